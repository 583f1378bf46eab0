"""Readers with geometry: NIfTI (4D / per-class), NumPy, nnU-Net axis order, matching, clear errors."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from _eval_data import affine_for, make_case, write_nifti_dataset, write_nnunet_dataset
from segcal.io import (
    CaseError,
    CaseFiles,
    case_id_from_path,
    detect_format,
    load_case,
    match_cases,
    read_label,
    read_nnunet_probabilities,
    read_numpy,
)


def test_case_id_strips_extensions_and_channel_suffix():
    assert case_id_from_path("a/BraTS_001_0000.nii.gz") == ("BraTS_001", 0)
    assert case_id_from_path("x/case7.npz") == ("case7", None)
    assert case_id_from_path("BraTS2021_00000.nii") == ("BraTS2021_00000", None)


def test_nifti_4d_roundtrip_keeps_geometry(tmp_path):
    pred, lab, data = write_nifti_dataset(tmp_path, 2, spacing=(0.8, 1.2, 3.0))
    cases, unmatched = match_cases(pred, lab)
    assert [c.case_id for c in cases] == ["case000", "case001"] and unmatched == {}
    case = load_case(cases[0], "nifti")
    probs, label = data["case000"]
    np.testing.assert_array_equal(case.probabilities, probs)
    np.testing.assert_array_equal(case.label, label)
    assert case.spacing == pytest.approx((0.8, 1.2, 3.0))
    np.testing.assert_allclose(case.affine, affine_for((0.8, 1.2, 3.0)))


def test_nifti_one_file_per_class(tmp_path):
    rng = np.random.default_rng(1)
    probs, label = make_case(rng, (6, 5, 4), 3)
    (tmp_path / "p").mkdir()
    (tmp_path / "l").mkdir()
    aff = affine_for((1.0, 1.0, 2.0))
    for k in range(3):
        nib.save(nib.Nifti1Image(probs[k], aff), tmp_path / "p" / f"img_{k:04d}.nii.gz")
    nib.save(nib.Nifti1Image(label, aff), tmp_path / "l" / "img.nii.gz")
    assert detect_format(tmp_path / "p") == "nifti"
    cases, unmatched = match_cases(tmp_path / "p", tmp_path / "l")
    assert len(cases) == 1 and len(cases[0].prediction) == 3 and unmatched == {}
    case = load_case(cases[0], "nifti")
    np.testing.assert_array_equal(case.probabilities, probs)


def test_nnunet_axes_are_transposed_for_asymmetric_volume(tmp_path):
    pred, lab, data = write_nnunet_dataset(tmp_path, 1, shape=(9, 7, 5))
    assert detect_format(pred) == "nnunet"
    raw = np.load(pred / "case000.npz")["probabilities"]
    assert raw.shape == (4, 5, 7, 9)  # (C, z, y, x) as nnU-Net writes it
    cases, _ = match_cases(pred, lab)
    case = load_case(cases[0], "nnunet")
    probs, label = data["case000"]
    np.testing.assert_array_equal(case.label, label)
    assert case.probabilities.shape == (4, 9, 7, 5)
    np.testing.assert_array_equal(case.probabilities, probs)
    assert case.probabilities[:, 8, 6, 4].tolist() == raw[:, 4, 6, 8].tolist()
    assert case.spacing == pytest.approx((1.0, 1.5, 2.5))


def test_unmatched_files_are_reported(tmp_path):
    pred, lab, _ = write_nifti_dataset(tmp_path, 3)
    (pred / "case001.nii.gz").unlink()
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 8, 4), np.float32), np.eye(4)), pred / "extra.nii.gz")
    cases, unmatched = match_cases(pred, lab)
    assert [c.case_id for c in cases] == ["case000", "case002"]
    assert unmatched["prediction"][0].endswith("extra.nii.gz")
    assert unmatched["label"][0].endswith("case001.nii.gz")


def test_spacing_mismatch_names_both_files(tmp_path):
    pred, lab, data = write_nifti_dataset(tmp_path, 1)
    _, label = data["case000"]
    nib.save(nib.Nifti1Image(label, affine_for((2.0, 1.5, 2.5))), lab / "case000.nii.gz")
    cases, _ = match_cases(pred, lab)
    with pytest.raises(CaseError, match="spacing/affine mismatch") as info:
        load_case(cases[0], "nifti")
    assert "case000.nii.gz" in str(info.value) and str(lab / "case000.nii.gz") in str(info.value)
    assert info.value.path == pred / "case000.nii.gz"


def test_numpy_reader_errors(tmp_path):
    with pytest.raises(CaseError, match="file not found"):
        read_numpy(tmp_path / "missing.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CaseError, match="pickled"):
        read_numpy(tmp_path / "obj.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros(2), b=np.zeros(2))
    with pytest.raises(CaseError, match="exactly one"):
        read_numpy(tmp_path / "two.npz")
    with pytest.raises(CaseError, match="no key 'c'"):
        read_numpy(tmp_path / "two.npz", "c")
    np.save(tmp_path / "t.npy", np.zeros((50, 50)))
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CaseError, match="corrupt or truncated"):
        read_numpy(tmp_path / "t.npy")


def test_nnunet_errors(tmp_path):
    np.savez(tmp_path / "a.npz", probs=np.zeros((2, 3, 3, 3), np.float32))
    with pytest.raises(CaseError, match="no key 'probabilities'"):
        read_nnunet_probabilities(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", probabilities=np.zeros((2, 3, 3, 3), np.int32))
    with pytest.raises(CaseError, match="floating-point"):
        read_nnunet_probabilities(tmp_path / "b.npz")
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CaseError, match=r"c\.npz: unreadable nnU-Net file"):
        read_nnunet_probabilities(tmp_path / "c.npz")


def test_label_errors(tmp_path):
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)), tmp_path / "soft.nii.gz")
    with pytest.raises(CaseError, match="integer class indices"):
        read_label(tmp_path / "soft.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), tmp_path / "t.nii.gz")
    raw = gzip.decompress((tmp_path / "t.nii.gz").read_bytes())
    (tmp_path / "t.nii.gz").write_bytes(gzip.compress(raw[: len(raw) - 300]))
    with pytest.raises(CaseError, match="cannot read NIfTI"):
        read_label(tmp_path / "t.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"junk")
    with pytest.raises(CaseError, match=r"junk\.nii\.gz"):
        read_label(tmp_path / "junk.nii.gz")


def test_shape_mismatch_hint_for_nnunet(tmp_path):
    pred, lab, _ = write_nnunet_dataset(tmp_path, 1, shape=(9, 7, 5))
    np.savez(pred / "case000.npz", probabilities=np.full((4, 9, 7, 5), 0.25, np.float32))  # forgot (z, y, x)
    (pred / "plans.json").write_text(json.dumps({}))
    with pytest.raises(CaseError, match=r"shape mismatch.*\(C, z, y, x\)"):
        load_case(CaseFiles("case000", [str(pred / "case000.npz")], str(lab / "case000.nii.gz")), "nnunet")
