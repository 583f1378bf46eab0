"""``segcal evaluate`` on an ensemble of nnU-Net folds (``--ensemble-with``, ``run_evaluation(ensemble_dirs=)``):
each case is scored on the voxel-wise mean of the folds' probability maps; every member file is an input of
the case (a changed one recomputes it), the member folders are configuration, and a case missing in a fold
or a member of another shape or kind fails naming that fold's file."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _eval_data import affine_for, make_case
from segcal.cli import app
from segcal.evaluation import ConfigMismatchError, EvalConfig, run_evaluation
from segcal.functional.scoring import case_statistics, image_metrics

runner = CliRunner()
SHAPE = (11, 9, 7)  # x != y != z: the nnU-Net axis reversal must be undone for every member
SPACING = (0.8, 1.2, 2.0)
NAMES = ("background", "CSF", "GM", "WM")
N_FOLDS = 5
CFG = EvalConfig(fmt="nnunet", num_bins=10)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(0, keepdims=True))
    return (e / e.sum(0, keepdims=True)).astype(np.float32)


def _write_fold(folder: Path, cid: str, probs: np.ndarray) -> None:
    """nnU-Net's ``case.npz``: key ``probabilities``, axes ``(C, z, y, x)``."""
    np.savez_compressed(folder / f"{cid}.npz", probabilities=probs.transpose(0, 3, 2, 1))


def _folds(root: Path, n_cases: int = 3) -> tuple[list[Path], Path, dict[str, tuple[list[np.ndarray], np.ndarray]]]:
    """Five fold folders of nnU-Net predictions of the same cases (each fold its own noise) and the labels."""
    rng = np.random.default_rng(7)
    folds = [root / f"fold_{k}" for k in range(N_FOLDS)]
    lab = root / "labelsTr"
    lab.mkdir(parents=True)
    for f in folds:
        f.mkdir(parents=True)
        (f / "plans.json").write_text(json.dumps({"dataset_name": "Dataset001_Test"}))
        (f / "dataset.json").write_text(json.dumps({"labels": {n: k for k, n in enumerate(NAMES)}}))
    data = {}
    for i in range(n_cases):
        cid = f"case{i:03d}"
        _, label = make_case(rng, SHAPE)
        onehot = np.moveaxis(np.eye(4, dtype=np.float32)[label], -1, 0)
        members = [_softmax(2.5 * onehot + rng.normal(0, 1.5, onehot.shape)) for _ in folds]
        for f, probs in zip(folds, members, strict=True):
            _write_fold(f, cid, probs)
        nib.save(nib.Nifti1Image(label, affine_for(SPACING)), lab / f"{cid}.nii.gz")
        data[cid] = (members, label)
    return folds, lab, data


def _by_hand(members: list[np.ndarray], label: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of the mean probability map, straight from the metric core: ``name -> (C,)`` or ``(1,)``."""
    mean = np.mean(np.stack([m.astype(np.float64) for m in members]), axis=0).astype(np.float32)
    stats = case_statistics(
        torch.from_numpy(mean)[None], torch.from_numpy(label.astype(np.int64))[None], 10, hd95=True, spacing=SPACING
    )
    return {k: v[0].numpy() for k, v in image_metrics(stats).items()}


def _rows(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(out / "cases.csv") as fh:
        return {(r["case_id"], r["class"]): r for r in csv.DictReader(fh)}


def _check_against_hand(out: Path, data: dict) -> None:
    rows = _rows(out)
    for cid, (members, label) in data.items():
        want = _by_hand(members, label)
        for k, name in enumerate(NAMES[1:]):
            r = rows[(cid, name)]
            for metric in ("dice", "iou", "ece", "ace", "mce", "brier", "hd95"):
                assert float(r[metric]) == pytest.approx(float(want[metric][k]), rel=1e-5, abs=1e-7), (cid, metric)
            for metric in ("nll", "top_label_ece", "top_label_ace"):
                assert float(r[metric]) == pytest.approx(float(want[metric][0]), rel=1e-5, abs=1e-7), (cid, metric)


def _evaluate(folds: list[Path], lab: Path, out: Path):  # type: ignore[no-untyped-def]
    args = ["evaluate", str(folds[0]), str(lab), "-o", str(out), "--bins", "10", "--workers", "0", "--no-report"]
    for f in folds[1:]:
        args += ["--ensemble-with", str(f)]
    return runner.invoke(app, args)


def test_five_folds_equal_the_average_by_hand(tmp_path: Path) -> None:
    folds, lab, data = _folds(tmp_path)
    res = run_evaluation(folds[0], lab, tmp_path / "api", CFG, ensemble_dirs=folds[1:], workers=0, progress=False)
    assert (res.n_ok, res.n_failed, res.unmatched) == (3, 0, {})
    _check_against_hand(tmp_path / "api", data)
    # the ensemble is not fold 0 alone
    single = _by_hand(data["case000"][0][:1], data["case000"][1])
    assert float(_rows(tmp_path / "api")[("case000", "CSF")]["ece"]) != pytest.approx(float(single["ece"][0]))
    # the command line gives the same numbers, and the member folders are in the stored configuration
    r = _evaluate(folds, lab, tmp_path / "cli")
    assert r.exit_code == 0, r.output
    _check_against_hand(tmp_path / "cli", data)
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["class_names"] == list(NAMES[1:])


def test_a_changed_member_file_recomputes_its_case(tmp_path: Path) -> None:
    folds, lab, data = _folds(tmp_path)
    out = tmp_path / "out"
    run_evaluation(folds[0], lab, out, CFG, ensemble_dirs=folds[1:], workers=0, progress=False)
    again = run_evaluation(folds[0], lab, out, CFG, ensemble_dirs=folds[1:], workers=0, progress=False)
    assert (again.n_computed, again.n_skipped) == (0, 3)
    # fold 3's prediction of case001 changes (a retrained fold): only that case is recomputed, on the new mean
    members, label = data["case001"]
    members[3] = _softmax(np.moveaxis(np.eye(4, dtype=np.float32)[label], -1, 0) * 6.0)
    path = folds[3] / "case001.npz"
    _write_fold(folds[3], "case001", members[3])
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    res = run_evaluation(folds[0], lab, out, CFG, ensemble_dirs=folds[1:], workers=0, progress=False)
    assert (res.stale, res.n_computed, res.n_skipped, res.n_ok) == (["case001"], 1, 2, 3)
    _check_against_hand(out, data)
    # other members are another configuration: refused, not mixed with the stored cases
    with pytest.raises(ConfigMismatchError, match="ensemble_dirs"):
        run_evaluation(folds[0], lab, out, CFG, ensemble_dirs=folds[1:4], workers=0, progress=False)
    # and the run without members keeps the configuration it always had (no ensemble key)
    plain = run_evaluation(folds[0], lab, tmp_path / "plain", CFG, workers=0, progress=False)
    assert plain.n_ok == 3 and "ensemble_dirs" not in plain.summary["config"]
    assert res.summary["config"]["ensemble_dirs"] == [str(f.resolve()) for f in folds[1:]]


def test_a_case_missing_in_one_fold_fails_naming_the_fold(tmp_path: Path) -> None:
    folds, lab, data = _folds(tmp_path)
    missing = folds[2] / "case001.npz"
    kept = missing.read_bytes()
    missing.unlink()
    r = _evaluate(folds, lab, tmp_path / "out")
    assert r.exit_code == 2, r.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (failed,) = summary["failed"]
    assert failed["case_id"] == "case001"
    assert str(missing) in failed["error"] and f"member {folds[2]}" in failed["error"]
    assert summary["n_ok"] == 2
    # the file appears (the fold finished): the case is recomputed, without --retry-failed
    missing.write_bytes(kept)
    r = _evaluate(folds, lab, tmp_path / "out")
    assert r.exit_code == 0, r.output
    _check_against_hand(tmp_path / "out", data)


def test_a_member_of_another_shape_fails_naming_its_file(tmp_path: Path) -> None:
    folds, lab, data = _folds(tmp_path, n_cases=2)
    members, _ = data["case000"]
    _write_fold(folds[4], "case000", members[4][:3] / members[4][:3].sum(0, keepdims=True))  # 3 classes
    res = run_evaluation(folds[0], lab, tmp_path / "out", CFG, ensemble_dirs=folds[1:], workers=0, progress=False)
    assert (res.n_ok, res.n_failed) == (1, 1)
    (failed,) = res.summary["failed"]
    assert str(folds[4] / "case000.npz") in failed["error"] and "same classes and shape" in failed["error"]


def test_a_member_declared_as_logits_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    probs, label = make_case(rng, SHAPE)
    a, b, lab = tmp_path / "a", tmp_path / "b", tmp_path / "lab"
    for d in (a, b, lab):
        d.mkdir()
    np.savez(a / "case000.npz", probabilities=probs)
    np.savez(b / "case000.npz", logits=np.log(probs))
    np.save(lab / "case000.npy", label)
    res = run_evaluation(
        a, lab, tmp_path / "out", EvalConfig(fmt="npy", num_bins=10), ensemble_dirs=[b], workers=0, progress=False
    )
    (failed,) = res.summary["failed"]
    assert str(b / "case000.npz") in failed["error"] and "logits" in failed["error"]


def test_a_member_given_twice_or_inside_the_output_is_refused(tmp_path: Path) -> None:
    folds, lab, _ = _folds(tmp_path, n_cases=1)
    with pytest.raises(ValueError, match="given twice"):
        run_evaluation(
            folds[0], lab, tmp_path / "o", CFG, ensemble_dirs=[folds[1], folds[1]], workers=0, progress=False
        )
    with pytest.raises(ValueError, match="ensemble-with"):
        run_evaluation(folds[0], lab, folds[1] / "out", CFG, ensemble_dirs=[folds[1]], workers=0, progress=False)
