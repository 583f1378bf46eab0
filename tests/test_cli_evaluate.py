"""``segcal evaluate`` / ``segcal compare`` end to end, including a SIGKILL fault-injection resume test."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import segcal.functional as F
from _eval_data import affine_for, write_nifti_dataset, write_nnunet_dataset
from _helpers import SRC
from segcal.cli import app

runner = CliRunner()
def _rows(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(out / "cases.csv") as fh:
        return {(r["case_id"], r["class"]): r for r in csv.DictReader(fh)}


def test_evaluate_nifti_known_answers(tmp_path):
    pred, lab, data = write_nifti_dataset(tmp_path, 3)
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        ["evaluate", str(pred), str(lab), "-o", str(out), "--bins", "10", "--workers", "0", "--no-report"],
    )
    assert r.exit_code == 0, r.output
    assert "ok, 0 failed" in r.output
    rows = _rows(out)
    assert len(rows) == 3 * 3
    for cid, (probs, label) in data.items():
        p, y = torch.from_numpy(probs)[None], torch.from_numpy(label.astype(np.int64))[None]
        ce = F.calibration_errors(F.bin_statistics(p, y, 10, include_background=False))
        hd = F.hausdorff_distance_95(p, y, spacing=(1.0, 1.5, 2.5))
        for k in range(3):
            assert float(rows[(cid, f"class_{k + 1}")]["ace"]) == pytest.approx(
                float(ce["ace"][0, k]), rel=1e-12
            )
            assert float(rows[(cid, f"class_{k + 1}")]["hd95"]) == pytest.approx(float(hd[0, k]), rel=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_ok"] == 3 and set(summary["macro"]["ace"]) == {"class_1", "class_2", "class_3", "mean"}
    # rerun: resumes, recomputes nothing
    r = runner.invoke(
        app,
        ["evaluate", str(pred), str(lab), "-o", str(out), "--bins", "10", "--workers", "0", "--no-report"],
    )
    assert r.exit_code == 0 and "3 resumed" in r.output
    # a different configuration in the same OUT is refused
    r = runner.invoke(
        app, ["evaluate", str(pred), str(lab), "-o", str(out), "--bins", "5", "--workers", "0", "--no-report"]
    )
    assert r.exit_code == 1 and "different configuration" in r.output


def test_evaluate_nnunet_brats_regions_bbox(tmp_path):
    pred, lab, data = write_nnunet_dataset(tmp_path, 2, shape=(11, 9, 7))
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        [
            "evaluate",
            str(pred),
            str(lab),
            "-o",
            str(out),
            "--regions",
            "ET=3;TC=1,3;WT=1,2,3",
            "--region",
            "bbox",
            "--bbox-margin-mm",
            "2,3,5",
            "--workers",
            "0",
            "--no-hd95",
            "--no-report",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = _rows(out)
    regions = [[3], [1, 3], [1, 2, 3]]
    for cid, (probs, label) in data.items():
        p, y = torch.from_numpy(probs)[None], torch.from_numpy(label.astype(np.int64))[None]
        from segcal.functional.regions import dilated_bbox_mask

        m = dilated_bbox_mask(y[0], (1.0, 1.5, 2.5), (2.0, 3.0, 5.0))[None]
        st = F.bin_statistics(p, y, 20, regions=regions, mask=m)
        dice = F.overlap_scores(F.confusion_counts(p, y, regions=regions, mask=m))["dice"]
        ce = F.calibration_errors(st)
        for k, name in enumerate(["ET", "TC", "WT"]):
            assert float(rows[(cid, name)]["dice"]) == pytest.approx(float(dice[0, k]), rel=1e-12)
            assert float(rows[(cid, name)]["ece"]) == pytest.approx(float(ce["ece"][0, k]), rel=1e-6)
            assert float(rows[(cid, name)]["n_voxels"]) == float(m.sum())
    bins = np.load(out / "bins.npz", allow_pickle=False)
    assert bins["class_names"].tolist() == ["ET", "TC", "WT"] and bins["bin_stats"].shape == (2, 3, 3, 20)


def test_failed_cases_give_exit_code_2(tmp_path):
    pred, lab, _ = write_nifti_dataset(tmp_path, 3, shape=(6, 5, 4))
    (pred / "case001.nii.gz").write_bytes(b"corrupt")
    r = runner.invoke(
        app,
        [
            "evaluate",
            str(pred),
            str(lab),
            "-o",
            str(tmp_path / "o"),
            "--workers",
            "0",
            "--no-hd95",
            "--no-report",
        ],
    )
    assert r.exit_code == 2
    assert "case001" in r.output and "cannot read NIfTI" in r.output


def test_compare_cli(tmp_path):
    pred, lab, data = write_nifti_dataset(tmp_path, 6, shape=(6, 5, 4))
    flat = tmp_path / "flat"
    flat.mkdir()
    for cid, (probs, _) in data.items():
        q = 0.5 * probs + 0.125
        nib.save(nib.Nifti1Image(np.moveaxis(q, 0, -1), affine_for((1.0, 1.5, 2.5))), flat / f"{cid}.nii.gz")
    for name, folder in (("a", pred), ("b", flat)):
        r = runner.invoke(
            app,
            [
                "evaluate",
                str(folder),
                str(lab),
                "-o",
                str(tmp_path / name),
                "--workers",
                "0",
                "--no-hd95",
                "--no-report",
            ],
        )
        assert r.exit_code == 0, r.output
    r = runner.invoke(
        app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "cmp"), "--no-report"]
    )
    assert r.exit_code == 0, r.output
    assert "%" in r.output
    comp = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert {row["metric"] for row in comp["rows"]} >= {"ace", "dice", "nll"}
    assert (tmp_path / "cmp" / "comparison.csv").exists()
    (tmp_path / "b" / "cases.csv").write_text(
        "\n".join(ln for ln in (tmp_path / "b" / "cases.csv").read_text().splitlines() if "case002" not in ln)
    )
    r = runner.invoke(
        app,
        ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "cmp2"), "--no-report"],
    )
    assert r.exit_code == 1 and "different case sets" in r.output
    r = runner.invoke(
        app,
        [
            "compare",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "-o",
            str(tmp_path / "cmp2"),
            "--intersection",
            "--no-report",
        ],
    )
    assert r.exit_code == 0


def _count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0


@pytest.mark.slow
def test_sigkill_midway_then_resume_is_loss_free(tmp_path):
    pred, lab, _ = write_nifti_dataset(tmp_path, 30, shape=(6, 5, 4))
    out = tmp_path / "killed"
    args = ["evaluate", str(pred), str(lab), "-o", str(out), "--workers", "0", "--no-hd95", "--no-report"]
    env = {**os.environ, "PYTHONPATH": SRC, "FAULT_CASE_DELAY": "0.15"}
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_faulty_cli.py")), *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = out / "results.sqlite"
    deadline = time.time() + 120
    while _count(db) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = _count(db)
    assert 5 <= n_before < 30, n_before
    # rerun the same command (in-process): resumes
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"{n_before} resumed" in r.output
    with sqlite3.connect(db) as conn:
        ids = [row[0] for row in conn.execute("SELECT case_id FROM cases")]
        counts = [row[0] for row in conn.execute("SELECT n_computed FROM cases")]
    assert len(ids) == len(set(ids)) == 30 and set(counts) == {1}  # nothing lost, duplicated or recomputed
    ref = tmp_path / "uninterrupted"
    r = runner.invoke(
        app, ["evaluate", str(pred), str(lab), "-o", str(ref), "--workers", "0", "--no-hd95", "--no-report"]
    )
    assert r.exit_code == 0
    assert (ref / "cases.csv").read_text() == (out / "cases.csv").read_text()
    a, b = np.load(ref / "bins.npz"), np.load(out / "bins.npz")
    np.testing.assert_array_equal(a["bin_stats"], b["bin_stats"])
    np.testing.assert_array_equal(a["case_ids"], b["case_ids"])
    sa = json.loads((ref / "summary.json").read_text())
    sb = json.loads((out / "summary.json").read_text())
    assert sa["macro"] == sb["macro"] and sa["pooled"] == sb["pooled"]
