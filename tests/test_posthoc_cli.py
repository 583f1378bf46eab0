"""`segcal calibrate` on folders of .npy/.npz logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _helpers import invoke_cli as _invoke
from posthoc_helpers import phantom
from segcal.posthoc import TemperatureScaling, load_calibrator


def _write(folder, z, y=None, fmt="npy"):
    folder.mkdir()
    for i in range(z.shape[0]):
        if fmt == "npy":
            np.save(folder / f"case{i}.npy", z[i].numpy())
        else:
            np.savez(folder / f"case{i}.npz", logits=z[i].numpy())
    if y is not None:
        lab = folder.parent / (folder.name + "_lab")
        lab.mkdir()
        for i in range(y.shape[0]):
            np.save(lab / f"case{i}.npy", y[i].numpy().astype(np.int16))
        return lab
    return None


@pytest.mark.parametrize("method", ["ts", "vector", "aux", "temperature"])
def test_calibrate_cli(tmp_path, method) -> None:
    zv, yv = phantom(n=4, c=3, shape=(24, 24), seed=40)
    zt, _ = phantom(n=2, c=3, shape=(24, 24), seed=41)
    lab = _write(tmp_path / "val", zv * 2, yv)
    _write(tmp_path / "test", zt * 2, fmt="npz")
    out = tmp_path / "out"
    args = [
        "calibrate",
        "--method",
        method,
        "--val-pred",
        str(tmp_path / "val"),
        "--val-labels",
        str(lab),
        "--apply-to",
        str(tmp_path / "test"),
        "-o",
        str(out),
        "--epochs",
        "3",
        "--max-voxels",
        "0",
        "--save-calibrator",
        str(tmp_path / "cal.pt"),
        "--pred-kind",
        "logits",  # the validation .npy files cannot say it themselves
    ]
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["case0.npz", "case1.npz", "segcal.json"]
    with np.load(out / "case0.npz") as f:
        probs = f["probabilities"]
    assert probs.shape == (3, 24, 24)
    assert np.allclose(probs.sum(0), 1, atol=1e-5)
    cal = load_calibrator(tmp_path / "cal.pt")
    assert np.allclose(cal.transform(zt[:1] * 2)[0].numpy(), probs, atol=1e-6)
    if method in ("ts", "temperature"):  # "temperature", the name a saved calibrator records, is ts
        ref = TemperatureScaling().fit(zv * 2, yv).temperature_
        assert cal.temperature_ == pytest.approx(ref, rel=1e-6)
        assert json.loads((out / "segcal.json").read_text())["calibration"]["method"] == "ts"


def test_calibrate_cli_errors(tmp_path) -> None:
    zv, yv = phantom(n=2, c=3, shape=(16, 16), seed=42)
    lab = _write(tmp_path / "val", zv, yv)
    np.save(lab / "case1.npy", np.zeros((8, 8), dtype=np.int16))  # wrong spatial shape
    _write(tmp_path / "test", zv)
    res = _invoke(
        [
            "calibrate",
            "--val-pred",
            str(tmp_path / "val"),
            "--val-labels",
            str(lab),
            "--apply-to",
            str(tmp_path / "test"),
            "-o",
            str(tmp_path / "o"),
            "--pred-kind",
            "logits",
        ]
    )
    assert res.exit_code != 0
    assert "case1" in str(res.exception) + res.output
    res = _invoke(
        [
            "calibrate",
            "--val-pred",
            str(tmp_path / "nope"),
            "--val-labels",
            str(lab),
            "--apply-to",
            str(tmp_path / "test"),
            "-o",
            str(tmp_path / "o"),
        ]
    )
    assert res.exit_code != 0
