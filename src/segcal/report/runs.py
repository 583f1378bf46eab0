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

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segcal.functional.binning import BinStats
from segcal.functional.calibration import calibration_errors
from segcal.functional.scoring import CASE_METRICS, CLASS_METRICS
from segcal.io import write_bytes, write_text
from segcal.io.runs import read_run
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


def _metric_columns() -> tuple[str, ...]:
    """Metric columns of cases.csv, in schema order (:data:`segcal.functional.scoring.METRICS`)."""
    return (*CLASS_METRICS, *CASE_METRICS)


def glossary_section() -> Section:
    """The section explaining every metric of the report."""
    return Section("How to read the metrics", METRIC_GLOSSARY)


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------


class RunData:
    """The parsed content of one run folder (any missing optional file leaves its part ``None``), read by
    :func:`segcal.io.runs.read_run` with the metric columns parsed to floats."""

    def __init__(self, run_dir: Path) -> None:
        run = read_run(run_dir, _metric_columns())
        self.run_dir = run.run_dir
        self.cases = run.cases
        self.summary = run.summary
        self.case_ids: list[str] | None = None
        self.stats: BinStats | None = None
        self.class_names: list[str] | None = None
        if run.bins is not None:
            self.case_ids, self.class_names = run.bins.case_ids, run.bins.class_names
            self.stats = BinStats.from_numpy(run.bins.bin_stats)

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
        write_bytes(path, png)
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


def _present(*sections: Section | None) -> list[Section]:
    """The sections that were built (the optional ones return ``None`` when they have nothing to show)."""
    return [s for s in sections if s is not None]


def _geometry_text(geometry: Mapping[str, Any]) -> str:
    """Where the run's voxel sizes came from, in words (``summary.json`` ``geometry``)."""
    parts = []
    if geometry.get("folder_spacing") is not None:
        sp = ", ".join(f"{float(v):g}" for v in geometry["folder_spacing"])
        parts.append(f"({sp}) mm from {geometry.get('folder_spacing_from')} where the files state none")
    else:
        parts.append("from the files")
    assumed = geometry.get("assumed_1mm") or []
    if assumed:
        parts.append(f"{len(assumed)} case(s) without geometry scored with 1 mm voxels")
    return "; ".join(parts)


def _overview_section(run: RunData, n_cases: int, n_failed: int, classes: list[str]) -> Section:
    """Run folder, case / failure / class counts, M, and the scalar entries of summary.json."""
    overview = [
        {"item": "run folder", "value": run.run_dir.name},
        {"item": "cases", "value": n_cases},
        {"item": "failed cases", "value": n_failed},
        {"item": "classes", "value": ", ".join(classes)},
    ]
    if run.stats is not None:
        overview.append({"item": "bins (M)", "value": run.stats.num_bins})
    geometry = (run.summary or {}).get("geometry")
    text = f"Evaluation of **{run.run_dir.name}**: {n_cases} case(s), {n_failed} failed."
    if isinstance(geometry, Mapping):
        overview.append({"item": "voxel geometry", "value": _geometry_text(geometry)})
        if geometry.get("warning"):
            text += f"\n\n**Note:** {geometry['warning']}."
    sec = Section("Overview", text, tables=[Table(overview, columns=["item", "value"])])
    if run.summary:
        scal = _scalars(run.summary)
        if scal:
            sec.tables.append(Table(scal, "Run information (summary.json)"))
    return sec


def _dataset_summary_section(summary: Mapping[str, Any] | None) -> Section | None:
    """Macro and pooled tables of summary.json (``None`` when it has neither)."""
    if not summary or not (isinstance(summary.get("macro"), Mapping) or isinstance(summary.get("pooled"), Mapping)):
        return None
    sec = Section(
        "Dataset summary",
        "Macro values aggregate per-case metrics; pooled values come from the "
        "bin sums merged over all cases.",
    )
    if isinstance(summary.get("macro"), Mapping):
        sec.tables.append(_macro_table(summary["macro"]))
    if isinstance(summary.get("pooled"), Mapping):
        sec.tables.append(_pooled_table(summary["pooled"]))
    return sec


def _case_reliability_section(
    stats: BinStats, names: list[str], ids: list[str], out_fig: _FigureWriter, min_count: int
) -> Section:
    """Reliability diagrams of all cases pooled, then of the best, median and worst case by mean ACE."""
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
    return sec


def _dataset_histogram_section(stats: BinStats, names: list[str], out_fig: _FigureWriter, min_count: int) -> Section:
    """Dataset reliability histograms (per class and average, with the voxel-count strip)."""
    fig = dataset_reliability_histogram(stats, names, min_count=min_count)
    return Section(
        "Dataset reliability histograms",
        "For each predicted-probability bin (x), the distribution over cases of the observed "
        "frequency (y); every case adds one count per non-empty bin and each column sums to 1 "
        "(ACE-MICCAI Fig. 2). Mass on the diagonal means good calibration. The strip shows the "
        "voxels per bin over all cases.",
        figures=[out_fig(fig, "dataset_reliability_histogram", "Dataset reliability histograms")],
    )


def _subject_spread_section(stats: BinStats, names: list[str], out_fig: _FigureWriter, min_count: int) -> Section:
    """Per-bin subject spread (violins) per class."""
    sec = Section(
        "Subject-level spread per bin",
        "Violins: per-case observed frequency in each bin (PostHoc Fig. 3); numbers above: cases "
        "with voxels in the bin.",
    )
    for ci, name in enumerate(names):
        fig = subject_spread(stats, ci, min_count=min_count, class_name=name)
        sec.figures.append(out_fig(fig, f"subject_spread_{_safe(name)}", f"Subject spread: {name}"))
    return sec


def _bin_sections(run: RunData, out_fig: _FigureWriter, min_count: int) -> list[Section]:
    """The sections drawn from bins.npz, or one note that they were skipped."""
    if run.stats is None or run.stats.count.shape[0] == 0:
        return [Section("Bin statistics", "No `bins.npz` in the run folder: reliability figures skipped.")]
    stats, names, ids = run.stats, run.class_names or [], run.case_ids or []
    return [
        _case_reliability_section(stats, names, ids, out_fig, min_count),
        _dataset_histogram_section(stats, names, out_fig, min_count),
        _subject_spread_section(stats, names, out_fig, min_count),
    ]


def _quality_section(ok: list[dict[str, Any]], out_fig: _FigureWriter) -> Section | None:
    """Dice vs ACE per case and class (``None`` without any finite Dice)."""
    if not (ok and any(np.isfinite(r.get("dice", math.nan)) for r in ok)):
        return None
    labels, dice, ace_v = _series_by_class(ok, "dice", "ace")
    fig = quality_scatter(dice, ace_v, labels, pareto=True, calibration_name="ACE", title="Dice vs ACE per case")
    return Section(
        "Segmentation quality vs calibration",
        "One point per case and class; diamonds are class means; the dashed line is "
        "the Pareto front of the class means.",
        figures=[out_fig(fig, "dice_vs_ace", "Dice vs ACE per case")],
    )


def _case_table_section(ok: list[dict[str, Any]], max_case_rows: int) -> Section | None:
    """The per-case metric table (first ``max_case_rows`` ok rows; ``None`` without ok rows)."""
    if not ok:
        return None
    cols = ["case_id", "class", *[m for m in _metric_columns() if m in ok[0]]]
    text = "" if len(ok) <= max_case_rows else f"First {max_case_rows} of {len(ok)} rows (see cases.csv)."
    return Section("Per-case metrics", text, tables=[Table(ok[:max_case_rows], columns=cols)])


def _failed_section(failed: list[dict[str, Any]], n_failed: int) -> Section | None:
    """The failed cases with their messages (``None`` if none failed)."""
    if not failed:
        return None
    rows = [{"case_id": r["case_id"], "class": r.get("class", ""), "error": r.get("error", "")} for r in failed]
    return Section(
        "Failed cases",
        f"{n_failed} case(s) failed and are excluded from all statistics.",
        tables=[Table(rows, columns=["case_id", "class", "error"])],
    )


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
    sections = [
        _overview_section(run, n_cases, n_failed, classes),
        *_present(_dataset_summary_section(run.summary)),
        *_bin_sections(run, out_fig, min_count),
        *_present(
            _quality_section(ok, out_fig), _case_table_section(ok, max_case_rows), _failed_section(failed, n_failed)
        ),
        glossary_section(),
    ]
    html = render_html(
        f"segcal evaluation: {run.run_dir.name}", sections, subtitle=f"{n_cases} cases · {len(classes)} classes"
    )
    return write_text(run.run_dir / "report.html", html)


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


def _runs_section(names: list[str], runs: Sequence[RunData]) -> Section:
    """One row per run: name, folder, cases, failed cases."""
    rows = [
        {
            "run": n,
            "folder": str(r.run_dir),
            "cases": len({c["case_id"] for c in r.cases}),
            "failed": len({c["case_id"] for c in r.failed_rows}),
        }
        for n, r in zip(names, runs, strict=True)
    ]
    return Section("Runs", tables=[Table(rows)])


def _statistics_section(rows: list[dict[str, Any]], alpha: float) -> Section | None:
    """The comparison rows, preferred columns first, Holm p-values below ``alpha`` highlighted."""
    if not rows:
        return None
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
    return Section(
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


def _comparison_reliability_section(
    runs: Sequence[RunData], names: list[str], out_fig: _FigureWriter
) -> Section | None:
    """Dataset reliability histograms of the common cases, side by side (and their difference for two runs)."""
    aligned = _aligned_stats(runs)
    if aligned is None:
        return None
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
    return sec


def _comparison_quality_section(runs: Sequence[RunData], names: list[str], out_fig: _FigureWriter) -> Section | None:
    """Dice vs ACE (class means) per case and run (``None`` without any finite Dice)."""
    dice = [_per_case_mean(r.ok_rows, "dice") for r in runs]
    ace = [_per_case_mean(r.ok_rows, "ace") for r in runs]
    if not any(np.isfinite(d).any() for d in dice):
        return None
    fig = quality_scatter(
        dice,
        ace,
        names,
        pareto=True,
        calibration_name="ACE (mean over classes)",
        dice_name="Dice (mean over classes)",
        title="Dice vs ACE per case and run",
    )
    return Section(
        "Segmentation quality vs calibration",
        "Small points: cases; diamonds: run means; dashed: Pareto front of the run means.",
        figures=[out_fig(fig, "dice_vs_ace", "Dice vs ACE per run")],
    )


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
        _runs_section(names, runs),
        *_present(
            _statistics_section(comparison.get("rows", []), alpha),
            _comparison_reliability_section(runs, names, out_fig),
            _comparison_quality_section(runs, names, out_fig),
        ),
        glossary_section(),
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_text(out_dir / "report.html", render_html("segcal comparison: " + " vs ".join(names), sections))
