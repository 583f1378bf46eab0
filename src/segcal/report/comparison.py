"""The comparison report of several evaluated runs (``segcal compare``; docs/report.md).

It leads with one compact table: per metric (class-averaged, or the per-case value) and run, the relative change
from the baseline in percent, its 95% CI and the Holm-corrected p-value, each with the statistical unit and its
number (subjects when the runs' cases are grouped into subjects, else cases). A change is coloured only when it
is both significant (Holm p < ``alpha``) and at least ``min_change`` in size (green better, red worse, and said
in words). The per-class rows are folded below it. Runs are named by their folder (the full path in a tooltip);
each figure has its own colour scale and every series its own colour and marker.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segcal.functional.binning import BinStats
from segcal.io import write_text
from segcal.plots import dataset_reliability_comparison, dataset_reliability_histogram, quality_scatter
from segcal.report.html import Cell, Details, Section, Table, render_html
from segcal.report.runs import RunData, _FigureWriter, _present, _safe, glossary_section, load_run

__all__ = ["HEADLINE_METRICS", "build_comparison_report", "display_names"]

#: the metrics of the compact table (every metric is in the folded detail and in comparison.csv)
HEADLINE_METRICS = ("dice", "hd95", "nsd", "ece", "ace", "mce", "brier", "nll", "top_label_ece")
_HIGHER_IS_BETTER = {"dice", "iou", "precision", "recall", "nsd"}
#: runs up to which the dataset reliability histograms share one figure (one row and colour bar per run)
_SIDE_BY_SIDE_MAX = 3


def display_names(run_dirs: Sequence[str | Path], names: Sequence[str] | None = None) -> list[str]:
    """Short run names: the given ``names`` or the folders' names, as their last path component; names that
    would repeat get their parent folder (``a/eval``, ``b/eval``)."""
    full = [str(n) for n in names] if names is not None and len(names) == len(run_dirs) else [str(d) for d in run_dirs]
    short = [Path(n).name or n for n in full]
    if len(set(short)) < len(short):
        short = [str(Path(*Path(n).parts[-2:])) if short.count(s) > 1 else s for n, s in zip(full, short, strict=True)]
    return short


def _pct(rel: Any) -> str:
    return "" if rel is None or not math.isfinite(float(rel)) else f"{float(rel) * 100:+.1f}%"


def _ci(row: Mapping[str, Any]) -> str:
    lo, hi = row.get("rel_ci_low"), row.get("rel_ci_high")
    if lo is None or hi is None or not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        return ""
    return f"[{_pct(lo)}, {_pct(hi)}]"


def _n(row: Mapping[str, Any]) -> str:
    unit = row.get("unit", "case")
    return f"{row.get('n', '')} {unit}s" if row.get("n") is not None else ""


def _verdict(row: Mapping[str, Any], alpha: float, min_change: float) -> str:
    """``better`` / ``worse`` (significant and large enough), else why not."""
    p, rel = row.get("p_holm"), row.get("rel_change")
    if p is None or rel is None or not math.isfinite(float(p)) or float(p) >= alpha:
        return "not significant"
    if not math.isfinite(float(rel)) or abs(float(rel)) < min_change:
        return f"below {min_change * 100:g}%"
    lower = float(rel) < 0
    return "better" if lower != (row.get("metric") in _HIGHER_IS_BETTER) else "worse"


class _Namer:
    """Run path (or given name) → short display name, with the full path as tooltip."""

    def __init__(self, run_dirs: Sequence[Path], names: list[str], given: Sequence[str]) -> None:
        self.short: dict[str, str] = {}
        self.full: dict[str, str] = {}
        for d, n, g in zip(run_dirs, names, list(given) or [None] * len(names), strict=True):
            for key in {str(d), str(g) if g is not None else str(d)}:
                self.short[key], self.full[key] = n, str(d)

    def cell(self, run: Any) -> Cell:
        key = str(run)
        return Cell(self.short.get(key, Path(key).name or key), title=self.full.get(key, key))


def _row_cells(row: Mapping[str, Any], namer: _Namer, alpha: float, min_change: float) -> dict[str, Any]:
    verdict = _verdict(row, alpha, min_change)
    css = verdict if verdict in ("better", "worse") else ""
    return {
        "metric": row.get("metric"),
        "class": row.get("class"),
        "run": namer.cell(row.get("run_b")),
        "baseline mean": row.get("mean_a"),
        "run mean": row.get("mean_b"),
        "change": Cell(_pct(row.get("rel_change")), css=css),
        "95% CI of change": _ci(row),
        "Holm p": row.get("p_holm"),
        "n": _n(row),
        "verdict": Cell(verdict, css=css),
        "Wilcoxon p": row.get("p_wilcoxon"),
        "rank-sum p": row.get("p_ranksum"),
        "rank-biserial r": row.get("effect_size"),
        "Cliff's delta": row.get("cliffs_delta"),
        "Cohen's d": row.get("cohens_d"),
    }


_COMPACT = ["metric", "run", "baseline mean", "run mean", "change", "95% CI of change", "Holm p", "n", "verdict"]
_DETAIL = [
    "metric", "class", "run", "baseline mean", "run mean", "change", "95% CI of change", "Wilcoxon p", "Holm p",
    "n", "verdict", "rank-sum p", "rank-biserial r", "Cliff's delta", "Cohen's d",
]


def _units_text(rows: list[Mapping[str, Any]], comparison: Mapping[str, Any]) -> str:
    """The statistical unit and its number, with the small-sample caveat."""
    unit = rows[0].get("unit", "case") if rows else comparison.get("unit", "case")
    ns = sorted({int(r["n"]) for r in rows if r.get("n") is not None})
    n_text = str(ns[-1]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}" if ns else "?"
    grouping = comparison.get("grouping") or {}
    if unit == "subject":
        text = (
            f"Statistical unit: **subject** ({n_text} subjects; {grouping.get('description', 'grouped cases')}). "
            "Each subject's value comes from its cases' sums pooled; every test, CI and p-value is over subjects."
        )
    else:
        text = (
            f"Statistical unit: **case** ({n_text} cases; each case is its own subject, no grouping given). If "
            "several cases come from one subject (slices, patches), these statistics are pseudo-replicated: "
            "compare with `--group-by` or `--groups`."
        )
    if ns and ns[0] < 6:
        text += (
            f" With {ns[0]} units the paired Wilcoxon test cannot reach p < 0.05 (its smallest two-sided p is "
            f"2/2^{ns[0]} = {2 / 2 ** ns[0]:.3g}), and bootstrap CIs over so few units are too narrow."
        )
    return text


def _statistics_section(
    rows: list[Mapping[str, Any]], comparison: Mapping[str, Any], namer: _Namer, alpha: float, min_change: float
) -> Section | None:
    """The compact table (class averages and per-case metrics of the headline metrics) and the folded detail."""
    if not rows:
        return None
    order = {m: i for i, m in enumerate(HEADLINE_METRICS)}
    head = [r for r in rows if r.get("class") in ("mean", "case") and r.get("metric") in order]
    head = head or [r for r in rows if r.get("class") in ("mean", "case")] or list(rows)
    head = sorted(head, key=lambda r: order.get(str(r.get("metric")), len(order)))
    fmt = {"Holm p": "{:.3g}".format, "Wilcoxon p": "{:.3g}".format, "rank-sum p": "{:.3g}".format}
    rule = (
        f"Coloured: Holm p < {alpha:g} **and** |change| ≥ {min_change * 100:g}% (green better, red worse; the "
        "verdict column says the same in words). Change: relative change of the mean from the baseline, with "
        "its paired bootstrap 95% CI over the units; Holm: Wilcoxon signed-rank p-values corrected over all "
        "metric × class rows of a run."
    )
    compact = Table([_row_cells(r, namer, alpha, min_change) for r in head],
                    "Class average (per-case metrics: per case) of each run vs the baseline", columns=_COMPACT,
                    formats=fmt)
    detail = Table([_row_cells(r, namer, alpha, min_change) for r in rows], columns=_DETAIL, formats=fmt)
    return Section(
        "Comparison at a glance",
        [_units_text(list(rows), comparison), rule],
        tables=[compact],
        details=[Details(f"Every metric and class ({len(rows)} rows; comparison.csv)", tables=[detail])],
    )


def _runs_section(names: list[str], runs: Sequence[RunData], comparison: Mapping[str, Any]) -> Section:
    """One row per run: name (full path as tooltip), role, cases, failed cases, the unit and its number."""
    by_b = {str(p.get("run_b")): p for p in comparison.get("pairs", [])}
    rows = []
    for i, (n, r) in enumerate(zip(names, runs, strict=True)):
        pair = by_b.get(str(r.run_dir), {})
        rows.append({
            "run": Cell(n, title=str(r.run_dir)),
            "role": "baseline" if i == 0 else "compared with the baseline",
            "cases": len({c["case_id"] for c in r.cases}),
            "failed": len({c["case_id"] for c in r.failed_rows}),
            "units compared": f"{pair['n_units']} {pair['unit']}s" if pair else "",
        })
    return Section("Runs", "Hover a run's name for its folder.", tables=[Table(rows)])


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


def _comparison_reliability_section(
    runs: Sequence[RunData], names: list[str], out_fig: _FigureWriter
) -> Section | None:
    """Dataset reliability histograms of the common cases: up to three runs in one figure (a row and a colour
    bar per run), else one figure per run (folded); the difference of each run from the baseline."""
    aligned = _aligned_stats(runs)
    if aligned is None:
        return None
    common, stats = aligned
    class_names = runs[0].class_names
    sec = Section(
        "Dataset reliability histograms",
        f"Computed on the {len(common)} case(s) present in every run; each case adds one count per non-empty "
        "bin, each column sums to 1, each figure has its own colour bar.",
    )
    if len(runs) <= _SIDE_BY_SIDE_MAX:
        fig = dataset_reliability_comparison(stats, names, class_names, mode="side_by_side")
        sec.figures.append(out_fig(fig, "dataset_reliability_side_by_side", "Dataset reliability histograms"))
    else:
        figs = [
            out_fig(dataset_reliability_histogram(s, class_names, title=n), f"dataset_reliability_{i:02d}_{_safe(n)}",
                    f"Dataset reliability histograms: {n}")
            for i, (s, n) in enumerate(zip(stats, names, strict=True))
        ]
        sec.details.append(Details(f"One figure per run ({len(runs)} figures)", figures=figs))
    diffs = [
        out_fig(dataset_reliability_comparison([stats[0], s], [names[0], n], class_names, mode="difference"),
                "dataset_reliability_difference" + ("" if len(runs) == 2 else f"_{i:02d}_{_safe(n)}"),
                f"Column fractions of {n} minus {names[0]} (red: more cases there)")
        for i, (s, n) in enumerate(zip(stats[1:], names[1:], strict=True), start=1)
    ]
    if len(diffs) == 1:
        sec.figures += diffs
    else:
        sec.details.append(Details(f"Difference of each run from the baseline ({len(diffs)} figures)", figures=diffs))
    return sec


def _per_case_mean(rows: list[dict[str, Any]], metric: str) -> np.ndarray:
    by_case: dict[str, list[float]] = {}
    for r in rows:
        by_case.setdefault(str(r["case_id"]), []).append(float(r.get(metric, math.nan)))
    with np.errstate(all="ignore"):
        return np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in by_case.values()])


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
        "Small points: cases (descriptive); large markers: run means; dashed: Pareto front of the run means. "
        "Each run has its own colour and marker.",
        figures=[out_fig(fig, "dice_vs_ace", "Dice vs ACE per run")],
    )


def build_comparison_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    comparison: Mapping[str, Any],
    *,
    alpha: float = 0.05,
    min_change: float = 0.05,
) -> Path:
    """Compare evaluated runs: the compact statistics table (and the folded per-class rows), dataset
    reliability histograms, Dice-vs-ACE scatter; writes ``out_dir/figures/*.png`` and ``out_dir/report.html``.

    ``comparison``: :func:`segcal.evaluation.compare.compare_runs`'s result (``"runs"`` may be replaced by
    display names); a change is coloured when its Holm p < ``alpha`` and ``|relative change| >= min_change``
    (0.05 = 5 %).
    """
    if len(run_dirs) < 2:
        raise ValueError("build_comparison_report needs at least two run folders")
    runs = [load_run(d) for d in run_dirs]
    given = [str(n) for n in comparison.get("runs", [])]
    names = display_names([r.run_dir for r in runs], given if len(given) == len(runs) else None)
    namer = _Namer([r.run_dir for r in runs], names, given if len(given) == len(runs) else [])
    out_dir = Path(out_dir)
    out_fig = _FigureWriter(out_dir / "figures")
    sections = [
        *_present(
            _statistics_section(list(comparison.get("rows", [])), comparison, namer, alpha, min_change),
        ),
        _runs_section(names, runs, comparison),
        *_present(
            _comparison_reliability_section(runs, names, out_fig),
            _comparison_quality_section(runs, names, out_fig),
        ),
        glossary_section(),
    ]
    title = " vs ".join(names) if len(names) <= 3 else f"{names[0]} (baseline) vs {len(names) - 1} runs"
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_text(out_dir / "report.html", render_html("segcal comparison: " + title, sections))
