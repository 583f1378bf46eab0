"""``segcal evaluate --nnunet-regions``: nnU-Net region-based predictions (one sigmoid channel per region of the
prediction folder's ``dataset.json``) scored as overlapping regions against multi-hot targets built from the
label map, with hand-computed Dice on an x != y != z volume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from _eval_data import affine_for
from segcal.cli import app
from segcal.evaluation import EvalConfig, run_evaluation
from segcal.io import CaseError
from segcal.io.nnunet import read_nnunet_regions

runner = CliRunner()
LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
SHAPE = (6, 5, 4)  # x, y, z


def _case() -> tuple[np.ndarray, np.ndarray]:
    """Label ``(x, y, z)`` (WT 24 voxels, TC 8, ET 1) and sigmoid region probabilities ``(3, x, y, z)``."""
    label = np.zeros(SHAPE, np.int16)
    label[0:4, 0:3, 0:2] = 1
    label[1:3, 1:3, 0:2] = 2
    label[1, 1, 0] = 3
    wt = np.where(label > 0, 0.8, 0.1)
    wt[0, 0:2, 0:2] = 0.3  # 4 false negatives
    wt[5, 0:3, 0:2] = 0.7  # 6 false positives: TP 20, Dice 40 / 50
    tc = np.where(label >= 2, 0.9, 0.1)
    tc[4:6, 3:5, 2:4] = 0.6  # 8 false positives: TP 8, Dice 16 / 24
    et = np.full(SHAPE, 0.4)  # nothing above 0.5: Dice 0
    return np.stack([wt, tc, et]).astype(np.float32), label


def _write(root: Path, labels: dict = LABELS) -> tuple[Path, Path]:
    pred, lab = root / "pred", root / "labelsTr"
    pred.mkdir()
    lab.mkdir()
    (pred / "plans.json").write_text("{}")
    (pred / "dataset.json").write_text(json.dumps({"labels": labels, "regions_class_order": [1, 2, 3]}))
    probs, label = _case()
    np.savez_compressed(pred / "case000.npz", probabilities=probs.transpose(0, 3, 2, 1))  # (C, z, y, x)
    nib.save(nib.Nifti1Image(label, affine_for((1.0, 1.0, 1.0))), lab / "case000.nii.gz")
    return pred, lab


def test_region_based_predictions_give_the_dice_of_each_region(tmp_path: Path) -> None:
    pred, lab = _write(tmp_path)
    args = ["evaluate", str(pred), str(lab), "-o", str(tmp_path / "out"), "--bins", "10", "--workers", "0"]
    r = runner.invoke(app, [*args, "--no-report", "--no-hd95", "--nnunet-regions"])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "out" / "cases.csv") as fh:
        rows = {row["class"]: row for row in csv.DictReader(fh)}
    assert set(rows) == {"whole tumor", "tumor core", "enhancing tumor"}
    assert float(rows["whole tumor"]["dice"]) == pytest.approx(40 / 50)
    assert float(rows["tumor core"]["dice"]) == pytest.approx(16 / 24)
    assert float(rows["enhancing tumor"]["dice"]) == pytest.approx(0.0)
    assert float(rows["whole tumor"]["precision"]) == pytest.approx(20 / 26)
    assert float(rows["whole tumor"]["recall"]) == pytest.approx(20 / 24)
    # ET: every voxel has p = 0.4, one in 120 is ET: one bin, |0.4 - 1/120|
    assert float(rows["enhancing tumor"]["ece"]) == pytest.approx(0.4 - 1 / 120, rel=1e-5)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["config"]["regions"] == [[1, 2, 3], [2, 3], [3]]
    # without the option the region-based dataset.json is refused, and the message names the option
    r = runner.invoke(app, [*args[:4], str(tmp_path / "o2"), *args[5:], "--no-report", "--no-hd95"])
    assert r.exit_code == 1 and "--nnunet-regions" in " ".join(r.output.split())


def test_a_channel_count_that_is_not_the_region_count_fails_the_case(tmp_path: Path) -> None:
    pred, lab = _write(tmp_path, {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3]})
    cfg = EvalConfig(fmt="nnunet", num_bins=10, hd95=False, nnunet_regions=True)
    res = run_evaluation(pred, lab, tmp_path / "out", cfg, workers=0, progress=False)
    (failed,) = res.summary["failed"]
    assert "3 prediction channels but 2 regions" in failed["error"] and "case000.npz" in failed["error"]


def test_read_nnunet_regions(tmp_path: Path) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": LABELS}))
    assert read_nnunet_regions(path) == (
        ("whole tumor", "tumor core", "enhancing tumor"), ((1, 2, 3), (2, 3), (3,))
    )
    path.write_text(json.dumps({"labels": {"background": 0, "GM": 1}}))
    with pytest.raises(CaseError, match="not a region-based dataset"):
        read_nnunet_regions(path)
    path.write_text(json.dumps({"labels": {**LABELS, "ignore": 4}}))  # the ignore label is no region
    assert read_nnunet_regions(path)[1] == ((1, 2, 3), (2, 3), (3,))
    path.write_text(json.dumps({"labels": {**LABELS, "ignore": 3}}))
    with pytest.raises(CaseError, match="ignore"):
        read_nnunet_regions(path)
