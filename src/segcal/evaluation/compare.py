"""Statistical comparison of evaluated runs on the same cases (``segcal compare``).

Every run after the first is compared with the first (the baseline), per metric and class and for the
per-case class average (``"mean"``): means, relative change of the mean (``(B − A) / |A|``), paired Wilcoxon
signed-rank and rank-sum p-values, matched-pairs rank-biserial correlation, Cliff's delta, paired Cohen's d,
and Holm-corrected Wilcoxon p-values over all metric × class rows of that pair (the tests and effect sizes
are described in :mod:`segcal.evaluation.statistics`).

Row keys: ``run_a, run_b, metric, class, n, mean_a, mean_b, rel_change, p_wilcoxon, p_ranksum, effect_size``
(matched-pairs rank-biserial of B vs A), ``cliffs_delta, cohens_d, p_holm``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from segcal.evaluation.statistics import (
    cliffs_delta,
    cohens_d_paired,
    holm,
    rank_biserial_paired,
    rank_sum_test,
    wilcoxon_signed_rank,
)
from segcal.io.runs import read_bins_npz, read_case_metrics, write_csv, write_json

__all__ = ["compare_runs", "write_comparison"]

_SKIP = {"tp", "fp", "fn", "n_voxels", "status", "error"}


def _table(run_dir: Path) -> tuple[dict[str, dict[str, dict[str, float]]], list[str], list[str]]:
    path = run_dir / "cases.csv"
    if not path.exists():
        raise ValueError(f"{run_dir}: no cases.csv (not an evaluated run folder?)")
    rows = read_case_metrics(path)
    table: dict[str, dict[str, dict[str, float]]] = {}
    classes: list[str] = []
    metrics: list[str] = []
    for (cid, cls), vals in rows.items():
        table.setdefault(cid, {})[cls] = vals
        if cls not in classes:
            classes.append(cls)
        if not metrics:
            metrics = [k for k in vals if k not in _SKIP]
    return table, classes, metrics


def _num_bins(run_dir: Path) -> int | None:
    """The run's number of bins, from ``bins.npz`` (None when the run has no bins file)."""
    if not (run_dir / "bins.npz").exists():
        return None
    return int(read_bins_npz(run_dir / "bins.npz").bin_stats.shape[-1])


def _check_bins(dirs: list[Path]) -> None:
    bins = {d: _num_bins(d) for d in dirs}
    known = {d: m for d, m in bins.items() if m is not None}
    if len(set(known.values())) > 1:
        listing = ", ".join(f"{d}: {m}" for d, m in known.items())
        raise ValueError(
            f"the runs were evaluated with different numbers of bins ({listing}); calibration errors from "
            "different bins are not comparable: evaluate them with the same --bins"
        )


def compare_runs(run_dirs: list[str | Path], *, intersection: bool = False) -> dict[str, Any]:
    """Compare runs 2..n against run 1; refuses different case sets unless ``intersection``, and runs with
    different classes or bins (checked before anything is computed or written)."""
    if len(run_dirs) < 2:
        raise ValueError("compare needs at least two run folders")
    dirs = [Path(d) for d in run_dirs]
    tables = [_table(d) for d in dirs]
    _check_bins(dirs)
    base, base_classes, metrics = tables[0]
    out_rows: list[dict[str, Any]] = []
    pairs = []
    for d, (tab, classes, _) in zip(dirs[1:], tables[1:], strict=True):
        if classes != base_classes:
            raise ValueError(f"{dirs[0]} has classes {base_classes} but {d} has {classes}")
        a_ids, b_ids = set(base), set(tab)
        if a_ids != b_ids:
            only_a, only_b = sorted(a_ids - b_ids), sorted(b_ids - a_ids)
            if not intersection:
                raise ValueError(
                    f"{dirs[0]} and {d} have different case sets ({len(only_a)} only in the first, e.g. "
                    f"{only_a[:3]}; {len(only_b)} only in the second, e.g. {only_b[:3]}); "
                    "use --intersection to compare the common cases"
                )
        ids = sorted(a_ids & b_ids)
        if len(ids) == 0:
            raise ValueError(f"{dirs[0]} and {d} have no case in common")
        rows = []
        for metric in metrics:
            per_class = {
                cls: (
                    np.array([base[i][cls][metric] for i in ids]),
                    np.array([tab[i][cls][metric] for i in ids]),
                )
                for cls in base_classes
            }
            case_level = metric in ("nll", "top_label_ece", "top_label_mce")
            if case_level:
                groups = {"case": per_class[base_classes[0]]}
            else:
                with np.errstate(all="ignore"):
                    a_m = np.array([_nanmean([base[i][c][metric] for c in base_classes]) for i in ids])
                    b_m = np.array([_nanmean([tab[i][c][metric] for c in base_classes]) for i in ids])
                groups = {**per_class, "mean": (a_m, b_m)}
            for cls, (a, b) in groups.items():
                if not (np.isfinite(a).any() or np.isfinite(b).any()):
                    continue
                ma, mb = _nanmean(a), _nanmean(b)
                rel = (mb - ma) / abs(ma) if ma not in (0.0,) and math.isfinite(ma) else float("nan")
                rows.append(
                    {
                        "run_a": str(dirs[0]),
                        "run_b": str(d),
                        "metric": metric,
                        "class": cls,
                        "n": int((np.isfinite(a) & np.isfinite(b)).sum()),
                        "mean_a": ma,
                        "mean_b": mb,
                        "rel_change": rel,
                        "p_wilcoxon": wilcoxon_signed_rank(a, b),
                        "p_ranksum": rank_sum_test(a, b),
                        "effect_size": rank_biserial_paired(b, a),
                        "cliffs_delta": cliffs_delta(b, a),
                        "cohens_d": cohens_d_paired(b, a),
                    }
                )
        adj = holm([r["p_wilcoxon"] for r in rows])
        for r, p in zip(rows, adj, strict=True):
            r["p_holm"] = float(p)
        out_rows += rows
        pairs.append(
            {
                "run_a": str(dirs[0]),
                "run_b": str(d),
                "n_cases": len(ids),
                "only_a": sorted(a_ids - b_ids),
                "only_b": sorted(b_ids - a_ids),
            }
        )
    return {"runs": [str(d) for d in dirs], "pairs": pairs, "rows": out_rows}


def _nanmean(x: Any) -> float:
    a = np.asarray(x, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def format_change(rel: float) -> str:
    """``-0.45`` → ``"-45%"``."""
    return "n/a" if not math.isfinite(rel) else f"{rel * 100:+.0f}%"


def write_comparison(comparison: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``comparison.csv`` and ``comparison.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "comparison.csv", "json": out / "comparison.json"}
    rows = comparison["rows"]
    write_csv(files["csv"], rows, list(rows[0]) if rows else [])
    write_json(files["json"], comparison)
    return files
