"""Run outputs: ``cases.csv`` (case × class rows), ``bins.npz`` (per-case bin sums) and ``summary.json``.

Every value is derived from the stored per-case statistics by :func:`segcal.functional.scoring.image_metrics`
and :func:`~segcal.functional.scoring.pooled_metrics`; the columns and keys follow the metric schema
:data:`segcal.functional.scoring.METRICS`. ``summary.json`` holds, per metric and class (and ``"mean"``: the
per-case average over classes; per-case metrics under ``"case"``):

* ``macro``: per-case values aggregated with :func:`~segcal.evaluation.statistics.summarize` (mean, std,
  median, IQR, seeded bootstrap 95% CI of the mean);
* ``pooled``: the dataset-level (micro) values from the statistics summed over all cases (calibration errors
  from the merged bin sums, overlap scores from the summed confusion counts, Brier / NLL / MAE per voxel).

``subject_macro`` (only when the cases are grouped into subjects: the same summaries over per-subject values,
``{"unit": "subject", "n": S, "n_cases": N, "metrics": {...}}``), ``grouping`` (the statistical unit, their
number and how the subjects were found; :mod:`segcal.evaluation.grouping`), and ``class_names`` (the scored
channels' names: the run's class names of those label values, else ``class_k`` /
region names; see :mod:`segcal.evaluation.folders`), ``class_names_from`` and ``geometry`` (folder spacing, the
cases scored with an assumed 1 mm voxel size, the warning when an mm metric depended on it).

``bins.npz`` (read by :mod:`segcal.report`, :mod:`segcal.plots` and :mod:`segcal.evaluation.compare`):
``case_ids`` ``(N,)`` unicode, ``bin_stats`` ``(N, C, 3, M)`` float64 (count, Σp, Σy), ``class_names`` ``(C,)``
unicode, and the other per-case sums of :class:`~segcal.functional.scoring.CaseStatistics` (``top``,
``counts``, ``brier_sum``, ``mae_sum``, ``nll_sum``, ``n_voxels``, ``hd95``), so that every metric of any group
of cases can be derived again; no pickled objects.

With the metrics of the peers (``EvalConfig(peer_metrics=True)``, ``--peer-metrics``) the columns and summaries
also hold the schema's ``"peers"`` group (:data:`~segcal.functional.scoring.PEER_CLASS_METRICS` before
:data:`~segcal.functional.scoring.PEER_CASE_METRICS`, after the core metrics), and ``summary["failure_detection"]``
holds the dataset-level AURC / E-AURC (:mod:`segcal.functional.failure`) of the case-level uncertainty scores
(``mean_entropy``; ``1 − mean_confidence``) against the case risk ``1 − Dice`` (Dice averaged over the scored
channels): ``{"risk": ..., "scores": {name: {"aurc", "e_aurc", "n"}}}``.

``subjects.csv`` (only with a grouping): one row per subject and class, ``subject, class, n_cases``, every metric
of the schema and ``tp, fp, fn, n_voxels``, from the subject's pooled statistics
(:func:`segcal.evaluation.grouping.subject_statistics`).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcal.evaluation.folders import ClassNames, FolderSpacing, geometry_summary, scored_names
from segcal.evaluation.grouping import Grouping, subject_statistics
from segcal.evaluation.statistics import summarize
from segcal.evaluation.store import CaseResult, ResultStore
from segcal.functional.failure import failure_detection
from segcal.functional.scoring import (
    CASE_METRICS,
    CLASS_METRICS,
    PEER_CASE_METRICS,
    PEER_CLASS_METRICS,
    SURFACE_FIELDS,
    CaseStatistics,
    image_metrics,
    pooled_metrics,
)
from segcal.io.runs import (
    SUBJECTS_CSV,
    write_bins_npz,
    write_cases_csv,
    write_failed_csv,
    write_subjects_csv,
    write_summary_json,
)

__all__ = ["COLUMNS", "PEER_COLUMNS", "SUBJECT_COLUMNS", "write_outputs"]

#: ``cases.csv`` columns: one row per case and class (a failed case: one row with its error)
COLUMNS: tuple[str, ...] = (
    "case_id", "class", "status", *CLASS_METRICS, *CASE_METRICS, "tp", "fp", "fn", "n_voxels", "error",
)
#: ``subjects.csv`` columns: one row per subject and class (subjects of ok cases only)
SUBJECT_COLUMNS: tuple[str, ...] = (
    "subject", "class", "n_cases", *CLASS_METRICS, *CASE_METRICS, "tp", "fp", "fn", "n_voxels",
)
#: the columns of the peers group, after the core metrics (only in runs with the metrics of the peers)
PEER_COLUMNS: tuple[str, ...] = (*PEER_CLASS_METRICS, *PEER_CASE_METRICS)
#: every per-case metric name (core and peers)
_PER_CASE = frozenset((*CASE_METRICS, *PEER_CASE_METRICS))


def _with_peers(columns: tuple[str, ...], values: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """``columns`` with the peers group's columns inserted before ``tp`` when ``values`` hold them."""
    if not any(m in values for m in PEER_COLUMNS):
        return columns
    i = columns.index("tp")
    return (*columns[:i], *PEER_COLUMNS, *columns[i:])


def _not_computed(run_config: dict[str, Any]) -> set[str]:
    """The surface metrics besides HD95 that the run did not compute: their columns and ``bins.npz`` arrays are
    left out, so a run without them writes the files it always wrote (HD95 keeps its column either way)."""
    return {m for m in SURFACE_FIELDS if m != "hd95" and m not in (run_config.get("surface") or ())}


def _table(
    rows: list[dict[str, Any]], columns: tuple[str, ...], run_config: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """``rows`` and ``columns`` without the surface metrics the run did not compute."""
    skip = _not_computed(run_config)
    return [{k: v for k, v in r.items() if k not in skip} for r in rows], [c for c in columns if c not in skip]


def _rows(
    key: dict[str, Any], names: list[str], values: dict[str, torch.Tensor], stats: CaseStatistics, i: int
) -> list[dict[str, Any]]:
    """The rows of image ``i`` of ``stats`` (one per class), each starting with ``key``."""
    rows = []
    n_vox = stats.bins[i, :, 0].sum(-1).tolist()
    for k, name in enumerate(names):
        row: dict[str, Any] = {**key, "class": name}
        row.update({m: float(values[m][i, k]) for m in (*CLASS_METRICS, *PEER_CLASS_METRICS) if m in values})
        row.update({m: float(values[m][i, 0]) for m in (*CASE_METRICS, *PEER_CASE_METRICS) if m in values})
        row["tp"], row["fp"], row["fn"] = stats.counts[i, k].tolist()
        row["n_voxels"] = n_vox[k]
        rows.append(row)
    return rows


def _class_summary(values: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """``{class: summarize(per-case values), "mean": summarize(per-case mean over classes)}``."""
    d = {name: summarize(values[:, i]) for i, name in enumerate(class_names)}
    with np.errstate(all="ignore"):
        case_mean = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in values])
    d["mean"] = summarize(case_mean)
    return d


def _pooled_summary(pooled: dict[str, torch.Tensor], class_names: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for k, v in pooled.items():
        vals = v.tolist()
        if not any(math.isfinite(x) for x in vals):
            continue  # not computed in this run (e.g. MAE without a soft reference)
        if k in _PER_CASE:
            out[k] = {"case": vals[0]}
            continue
        d = dict(zip(class_names, vals, strict=True))
        d["mean"] = float(np.mean([x for x in vals if math.isfinite(x)]))
        out[k] = d
    return out


def _layout(r: CaseResult) -> tuple[tuple[int, ...], tuple[str, ...]]:
    return (tuple(r.bins.shape) if r.bins is not None else ()), tuple(r.class_names or [])


def _fail_incompatible(store: ResultStore, results: list[CaseResult]) -> list[CaseResult]:
    """``results`` with every ok case whose classes or bins differ from the run's majority turned into a failed
    case with a message naming it (also recorded in the store)."""
    layouts = Counter(_layout(r) for r in results if r.status == "ok")
    if len(layouts) <= 1:
        return results
    (shape, names), n = layouts.most_common(1)[0]  # ties: the layout of the first case id
    out = []
    for r in results:
        if r.status == "ok" and _layout(r) != (shape, names):
            error = (
                f"{r.case_id}: {len(r.class_names or [])} classes {list(r.class_names or [])} and bins of shape "
                f"{list(_layout(r)[0])}, but {n} other cases of this run have {len(names)} classes {list(names)} "
                f"and bins of shape {list(shape)}; evaluate it in a separate run"
            )
            store.mark_failed(r.case_id, error)
            r = CaseResult(r.case_id, "failed", error, seconds=r.seconds, peak_rss_mb=r.peak_rss_mb)
        out.append(r)
    return out


def _case_rows(
    results: list[CaseResult], values: dict[str, torch.Tensor], stats: Any, names: list[str]
) -> list[dict[str, Any]]:
    """The ``cases.csv`` rows: each ok case's class rows (classes ``names``), a failed case as one row with its
    error."""
    index: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for r in results:
        if r.status == "ok":
            i = index.setdefault(r.case_id, len(index))
            rows += _rows({"case_id": r.case_id, "status": "ok", "error": ""}, names, values, stats, i)
        else:
            rows.append({"case_id": r.case_id, "class": "", "status": "failed", "error": r.error})
    return rows


def _subject_outputs(
    path: Path,
    stats: CaseStatistics | None,
    case_ids: list[str],
    names: list[str],
    grouping: Grouping,
    run_config: dict[str, Any],
) -> dict[str, Any] | None:
    """Write ``subjects.csv`` and return the ``subject_macro`` summary when the cases are grouped into subjects;
    otherwise remove a ``subjects.csv`` left by an earlier grouped run of this folder and return None."""
    if grouping.unit != "subject" or stats is None:
        path.unlink(missing_ok=True)
        return None
    subjects, n_cases, sub_stats = subject_statistics(stats, case_ids, grouping)
    values = image_metrics(sub_stats)
    rows = []
    for i, (subject, n) in enumerate(zip(subjects, n_cases, strict=True)):
        rows += _rows({"subject": subject, "n_cases": n}, names, values, sub_stats, i)
    write_subjects_csv(path, *_table(rows, _with_peers(SUBJECT_COLUMNS, values), run_config))
    return {"unit": "subject", "n": len(subjects), "n_cases": len(case_ids), "metrics": _macro_summary(values, names)}


def _macro_summary(values: dict[str, torch.Tensor], class_names: list[str]) -> dict[str, dict[str, Any]]:
    macro: dict[str, dict[str, Any]] = {}
    for k in (*CLASS_METRICS, *PEER_CLASS_METRICS):
        if k not in values:
            continue  # the peers group, not computed in this run
        vals = values[k].numpy().reshape(len(values[k]), -1)
        if vals.size and np.isnan(vals).all():
            continue  # metric not computed in this run (e.g. MAE without soft reference, --no-hd95)
        macro[k] = _class_summary(vals, class_names)
    for k in (*CASE_METRICS, *PEER_CASE_METRICS):
        if k in values:
            macro[k] = {"case": summarize(values[k][:, 0].tolist())}
    return macro


def _failure_detection(values: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """AURC / E-AURC of the case-level uncertainty scores against ``1 − Dice`` (None without the peers group)."""
    if "mean_entropy" not in values or "mean_confidence" not in values:
        return None
    dice = values["dice"].numpy()
    with np.errstate(all="ignore"):
        quality = np.array([np.nanmean(d) if np.isfinite(d).any() else np.nan for d in dice])
    scores = {
        "mean_entropy": values["mean_entropy"][:, 0].numpy(),
        "one_minus_mean_confidence": 1.0 - values["mean_confidence"][:, 0].numpy(),
    }
    return {"risk": "1 - Dice (mean over the scored channels)", "scores": failure_detection(scores, 1.0 - quality)}


def _output_names(ok: list[CaseResult], run_config: dict[str, Any], class_names: ClassNames) -> list[str]:
    """The scored channels' names: the stored ``class_k`` / region names, or the run's class names of those label
    values (:func:`~segcal.evaluation.folders.scored_names`; a wrong count is an error naming their source)."""
    if not ok:
        return []
    first = 0 if run_config.get("include_background") or run_config.get("regions") is not None else 1
    num_classes = (ok[0].metrics or {}).get("num_classes")
    return scored_names(class_names, list(ok[0].class_names or []), num_classes, first)


def _assumed_1mm(ok: list[CaseResult]) -> list[str]:
    return [r.case_id for r in ok if (r.metrics or {}).get("spacing_assumed")]


def write_outputs(
    store: ResultStore,
    out_dir: Path,
    run_config: dict[str, Any],
    unmatched: dict[str, list[str]],
    *,
    class_names: ClassNames | None = None,
    geometry: FolderSpacing | None = None,
    grouping: Grouping | None = None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write ``cases.csv``, ``bins.npz``, ``summary.json``, ``failed.csv`` (and ``subjects.csv``) from the
    store's cases.

    ``class_names`` label the scored channels in every output (they change no number; ``None``: the stored
    ``class_k`` / region names); ``geometry`` (the run's folder spacing) and the cases scored with an assumed
    1 mm voxel size go into ``summary["geometry"]``; ``grouping`` (None: each case its own subject) gives
    ``subjects.csv`` and ``summary["subject_macro"]``, and ``summary["grouping"]`` states the unit either way.
    """
    class_names = class_names or ClassNames()
    grouping = grouping or Grouping("none", None)
    results = _fail_incompatible(store, store.results())
    ok = [r for r in results if r.status == "ok"]
    failed = [r for r in results if r.status != "ok"]
    files = {
        "cases": out_dir / "cases.csv",
        "bins": out_dir / "bins.npz",
        "summary": out_dir / "summary.json",
        "failed": out_dir / "failed.csv",
        "subjects": out_dir / SUBJECTS_CSV,
    }
    names = _output_names(ok, run_config, class_names)
    stats = CaseStatistics.cat([r.statistics() for r in ok]) if ok else None
    values = image_metrics(stats) if stats is not None else {}
    rows = _case_rows(results, values, stats, names)
    write_cases_csv(files["cases"], *_table(rows, _with_peers(COLUMNS, values), run_config))
    write_failed_csv(files["failed"], [(r.case_id, r.error or "") for r in failed])
    m = int(run_config.get("num_bins", 20))
    bins = stats.bins.numpy() if stats is not None else np.zeros((0, len(names), 3, m))
    ok_ids = [r.case_id for r in ok]
    skip = {"bins", *_not_computed(run_config)}
    extra = {k: v for k, v in stats.to_numpy().items() if k not in skip} if stats is not None else None
    write_bins_npz(files["bins"], ok_ids, bins, names, statistics=extra)
    subject_macro = _subject_outputs(files["subjects"], stats, ok_ids, names, grouping, run_config)
    if subject_macro is None:
        del files["subjects"]
    summary = {
        "config": run_config,
        "n_cases": len(results),
        "n_ok": len(ok),
        "n_failed": len(failed),
        "failed": [{"case_id": r.case_id, "error": r.error} for r in failed],
        "unmatched": unmatched,
        "class_names": names,
        "class_names_from": class_names.source,
        "geometry": geometry_summary(_assumed_1mm(ok), run_config, geometry),
        "macro": _macro_summary(values, names) if ok else {},
        "pooled": _pooled_summary(pooled_metrics(stats), names) if stats is not None else {},
        "grouping": grouping.summary(ok_ids),
    }
    if subject_macro is not None:
        summary["subject_macro"] = subject_macro
    fd = _failure_detection(values) if ok else None
    if fd is not None:
        summary["failure_detection"] = fd
    write_summary_json(files["summary"], summary)
    return files, summary
