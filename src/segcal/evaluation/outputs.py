"""Run outputs: ``cases.csv`` (case × class rows), ``bins.npz`` (per-case bin sums) and ``summary.json``.

``summary.json`` holds, per metric and class (and ``"mean"``: the per-case average over classes):

* ``macro``: per-case values aggregated with :func:`~segcal.evaluation.statistics.summarize` (mean, std,
  median,  IQR, seeded bootstrap 95% CI of the mean);
* ``pooled``: calibration errors from the bin sums merged over all cases (``BinStats.pooled()``) and overlap
  scores from the summed confusion counts.

``bins.npz`` (read by :mod:`segcal.report` and :mod:`segcal.plots`): ``case_ids`` ``(N,)`` unicode,
``bin_stats`` ``(N, C, 3, M)`` float64 (count, Σp, Σy), ``class_names`` ``(C,)`` unicode; no pickled objects.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcal.evaluation.statistics import summarize
from segcal.evaluation.store import CaseResult, ResultStore
from segcal.io.runs import read_case_metrics, write_bins_npz, write_cases_csv, write_failed_csv, write_summary_json

__all__ = ["load_cases_csv", "pooled_metrics", "write_outputs"]


def _columns() -> list[str]:
    from segcal.evaluation.runner import CASE_METRICS, CLASS_METRICS

    return [
        "case_id",
        "class",
        "status",
        *CLASS_METRICS,
        *CASE_METRICS,
        "tp",
        "fp",
        "fn",
        "n_voxels",
        "error",
    ]


def _rows(res: CaseResult) -> list[dict[str, Any]]:
    from segcal.evaluation.runner import CASE_METRICS, CLASS_METRICS

    m = res.metrics or {}
    rows = []
    for i, name in enumerate(res.class_names or []):
        row: dict[str, Any] = {"case_id": res.case_id, "class": name, "status": "ok", "error": ""}
        for k in CLASS_METRICS:
            row[k] = m["per_class"][k][i]
        for k in CASE_METRICS:
            row[k] = m["per_case"][k]
        row["tp"], row["fp"], row["fn"] = m["counts"][i]
        row["n_voxels"] = m["n_voxels"][i]
        rows.append(row)
    return rows


def pooled_metrics(
    bins: np.ndarray, counts: np.ndarray, class_names: list[str]
) -> dict[str, dict[str, float]]:
    """Dataset-level metrics from merged sums: ``bins`` ``(N, C, 3, M)``, ``counts`` ``(N, C, 3)``."""
    from segcal.functional import BinStats, calibration_errors, overlap_scores

    pooled = BinStats.from_numpy(bins).pooled()
    ce = calibration_errors(pooled)
    ov = overlap_scores(torch.as_tensor(counts, dtype=torch.float64).sum(0, keepdim=True))
    out: dict[str, dict[str, float]] = {}
    for k, v in {**ce, **ov}.items():
        vals = v[0].tolist()
        d = dict(zip(class_names, vals, strict=True))
        fin = [x for x in vals if math.isfinite(x)]
        d["mean"] = float(np.mean(fin)) if fin else float("nan")
        out[k] = d
    return out


def write_outputs(
    store: ResultStore, out_dir: Path, run_config: dict[str, Any], unmatched: dict[str, list[str]]
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write ``cases.csv``, ``bins.npz``, ``summary.json`` (and ``failed.csv``) from the store's ok cases."""
    from segcal.evaluation.runner import CASE_METRICS, CLASS_METRICS

    results = store.results()
    ok = [r for r in results if r.status == "ok"]
    failed = [r for r in results if r.status != "ok"]
    files = {
        "cases": out_dir / "cases.csv",
        "bins": out_dir / "bins.npz",
        "summary": out_dir / "summary.json",
    }
    case_rows: list[dict[str, Any]] = []
    for r in results:  # failed cases: one row with status "failed" and the error, metrics empty
        case_rows += (
            _rows(r)
            if r.status == "ok"
            else [{"case_id": r.case_id, "class": "", "status": "failed", "error": r.error}]
        )
    write_cases_csv(files["cases"], case_rows, _columns())
    files["failed"] = out_dir / "failed.csv"
    write_failed_csv(files["failed"], [(r.case_id, r.error) for r in failed])

    shapes = {r.bins.shape for r in ok if r.bins is not None}
    names_set = {tuple(r.class_names or []) for r in ok}
    if len(shapes) > 1 or len(names_set) > 1:
        raise ValueError(
            f"cases have different numbers of classes or bins {sorted(shapes)}; "
            "evaluate them in separate runs"
        )
    class_names = list(next(iter(names_set))) if names_set else []
    m = int(run_config.get("num_bins", 20))
    bins = np.stack([r.bins for r in ok]) if ok else np.zeros((0, len(class_names), 3, m))
    write_bins_npz(files["bins"], [r.case_id for r in ok], bins, class_names)

    macro: dict[str, dict[str, Any]] = {}
    for k in CLASS_METRICS:
        vals = np.array([r.metrics["per_class"][k] for r in ok], dtype=np.float64).reshape(len(ok), -1)
        if vals.size and np.isnan(vals).all():
            continue  # metric not computed in this run (e.g. MAE without soft reference, --no-hd95)
        d = {name: summarize(vals[:, i]) for i, name in enumerate(class_names)}
        with np.errstate(all="ignore"):
            case_mean = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in vals])
        d["mean"] = summarize(case_mean)
        macro[k] = d
    for k in CASE_METRICS:
        macro[k] = {"case": summarize([r.metrics["per_case"][k] for r in ok])}
    counts = np.array([r.metrics["counts"] for r in ok], dtype=np.float64).reshape(
        len(ok), len(class_names), 3
    )
    summary = {
        "config": run_config,
        "n_cases": len(results),
        "n_ok": len(ok),
        "n_failed": len(failed),
        "failed": [{"case_id": r.case_id, "error": r.error} for r in failed],
        "unmatched": unmatched,
        "class_names": class_names,
        "macro": macro,
        "pooled": pooled_metrics(bins, counts, class_names) if ok else {},
    }
    write_summary_json(files["summary"], summary)
    return files, summary


def load_cases_csv(path: str | Path) -> dict[tuple[str, str], dict[str, float]]:
    """``(case_id, class) → {metric: value}`` of the ok rows of a run's ``cases.csv`` (empty cells → NaN);
    read by :func:`segcal.io.runs.read_case_metrics`."""
    return read_case_metrics(path)
