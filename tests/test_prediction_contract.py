"""The prediction-file contract: every prediction file says whether it holds probabilities or logits, and
`segcal calibrate` uses it (converting probabilities with a stated method), refuses what it cannot tell, and
never calibrates its own output again."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from _helpers import invoke_cli
from posthoc_helpers import phantom
from segcal.io import CaseError, FolderInfo, read_folder_info, read_prediction, write_folder_info
from segcal.io.nifti import write_nifti_probabilities
from segcal.posthoc import TemperatureScaling
from segcal.posthoc.folders import (
    PROB_EPS,
    FolderVolumes,
    check_prediction_values,
    probabilities_to_logits,
    read_logits,
    saturated_voxels,
)

SHAPE = (24, 24)


@pytest.fixture(scope="module")
def overconfident() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validation logits twice too confident (``T`` near 2), their labels, and test logits."""
    zv, yv = phantom(n=4, c=3, shape=SHAPE, seed=70)
    zt, _ = phantom(n=2, c=3, shape=SHAPE, seed=71)
    return zv * 2, yv, zt * 2


def _labels(folder: Path, y: torch.Tensor) -> Path:
    folder.mkdir()
    for i in range(y.shape[0]):
        np.save(folder / f"case{i}.npy", y[i].numpy().astype(np.int16))
    return folder


def _npz(folder: Path, **arrays: torch.Tensor) -> Path:
    folder.mkdir()
    n = next(iter(arrays.values())).shape[0]
    for i in range(n):
        np.savez(folder / f"case{i}.npz", **{k: v[i].numpy() for k, v in arrays.items()})
    return folder


def _calibrate(val: Path, lab: Path, apply: Path, out: Path, *extra: str):
    args = ["calibrate", "--val-pred", str(val), "--val-labels", str(lab), "--apply-to", str(apply), "-o", str(out)]
    return invoke_cli([*args, "--max-voxels", "0", *extra])


def _text(res) -> str:
    return " ".join(res.output.split())


def test_npz_probabilities_are_not_read_as_logits(tmp_path, overconfident) -> None:
    """Regression: the demo's `.npz` probability files were read as logits (T = 0.22 instead of about 2)."""
    zv, yv, zt = overconfident
    val = _npz(tmp_path / "val", probabilities=torch.softmax(zv, 1))
    test = _npz(tmp_path / "test", probabilities=torch.softmax(zt, 1))
    lab = _labels(tmp_path / "lab", yv)
    res = _calibrate(val, lab, test, tmp_path / "out", "--save-calibrator", str(tmp_path / "cal.pt"))
    assert res.exit_code == 0, res.output
    from segcal.posthoc import load_calibrator

    t_cli = load_calibrator(tmp_path / "cal.pt").temperature_
    t_logits = TemperatureScaling().fit(zv, yv).temperature_
    t_logp = TemperatureScaling().fit(torch.log(torch.softmax(zv, 1).clamp_min(PROB_EPS)), yv).temperature_
    assert t_cli == pytest.approx(t_logp, rel=1e-5)  # the stated conversion, log(clip(p, 1e-7))
    assert t_cli == pytest.approx(t_logits, rel=0.02)  # and it recovers the logits' temperature
    assert t_cli > 1.5


def test_npz_with_both_keys_fits_on_logits(tmp_path, overconfident) -> None:
    zv, yv, zt = overconfident
    val = _npz(tmp_path / "val", probabilities=torch.softmax(zv, 1), logits=zv)
    test = _npz(tmp_path / "test", probabilities=torch.softmax(zt, 1), logits=zt)
    lab = _labels(tmp_path / "lab", yv)
    res = _calibrate(val, lab, test, tmp_path / "out", "--save-calibrator", str(tmp_path / "cal.pt"))
    assert res.exit_code == 0, res.output
    from segcal.posthoc import load_calibrator

    t_cli = load_calibrator(tmp_path / "cal.pt").temperature_
    assert t_cli == pytest.approx(TemperatureScaling().fit(zv, yv).temperature_, rel=1e-5)
    assert "saturated validation voxels │ 0.00%" in res.output


def test_undeclared_logits_are_refused_and_can_be_declared(tmp_path, overconfident) -> None:
    zv, yv, zt = overconfident
    val, test = tmp_path / "val", tmp_path / "test"
    for folder, z in ((val, zv), (test, zt)):
        folder.mkdir()
        for i in range(z.shape[0]):
            np.save(folder / f"case{i}.npy", z[i].numpy())
    lab = _labels(tmp_path / "lab", yv)
    res = _calibrate(val, lab, test, tmp_path / "out")
    assert res.exit_code == 1
    text = _text(res)
    assert "case0.npy" in text and "cannot tell whether it holds probabilities or logits" in text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("case*"))
    # declared by the option ...
    save = ("--save-calibrator", str(tmp_path / "a.pt"))
    res = _calibrate(val, lab, test, tmp_path / "out1", "--pred-kind", "logits", *save)
    assert res.exit_code == 0, res.output
    # ... or by a sidecar
    for folder in (val, test):
        write_folder_info(folder, FolderInfo(kind="logits"))
    res = _calibrate(val, lab, test, tmp_path / "out2", "--save-calibrator", str(tmp_path / "b.pt"))
    assert res.exit_code == 0, res.output
    from segcal.posthoc import load_calibrator

    t_ref = TemperatureScaling().fit(zv, yv).temperature_
    assert load_calibrator(tmp_path / "a.pt").temperature_ == pytest.approx(t_ref, rel=1e-5)
    assert load_calibrator(tmp_path / "b.pt").temperature_ == pytest.approx(t_ref, rel=1e-5)


def test_declared_kind_is_never_overridden(tmp_path, overconfident) -> None:
    zv, yv, zt = overconfident
    val = _npz(tmp_path / "val", probabilities=torch.softmax(zv, 1))
    test = _npz(tmp_path / "test", probabilities=torch.softmax(zt, 1))
    lab = _labels(tmp_path / "lab", yv)
    res = _calibrate(val, lab, test, tmp_path / "out", "--pred-kind", "logits")
    assert res.exit_code == 1
    assert "case0.npz" in _text(res) and "a declared kind is never overridden" in _text(res)


def test_mislabelled_files_are_refused() -> None:
    """Logits that are a probability map, and probabilities that are not, are refused naming the file."""
    p = torch.softmax(torch.randn(3, 8, 8), 0).numpy()
    with pytest.raises(CaseError, match=r"declared as logits .* but its values are a probability map"):
        check_prediction_values(_pred(p, "logits", "its npz key 'logits'"), "x.npz")
    with pytest.raises(CaseError, match=r"declared as probabilities .* must hold probabilities"):
        check_prediction_values(_pred(p * 3 - 1, "probabilities", "x/segcal.json"), "x.npz")
    with pytest.raises(CaseError, match="NaN"):
        check_prediction_values(_pred(np.full((3, 2, 2), np.nan, np.float32), "logits", "--pred-kind logits"), "x")


def _pred(values: np.ndarray, kind: str, how: str | None):
    from segcal.io import Prediction

    return Prediction(values.astype(np.float32), kind, how)  # type: ignore[arg-type]


def test_nifti_kind_is_in_the_header(tmp_path) -> None:
    p = torch.softmax(torch.randn(3, 6, 5, 4), 0).numpy()
    path = write_nifti_probabilities(tmp_path / "a.nii.gz", np.log(p), np.eye(4), kind="logits")
    pred = read_prediction(path, "nifti")
    assert pred.kind == "logits" and "intent_name" in (pred.declared_by or "")
    np.testing.assert_allclose(pred.values, np.log(p), rtol=1e-6)
    # a NIfTI map from another tool declares nothing: probabilities assumed, then checked
    nib.save(nib.Nifti1Image(np.moveaxis(p, 0, -1), np.eye(4)), tmp_path / "b.nii.gz")
    pred = read_prediction(tmp_path / "b.nii.gz", "nifti")
    assert pred.kind == "probabilities" and pred.declared_by is None
    z, _, _ = read_logits(tmp_path / "b.nii.gz", "nifti")
    np.testing.assert_allclose(z, np.log(np.clip(p, PROB_EPS, None)), rtol=1e-6)


def test_calibrated_output_is_never_calibrated_again(tmp_path, overconfident) -> None:
    """Regression: calibrating the calibrated folder (or a copy of its files elsewhere) stacked a second
    calibration silently."""
    zv, yv, zt = overconfident
    val = _npz(tmp_path / "val", logits=zv)
    test = _npz(tmp_path / "test", logits=zt)
    lab = _labels(tmp_path / "lab", yv)
    out = tmp_path / "cal"
    res = _calibrate(val, lab, test, out)
    assert res.exit_code == 0, res.output
    info = read_folder_info(out)
    assert info.kind == "probabilities" and info.calibration is not None
    assert info.calibration["method"] == "ts" and info.calibration["temperature"] > 1.5
    res = _calibrate(val, lab, out, tmp_path / "twice")
    assert res.exit_code == 1 and "is already calibrated" in _text(res) and "case0.npz" in _text(res)
    # the files carry the mark themselves: copied into a folder without the sidecar, still refused
    copy = tmp_path / "copied"
    copy.mkdir()
    shutil.copy(out / "case0.npz", copy / "case0.npz")
    res = _calibrate(val, lab, copy, tmp_path / "twice2")
    assert res.exit_code == 1 and "is already calibrated (segcal calibrated: calibrate --method ts T=" in _text(res)
    # ... also as validation data
    res = _calibrate(copy, lab, test, tmp_path / "twice3")
    assert res.exit_code == 1 and "is already calibrated" in _text(res)


def test_calibrated_nifti_is_marked(tmp_path, overconfident) -> None:
    zv, yv, zt = overconfident
    val = _npz(tmp_path / "val", logits=zv)
    lab = _labels(tmp_path / "lab", yv)
    test = tmp_path / "test"
    test.mkdir()
    for i in range(zt.shape[0]):
        p = torch.softmax(zt[i], 0).numpy()[..., None]  # (C, X, Y, 1): a 2D slice as NIfTI
        write_nifti_probabilities(test / f"case{i}.nii.gz", p, np.eye(4))
    res = _calibrate(val, lab, test, tmp_path / "out")
    assert res.exit_code == 0, res.output
    pred = read_prediction(tmp_path / "out" / "case0.nii.gz", "nifti")
    assert pred.kind == "probabilities"
    assert (pred.calibration or "").startswith("segcal calibrated: calibrate --method ts")
    res = _calibrate(val, lab, tmp_path / "out", tmp_path / "again")
    assert res.exit_code == 1 and "is already calibrated" in _text(res)


def test_saturated_probabilities_warn(tmp_path, overconfident) -> None:
    zv, yv, zt = overconfident
    val = _npz(tmp_path / "val", probabilities=torch.softmax(zv * 10, 1))  # margins far above 16
    test = _npz(tmp_path / "test", probabilities=torch.softmax(zt, 1))
    lab = _labels(tmp_path / "lab", yv)
    res = _calibrate(val, lab, test, tmp_path / "out")
    assert res.exit_code == 0, res.output
    text = _text(res)
    assert "of the validation voxels are saturated" in text and "--save-logits" in text
    # no warning on unsaturated probabilities
    val2 = _npz(tmp_path / "val2", probabilities=torch.softmax(zv, 1))
    res = _calibrate(val2, lab, test, tmp_path / "out2")
    assert res.exit_code == 0 and "saturated (a class" not in _text(res)


def test_saturation_counts_and_conversion() -> None:
    p = np.array([[1.0, 0.5, 0.9999], [0.0, 0.5, 1e-4]], np.float32)  # (C=2, 3 voxels)
    assert saturated_voxels(p) == 1
    np.testing.assert_allclose(probabilities_to_logits(p)[:, 1], np.log([0.5, 0.5]), rtol=1e-6)
    q = np.array([[1e-9, 0.3, 1.0]], np.float32)  # one sigmoid channel
    assert saturated_voxels(q, "multilabel") == 2
    z = probabilities_to_logits(q, "multilabel")
    np.testing.assert_allclose(torch.sigmoid(torch.from_numpy(z)).numpy()[0, 1], 0.3, rtol=1e-6)


def test_folder_volumes_saturation_is_per_case(tmp_path) -> None:
    from segcal.io import CaseFiles

    (tmp_path / "p").mkdir()
    (tmp_path / "l").mkdir()
    p = np.zeros((2, 4, 4), np.float32)
    p[0] = 1.0  # every voxel saturated
    np.savez(tmp_path / "p" / "a.npz", probabilities=p)
    np.save(tmp_path / "l" / "a.npy", np.zeros((4, 4), np.int16))
    vols = FolderVolumes([CaseFiles("a", [str(tmp_path / "p" / "a.npz")], str(tmp_path / "l" / "a.npy"))], "npy")
    for _ in range(3):  # iterated several times (aux conv epochs): counted once
        list(vols)
    assert vols.saturation == 1.0
