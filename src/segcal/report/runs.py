"""Run-level reports: an evaluated run folder → figures + ``report.html``; several runs → a comparison report.

Run folder layout (written by ``segcal evaluate``):

* ``cases.csv`` — one row per case × class: ``case_id, class, status, dice, iou, precision, recall, hd95,
  ece, ace, mce, ece_l2, ace_l2, nll, brier, top_label_ece`` (+ ``error`` for failed cases,
  ``status == "failed"``);
* ``summary.json`` — free-form; ``{"macro": {metric: {class: {mean, std, median, iqr, ci_low, ci_high}}},
  "pooled": {metric: {class: value}}}`` parts are rendered as tables;
* ``bins.npz`` — ``case_ids (N,)`` str, ``bin_stats (N, C, 3, M)`` float64 (count, sum_p, sum_y),
  ``class_names (C,)`` str; loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segcal.functional.binning import BinStats
from segcal.functional.calibration import calibration_errors
from segcal.functional.scoring import CASE_METRICS, CLASS_METRICS
from segcal.plots import (
    dataset_reliability_comparison,
    dataset_reliability_histogram,
    quality_scatter,
    reliability_diagrams,
    subject_spread,
)
from segcal.plots._common import figure_to_png_bytes
from segcal.report.html import ReportFigure, Section, Table, render_html

__all__ = [
    "METRIC_GLOSSARY",
    "RunData",
    "build_comparison_report",
    "build_evaluation_report",
    "glossary_section",
    "load_run",
]

METRIC_GLOSSARY = """
Per image and class, the predicted probabilities are split into M equal-width bins (k/M, (k+1)/M]. In bin k,
*e_k* is the mean predicted probability and *o_k* the observed frequency of the class (mean label).

- **ECE** (expected calibration error): Σ_k (n_k/N)·|o_k − e_k|, the voxel-weighted mean gap. Dominated by the
  nearly-certain background and foreground bins (ACE-MICCAI eq. 1).
- **ACE** (average calibration error): the unweighted mean of |o_k − e_k| over non-empty bins; sensitive to
  the uncertain voxels at object borders (ACE-MICCAI eq. 3).
- **MCE** (maximum calibration error): the largest gap over non-empty bins (ACE-MICCAI eq. 4).
  `_l2` variants use the root mean squared gap. Empty bins are never counted as zero.
- **Top-label ECE / MCE**: ECE / MCE of the confidence max_c p_c against the accuracy (argmax == label)
  (PostHoc eq. 3).
- **NLL**: mean negative log-likelihood of the labels, probabilities clipped to [ε, 1−ε] (Ensembles eq. 3).
- **Brier**: mean squared difference between probability and one-hot label (Ensembles eq. 4).
- **MAE** (with soft reference maps): mean absolute difference between the predicted probability and the
  reference probability of the class.
- **Dice**: 2|P∩G| / (|P|+|G|); **IoU** (Jaccard): |P∩G| / |P∪G|; precision and recall of the
  thresholded mask.
- **HD95**: 95th percentile of the symmetric surface distance between prediction and ground truth, in
  physical units (voxel spacing).
- **Macro vs pooled**: *macro* values are per-case metrics aggregated over cases (mean, std, median, IQR);
  *pooled* values are computed once from the bin sums merged over all cases (one big image).
- **Bootstrap CI**: 95% percentile interval of the macro mean over case resamples (seeded, default 1000).
"""

_MACRO_FIELDS = ("mean", "std", "median", "iqr", "ci_low", "ci_high")
#: metric columns of cases.csv, in the evaluation's order (one definition: the evaluation runner's)
_METRIC_COLUMNS = (*CLASS_METRICS, *CASE_METRICS)


def glossary_section() -> Section:
    """The section explaining every metric of the report."""
    return Section("How to read the metrics", METRIC_GLOSSARY)


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------


class RunData:
    """The parsed content of one run folder (any missing optional file leaves its part ``None``)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.cases = _read_cases(self.run_dir / "cases.csv")
        self.summary = _read_summary(self.run_dir / "summary.json")
        self.case_ids, self.stats, self.class_names = _read_bins(self.run_dir / "bins.npz")

    @property
    def ok_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.cases if r.get("status", "ok") != "failed"]

    @property
    def failed_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.cases if r.get("status") == "failed"]


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    return RunData(run_dir)


def _to_float(v: str | None) -> float:
    if v is None or v.strip() == "":
        return math.nan
    try:
        return float(v)
    except ValueError:
        return math.nan


def _read_cases(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: cases.csv is missing (run `segcal evaluate` first)")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"case_id", "class"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        rows = []
        for r in reader:
            row: dict[str, Any] = dict(r)
            row.setdefault("status", "ok")  # files without a status column; evaluate's rows carry "ok" / "failed"
            for m in _METRIC_COLUMNS:
                if m in row:
                    row[m] = _to_float(row[m])
            rows.append(row)
    return rows


def _read_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def _read_bins(path: Path) -> tuple[list[str] | None, BinStats | None, list[str] | None]:
    if not path.is_file():
        return None, None, None
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            missing = {"case_ids", "bin_stats", "class_names"} - files
            if not missing:
                ids, arr, names = z["case_ids"], z["bin_stats"], z["class_names"]
    except (OSError, EOFError, ValueError) as exc:  # not a zip / truncated / would need pickle
        raise ValueError(f"{path}: unreadable bins file ({exc})") from exc
    except AttributeError as exc:  # a plain .npy array instead of an .npz archive
        raise ValueError(f"{path}: expected an .npz archive with case_ids, bin_stats, class_names") from exc
    if missing:
        raise ValueError(f"{path}: missing array(s) {sorted(missing)}")
    if arr.ndim != 4 or arr.shape[2] != 3:
        raise ValueError(f"{path}: bin_stats must be (N, C, 3, M), got shape {arr.shape}")
    if ids.shape != (arr.shape[0],) or names.shape != (arr.shape[1],):
        raise ValueError(
            f"{path}: case_ids {ids.shape} / class_names {names.shape} do not match bin_stats {arr.shape}"
        )
    if not np.isfinite(arr).all() or (arr[:, :, 0] < 0).any():
        raise ValueError(f"{path}: bin_stats holds NaN/Inf or negative counts")
    return [str(s) for s in ids], BinStats.from_numpy(arr), [str(s) for s in names]


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


class _FigureWriter:
    """Render each figure once: write ``figures/<name>.png`` and keep the bytes for embedding."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []

    def __call__(self, fig: Any, name: str, caption: str) -> ReportFigure:
        png = figure_to_png_bytes(fig)
        path = self.folder / f"{name}.png"
        path.write_bytes(png)
        self.paths.append(path)
        return ReportFigure(png, caption)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:80] or "x"


def _macro_table(macro: Mapping[str, Any]) -> Table:
    rows = []
    for metric, per_class in macro.items():
        if not isinstance(per_class, Mapping):
            continue
        for cls, vals in per_class.items():
            if isinstance(vals, Mapping):
                rows.append({"metric": metric, "class": cls, **{k: vals.get(k) for k in _MACRO_FIELDS}})
            else:
                rows.append({"metric": metric, "class": cls, "mean": vals})
    return Table(rows, "Macro (per-case) statistics", columns=["metric", "class", *_MACRO_FIELDS])


def _pooled_table(pooled: Mapping[str, Any]) -> Table:
    rows = []
    for metric, per_class in pooled.items():
        if isinstance(per_class, Mapping):
            rows.append({"metric": metric, **{str(k): v for k, v in per_class.items()}})
        else:
            rows.append({"metric": metric, "value": per_class})
    return Table(rows, "Pooled (bin sums merged over cases)")


def _scalars(d: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {"key": k, "value": v} for k, v in d.items() if isinstance(v, str | int | float | bool) or v is None
    ]


def _case_ace(stats: BinStats) -> np.ndarray:
    """Mean over classes of the per-case marginal ACE (NaN where every class is empty)."""
    ace = calibration_errors(stats)["ace"].numpy()
    fin = np.isfinite(ace)
    n = fin.sum(1)
    return np.where(n > 0, np.where(fin, ace, 0.0).sum(1) / np.maximum(n, 1), np.nan)


def _pick_cases(ace: np.ndarray) -> list[tuple[str, int]]:
    ok = np.flatnonzero(np.isfinite(ace))
    if ok.size == 0:
        return []
    order = ok[np.argsort(ace[ok], kind="stable")]
    picks = [("best", int(order[0])), ("median", int(order[len(order) // 2])), ("worst", int(order[-1]))]
    seen: set[int] = set()
    out = []
    for name, i in picks:
        if i not in seen:
            seen.add(i)
            out.append((name, i))
    return out


def _series_by_class(
    rows: list[dict[str, Any]], x: str, y: str
) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    classes = list(dict.fromkeys(str(r["class"]) for r in rows))
    xs = [np.array([r.get(x, math.nan) for r in rows if str(r["class"]) == c], dtype=float) for c in classes]
    ys = [np.array([r.get(y, math.nan) for r in rows if str(r["class"]) == c], dtype=float) for c in classes]
    return classes, xs, ys


# ----------------------------------------------------------------------------------------------------
# evaluation report
# ----------------------------------------------------------------------------------------------------


def build_evaluation_report(run_dir: str | Path, *, min_count: int = 1, max_case_rows: int = 500) -> Path:
    """Build ``run_dir/figures/*.png`` and ``run_dir/report.html`` for one evaluated run; returns the HTML
    path.

    Figures: reliability diagrams of the best / median / worst case by mean marginal ACE, dataset reliability
    histograms (per class + average, with the voxel-count strip), per-bin subject spread per class, Dice vs
    ACE scatter. Failed cases are listed with their messages.
    """
    run = load_run(run_dir)
    out_fig = _FigureWriter(run.run_dir / "figures")
    ok, failed = run.ok_rows, run.failed_rows
    n_cases = len({r["case_id"] for r in run.cases})
    n_failed = len({r["case_id"] for r in failed})
    classes = list(dict.fromkeys(str(r["class"]) for r in run.cases))
    sections: list[Section] = []

    overview = [
        {"item": "run folder", "value": run.run_dir.name},
        {"item": "cases", "value": n_cases},
        {"item": "failed cases", "value": n_failed},
        {"item": "classes", "value": ", ".join(classes)},
    ]
    if run.stats is not None:
        overview.append({"item": "bins (M)", "value": run.stats.num_bins})
    sec = Section(
        "Overview",
        f"Evaluation of **{run.run_dir.name}**: {n_cases} case(s), {n_failed} failed.",
        tables=[Table(overview, columns=["item", "value"])],
    )
    if run.summary:
        scal = _scalars(run.summary)
        if scal:
            sec.tables.append(Table(scal, "Run information (summary.json)"))
    sections.append(sec)

    if run.summary and (
        isinstance(run.summary.get("macro"), Mapping) or isinstance(run.summary.get("pooled"), Mapping)
    ):
        sec = Section(
            "Dataset summary",
            "Macro values aggregate per-case metrics; pooled values come from the "
            "bin sums merged over all cases.",
        )
        if isinstance(run.summary.get("macro"), Mapping):
            sec.tables.append(_macro_table(run.summary["macro"]))
        if isinstance(run.summary.get("pooled"), Mapping):
            sec.tables.append(_pooled_table(run.summary["pooled"]))
        sections.append(sec)

    if run.stats is not None and run.stats.count.shape[0] > 0:
        stats, names, ids = run.stats, run.class_names or [], run.case_ids or []
        ace = _case_ace(stats)
        sec = Section(
            "Per-case reliability diagrams",
            "All cases pooled (the dataset-level, micro calibration), then the best, median and worst "
            "case by the class-averaged marginal ACE (mL1-ACE). Bars: observed "
            "frequency per bin; hatched: the gap to the mean predicted probability; below: voxels "
            "per bin (log scale).",
        )
        pooled_fig = reliability_diagrams(
            stats.pooled(), 0, class_names=names, min_count=min_count, title="all cases pooled"
        )
        sec.figures.append(
            out_fig(pooled_fig, "reliability_pooled", "All cases pooled: bin sums merged over the dataset")
        )
        for label, i in _pick_cases(ace):
            fig = reliability_diagrams(
                stats,
                i,
                class_names=names,
                min_count=min_count,
                title=f"{label} case {ids[i]} (mean ACE {ace[i]:.4f})",
            )
            sec.figures.append(
                out_fig(
                    fig,
                    f"reliability_{label}_{_safe(ids[i])}",
                    f"{label.capitalize()} case {ids[i]}: mean ACE {ace[i]:.4f}",
                )
            )
        sections.append(sec)

        fig = dataset_reliability_histogram(stats, names, min_count=min_count)
        sections.append(
            Section(
                "Dataset reliability histograms",
                "For each predicted-probability bin (x), the distribution over cases of the observed "
                "frequency (y); every case adds one count per non-empty bin and each column sums to 1 "
                "(ACE-MICCAI Fig. 2). Mass on the diagonal means good calibration. The strip shows the "
                "voxels per bin over all cases.",
                figures=[out_fig(fig, "dataset_reliability_histogram", "Dataset reliability histograms")],
            )
        )

        sec = Section(
            "Subject-level spread per bin",
            "Violins: per-case observed frequency in each bin (PostHoc Fig. 3); numbers above: cases "
            "with voxels in the bin.",
        )
        for ci, name in enumerate(names):
            fig = subject_spread(stats, ci, min_count=min_count, class_name=name)
            sec.figures.append(out_fig(fig, f"subject_spread_{_safe(name)}", f"Subject spread: {name}"))
        sections.append(sec)
    else:
        sections.append(
            Section("Bin statistics", "No `bins.npz` in the run folder: reliability figures skipped.")
        )

    if ok and any(np.isfinite(r.get("dice", math.nan)) for r in ok):
        labels, dice, ace_v = _series_by_class(ok, "dice", "ace")
        fig = quality_scatter(
            dice, ace_v, labels, pareto=True, calibration_name="ACE", title="Dice vs ACE per case"
        )
        sections.append(
            Section(
                "Segmentation quality vs calibration",
                "One point per case and class; diamonds are class means; the dashed line is "
                "the Pareto front of the class means.",
                figures=[out_fig(fig, "dice_vs_ace", "Dice vs ACE per case")],
            )
        )

    if ok:
        cols = ["case_id", "class", *[m for m in _METRIC_COLUMNS if m in ok[0]]]
        text = "" if len(ok) <= max_case_rows else f"First {max_case_rows} of {len(ok)} rows (see cases.csv)."
        sections.append(Section("Per-case metrics", text, tables=[Table(ok[:max_case_rows], columns=cols)]))

    if failed:
        rows = [
            {"case_id": r["case_id"], "class": r.get("class", ""), "error": r.get("error", "")}
            for r in failed
        ]
        sections.append(
            Section(
                "Failed cases",
                f"{n_failed} case(s) failed and are excluded from all statistics.",
                tables=[Table(rows, columns=["case_id", "class", "error"])],
            )
        )

    sections.append(glossary_section())
    html_path = run.run_dir / "report.html"
    html_path.write_text(
        render_html(
            f"segcal evaluation: {run.run_dir.name}",
            sections,
            subtitle=f"{n_cases} cases · {len(classes)} classes",
        ),
        encoding="utf-8",
    )
    return html_path


# ----------------------------------------------------------------------------------------------------
# comparison report
# ----------------------------------------------------------------------------------------------------


def _aligned_stats(runs: Sequence[RunData]) -> tuple[list[str], list[BinStats]] | None:
    if any(r.stats is None for r in runs):
        return None
    common = [c for c in runs[0].case_ids or [] if all(c in set(r.case_ids or []) for r in runs[1:])]
    if not common:
        return None
    out = []
    for r in runs:
        pos = {c: i for i, c in enumerate(r.case_ids or [])}
        idx = [pos[c] for c in common]
        s = r.stats
        assert s is not None
        out.append(BinStats(s.count[idx], s.sum_p[idx], s.sum_y[idx]))
    return common, out


def _per_case_mean(rows: list[dict[str, Any]], metric: str) -> np.ndarray:
    by_case: dict[str, list[float]] = {}
    for r in rows:
        by_case.setdefault(str(r["case_id"]), []).append(float(r.get(metric, math.nan)))
    with np.errstate(all="ignore"):
        return np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in by_case.values()])


def build_comparison_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, comparison: Mapping[str, Any], *, alpha: float = 0.05
) -> Path:
    """Compare evaluated runs: statistics table, overlaid dataset reliability histograms, Dice-vs-ACE scatter.

    ``comparison = {"runs": [names], "rows": [{metric, class, run_a, run_b, mean_a, mean_b, rel_change,
    p_wilcoxon, p_holm, effect_size, ...}]}`` (from the evaluation statistics); Holm-corrected p-values below
    ``alpha`` are highlighted. Writes ``out_dir/figures/*.png`` and ``out_dir/report.html``.
    """
    if len(run_dirs) < 2:
        raise ValueError("build_comparison_report needs at least two run folders")
    runs = [load_run(d) for d in run_dirs]
    names = [str(n) for n in comparison.get("runs", [])]
    if len(names) != len(runs):
        names = [r.run_dir.name for r in runs]
    out_dir = Path(out_dir)
    out_fig = _FigureWriter(out_dir / "figures")
    sections = [
        Section(
            "Runs",
            tables=[
                Table(
                    [
                        {
                            "run": n,
                            "folder": str(r.run_dir),
                            "cases": len({c["case_id"] for c in r.cases}),
                            "failed": len({c["case_id"] for c in r.failed_rows}),
                        }
                        for n, r in zip(names, runs, strict=True)
                    ]
                )
            ],
        )
    ]

    rows = comparison.get("rows", [])
    if rows:
        preferred = [
            "metric",
            "class",
            "run_a",
            "run_b",
            "mean_a",
            "mean_b",
            "rel_change",
            "p_wilcoxon",
            "p_holm",
            "effect_size",
        ]
        present = list(dict.fromkeys(k for r in rows for k in r))
        cols = [c for c in preferred if c in present] + [c for c in present if c not in preferred]
        sections.append(
            Section(
                "Statistical comparison",
                "Paired Wilcoxon signed-rank tests on the cases common to both runs; p-values "
                f"Holm-corrected over all metric/class pairs. Highlighted: Holm p < {alpha}.",
                tables=[
                    Table(
                        rows,
                        columns=cols,
                        highlight=lambda c, v: c == "p_holm" and isinstance(v, int | float) and v < alpha,
                    )
                ],
            )
        )

    aligned = _aligned_stats(runs)
    if aligned is not None:
        common, stats = aligned
        class_names = runs[0].class_names
        sec = Section(
            "Dataset reliability histograms",
            f"Computed on the {len(common)} case(s) present in every run; one row per run.",
        )
        fig = dataset_reliability_comparison(stats, names, class_names, mode="side_by_side")
        sec.figures.append(out_fig(fig, "dataset_reliability_side_by_side", "Dataset reliability histograms"))
        if len(runs) == 2:
            fig = dataset_reliability_comparison(stats, names, class_names, mode="difference")
            sec.figures.append(
                out_fig(
                    fig,
                    "dataset_reliability_difference",
                    f"Column fractions of {names[1]} minus {names[0]} (red: more cases)",
                )
            )
        sections.append(sec)

    dice = [_per_case_mean(r.ok_rows, "dice") for r in runs]
    ace = [_per_case_mean(r.ok_rows, "ace") for r in runs]
    if any(np.isfinite(d).any() for d in dice):
        fig = quality_scatter(
            dice,
            ace,
            names,
            pareto=True,
            calibration_name="ACE (mean over classes)",
            dice_name="Dice (mean over classes)",
            title="Dice vs ACE per case and run",
        )
        sections.append(
            Section(
                "Segmentation quality vs calibration",
                "Small points: cases; diamonds: run means; dashed: Pareto front of the run means.",
                figures=[out_fig(fig, "dice_vs_ace", "Dice vs ACE per run")],
            )
        )
    sections.append(glossary_section())
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = out_dir / "report.html"
    html_path.write_text(render_html("segcal comparison: " + " vs ".join(names), sections), encoding="utf-8")
    return html_path
