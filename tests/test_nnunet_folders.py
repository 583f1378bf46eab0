"""nnU-Net prediction folders end to end: ``segcal calibrate`` writes complete nnU-Net folders (``case.npz``,
``case.pkl``, the segmentation ``case.nii.gz`` with the input's geometry, ``dataset.json`` / ``plans.json``)
that nnU-Net's own evaluation (``compute_metrics_on_folder``) accepts; the segmentation rule equals nnU-Net's
``LabelManager``; ``segcal evaluate --nnunet-segmentations`` scores the overlap metrics on the exported
(post-processed) segmentations and the calibration metrics on the probabilities."""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import invoke_cli
from segcal.evaluation import ConfigMismatchError, EvalConfig, run_evaluation
from segcal.functional.scoring import case_statistics, image_metrics
from segcal.io.nnunet import nnunet_segmentation

SHAPE = (11, 9, 7)  # x != y != z: nnU-Net's (C, z, y, x) must be reversed everywhere
C = 4
#: an oblique (rotated 30° about z), flipped voxel-to-world matrix with spacing (0.8, 1.2, 2.0): the geometry
#: must travel as it is, not as a diagonal spacing (orthonormal directions, as ITK requires)
_ROT = np.array([[np.cos(np.pi / 6), -np.sin(np.pi / 6), 0], [np.sin(np.pi / 6), np.cos(np.pi / 6), 0], [0, 0, 1]])
AFFINE = np.eye(4)
AFFINE[:3, :3] = _ROT @ np.diag([-0.8, 1.2, 2.0])
AFFINE[:3, 3] = [12.0, -5.0, 3.5]
LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
DOCS = Path(__file__).resolve().parents[1] / "docs"
DOC = DOCS / "integrations" / "nnunet.md"


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(0, keepdims=True))
    return (e / e.sum(0, keepdims=True)).astype(np.float32)


def _label() -> np.ndarray:
    """Nested boxes of classes 1..3 and, for post-processing to remove, a small second component of class 1
    (the same anatomy in every case; the noise of the probabilities differs)."""
    y = np.zeros(SHAPE, np.int16)
    y[2:9, 1:8, 1:6] = 1
    y[3:8, 2:7, 2:5] = 2
    y[4:7, 3:6, 3:4] = 3
    y[0:2, 0:2, 5:7] = 1
    return y


def _case(rng: np.random.Generator, sharp: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """``(probs (C, x, y, z), label (x, y, z))``: over-confident noisy softmax around the label."""
    y = _label()
    onehot = np.moveaxis(np.eye(C, dtype=np.float32)[y], -1, 0)
    return _softmax(sharp * (2.0 * onehot + rng.normal(0, 1.0, onehot.shape))), y


def write_nnunet_folder(folder: Path, cases: dict[str, np.ndarray], *, segmentations: bool = True) -> None:
    """What ``nnUNetv2_predict --save_probabilities`` leaves: ``case.npz`` (key probabilities, (C, z, y, x)),
    ``case.pkl`` (properties), the segmentation ``case.nii.gz`` (argmax, the reference's geometry),
    ``dataset.json`` and ``plans.json``."""
    folder.mkdir(parents=True)
    for cid, probs in cases.items():
        np.savez_compressed(folder / f"{cid}.npz", probabilities=probs.transpose(0, 3, 2, 1))
        (folder / f"{cid}.pkl").write_bytes(pickle.dumps({"spacing": [2.0, 1.2, 0.8], "case": cid}))
        if segmentations:
            nib.save(nib.Nifti1Image(probs.argmax(0).astype(np.uint8), AFFINE), folder / f"{cid}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    (folder / "plans.json").write_text(json.dumps({"dataset_name": "Dataset001_Test"}))


def write_labels(folder: Path, labels: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True)
    for cid, y in labels.items():
        nib.save(nib.Nifti1Image(y, AFFINE), folder / f"{cid}.nii.gz")


def _dataset(root: Path, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    val = {f"val{i}": _case(rng) for i in range(3)}
    test = {f"test{i}": _case(rng) for i in range(2)}
    write_nnunet_folder(root / "val", {k: p for k, (p, _) in val.items()})
    write_labels(root / "labelsVal", {k: y for k, (_, y) in val.items()})
    write_nnunet_folder(root / "test", {k: p for k, (p, _) in test.items()})
    write_labels(root / "labelsTs", {k: y for k, (_, y) in test.items()})
    return {"val": root / "val", "val_labels": root / "labelsVal", "test": root / "test", "labels": root / "labelsTs"}


def _dice(seg: np.ndarray, y: np.ndarray, k: int) -> float:
    a, b = seg == k, y == k
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _calibrate(d: dict[str, Path], out: Path, method: str = "vector"):  # type: ignore[no-untyped-def]
    return invoke_cli([
        "calibrate", "--method", method, "--val-pred", str(d["val"]), "--val-labels", str(d["val_labels"]),
        "--apply-to", str(d["test"]), "-o", str(out), "--max-voxels", "0",
    ])  # fmt: skip


def test_calibrated_folder_is_a_complete_nnunet_folder_nnunet_accepts(tmp_path: Path) -> None:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    d = _dataset(tmp_path)
    out = tmp_path / "calibrated"
    res = _calibrate(d, out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json", "plans.json", "segcal.json", "test0.nii.gz", "test0.npz", "test0.pkl", "test1.nii.gz",
        "test1.npz", "test1.pkl",
    ]  # fmt: skip
    for name in ("dataset.json", "plans.json", "test0.pkl", "test1.pkl"):  # copied byte for byte
        assert (out / name).read_bytes() == (d["test"] / name).read_bytes()
    segs = {}
    for cid in ("test0", "test1"):
        with np.load(out / f"{cid}.npz", allow_pickle=False) as f:
            probs = f["probabilities"].transpose(0, 3, 2, 1)  # nnU-Net's (C, z, y, x) → (C, x, y, z)
        img = nib.load(out / f"{cid}.nii.gz")
        seg = np.asarray(img.dataobj)
        assert seg.dtype == np.uint8 and seg.shape == SHAPE
        assert np.allclose(img.affine, AFFINE, atol=1e-5)  # the input segmentation's geometry
        assert np.array_equal(seg, probs.argmax(0))  # the segmentation of the calibrated probabilities
        segs[cid] = seg
    # vector scaling moves some decisions: the written segmentation is recomputed, not copied
    changed = sum(int((segs[c] != np.asarray(nib.load(d["test"] / f"{c}.nii.gz").dataobj)).sum()) for c in segs)
    assert changed > 0
    # nnU-Net's own evaluation reads the folder (its reader: SimpleITK) and agrees with Dice by hand
    summary = compute_metrics_on_folder(
        str(d["labels"]), str(out), str(tmp_path / "nnunet_summary.json"), SimpleITKIO(), ".nii.gz", [1, 2, 3],
        num_processes=1, chill=False,
    )  # fmt: skip
    assert len(summary["metric_per_case"]) == 2
    for entry in summary["metric_per_case"]:
        cid = Path(entry["prediction_file"]).name[: -len(".nii.gz")]
        y = np.asarray(nib.load(d["labels"] / f"{cid}.nii.gz").dataobj)
        for k in (1, 2, 3):
            assert entry["metrics"][k]["Dice"] == pytest.approx(_dice(segs[cid], y, k), abs=1e-12)


def test_without_input_segmentations_probabilities_only_with_a_warning(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    val = {f"v{i}": _case(rng) for i in range(2)}
    write_nnunet_folder(tmp_path / "val", {k: p for k, (p, _) in val.items()})
    write_labels(tmp_path / "lab", {k: y for k, (_, y) in val.items()})
    write_nnunet_folder(tmp_path / "test", {"t0": _case(rng)[0]}, segmentations=False)
    d = {"val": tmp_path / "val", "val_labels": tmp_path / "lab", "test": tmp_path / "test"}
    res = _calibrate(d, tmp_path / "out", method="ts")
    assert res.exit_code == 0, res.output
    assert "no segmentation written for 1 case(s)" in " ".join(res.output.split())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "dataset.json", "plans.json", "segcal.json", "t0.npz", "t0.pkl",
    ]  # fmt: skip


def test_segmentation_template_of_another_shape_is_an_error_naming_it(tmp_path: Path) -> None:
    d = _dataset(tmp_path)
    bad = d["test"] / "test1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE[::-1], np.uint8), AFFINE), bad)  # (z, y, x): the wrong order
    res = _calibrate(d, tmp_path / "out", method="ts")
    assert res.exit_code == 1, res.output
    text = "".join(res.output.split())  # Rich wraps long paths
    assert "".join(str(bad).split()) in text and "segmentationshape" in text


def _label_manager(order: list[int] | None):  # type: ignore[no-untyped-def]
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    if order is None:
        return LabelManager(LABELS, None)
    return LabelManager({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}, order)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tie=st.booleans())
def test_segmentation_rule_equals_nnunet_label_manager(seed: int, tie: bool) -> None:
    rng = np.random.default_rng(seed)
    probs = rng.random((C, 5, 4, 3)).astype(np.float32)
    if tie:  # adversarial: exact ties between classes and region probabilities of exactly 0.5
        probs[1] = probs[2]
        probs[:, 0] = 0.5
    probs /= probs.sum(0, keepdims=True)
    assert np.array_equal(nnunet_segmentation(probs), _label_manager(None).convert_probabilities_to_segmentation(probs))
    regions = rng.random((3, 5, 4, 3)).astype(np.float32)
    if tie:
        regions[:, :, 0] = 0.5
    want = _label_manager([1, 2, 3]).convert_probabilities_to_segmentation(regions)
    assert np.array_equal(nnunet_segmentation(regions, [1, 2, 3]), want)


# --- segcal evaluate --nnunet-segmentations ---------------------------------------------------------------


def _postprocessed(root: Path) -> tuple[Path, Path, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """An nnU-Net folder whose exported segmentations were post-processed: the small second component of
    class 1 is removed from the argmax (set to background), so the file differs from the probabilities."""
    rng = np.random.default_rng(11)
    data = {}
    for i in range(2):
        probs, y = _case(rng)
        seg = probs.argmax(0).astype(np.uint8)
        assert (seg[0:2, 0:2, 5:7] == 1).sum() > 0
        seg[0:3, 0:3, 4:7] = np.where(seg[0:3, 0:3, 4:7] == 1, 0, seg[0:3, 0:3, 4:7])
        data[f"case{i}"] = (probs, y, seg)
    write_nnunet_folder(root / "pred", {k: p for k, (p, _, _) in data.items()})
    for cid, (_, _, seg) in data.items():
        nib.save(nib.Nifti1Image(seg, AFFINE), root / "pred" / f"{cid}.nii.gz")
    write_labels(root / "labelsTr", {k: y for k, (_, y, _) in data.items()})
    return root / "pred", root / "labelsTr", data


def _rows(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(out / "cases.csv") as fh:
        return {(r["case_id"], r["class"]): r for r in csv.DictReader(fh)}


CFG = EvalConfig(fmt="nnunet", num_bins=10)


def test_overlap_from_the_exported_segmentation_calibration_from_probabilities(tmp_path: Path) -> None:
    pred, lab, data = _postprocessed(tmp_path)
    r = invoke_cli([
        "evaluate", str(pred), str(lab), "-o", str(tmp_path / "seg"), "--bins", "10",
        "--nnunet-segmentations", "--workers", "0", "--no-report",
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    plain = run_evaluation(pred, lab, tmp_path / "plain", CFG, workers=0, progress=False)
    assert plain.n_ok == 2
    with_seg, without = _rows(tmp_path / "seg"), _rows(tmp_path / "plain")
    spacing = tuple(float(s) for s in nib.load(lab / "case0.nii.gz").header.get_zooms())
    for cid, (probs, y, seg) in data.items():
        hard = torch.from_numpy(np.moveaxis(np.eye(C, dtype=np.float32)[seg], -1, 0))[None]
        want = image_metrics(case_statistics(hard, torch.from_numpy(y.astype(np.int64))[None], 10, hd95=True,
                                             spacing=spacing))  # fmt: skip
        for k, name in enumerate(("CSF", "GM", "WM"), start=1):
            row = with_seg[(cid, name)]
            assert float(row["dice"]) == pytest.approx(_dice(seg, y, k), rel=1e-9)  # Dice of the file, by hand
            for metric in ("iou", "precision", "recall", "hd95"):
                assert float(row[metric]) == pytest.approx(float(want[metric][0, k - 1]), rel=1e-6), metric
            for metric in ("ece", "ace", "mce", "brier"):  # the probabilities', as without the option
                assert row[metric] == without[(cid, name)][metric], metric
        # post-processing changed CSF's Dice: the file was scored, not the argmax
        assert float(with_seg[(cid, "CSF")]["dice"]) != pytest.approx(float(without[(cid, "CSF")]["dice"]))
        assert float(without[(cid, "CSF")]["dice"]) == pytest.approx(_dice(probs.argmax(0), y, 1), rel=1e-9)
        assert with_seg[(cid, "CSF")]["nll"] == without[(cid, "CSF")]["nll"]


def test_the_option_is_configuration_and_the_file_an_input(tmp_path: Path) -> None:
    pred, lab, data = _postprocessed(tmp_path)
    assert "nnunet_segmentations" not in CFG.as_dict()  # runs without the option keep their hash
    seg_cfg = EvalConfig(fmt="nnunet", num_bins=10, nnunet_segmentations=True)
    assert seg_cfg.as_dict()["nnunet_segmentations"] is True
    out = tmp_path / "out"
    first = run_evaluation(pred, lab, out, seg_cfg, workers=0, progress=False)
    assert first.n_ok == 2
    with pytest.raises(ConfigMismatchError):  # never mixed with results of the argmax
        run_evaluation(pred, lab, out, CFG, workers=0, progress=False)
    # a re-exported segmentation recomputes its case only
    _, y, _ = data["case1"]
    path = pred / "case1.nii.gz"
    nib.save(nib.Nifti1Image(y.astype(np.uint8), AFFINE), path)
    st_ = path.stat()
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    again = run_evaluation(pred, lab, out, seg_cfg, workers=0, progress=False)
    assert (again.stale, again.n_computed) == (["case1"], 1)
    assert float(_rows(out)[("case1", "GM")]["dice"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="fmt='nnunet'"):
        EvalConfig(fmt="npy", nnunet_segmentations=True)
    with pytest.raises(ValueError, match="ensemble"):
        run_evaluation(pred, lab, tmp_path / "ens", seg_cfg, ensemble_dirs=[pred], workers=0, progress=False)


@pytest.mark.parametrize("problem", ["missing", "shape", "affine", "labels"])
def test_a_bad_segmentation_fails_its_case_naming_the_file(tmp_path: Path, problem: str) -> None:
    pred, lab, _ = _postprocessed(tmp_path)
    path = pred / "case0.nii.gz"
    if problem == "missing":
        path.unlink()
    elif problem == "shape":  # stored in nnU-Net's array order (z, y, x) instead of the image's
        nib.save(nib.Nifti1Image(np.zeros(SHAPE[::-1], np.uint8), AFFINE), path)
    elif problem == "affine":
        nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), np.diag([1.0, 1.0, 1.0, 1.0])), path)
    else:
        nib.save(nib.Nifti1Image(np.full(SHAPE, 7, np.uint8), AFFINE), path)
    cfg = EvalConfig(fmt="nnunet", num_bins=10, nnunet_segmentations=True)
    res = run_evaluation(pred, lab, tmp_path / "out", cfg, workers=0, progress=False)
    assert (res.n_ok, res.n_failed) == (1, 1)
    (failed,) = res.summary["failed"]
    assert failed["error"].startswith(str(path.resolve())), failed["error"]
    expected = {"missing": "missing", "shape": "segmentation shape", "affine": "spacing/affine", "labels": "[0, 3]"}
    assert expected[problem] in failed["error"]


def test_cli_refuses_the_option_for_other_formats(tmp_path: Path) -> None:
    folder, lab = tmp_path / "npy", tmp_path / "lab"
    folder.mkdir()
    lab.mkdir()
    probs, y = _case(np.random.default_rng(0))
    np.savez(folder / "c.npz", probabilities=probs)
    np.save(lab / "c.npy", y)
    r = invoke_cli(["evaluate", str(folder), str(lab), "-o", str(tmp_path / "o"), "--nnunet-segmentations"])
    assert r.exit_code == 2 and "nnU-Net prediction folders" in " ".join(r.output.split())


def test_the_ignore_label_is_excluded_in_region_mode(tmp_path: Path) -> None:
    """Region-based predictions with nnU-Net's ignore label (value 4): every metric equals the one computed on the
    known voxels alone (selected, not masked), by hand for Dice; HD95 equals the volume whose ignored voxels
    are predicted background; the exported segmentation is scored the same way."""
    labels = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3, "ignore": 4}
    rng = np.random.default_rng(4)
    y = _label()
    y[7:11, 6:9, 0:3] = 4  # an unannotated block, where the model predicts tumour
    regions = ((1, 2, 3), (2, 3), (3,))
    truth = np.stack([np.isin(y, r) for r in regions]).astype(np.float32)
    probs = np.clip(0.75 * truth + rng.uniform(0, 0.3, truth.shape), 0.01, 0.99).astype(np.float32)
    probs[0][y == 4] = 0.9  # "whole" predicted in the ignored block: false positives unless excluded
    probs[probs == 0.5] = 0.51
    pred, lab = tmp_path / "pred", tmp_path / "lab"
    write_nnunet_folder(pred, {"case0": probs})
    seg = nnunet_segmentation(probs, [1, 2, 3])
    nib.save(nib.Nifti1Image(seg, AFFINE), pred / "case0.nii.gz")
    (pred / "dataset.json").write_text(json.dumps({"labels": labels, "regions_class_order": [1, 2, 3]}))
    write_labels(lab, {"case0": y})
    cfg = EvalConfig(fmt="nnunet", num_bins=10, nnunet_regions=True)
    res = run_evaluation(pred, lab, tmp_path / "out", cfg, workers=0, progress=False)
    assert res.n_ok == 1 and res.summary["config"]["ignore_label"] == 4
    seg_cfg = EvalConfig(fmt="nnunet", num_bins=10, nnunet_regions=True, nnunet_segmentations=True)
    assert run_evaluation(pred, lab, tmp_path / "seg", seg_cfg, workers=0, progress=False).n_ok == 1
    rows, seg_rows = _rows(tmp_path / "out"), _rows(tmp_path / "seg")
    known = y != 4
    sel = torch.from_numpy(probs[:, known])[None, ..., None]  # (1, R, N, 1): the known voxels only
    by_selection = image_metrics(case_statistics(sel, torch.from_numpy(truth[:, known])[None, ..., None], 10,
                                                 mode="multilabel"))  # fmt: skip
    spacing = tuple(float(s) for s in nib.load(lab / "case0.nii.gz").header.get_zooms())
    zeroed = torch.from_numpy(probs * known)[None]
    hd = image_metrics(case_statistics(zeroed, torch.from_numpy(truth)[None], 10, mode="multilabel", hd95=True,
                                       spacing=spacing))["hd95"]  # fmt: skip
    for r, name in enumerate(("whole", "core", "enhancing")):
        p_hard, t = probs[r][known] > 0.5, truth[r][known] > 0
        dice = 2 * float((p_hard & t).sum()) / float(p_hard.sum() + t.sum())
        assert float(rows[("case0", name)]["dice"]) == pytest.approx(dice, rel=1e-9)
        for metric in ("ece", "ace", "mce", "brier", "iou", "recall", "precision"):
            assert float(rows[("case0", name)][metric]) == pytest.approx(float(by_selection[metric][0, r]), rel=1e-6)
        assert float(rows[("case0", name)]["hd95"]) == pytest.approx(float(hd[0, r]), rel=1e-6)
        for metric in ("dice", "hd95", "ece"):  # the exported segmentation is nnU-Net's rule of these probabilities
            assert float(seg_rows[("case0", name)][metric]) == pytest.approx(float(rows[("case0", name)][metric]))
    # nnU-Net's own evaluation of the exported segmentation, with its ignore label, gives the same Dice
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    theirs = compute_metrics(str(lab / "case0.nii.gz"), str(pred / "case0.nii.gz"), SimpleITKIO(), list(regions), 4)
    for region, name in zip(regions, ("whole", "core", "enhancing"), strict=True):
        assert theirs["metrics"][region]["Dice"] == pytest.approx(float(seg_rows[("case0", name)]["dice"]), rel=1e-9)
    whole_all = 2 * float(((probs[0] > 0.5) & (truth[0] > 0)).sum()) / float((probs[0] > 0.5).sum() + truth[0].sum())
    assert float(rows[("case0", "whole")]["dice"]) > whole_all + 0.01  # the ignored block is not counted


def test_the_ignore_label_is_excluded_with_softmax_classes(tmp_path: Path) -> None:
    """Softmax predictions of 4 classes with nnU-Net's ignore label (value 4, read from dataset.json): every
    metric equals the one computed on the known voxels alone (selected, not masked), Dice by hand and by
    nnU-Net's own evaluation of the exported segmentation with its ignore label; HD95 equals the volume whose
    ignored voxels are predicted and labelled background. ``--ignore-label`` on the command line gives the same
    run; an ignore label that is one of the classes fails the case by name."""
    rng = np.random.default_rng(7)
    probs, y = _case(rng)
    y[7:11, 6:9, 0:3] = 4  # an unannotated block, where the model predicts class 1
    probs[:, y == 4] = np.array([0.05, 0.85, 0.05, 0.05], np.float32)[:, None]
    pred, lab = tmp_path / "pred", tmp_path / "lab"
    write_nnunet_folder(pred, {"case0": probs})
    (pred / "dataset.json").write_text(json.dumps({"labels": {**LABELS, "ignore": 4}, "file_ending": ".nii.gz"}))
    write_labels(lab, {"case0": y})
    res = run_evaluation(pred, lab, tmp_path / "out", CFG, workers=0, progress=False)
    assert res.n_ok == 1 and res.summary["config"]["ignore_label"] == 4
    seg_cfg = EvalConfig(fmt="nnunet", num_bins=10, nnunet_segmentations=True)
    assert run_evaluation(pred, lab, tmp_path / "seg", seg_cfg, workers=0, progress=False).n_ok == 1
    rows, seg_rows = _rows(tmp_path / "out"), _rows(tmp_path / "seg")
    known = y != 4
    sel = torch.from_numpy(probs[:, known])[None, ..., None]  # (1, C, N, 1): the known voxels only
    by_selection = image_metrics(case_statistics(sel, torch.from_numpy(y[known])[None, ..., None], 10))
    spacing = tuple(float(s) for s in nib.load(lab / "case0.nii.gz").header.get_zooms())
    as_background = np.where(known, probs, np.eye(C, dtype=np.float32)[:, :1].reshape(C, 1, 1, 1))
    hd = image_metrics(case_statistics(torch.from_numpy(as_background)[None], torch.from_numpy(y * known)[None], 10,
                                       hd95=True, spacing=spacing))["hd95"]  # fmt: skip
    hard = probs.argmax(0)
    for k, name in enumerate(("CSF", "GM", "WM")):
        p_hard, t = hard[known] == k + 1, y[known] == k + 1
        dice = 2 * float((p_hard & t).sum()) / float(p_hard.sum() + t.sum())
        assert float(rows[("case0", name)]["dice"]) == pytest.approx(dice, rel=1e-9)
        for metric in ("ece", "ace", "mce", "brier", "iou", "recall", "precision"):
            assert float(rows[("case0", name)][metric]) == pytest.approx(float(by_selection[metric][0, k]), rel=1e-6)
        assert float(rows[("case0", name)]["hd95"]) == pytest.approx(float(hd[0, k]), rel=1e-6)
        assert float(seg_rows[("case0", name)]["dice"]) == pytest.approx(dice, rel=1e-9)
    for metric in ("nll", "top_label_ece"):  # per image: in the rows of every class
        assert float(rows[("case0", "CSF")][metric]) == pytest.approx(float(by_selection[metric][0, 0]), rel=1e-6)
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    theirs = compute_metrics(str(lab / "case0.nii.gz"), str(pred / "case0.nii.gz"), SimpleITKIO(), [1, 2, 3], 4)
    for k, name in enumerate(("CSF", "GM", "WM")):
        assert theirs["metrics"][k + 1]["Dice"] == pytest.approx(float(seg_rows[("case0", name)]["dice"]), rel=1e-9)
    csf_all = 2 * float(((hard == 1) & (y == 1)).sum()) / float((hard == 1).sum() + (y == 1).sum())
    assert float(rows[("case0", "CSF")]["dice"]) > csf_all + 0.01  # the ignored block is not counted
    # the same through the command line, the ignore label given explicitly (and no dataset.json ignore entry)
    (pred / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    cli_args = ["evaluate", str(pred), str(lab), "-o", str(tmp_path / "cli"), "--bins", "10", "--ignore-label", "4"]
    r = invoke_cli(cli_args)
    assert r.exit_code == 0, r.output
    assert _rows(tmp_path / "cli")[("case0", "CSF")]["dice"] == rows[("case0", "CSF")]["dice"]
    bad = run_evaluation(pred, lab, tmp_path / "bad", EvalConfig(fmt="nnunet", num_bins=10, ignore_label=2),
                         workers=0, progress=False)  # fmt: skip
    failed = (tmp_path / "bad" / "failed.csv").read_text()
    assert bad.n_failed == 1 and "the ignore label 2 is one of the prediction's 4 classes" in failed
    with pytest.raises(ValueError, match="ignore_label must be a label value >= 0"):
        EvalConfig(fmt="nnunet", ignore_label=-1)


# --- the documented commands -----------------------------------------------------------------------------


def _blocks(page: Path, marker: str, language: str) -> list[str]:
    """The fenced ``language`` blocks right after ``<!-- marker -->`` in ``page``."""
    return re.findall(rf"<!-- {re.escape(marker)} -->\s*```{language}\n(.*?)```", page.read_text(), re.S)


def _commands(block: str) -> list[list[str]]:
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _documented_layout(root: Path) -> None:
    """The folders the documented commands name: three folds' predictions of a validation and a test set
    (``val/fold_k``, ``test/fold_k``, complete nnU-Net folders) and their labels."""
    rng = np.random.default_rng(21)
    for split, labels, n in (("val", "labelsVal", 3), ("test", "labelsTs", 2)):
        cases = [f"{split}{i}" for i in range(n)]
        for k in range(3):
            write_nnunet_folder(root / split / f"fold_{k}", {c: _case(rng, sharp=2.0 + k)[0] for c in cases})
        write_labels(root / labels, {c: _label() for c in cases})


def test_the_documented_commands_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (block,) = _blocks(DOC, "tested commands: nnunet-folders", "bash")
    commands = _commands(block)
    assert [c[:2] for c in commands] == [["segcal", "evaluate"], ["segcal", "calibrate"], ["segcal", "evaluate"]]
    shown = [c for page in ("evaluation.md", "posthoc.md") for b in _blocks(DOCS / page, "tested command: "
             "nnunet-folders", "bash") for c in _commands(b)]  # fmt: skip
    assert len(shown) == 2 and all(c in commands for c in shown)  # the other pages show commands run here
    _documented_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        extra = ["--workers", "0", "--no-report"] if command[1] == "evaluate" else []  # in this process, fast
        res = invoke_cli(command[1:] + extra)
        assert res.exit_code == 0, f"{shlex.join(command)}\n{res.output}"
    ensemble = json.loads((tmp_path / "runs" / "ensemble" / "summary.json").read_text())
    assert ensemble["n_ok"] == 2 and len(ensemble["config"]["ensemble_dirs"]) == 2
    calibrated = json.loads((tmp_path / "runs" / "calibrated" / "summary.json").read_text())
    assert calibrated["n_ok"] == 2 and calibrated["config"]["nnunet_segmentations"] is True
    out = tmp_path / "test_calibrated"
    assert {p.name for p in out.iterdir()} >= {"test0.npz", "test0.pkl", "test0.nii.gz", "dataset.json"}
    # the Python example of posthoc.md, in the same folder, gives what the command wrote
    (example,) = _blocks(DOCS / "posthoc.md", "tested example: calibrate-folds", "python")
    scope: dict = {"__name__": "__main__"}
    exec(compile(example, "docs/posthoc.md[calibrate-folds]", "exec"), scope)
    with np.load(out / "test0.npz", allow_pickle=False) as f:
        written = f["probabilities"].transpose(0, 3, 2, 1)
    assert np.allclose(scope["calibrated"].numpy(), written, atol=1e-5)
