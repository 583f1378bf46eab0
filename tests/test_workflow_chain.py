"""The documented workflow, run exactly as docs/workflow.md gives it: its YAML config and its command sequence
`train -> predict -> calibrate -> evaluate -> compare`, on generated data in the documented folder layout; every
step's numbers are checked against the Python API on the same arrays."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import invoke_cli
from _training_utils import synthetic_squares

DOC = Path(__file__).resolve().parents[1] / "docs" / "workflow.md"
SPACING = (0.8, 0.6)


def _block(marker: str, language: str, doc: Path = DOC) -> str:
    """The fenced ``language`` block right after ``<!-- workflow: marker -->`` in ``doc``."""
    text = doc.read_text(encoding="utf-8")
    m = re.search(rf"<!-- workflow: {marker} -->\s*```{language}\n(.*?)```", text, re.S)
    assert m is not None, f"{doc.name} has no {language} block after <!-- workflow: {marker} -->"
    return m.group(1)


def test_readme_gives_the_same_commands() -> None:
    assert _block("commands", "bash", DOC.parents[1] / "README.md") == _block("commands", "bash")


def _write_data(root: Path) -> None:
    """data/{train,val,test}/<case>.npz with image (1, H, W), label (H, W) and spacing: the documented layout."""
    for split, n, seed in (("train", 12, 0), ("val", 4, 1), ("test", 4, 2)):
        images, labels = synthetic_squares(n, 32, seed=seed, noise=0.6)
        folder = root / "data" / split
        folder.mkdir(parents=True)
        for i in range(n):
            np.savez(folder / f"{split}{i:02d}.npz", image=images[i], label=labels[i], spacing=np.array(SPACING))


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the documented config and commands ran, each exiting 0."""
    root = tmp_path_factory.mktemp("workflow")
    _write_data(root)
    (root / "config.yaml").write_text(_block("config", "yaml"))
    commands = [line for line in _block("commands", "bash").splitlines() if line.strip()]
    assert [shlex.split(c)[1] for c in commands] == ["train", "predict", "predict", "calibrate", "evaluate",
                                                      "evaluate", "compare"]
    cwd = Path.cwd()
    import os

    os.chdir(root)  # the documented commands use paths relative to the project folder
    try:
        for command in commands:
            args = shlex.split(command)
            assert args[0] == "segcal"
            res = invoke_cli(args[1:])
            assert res.exit_code == 0, f"{command}\n{res.output}"
    finally:
        os.chdir(cwd)
    return root


def _cases(folder: Path) -> list[str]:
    return sorted(p.name[: -len(".npz")] for p in folder.glob("*.npz"))


def test_predict_matches_the_api(workflow: Path) -> None:
    from segcal.training import load_model, predict_probabilities

    model = load_model(workflow / "runs" / "model" / "best.pt")
    for split in ("val", "test"):
        assert _cases(workflow / "preds" / split) == _cases(workflow / "data" / split)
        out = _npz(workflow / "preds" / split / f"{split}00.npz")
        image = _npz(workflow / "data" / split / f"{split}00.npz")["image"]
        with torch.no_grad():
            probs, logits = predict_probabilities(model, torch.from_numpy(image)[None], return_logits=True)
        np.testing.assert_allclose(out["probabilities"], probs[0].numpy(), atol=1e-6)
        np.testing.assert_allclose(out["logits"], logits[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(out["spacing"], SPACING)  # the geometry travelled with the data
    info = json.loads((workflow / "preds" / "test" / "segcal.json").read_text())
    assert info["kind"] == "probabilities" and "calibration" not in info


def test_calibrated_temperature_equals_the_api(workflow: Path) -> None:
    from segcal.posthoc import TemperatureScaling

    val = workflow / "preds" / "val"
    volumes = []
    for case in _cases(val):
        z = torch.from_numpy(_npz(val / f"{case}.npz")["logits"])[None]
        y = torch.from_numpy(_npz(workflow / "data" / "val" / f"{case}.npz")["label"].astype(np.int64))[None]
        volumes.append((z, y))
    t_api = TemperatureScaling(max_voxels=1_000_000, seed=0).fit(volumes).temperature_
    info = json.loads((workflow / "calibrated" / "test" / "segcal.json").read_text())
    assert info["kind"] == "probabilities" and info["calibration"]["method"] == "ts"
    assert info["calibration"]["temperature"] == pytest.approx(t_api, rel=1e-6)
    assert abs(t_api - 1.0) > 0.05  # the model is miscalibrated, so the check has something to see
    for case in _cases(workflow / "calibrated" / "test"):
        z = torch.from_numpy(_npz(workflow / "preds" / "test" / f"{case}.npz")["logits"])
        calibrated = _npz(workflow / "calibrated" / "test" / f"{case}.npz")
        np.testing.assert_allclose(calibrated["probabilities"], torch.softmax(z / t_api, 0).numpy(), atol=2e-6)
        assert str(calibrated["segcal_calibration"]).startswith("segcal calibrated: calibrate --method ts")


@pytest.mark.parametrize(("run", "folder"), [("uncalibrated", "preds/test"), ("calibrated", "calibrated/test")])
def test_evaluate_matches_the_metric(workflow: Path, run: str, folder: str) -> None:
    from segcal.metrics import SegmentationCalibrationMetric

    metric = SegmentationCalibrationMetric(num_bins=20, hd95=True)
    test = workflow / "data" / "test"
    for case in _cases(test):
        p = torch.from_numpy(_npz(workflow / folder / f"{case}.npz")["probabilities"].astype(np.float64))[None]
        y = torch.from_numpy(_npz(test / f"{case}.npz")["label"].astype(np.int64))[None]
        metric.update(p, y, spacing=SPACING, case_ids=[case])
    result = metric.compute()
    summary = json.loads((workflow / "eval" / run / "summary.json").read_text())
    assert summary["n_ok"] == 4 and summary["n_failed"] == 0
    (name,) = [k for k in summary["pooled"]["ece"] if k != "mean"]
    for key in ("ece", "ace", "mce"):
        assert summary["pooled"][key][name] == pytest.approx(float(result.pooled[key][0]), rel=1e-9)
        assert summary["macro"][key][name]["mean"] == pytest.approx(float(result.macro[key][0]), rel=1e-9)
    assert summary["macro"]["hd95"][name]["mean"] == pytest.approx(float(result.macro["hd95"][0]), rel=1e-9)


def test_compare_pairs_the_two_runs(workflow: Path) -> None:
    with open(workflow / "eval" / "comparison" / "comparison.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ece = [r for r in rows if r["metric"] == "ece" and r["class"] != "mean"]
    assert ece and all(int(float(r["n"])) == 4 for r in ece)
    a = json.loads((workflow / "eval" / "uncalibrated" / "summary.json").read_text())
    b = json.loads((workflow / "eval" / "calibrated" / "summary.json").read_text())
    name = ece[0]["class"]
    assert float(ece[0]["mean_a"]) == pytest.approx(a["macro"]["ece"][name]["mean"], rel=1e-9)
    assert float(ece[0]["mean_b"]) == pytest.approx(b["macro"]["ece"][name]["mean"], rel=1e-9)


def test_nifti_pairs_chain(tmp_path: Path, workflow: Path) -> None:
    """The NIfTI form of the layout: <case>_image / <case>_label pairs of 2D slices, `predict --format nifti`
    (probabilities (X, Y, 1, C), logits in logits/), `calibrate` on those logits, `evaluate` against the pairs."""
    import nibabel as nib

    from segcal.posthoc import TemperatureScaling

    affine = np.diag([*SPACING, 2.0, 1.0])
    for split, n, seed in (("val", 3, 1), ("test", 3, 2)):
        images, labels = synthetic_squares(n, 32, seed=seed, noise=0.6)
        folder = tmp_path / "data" / split
        folder.mkdir(parents=True)
        for i in range(n):
            nib.save(nib.Nifti1Image(images[i, 0], affine), folder / f"{split}{i}_image.nii.gz")
            nib.save(nib.Nifti1Image(labels[i].astype(np.int16), affine), folder / f"{split}{i}_label.nii.gz")
    ckpt = str(workflow / "runs" / "model" / "best.pt")
    d = str(tmp_path)
    for split in ("val", "test"):
        res = invoke_cli(["predict", f"{d}/data/{split}", "-o", f"{d}/preds/{split}", "-c", ckpt, "--format", "nifti",
                          "--save-logits"])
        assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "preds" / "test").glob("*.nii.gz")) == [
        "test0.nii.gz", "test1.nii.gz", "test2.nii.gz"]
    res = invoke_cli(["calibrate", "--val-pred", f"{d}/preds/val/logits", "--val-labels", f"{d}/data/val",
                      "--apply-to", f"{d}/preds/test/logits", "-o", f"{d}/calibrated/test"])
    assert res.exit_code == 0, res.output
    volumes = []
    for i in range(3):
        z = np.asarray(nib.load(tmp_path / "preds" / "val" / "logits" / f"val{i}.nii.gz").dataobj)[:, :, 0]
        y = np.asarray(nib.load(tmp_path / "data" / "val" / f"val{i}_label.nii.gz").dataobj).astype(np.int64)
        volumes.append((torch.from_numpy(np.moveaxis(z, -1, 0))[None], torch.from_numpy(y)[None]))
    t_api = TemperatureScaling(max_voxels=1_000_000, seed=0).fit(volumes).temperature_
    info = json.loads((tmp_path / "calibrated" / "test" / "segcal.json").read_text())
    assert info["calibration"]["temperature"] == pytest.approx(t_api, rel=1e-6)
    for run in ("preds/test", "calibrated/test"):
        res = invoke_cli(["evaluate", f"{d}/{run}", f"{d}/data/test", "-o", f"{d}/eval/{run.replace('/', '_')}"])
        assert res.exit_code == 0, res.output
        summary = json.loads((tmp_path / "eval" / run.replace("/", "_") / "summary.json").read_text())
        assert summary["n_ok"] == 3 and summary["n_failed"] == 0
        rows = list(csv.DictReader(open(tmp_path / "eval" / run.replace("/", "_") / "cases.csv", newline="")))
        assert {r["case_id"] for r in rows} == {"test0", "test1", "test2"}
