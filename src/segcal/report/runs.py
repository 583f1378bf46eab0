"""Run-level reports: an evaluated run folder → figures + ``report.html`` (the comparison of several runs is
:mod:`segcal.report.comparison`).

Run folder layout (written by ``segcal evaluate``):

* ``cases.csv`` — one row per case × class: ``case_id, class, status, dice, iou, precision, recall, hd95,
  ece, ace, mce, ece_l2, ace_l2, nll, brier, top_label_ece`` (+ ``error`` for failed cases,
  ``status == "failed"``);
* ``summary.json`` — free-form; ``{"macro": {metric: {class: {mean, std, median, iqr, ci_low, ci_high}}},
  "pooled": {metric: {class: value}}}`` parts are rendered as tables, ``subject_macro`` (cases grouped into
  subjects) first, and ``grouping`` states the statistical unit;
* ``bins.npz`` — ``case_ids (N,)`` str, ``bin_stats (N, C, 3, M)`` float64 (count, sum_p, sum_y),
  ``class_names (C,)`` str; loaded with ``allow_pickle=False``;
* ``subjects.csv`` (cases grouped into subjects) — one row per subject × class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segcal.evaluation.grouping import stored_grouping, subject_bins
from segcal.functional.binning import BinStats
from segcal.functional.calibration import calibration_errors
from segcal.functional.scoring import CASE_METRICS, CLASS_METRICS, PEER_CASE_METRICS, PEER_CLASS_METRICS
from segcal.io import write_bytes, write_text
from segcal.io.runs import read_run
from segcal.plots import (
    dataset_reliability_histogram,
    quality_scatter,
    reliability_diagrams,
    subject_spread,
)
from segcal.plots._common import figure_to_png_bytes
from segcal.report.html import Details, ReportFigure, Section, Table, render_html

__all__ = [
    "METRIC_GLOSSARY",
    "RunData",
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
  physical units (voxel spacing): the larger of the two directed 95th percentiles (boundary voxels of the
  prediction to the ground truth's, and back).
- **HD** (`--surface hd`): the largest of those surface distances (Hausdorff distance); **ASSD**
  (`--surface assd`): their mean over the boundary voxels of both masks; **NSD** (`--surface nsd`,
  normalised surface Dice): the fraction of boundary voxels of both masks within the tolerance (mm, in the
  run's configuration) of the other mask's boundary (Nikolov et al. 2021). A class absent from both masks
  scores 0 (NSD 1); present in only one: HD95 n/a, HD / ASSD infinite (left out of means, counted as n/a),
  NSD 0.
- **Per class vs per case**: most metrics have one value per class; NLL and the top-label metrics have one
  value per case, over all classes together (their rows say `case`).
- **Macro vs pooled**: *macro* values are per-unit metrics aggregated over the units (mean, std, median,
  IQR); *pooled* values are computed once from the bin sums merged over all cases (one big image).
- **Statistical unit**: the independent observations of the statistics. When the cases are slices or
  patches of fewer subjects (`segcal evaluate --group-by` / `--groups`), a subject's values come from its
  cases' sums pooled (its stacked volume), and every CI and test is over subjects; otherwise each case is its
  own subject. Slices of one subject are not independent: statistics over them are far too confident.
- **Bootstrap CI**: 95% percentile interval of the macro mean over resamples of the units (seeded, 1000).
- **Metrics of the peers** (runs with `--peer-metrics`): **cw_ece**, the class-wise ECE (mean of the class
  ECEs; MetricsReloaded's cwECE); **rbs**, the root Brier score (root of the Brier scores summed over the
  classes); **adaptive_ece**, the ECE over M equal-mass bins (edges at the quantiles of the probabilities),
  formed from a fine histogram, and **adaptive_ece_bound**, the bound on its distance to the exact per-voxel
  value; **mean_entropy** and **mean_confidence**, case-level uncertainty scores.
- **AURC / E-AURC** (failure detection, runs with `--peer-metrics`): the area under the risk-coverage curve of
  the cases ranked by an uncertainty score, risk 1 − Dice, and its excess over the ranking by the risk itself
  (0 = the score orders the cases as their risk does). Lower is better.
"""

_MACRO_FIELDS = ("mean", "std", "median", "iqr", "ci_low", "ci_high")


def _metric_columns() -> tuple[str, ...]:
    """Metric columns of cases.csv, in schema order (:data:`segcal.functional.scoring.METRICS`)."""
    return (*CLASS_METRICS, *CASE_METRICS, *PEER_CLASS_METRICS, *PEER_CASE_METRICS)


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
        self.subjects = run.subjects
        self.grouping = stored_grouping((self.summary or {}).get("grouping"))
        self.case_ids: list[str] | None = None
        self.stats: BinStats | None = None
        self.class_names: list[str] | None = None
        if run.bins is not None:
            self.case_ids, self.class_names = run.bins.case_ids, run.bins.class_names
            self.stats = BinStats.from_numpy(run.bins.bin_stats)

    def subject_stats(self) -> BinStats | None:
        """Per-subject bin sums (each subject's cases summed) when the cases are grouped, else None."""
        if self.stats is None or self.grouping.unit != "subject":
            return None
        _, arr = subject_bins(self.stats.numpy(), self.case_ids or [], self.grouping)
        return BinStats.from_numpy(arr)

    def unit_text(self) -> str:
        """The statistical unit in words (``summary.json`` ``grouping``)."""
        g = (self.summary or {}).get("grouping") or {}
        if g.get("unit") == "subject":
            return f"subject: {g.get('n')} subjects of {g.get('n_cases')} cases ({g.get('description')})"
        if g:
            return f"case: {g.get('n')} cases, each its own subject (no grouping given)"
        return "case (each case its own subject)"

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


def _split(d: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``d`` (metric → values) split into the per-class metrics and the per-case ones (NLL, top-label)."""
    case_metrics = (*CASE_METRICS, *PEER_CASE_METRICS)
    per_case = {k: v for k, v in d.items() if k in case_metrics}
    return {k: v for k, v in d.items() if k not in case_metrics}, per_case


def _macro_rows(macro: Mapping[str, Any], per_case: bool) -> list[dict[str, Any]]:
    rows = []
    for metric, per_class in macro.items():
        if not isinstance(per_class, Mapping):
            continue
        for cls, vals in per_class.items():
            row: dict[str, Any] = {"metric": metric} if per_case else {"metric": metric, "class": cls}
            if isinstance(vals, Mapping):
                row.update({k: vals.get(k) for k in ("n", *_MACRO_FIELDS)})
            else:
                row["mean"] = vals
            rows.append(row)
    return rows


def _macro_tables(macro: Mapping[str, Any], over: str) -> list[Table]:
    """The macro summaries over ``over`` (e.g. "3 subjects"): per-class metrics, then per-case metrics."""
    per_class, per_case = _split(macro)
    tables = [Table(_macro_rows(per_class, False), f"Macro over {over}: per-class metrics",
                    columns=["metric", "class", "n", *_MACRO_FIELDS])]
    if per_case:
        tables.append(Table(_macro_rows(per_case, True),
                            f"Macro over {over}: per-case metrics (one value per case over all classes)",
                            columns=["metric", "n", *_MACRO_FIELDS]))
    return tables


def _pooled_tables(pooled: Mapping[str, Any]) -> list[Table]:
    per_class, per_case = _split(pooled)
    rows = []
    for metric, values in per_class.items():
        if isinstance(values, Mapping):
            rows.append({"metric": metric, **{str(k): v for k, v in values.items()}})
        else:
            rows.append({"metric": metric, "value": values})
    tables = [Table(rows, "Pooled (bin sums merged over cases): per-class metrics")]
    if per_case:
        case_rows = [
            {"metric": m, "value": v.get("case") if isinstance(v, Mapping) else v} for m, v in per_case.items()
        ]
        tables.append(Table(case_rows, "Pooled: per-case metrics (over all classes, all voxels of all cases)"))
    return tables


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
        {"item": "statistical unit", "value": run.unit_text()},
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
    """Macro (over subjects first, when grouped) and pooled tables of summary.json (``None`` when it has
    neither)."""
    if not summary or not (isinstance(summary.get("macro"), Mapping) or isinstance(summary.get("pooled"), Mapping)):
        return None
    sub = summary.get("subject_macro")
    text = "Macro values aggregate per-case metrics; pooled values come from the bin sums merged over all cases."
    sec = Section("Dataset summary")
    if isinstance(sub, Mapping) and isinstance(sub.get("metrics"), Mapping):
        text = (
            f"The statistical unit is the **subject**: {sub.get('n')} subjects of {sub.get('n_cases')} cases. A "
            "subject's values come from its cases' sums pooled (its stacked volume); the macro tables over "
            "subjects, with bootstrap CIs over subjects, come first. The tables over cases that follow are "
            "descriptive only: cases of one subject are not independent, so their CIs are too narrow. Pooled "
            "values come from the bin sums merged over all cases."
        )
        sec.tables += _macro_tables(sub["metrics"], f"{sub.get('n')} subjects (the statistical unit)")
    if isinstance(summary.get("macro"), Mapping):
        n = summary.get("n_ok", "the")
        by_case = _macro_tables(summary["macro"], f"{n} cases")
        if sec.tables:  # grouped: the tables over cases are descriptive, folded
            sec.details.append(Details(f"Macro over {n} cases (descriptive: not independent units)", tables=by_case))
        else:
            sec.tables += by_case
    if isinstance(summary.get("pooled"), Mapping):
        sec.tables += _pooled_tables(summary["pooled"])
    fd = _failure_detection_table(summary.get("failure_detection"))
    if fd is not None:
        sec.tables.append(fd)
    sec.text = text
    return sec


def _failure_detection_table(fd: Any) -> Table | None:
    """AURC / E-AURC per uncertainty score (``summary["failure_detection"]``), or None without it."""
    if not isinstance(fd, Mapping) or not isinstance(fd.get("scores"), Mapping):
        return None
    rows = [
        {"score": name, **{k: v.get(k) for k in ("aurc", "e_aurc", "n")}}
        for name, v in fd["scores"].items()
        if isinstance(v, Mapping)
    ]
    caption = f"Failure detection over cases: risk {fd.get('risk', '1 - Dice')}; lower AURC / E-AURC is better"
    return Table(rows, caption, columns=["score", "aurc", "e_aurc", "n"])


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


def _subject_spread_section(run: RunData, out_fig: _FigureWriter, min_count: int) -> Section:
    """Per-bin spread over subjects (violins) per class: over the subjects' pooled bins when the cases are
    grouped into subjects, else over cases."""
    sub = run.subject_stats()
    stats, unit = (sub, "subjects") if sub is not None else (run.stats, "cases")
    assert stats is not None
    what = (
        "each subject's cases pooled into one set of bins" if sub is not None
        else "each case is its own subject (no grouping given)"
    )
    sec = Section(
        "Spread over subjects per bin",
        f"Violins: the observed frequency in each bin, one value per {unit[:-1]} ({what}; PostHoc Fig. 3); "
        f"numbers above: {unit} with voxels in the bin.",
    )
    for ci, name in enumerate(run.class_names or []):
        fig = subject_spread(stats, ci, min_count=min_count, class_name=name, unit=unit)
        sec.figures.append(out_fig(fig, f"subject_spread_{_safe(name)}", f"Spread over {unit}: {name}"))
    return sec


def _bin_sections(run: RunData, out_fig: _FigureWriter, min_count: int) -> list[Section]:
    """The sections drawn from bins.npz, or one note that they were skipped."""
    if run.stats is None or run.stats.count.shape[0] == 0:
        return [Section("Bin statistics", "No `bins.npz` in the run folder: reliability figures skipped.")]
    stats, names, ids = run.stats, run.class_names or [], run.case_ids or []
    return [
        _case_reliability_section(stats, names, ids, out_fig, min_count),
        _dataset_histogram_section(stats, names, out_fig, min_count),
        _subject_spread_section(run, out_fig, min_count),
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
    """The per-case metric table, folded (first ``max_case_rows`` ok rows; ``None`` without ok rows)."""
    if not ok:
        return None
    cols = ["case_id", "class", *[m for m in _metric_columns() if m in ok[0]]]
    n_cases = len({r["case_id"] for r in ok})
    shown = "" if len(ok) <= max_case_rows else f" (first {max_case_rows} of {len(ok)} rows; see cases.csv)"
    return Section(
        "Per-case metrics",
        "One row per case and class; NLL and the top-label metrics are per case (the same on each class row).",
        details=[Details(f"{n_cases} cases{shown}", tables=[Table(ok[:max_case_rows], columns=cols)])],
    )


def _subject_table_section(run: RunData) -> Section | None:
    """The per-subject metric table (``subjects.csv``; ``None`` when the cases are not grouped)."""
    if not run.subjects:
        return None
    cols = ["subject", "class", "n_cases", *[m for m in _metric_columns() if m in run.subjects[0]]]
    return Section(
        "Per-subject metrics",
        "One row per subject and class, from the subject's cases pooled (subjects.csv); HD95 is the mean of the "
        "subject's finite case values.",
        tables=[Table(run.subjects, columns=cols)],
    )


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
    histograms (per class + average, with the voxel-count strip), per-bin spread over subjects per class (over
    cases when they are not grouped into subjects), Dice vs ACE scatter. Tables: the macro summaries over
    subjects (when grouped) and over cases, pooled values, per-subject and per-case metrics. Failed cases are
    listed with their messages.
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
            _quality_section(ok, out_fig),
            _subject_table_section(run),
            _case_table_section(ok, max_case_rows),
            _failed_section(failed, n_failed),
        ),
        glossary_section(),
    ]
    html = render_html(
        f"segcal evaluation: {run.run_dir.name}", sections, subtitle=f"{n_cases} cases · {len(classes)} classes"
    )
    return write_text(run.run_dir / "report.html", html)
