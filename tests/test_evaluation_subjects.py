"""The statistical unit: cases grouped into subjects (slices of a volume) for evaluation and comparison."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _subject_data import subject_volume, write_slices, write_volumes
from segcal.cli import app
from segcal.evaluation import EvalConfig, GroupingError, compare_runs, resolve_grouping, run_evaluation
from segcal.evaluation.grouping import pool_cases, subject_statistics
from segcal.functional.scoring import CaseStatistics, case_statistics, image_metrics, pooled_metrics

SUBJECT = r"^(sub-\d+)_"
CFG = EvalConfig(fmt="npy", num_bins=10, hd95=False)
#: every metric that pools (HD95 does not)
POOLED = ("dice", "iou", "precision", "recall", "ece", "ace", "mce", "ece_l2", "ace_l2", "brier", "nll",
          "top_label_ece", "top_label_ace", "top_label_mce")


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """3 subjects × 16 slices; run ``a`` (noisy) and ``b`` (sharpened logits) evaluated slice-wise, grouped
    (``ga``) and not (``a``, ``b``), and ``a``'s subjects as whole volumes (``vol``)."""
    root = tmp_path_factory.mktemp("subjects")
    vols_a = {f"sub-{i:02d}": subject_volume(np.random.default_rng(i)) for i in range(3)}
    vols_b = {f"sub-{i:02d}": subject_volume(np.random.default_rng(i), sharpen=2.0) for i in range(3)}
    pred_a, lab = write_slices(root, vols_a, "pred_a")
    pred_b, _ = write_slices(root, vols_b, "pred_b")
    vol_pred, vol_lab = write_volumes(root, vols_a)
    out = {"root": root, "pred_a": pred_a, "pred_b": pred_b, "labels": lab}
    for name, pred, labels, grouping in (
        ("a", pred_a, lab, None),
        ("b", pred_b, lab, None),
        ("ga", pred_a, lab, SUBJECT),
        ("gb", pred_b, lab, SUBJECT),
        ("vol", vol_pred, vol_lab, None),
    ):
        res = run_evaluation(pred, labels, root / name, CFG, group_by=grouping, workers=0, progress=False)
        assert res.n_ok == (3 if name == "vol" else 48)
        out[name] = root / name
    return out


def test_subject_values_equal_the_stacked_volume(data: dict[str, Path]) -> None:
    """Pooling a subject's slices gives exactly the metrics of the subject's slices stacked into one volume."""
    subjects = {r["subject"] + "/" + r["class"]: r for r in _csv(data["ga"] / "subjects.csv")}
    volumes = {r["case_id"] + "/" + r["class"]: r for r in _csv(data["vol"] / "cases.csv")}
    assert set(subjects) == set(volumes) and len(subjects) == 3 * 2
    for key, row in subjects.items():
        assert row["n_cases"] == "16"
        for m in (*POOLED, "tp", "fp", "fn", "n_voxels"):
            assert float(row[m]) == pytest.approx(float(volumes[key][m]), rel=1e-9, abs=1e-12), (key, m)
    summary = json.loads((data["ga"] / "summary.json").read_text())
    sub = summary["subject_macro"]
    assert (sub["unit"], sub["n"], sub["n_cases"]) == ("subject", 3, 48)
    aces = [float(r["ace"]) for r in subjects.values() if r["class"] == "class_1"]
    assert sub["metrics"]["ace"]["class_1"]["mean"] == pytest.approx(np.mean(aces))
    assert sub["metrics"]["ace"]["class_1"]["n"] == 3
    assert summary["grouping"]["unit"] == "subject" and summary["grouping"]["n"] == 3
    assert summary["grouping"]["subjects"]["sub-01"][:2] == ["sub-01_slice00", "sub-01_slice01"]


def test_pool_cases_is_the_pooled_metric_of_the_cases() -> None:
    """The one-image pooled statistics give the dataset-level values of ``pooled_metrics``; HD95 is the mean of
    the finite case values."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(5, 3, 12, 10, generator=g), 1)
    labels = torch.randint(0, 3, (5, 12, 10), generator=g)
    labels[3] = 0  # no foreground: HD95 NaN for every class of that slice
    stats = case_statistics(probs, labels, 10, hd95=True)
    one = pool_cases(stats)
    assert len(one) == 1
    pooled, per_image = pooled_metrics(stats), image_metrics(one)
    for m, v in pooled.items():
        torch.testing.assert_close(per_image[m][0], v, equal_nan=True)
    hd = stats.hd95.numpy()
    np.testing.assert_allclose(one.hd95[0].numpy(), np.nanmean(hd, 0))
    subjects, n, sub = subject_statistics(stats, ["s1_a", "s2_a", "s1_b", "s2_b", "s1_c"], resolve_grouping(
        ["s1_a", "s2_a", "s1_b", "s2_b", "s1_c"], group_by=r"^(s\d)_"))
    assert subjects == ["s1", "s2"] and n == [3, 2]
    s1 = pool_cases(CaseStatistics.cat([stats.select(i) for i in (0, 2, 4)]))
    torch.testing.assert_close(sub.select(0).bins, s1.bins)


def test_slice_level_and_subject_level_answers_differ(data: dict[str, Path]) -> None:
    """48 slices of 3 subjects: over slices the change looks overwhelmingly significant; over the 3 subjects,
    the only independent units, the paired test cannot reach 0.05 (its smallest two-sided p is 2 / 2**3)."""
    by_case = compare_runs([data["a"], data["b"]])
    by_subject = compare_runs([data["a"], data["b"]], group_by=SUBJECT)
    stored = compare_runs([data["ga"], data["gb"]])  # the grouping the runs were evaluated with
    row = {(r["metric"], r["class"]): r for r in by_case["rows"]}[("ece", "mean")]
    sub = {(r["metric"], r["class"]): r for r in by_subject["rows"]}[("ece", "mean")]
    assert (row["unit"], row["n"]) == ("case", 48) and row["p_wilcoxon"] < 1e-6 and row["p_holm"] < 0.05
    assert (sub["unit"], sub["n"]) == ("subject", 3) and sub["p_wilcoxon"] >= 0.05 and sub["p_holm"] >= 0.05
    assert by_subject["unit"] == "subject" and by_subject["grouping"]["n"] == 3
    assert by_case["unit"] == "case" and "each case is its own subject" in by_case["grouping"]["note"]
    assert all(r["unit"] == "subject" and r["n"] == 3 for r in stored["rows"])
    labels = [[(r["metric"], r["class"]) for r in c["rows"]] for c in (stored, by_subject)]
    assert labels[0] == labels[1]
    key = ("n", "mean_a", "mean_b", "p_wilcoxon", "p_holm", "rel_ci_low")
    np.testing.assert_allclose(
        [[r[k] for k in key] for r in stored["rows"]], [[r[k] for k in key] for r in by_subject["rows"]]
    )
    # the subject means are the means of subjects.csv, not of the slices
    a_sub = [float(r["ece"]) for r in _csv(data["ga"] / "subjects.csv") if r["class"] == "class_1"]
    ece1 = {(r["metric"], r["class"]): r for r in stored["rows"]}[("ece", "class_1")]
    assert ece1["mean_a"] == pytest.approx(np.mean(a_sub))
    assert ece1["rel_ci_low"] <= ece1["rel_change"] <= ece1["rel_ci_high"]
    # per-case metrics get one row ("case"), never a copy per class
    assert {r["class"] for r in stored["rows"] if r["metric"].startswith("top_label_") or r["metric"] == "nll"} == {
        "case"
    }


def test_runs_grouped_differently_are_refused(data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(GroupingError, match="group their cases differently"):
        compare_runs([data["ga"], data["b"]])
    run_evaluation(data["pred_b"], data["labels"], tmp_path / "other", CFG, group_by=r"^(sub-\d+_slice\d)",
                   workers=0, progress=False)
    with pytest.raises(GroupingError, match="sub-00_slice00"):
        compare_runs([data["ga"], tmp_path / "other"])
    # a grouping given to compare groups both runs the same way
    assert compare_runs([data["ga"], data["b"]], group_by=SUBJECT)["unit"] == "subject"


def test_groups_file_regex_errors_and_regrouping(data: dict[str, Path], tmp_path: Path) -> None:
    ids = sorted(p.stem for p in data["pred_a"].glob("*.npz"))
    table = tmp_path / "groups.csv"
    table.write_text("case_id,subject\n" + "".join(f"{c},{c.split('_')[0]}\n" for c in ids))
    out = tmp_path / "by_file"
    run_evaluation(data["pred_a"], data["labels"], out, CFG, groups=table, workers=0, progress=False)
    assert (out / "subjects.csv").read_text() == (data["ga"] / "subjects.csv").read_text()
    assert json.loads((out / "summary.json").read_text())["grouping"]["by"] == "file"
    # the grouping labels the outputs only: regrouping recomputes nothing; no grouping removes subjects.csv
    res = run_evaluation(data["pred_a"], data["labels"], out, CFG, workers=0, progress=False)
    assert res.n_computed == 0 and not (out / "subjects.csv").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grouping"]["unit"] == "case" and summary["grouping"]["n"] == 48
    assert "subject_macro" not in summary
    # a case without subject stops the run before anything is computed
    table.write_text("case_id,subject\n" + "".join(f"{c},s\n" for c in ids[1:]))
    with pytest.raises(GroupingError, match=ids[0]):
        run_evaluation(data["pred_a"], data["labels"], tmp_path / "x", CFG, groups=table, workers=0, progress=False)
    assert not (tmp_path / "x" / "cases.csv").exists()
    with pytest.raises(GroupingError, match="no subject for 48"):
        resolve_grouping(ids, group_by=r"^(patient\d+)")
    with pytest.raises(GroupingError, match="not a valid regular expression"):
        resolve_grouping(ids, group_by="(")
    table.write_text("case,subject\nx,y\n")
    with pytest.raises(ValueError, match="case_id"):
        resolve_grouping(ids, groups=table)
    whole = resolve_grouping(["sub-1_a"], group_by=r"sub-\d")  # no capture group: the whole match
    assert whole.subject_of("sub-1_a") == "sub-1"


def test_hd95_of_a_subject_is_the_mean_of_its_finite_case_values(tmp_path: Path) -> None:
    vols = {f"sub-{i:02d}": subject_volume(np.random.default_rng(i), shape=(10, 9, 4)) for i in range(2)}
    pred, lab = write_slices(tmp_path, vols)
    cfg = EvalConfig(fmt="npy", num_bins=10, hd95=True)
    run_evaluation(pred, lab, tmp_path / "r", cfg, group_by=SUBJECT, workers=0, progress=False)
    cases = _csv(tmp_path / "r" / "cases.csv")
    for row in _csv(tmp_path / "r" / "subjects.csv"):
        hd = [float(c["hd95"]) for c in cases if c["case_id"].startswith(row["subject"]) and c["class"] == row["class"]]
        fin = [h for h in hd if math.isfinite(h)]
        expected = np.mean(fin) if fin else math.nan
        assert float(row["hd95"]) == pytest.approx(expected, nan_ok=True)


def test_cli_states_the_unit(data: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(
        app,
        ["evaluate", str(data["pred_a"]), str(data["labels"]), "-o", str(tmp_path / "e"), "--format", "npy",
         "--workers", "0", "--no-hd95", "--no-report", "--bins", "10", "--group-by", SUBJECT],
        env={"COLUMNS": "200"},
    )
    assert r.exit_code == 0, r.output
    assert "over 3 subjects (48 cases)" in r.output and "statistical unit: subject" in r.output
    assert (tmp_path / "e" / "subjects.csv").exists()
    r = runner.invoke(
        app,
        ["compare", str(data["a"]), str(data["b"]), "-o", str(tmp_path / "c"), "--no-report",
         "--group-by", SUBJECT],
        env={"COLUMNS": "250"},
    )
    assert r.exit_code == 0, r.output
    assert "statistical unit: subject (3 subjects)" in r.output and "3 subjects" in r.output
    lines = [ln for ln in r.output.splitlines() if " ece " in ln and " mean " in ln]
    assert lines and all("3 subjects" in ln for ln in lines)
    with (tmp_path / "c" / "comparison.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(x["unit"], x["n"]) for x in rows} == {("subject", "3")}
    r = runner.invoke(
        app, ["compare", str(data["a"]), str(data["b"]), "-o", str(tmp_path / "c2"), "--no-report"],
        env={"COLUMNS": "250"},
    )
    assert r.exit_code == 0 and "48 cases" in r.output and "statistical unit: case" in r.output
    r = runner.invoke(app, ["compare", str(data["ga"]), str(data["b"]), "-o", str(tmp_path / "c3"), "--no-report"])
    assert r.exit_code == 1 and "group their cases differently" in r.output
