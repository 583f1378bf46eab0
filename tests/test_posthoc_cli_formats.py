"""`segcal calibrate` on NIfTI probability folders and nnU-Net v2 prediction folders."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from posthoc_helpers import smooth_logits
from segcal.cli import app
from segcal.posthoc.folders import probabilities_to_logits

SHAPE = (12, 10, 8)  # (x, y, z)
C = 3
AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.9, 0, 5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])


def _invoke(args: list[str]):
    if len(app.registered_commands) + len(app.registered_groups) == 1:
        args = args[1:]
    return CliRunner().invoke(app, args)


def _cases(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Over-confident probabilities ``softmax(3 z)`` (n, C, x, y, z) and labels sampled from ``softmax(z)``."""
    z = smooth_logits(n, C, SHAPE, seed)
    p_true = torch.softmax(z, 1).movedim(1, -1).reshape(-1, C)
    g = torch.Generator().manual_seed(seed + 7)
    y = torch.multinomial(p_true, 1, generator=g).reshape(n, *SHAPE)
    return torch.softmax(3 * z, 1).numpy().astype(np.float32), y.numpy().astype(np.int16)


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    """Mean NLL of (n, C, *S) probabilities against (n, *S) labels."""
    picked = np.take_along_axis(p, y[:, None].astype(np.int64), 1)
    return float(-np.log(np.clip(picked, 1e-7, None)).mean())


def _write_labels(folder, y) -> None:
    folder.mkdir()
    for i in range(y.shape[0]):
        nib.Nifti1Image(y[i], AFFINE).to_filename(str(folder / f"case{i}.nii.gz"))


def _write_nifti(folder, p) -> None:
    folder.mkdir()
    for i in range(p.shape[0]):
        img = nib.Nifti1Image(np.moveaxis(p[i], 0, -1), AFFINE)
        img.header.set_xyzt_units("mm", "sec")
        img.to_filename(str(folder / f"case{i}.nii.gz"))


def _write_nnunet(folder, p) -> None:
    folder.mkdir()
    for i in range(p.shape[0]):  # nnU-Net stores (C, z, y, x)
        np.savez_compressed(folder / f"case{i}.npz", probabilities=np.transpose(p[i], (0, 3, 2, 1)))
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}}))
    (folder / "plans.json").write_text("{}")


def _args(val, lab, test, out, *extra: str) -> list[str]:
    return [
        "calibrate", "--method", "ts", "--val-pred", str(val), "--val-labels", str(lab),
        "--apply-to", str(test), "-o", str(out), "--max-voxels", "0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data():
    pv, yv = _cases(3, seed=50)
    pt, yt = _cases(2, seed=51)
    return pv, yv, pt, yt


def test_probabilities_to_logits_roundtrip() -> None:
    p, _ = _cases(1, seed=3)
    back = torch.softmax(torch.from_numpy(probabilities_to_logits(p)), 1).numpy()
    assert np.allclose(back, np.clip(p, 1e-7, None) / np.clip(p, 1e-7, None).sum(1, keepdims=True), atol=1e-6)
    assert np.all(np.isfinite(probabilities_to_logits(np.zeros((2, 3), np.float32))))


def test_calibrate_nifti(tmp_path, data) -> None:
    pv, yv, pt, yt = data
    _write_nifti(tmp_path / "val", pv)
    _write_labels(tmp_path / "lab", yv)
    _write_nifti(tmp_path / "test", pt)
    out = tmp_path / "out"
    res = _invoke(_args(tmp_path / "val", tmp_path / "lab", tmp_path / "test", out))
    assert res.exit_code == 0, res.output
    assert "nifti" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["case0.nii.gz", "case1.nii.gz", "segcal.json"]
    probs = []
    for i in range(2):
        img = nib.load(str(out / f"case{i}.nii.gz"))
        src = nib.load(str(tmp_path / "test" / f"case{i}.nii.gz"))
        data_i = np.asarray(img.dataobj)
        assert data_i.dtype == np.float32 and data_i.shape == (*SHAPE, C)
        assert np.allclose(img.affine, AFFINE) and np.allclose(img.header.get_zooms()[:3], (0.8, 0.9, 2.5))
        assert img.header.get_xyzt_units() == src.header.get_xyzt_units()
        assert np.allclose(data_i.sum(-1), 1, atol=1e-5)
        probs.append(np.moveaxis(data_i, -1, 0))
    probs = np.stack(probs)
    # sharper than the truth → T > 1 softens; argmax unchanged, NLL on the applied set goes down
    assert np.array_equal(probs.argmax(1), pt.argmax(1))
    assert _nll(probs, yt) < _nll(pt, yt) - 0.05


def test_calibrate_nnunet(tmp_path, data) -> None:
    pv, yv, pt, yt = data
    _write_nnunet(tmp_path / "val", pv)
    _write_labels(tmp_path / "lab", yv)
    _write_nnunet(tmp_path / "test", pt)
    (tmp_path / "test" / "case0.pkl").write_bytes(b"not a pickle, must never be read")
    out = tmp_path / "out"
    res = _invoke(_args(tmp_path / "val", tmp_path / "lab", tmp_path / "test", out, "--save-calibrator",
                        str(tmp_path / "cal.pt")))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "nnunet" in res.output
    written = sorted(p.name for p in out.iterdir())
    assert written == ["case0.npz", "case0.pkl", "case1.npz", "dataset.json", "plans.json", "segcal.json"]
    # nnU-Net's properties file is copied byte for byte (never unpickled: these bytes are no pickle)
    assert (out / "case0.pkl").read_bytes() == (tmp_path / "test" / "case0.pkl").read_bytes()
    probs = []
    for i in range(2):
        with np.load(out / f"case{i}.npz", allow_pickle=False) as f:
            assert f.files == ["probabilities", "segcal_calibration"]
            q = f["probabilities"]
        assert q.dtype == np.float32 and q.shape == (C, *SHAPE[::-1])  # (C, z, y, x)
        assert np.allclose(q.sum(0), 1, atol=1e-5)
        probs.append(np.transpose(q, (0, 3, 2, 1)))
    probs = np.stack(probs)
    assert np.array_equal(probs.argmax(1), pt.argmax(1))
    assert _nll(probs, yt) < _nll(pt, yt) - 0.05
    # the output folder is itself an nnU-Net folder that segcal.io reads back
    from segcal.io import detect_format

    assert detect_format(out) == "nnunet"
    # same temperature as fitting TemperatureScaling on log-probabilities directly
    from segcal.posthoc import TemperatureScaling, load_calibrator

    ref = TemperatureScaling().fit(torch.from_numpy(probabilities_to_logits(pv)), torch.from_numpy(yv).long())
    assert load_calibrator(tmp_path / "cal.pt").temperature_ == pytest.approx(ref.temperature_, rel=1e-4)


def test_mixed_formats_nnunet_val_nifti_apply(tmp_path, data) -> None:
    pv, yv, pt, _ = data
    _write_nnunet(tmp_path / "val", pv)
    _write_labels(tmp_path / "lab", yv)
    _write_nifti(tmp_path / "test", pt)
    res = _invoke(_args(tmp_path / "val", tmp_path / "lab", tmp_path / "test", tmp_path / "out"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "case0.nii.gz").is_file()


@pytest.mark.parametrize("where", ["val", "test"])
def test_corrupt_file_names_the_file(tmp_path, data, where) -> None:
    pv, yv, pt, _ = data
    _write_nifti(tmp_path / "val", pv)
    _write_labels(tmp_path / "lab", yv)
    _write_nifti(tmp_path / "test", pt)
    bad = tmp_path / where / "case1.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    res = _invoke(_args(tmp_path / "val", tmp_path / "lab", tmp_path / "test", tmp_path / "out"))
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert "case1.nii.gz" in text and "corrupt" in text


def test_corrupt_nnunet_and_shape_mismatch(tmp_path, data) -> None:
    pv, yv, pt, _ = data
    _write_nnunet(tmp_path / "val", pv)
    _write_labels(tmp_path / "lab", yv)
    _write_nnunet(tmp_path / "test", pt)
    (tmp_path / "test" / "case0.npz").write_bytes(b"PK\x03\x04garbage")
    res = _invoke(_args(tmp_path / "val", tmp_path / "lab", tmp_path / "test", tmp_path / "out"))
    assert res.exit_code == 1
    assert "case0.npz" in " ".join(res.output.split())
    # a validation file in (x, y, z) order instead of nnU-Net's (C, z, y, x) is refused with a hint
    np.savez_compressed(tmp_path / "val" / "case2.npz", probabilities=pv[2])
    res = _invoke(_args(tmp_path / "val", tmp_path / "lab", tmp_path / "val", tmp_path / "out2"))
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert "case2.npz" in text and "shape mismatch" in text
