"""The boundary band region, AURC / E-AURC, and the metrics of the peers through ``segcal evaluate``, the report
and ``segcal compare`` (the documented example runs as written)."""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _eval_data import write_nifti_dataset
from segcal.cli import app
from segcal.evaluation import ConfigMismatchError, EvalConfig, run_evaluation
from segcal.evaluation.compare import compare_runs
from segcal.functional.failure import aurc, excess_aurc, failure_detection
from segcal.functional.regions import boundary_band_mask, boundary_voxels
from segcal.functional.scoring import PEER_CASE_METRICS, PEER_CLASS_METRICS, case_statistics, image_metrics
from segcal.report.runs import _dataset_summary_section

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"

# ----------------------------------------------------------------------------------------------- band


def _brute_band(edge: np.ndarray, spacing: tuple[float, ...], d: float) -> np.ndarray:
    """Every voxel against every boundary voxel (the definition, no distance transform)."""
    pts = np.argwhere(edge) * np.asarray(spacing)
    out = np.zeros(edge.shape, dtype=bool)
    if not len(pts):
        return out
    for idx in np.ndindex(edge.shape):
        out[idx] = np.sqrt((((np.asarray(idx) * spacing) - pts) ** 2).sum(1)).min() <= d + 1e-9
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_band_equals_brute_force_distance_with_anisotropic_spacing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lab = np.zeros((9, 8, 5), np.int64)
    lab[2:6, 3:7, 1:4] = 1
    lab[4:8, 1:4, 2:5] = rng.integers(1, 3)
    pred = np.roll(lab, 1, axis=0)
    spacing = (0.7, 1.3, 2.5)
    for d in (0.0, 1.0, 2.6, 4.0):
        got = boundary_band_mask(lab, spacing, d)
        assert np.array_equal(got, _brute_band(boundary_voxels(lab), spacing, d)), d
        union = boundary_band_mask(lab, spacing, d, prediction=pred, boundary="union")
        both = boundary_voxels(lab) | boundary_voxels(pred)
        assert np.array_equal(union, _brute_band(both, spacing, d)), d
        only_pred = boundary_band_mask(torch.from_numpy(lab), spacing, d, prediction=pred, boundary="prediction")
        assert isinstance(only_pred, torch.Tensor)
        assert np.array_equal(only_pred.numpy(), _brute_band(boundary_voxels(pred), spacing, d))


def test_band_hand_computed_and_edge_cases() -> None:
    lab = np.zeros((10, 1, 1), np.int64)
    lab[5:] = 1  # boundary voxels 4 and 5
    m = boundary_band_mask(lab, (2.0, 1.0, 1.0), 4.0)  # 2 voxels of 2 mm either side
    assert np.flatnonzero(m[:, 0, 0]).tolist() == [2, 3, 4, 5, 6, 7]
    assert not boundary_band_mask(np.ones((4, 4, 4), np.int64), (1, 1, 1), 5.0).any()  # no boundary: empty
    with pytest.raises(ValueError, match="band_mm"):
        boundary_band_mask(lab, (1, 1, 1), -1.0)
    with pytest.raises(ValueError, match="spacing"):
        boundary_band_mask(lab, (1, 1), 1.0)
    with pytest.raises(ValueError, match="needs the predicted label map"):
        boundary_band_mask(lab, (1, 1, 1), 1.0, boundary="prediction")
    with pytest.raises(ValueError, match="boundary must be"):
        boundary_band_mask(lab, (1, 1, 1), 1.0, boundary="surface")


# ------------------------------------------------------------------------------------------ AURC


def test_aurc_hand_computed_and_excess() -> None:
    risk = [0.0, 1.0, 0.5]
    # ranked by the score: risks 0, 0.5, 1 -> selective risks 0, 0.25, 0.5
    assert aurc([0.1, 0.9, 0.5], risk) == pytest.approx((0 + 0.25 + 0.5) / 3)
    assert excess_aurc([0.1, 0.9, 0.5], risk) == pytest.approx(0.0, abs=1e-15)
    # the worst order: 1, 0.5, 0 -> 1, 0.75, 0.5
    assert aurc([0.9, 0.1, 0.5], risk) == pytest.approx(0.75)
    assert excess_aurc([0.9, 0.1, 0.5], risk) == pytest.approx(0.75 - 0.25)
    assert np.isnan(aurc([np.nan], [0.3]))
    assert failure_detection({"s": [0.1, np.nan, 0.5]}, risk)["s"]["n"] == 2
    with pytest.raises(ValueError, match="one value per case"):
        aurc([0.1, 0.2], [0.3])


def test_aurc_ties_are_the_mean_over_every_order() -> None:
    rng = np.random.default_rng(0)
    u = np.array([0.2, 0.2, 0.2, 0.5, 0.5, 0.9])
    r = rng.random(6)

    def plain(order: tuple[int, ...]) -> float:
        rr = r[list(order)]
        return float(np.mean(np.cumsum(rr) / np.arange(1, 7)))

    orders = [o for o in itertools.permutations(range(6)) if np.all(np.diff(u[list(o)]) >= 0)]
    assert len(orders) == 3 * 2 * 2 * 1 * 1 * 1
    assert aurc(u, r) == pytest.approx(np.mean([plain(o) for o in orders]), rel=1e-12)
    perm = rng.permutation(6)
    assert aurc(u[perm], r[perm]) == pytest.approx(aurc(u, r), rel=1e-12)
    assert excess_aurc(u, r) >= 0


# ------------------------------------------------------------------------------------- evaluate / CLI


def _read(out: Path) -> list[dict[str, str]]:
    with open(out / "cases.csv") as fh:
        return list(csv.DictReader(fh))


def test_default_configuration_is_unchanged() -> None:
    keys = set(EvalConfig().as_dict())
    assert not keys & {"band_mm", "band_boundary", "peer_metrics", "fine_bins"}
    assert {"band_mm", "band_boundary"} <= set(EvalConfig(region="band").as_dict())
    with pytest.raises(ValueError, match="band_boundary"):
        EvalConfig(region="band", band_boundary="surface")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="band_mm"):
        EvalConfig(region="band", band_mm=-1.0)


def test_evaluate_band_and_peer_metrics_equal_the_core(tmp_path: Path) -> None:
    pred, lab, data = write_nifti_dataset(tmp_path, 3, spacing=(1.0, 1.5, 2.5))
    cfg = EvalConfig(num_bins=10, region="band", band_mm=2.0, peer_metrics=True, fine_bins=200, hd95=False)
    res = run_evaluation(pred, lab, tmp_path / "out", cfg, workers=0, progress=False)
    assert res.n_ok == 3
    rows = _read(tmp_path / "out")
    assert set(PEER_CLASS_METRICS) | set(PEER_CASE_METRICS) <= set(rows[0])
    for cid, (probs, label) in data.items():
        band = boundary_band_mask(label, (1.0, 1.5, 2.5), 2.0)
        assert 0 < band.sum() < band.size
        stats = case_statistics(
            torch.from_numpy(probs)[None], torch.from_numpy(label.astype(np.int64))[None], 10,
            mask=torch.from_numpy(band)[None], fine_bins=200,
        )
        want = image_metrics(stats)
        mine = [r for r in rows if r["case_id"] == cid]
        for k, row in enumerate(mine):
            for m in ("ece", "adaptive_ece", "adaptive_ece_bound"):
                assert float(row[m]) == pytest.approx(float(want[m][0, k]), rel=1e-5, abs=1e-9), m
            for m in PEER_CASE_METRICS:
                assert float(row[m]) == pytest.approx(float(want[m][0, 0]), rel=1e-5, abs=1e-9), m
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    fd = summary["failure_detection"]["scores"]
    assert set(fd) == {"mean_entropy", "one_minus_mean_confidence"} and fd["mean_entropy"]["n"] == 3
    assert fd["mean_entropy"]["e_aurc"] >= 0
    assert "adaptive_ece" in summary["pooled"] and "cw_ece" in summary["macro"]
    # another band width is another configuration: a resumed run never mixes them
    with pytest.raises(ConfigMismatchError):
        run_evaluation(pred, lab, tmp_path / "out", EvalConfig(num_bins=10, region="band", band_mm=3.0,
                       peer_metrics=True, fine_bins=200, hd95=False), workers=0, progress=False)


def test_cli_peer_metrics_report_and_compare(tmp_path: Path) -> None:
    pred, lab, _ = write_nifti_dataset(tmp_path, 3)
    base = ["evaluate", str(pred), str(lab), "--bins", "10", "--workers", "0", "--no-hd95"]
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "a"), "--no-report"])
    assert r.exit_code == 0, r.output
    assert not set(PEER_CLASS_METRICS) & set(_read(tmp_path / "a")[0])  # the default outputs are unchanged
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "b"), "--peer-metrics", "--fine-bins", "300",
                            "--region", "band", "--band-mm", "3", "--band-boundary", "union", "--no-report"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["config"]["band_boundary"] == "union" and summary["config"]["fine_bins"] == 300
    section = _dataset_summary_section(summary)  # the report's dataset tables (the full report: test_report.py)
    captions = [t.caption or "" for t in section.tables]
    assert any(c.startswith("Failure detection") for c in captions)
    fd_rows = next(t.rows for t in section.tables if (t.caption or "").startswith("Failure detection"))
    assert {row["score"] for row in fd_rows} == {"mean_entropy", "one_minus_mean_confidence"}
    assert any(row.get("metric") == "adaptive_ece" for t in section.tables for row in t.rows)
    cmp = compare_runs([tmp_path / "b", tmp_path / "b"])
    assert {"cw_ece", "adaptive_ece", "rbs"} <= {row["metric"] for row in cmp["rows"]}
    cmp = compare_runs([tmp_path / "a", tmp_path / "b"], group_by=r"^(case)")  # subjects from bins.npz
    assert "adaptive_ece" not in {row["metric"] for row in cmp["rows"]}  # only where both runs have it
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "c"), "--region", "band", "--band-boundary", "edge"])
    assert r.exit_code != 0 and "band_boundary" in r.output


def test_documented_example_runs() -> None:
    text = DOCS.read_text()
    blocks = re.findall(r"<!-- tested example -->\s*\n```python\n(.*?)\n```", text, re.S)
    assert blocks, "docs/evaluation.md has no tested example"
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), {})
