"""Statistical comparison of evaluated runs on the same cases (``segcal compare``).

Every run after the first is compared with the first (the baseline), per metric and class and for the class
average (``"mean"``; per-case metrics such as NLL under ``"case"``), on the **statistical unit**:

* the **subject** when the runs' cases are grouped into subjects (:mod:`segcal.evaluation.grouping`): the
  grouping given here (``group_by`` / ``groups``, applied to every run), else the one the runs were evaluated
  with, which must be the same for every run (two runs grouped differently, or one grouped and one not, are
  refused). A subject's value in a run is derived from the summed statistics of its cases (``bins.npz``) by the
  one scoring function, so the pairs are subjects, and every test, effect size and interval is over subjects;
* the **case** otherwise (each case its own subject; every row says so).

Per pair of units: means, relative change of the mean (``(B − A) / |A|``) with its paired percentile bootstrap
95% CI over units, paired Wilcoxon signed-rank and rank-sum p-values, matched-pairs rank-biserial correlation,
Cliff's delta, paired Cohen's d, and Holm-corrected Wilcoxon p-values over all metric × class rows of that pair
(the tests and effect sizes are described in :mod:`segcal.evaluation.statistics`).

Row keys: ``run_a, run_b, metric, class, unit, n`` (units with both values finite), ``mean_a, mean_b,
rel_change, rel_ci_low, rel_ci_high, p_wilcoxon, p_ranksum, effect_size`` (matched-pairs rank-biserial of B vs
A), ``cliffs_delta, cohens_d, p_holm``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcal.evaluation.grouping import Grouping, GroupingError, resolve_grouping, stored_grouping, subject_statistics
from segcal.evaluation.statistics import (
    cliffs_delta,
    cohens_d_paired,
    holm,
    paired_bootstrap_ci,
    rank_biserial_paired,
    rank_sum_test,
    wilcoxon_signed_rank,
)
from segcal.functional.scoring import CASE_METRICS, CaseStatistics, image_metrics
from segcal.io.runs import read_bins_npz, read_case_metrics, read_summary_json, write_csv, write_json

__all__ = ["compare_runs", "format_change", "write_comparison"]

_SKIP = {"tp", "fp", "fn", "n_voxels", "status", "error"}

#: values of one run: unit id (case or subject) → class → metric → value
_Table = dict[str, dict[str, dict[str, float]]]


@dataclass
class _Run:
    """One run folder: its per-case table (``cases.csv``), classes, metric columns and stored grouping."""

    path: Path
    table: _Table
    classes: list[str]
    metrics: list[str]
    grouping: Grouping


def _load(run_dir: Path) -> _Run:
    path = run_dir / "cases.csv"
    if not path.exists():
        raise ValueError(f"{run_dir}: no cases.csv (not an evaluated run folder?)")
    rows = read_case_metrics(path)
    table: _Table = {}
    classes: list[str] = []
    metrics: list[str] = []
    for (cid, cls), vals in rows.items():
        table.setdefault(cid, {})[cls] = vals
        if cls not in classes:
            classes.append(cls)
        if not metrics:
            metrics = [k for k in vals if k not in _SKIP]
    summary = read_summary_json(run_dir / "summary.json") or {}
    return _Run(run_dir, table, classes, metrics, stored_grouping(summary.get("grouping")))


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


def _n_subjects(g: Grouping, ids: list[str]) -> int:
    return len({g.subject_of(c) for c in ids})


def _check_same_grouping(runs: list[_Run], groupings: list[Grouping]) -> None:
    """Refuse runs whose stored groupings differ (another unit, or another subject for a common case)."""
    base, g0 = runs[0], groupings[0]
    for run, g in zip(runs[1:], groupings[1:], strict=True):
        common = sorted(set(base.table) & set(run.table))
        differ = [c for c in common if g0.subject_of(c) != g.subject_of(c)] if g.unit == g0.unit else common[:1]
        if g.unit == g0.unit == "case" or not differ:
            continue
        c = differ[0]
        raise GroupingError(
            f"the runs group their cases differently: {base.path} was evaluated with {g0.describe()} "
            f"({_n_subjects(g0, common)} units; case {c!r} → {g0.subject_of(c)!r}) but {run.path} with "
            f"{g.describe()} ({_n_subjects(g, common)} units; case {c!r} → {g.subject_of(c)!r}); statistics over "
            "different units are not comparable: evaluate both with the same --group-by / --groups, or pass one "
            "to compare to group every run the same way"
        )


def _groupings(
    runs: list[_Run], group_by: str | None, groups: str | Path | Mapping[str, str] | None
) -> list[Grouping]:
    """One grouping per run: the given one (resolved on each run's cases), else the stored ones (checked)."""
    if group_by is not None or groups is not None:
        return [resolve_grouping(sorted(r.table), group_by=group_by, groups=groups) for r in runs]
    stored = [r.grouping for r in runs]
    _check_same_grouping(runs, stored)
    return stored


def _subject_table(run: _Run, ids: list[str], grouping: Grouping) -> _Table:
    """Per-subject values of the cases ``ids`` of ``run``, from their summed statistics in ``bins.npz``."""
    path = run.path / "bins.npz"
    bins = read_bins_npz(path) if path.exists() else None
    if bins is None or bins.statistics is None:
        raise ValueError(
            f"{run.path}: bins.npz lacks the per-case sums that subject-level values are pooled from (written "
            "by an older segcal); rerun the same `segcal evaluate` command into that folder (every stored case "
            "is reused, only the outputs are rewritten)"
        )
    pos = {c: i for i, c in enumerate(bins.case_ids)}
    missing = [c for c in ids if c not in pos]
    if missing:
        raise ValueError(f"{path}: no statistics for {len(missing)} case(s) of cases.csv, e.g. {missing[:3]}")
    stats = CaseStatistics.from_numpy({"bins": bins.bin_stats, **bins.statistics})
    sel = CaseStatistics.cat([stats.select(pos[c]) for c in ids])
    subjects, _, sub = subject_statistics(sel, ids, grouping)
    values = {k: v.numpy() for k, v in image_metrics(sub).items()}
    table: _Table = {}
    for i, s in enumerate(subjects):
        for k, cls in enumerate(bins.class_names):
            table.setdefault(s, {})[cls] = {
                m: float(v[i, 0] if m in CASE_METRICS else v[i, k]) for m, v in values.items()
            }
    return table


def _unit_tables(
    base: _Run, run: _Run, ids: list[str], grouping: Grouping
) -> tuple[_Table, _Table, list[str]]:
    """The two runs' values on the unit (cases ``ids``, or their subjects) and the unit ids."""
    if grouping.unit == "case":
        return base.table, run.table, ids
    a = _subject_table(base, ids, grouping)
    b = _subject_table(run, ids, grouping)
    return a, b, sorted(a)


def _nanmean(x: Any) -> float:
    a = np.asarray(x, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _groups(
    a_tab: _Table, b_tab: _Table, units: list[str], classes: list[str], metric: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{class: (a, b)}`` per-unit values of ``metric``: each class and the class mean, or ``"case"`` for a
    per-case metric."""
    per_class = {
        cls: (np.array([a_tab[u][cls][metric] for u in units]), np.array([b_tab[u][cls][metric] for u in units]))
        for cls in classes
    }
    if metric in CASE_METRICS:
        return {"case": per_class[classes[0]]}
    with np.errstate(all="ignore"):
        a_m = np.array([_nanmean([a_tab[u][c][metric] for c in classes]) for u in units])
        b_m = np.array([_nanmean([b_tab[u][c][metric] for c in classes]) for u in units])
    return {**per_class, "mean": (a_m, b_m)}


def _row(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """The statistics of one metric × class pair of per-unit values."""
    ma, mb = _nanmean(a), _nanmean(b)
    rel = (mb - ma) / abs(ma) if ma != 0.0 and math.isfinite(ma) else float("nan")
    lo, hi = paired_bootstrap_ci(a, b)
    return {
        "n": int((np.isfinite(a) & np.isfinite(b)).sum()),
        "mean_a": ma,
        "mean_b": mb,
        "rel_change": rel,
        "rel_ci_low": lo,
        "rel_ci_high": hi,
        "p_wilcoxon": wilcoxon_signed_rank(a, b),
        "p_ranksum": rank_sum_test(a, b),
        "effect_size": rank_biserial_paired(b, a),
        "cliffs_delta": cliffs_delta(b, a),
        "cohens_d": cohens_d_paired(b, a),
    }


def _pair_rows(
    names: tuple[str, str],
    tables: tuple[_Table, _Table],
    units: list[str],
    classes: list[str],
    metrics: list[str],
    unit: str,
) -> list[dict[str, Any]]:
    """The rows of one pair of runs, Holm-corrected over all its rows."""
    rows = []
    for metric in metrics:
        for cls, (a, b) in _groups(*tables, units, classes, metric).items():
            if not (np.isfinite(a).any() or np.isfinite(b).any()):
                continue
            key = {"run_a": names[0], "run_b": names[1], "metric": metric, "class": cls, "unit": unit}
            rows.append({**key, **_row(a, b)})
    adj = holm([r["p_wilcoxon"] for r in rows])
    for r, p in zip(rows, adj, strict=True):
        r["p_holm"] = float(p)
    return rows


def _common_cases(base: _Run, run: _Run, intersection: bool) -> list[str]:
    a_ids, b_ids = set(base.table), set(run.table)
    if a_ids != b_ids and not intersection:
        only_a, only_b = sorted(a_ids - b_ids), sorted(b_ids - a_ids)
        raise ValueError(
            f"{base.path} and {run.path} have different case sets ({len(only_a)} only in the first, e.g. "
            f"{only_a[:3]}; {len(only_b)} only in the second, e.g. {only_b[:3]}); "
            "use --intersection to compare the common cases"
        )
    ids = sorted(a_ids & b_ids)
    if not ids:
        raise ValueError(f"{base.path} and {run.path} have no case in common")
    return ids


def compare_runs(
    run_dirs: list[str | Path],
    *,
    intersection: bool = False,
    group_by: str | None = None,
    groups: str | Path | Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Compare runs 2..n against run 1 on the statistical unit (see the module docstring).

    Refuses different case sets unless ``intersection``, runs with different classes or bins, and runs whose
    stored groupings differ (checked before anything is computed or written). ``group_by`` (a regular
    expression on the case id) or ``groups`` (a CSV file ``case_id, subject`` or a mapping) group every run's
    cases into subjects the same way, overriding the stored groupings.

    Returns ``{"runs", "unit", "grouping", "pairs", "rows"}``; ``grouping`` describes the unit and its number
    (of the first pair), each pair entry its own ``unit`` and ``n_units``.
    """
    if len(run_dirs) < 2:
        raise ValueError("compare needs at least two run folders")
    dirs = [Path(d) for d in run_dirs]
    runs = [_load(d) for d in dirs]
    _check_bins(dirs)
    groupings = _groupings(runs, group_by, groups)
    base = runs[0]
    out_rows: list[dict[str, Any]] = []
    pairs = []
    for run, grouping in zip(runs[1:], groupings[1:], strict=True):
        if run.classes != base.classes:
            raise ValueError(f"{base.path} has classes {base.classes} but {run.path} has {run.classes}")
        ids = _common_cases(base, run, intersection)
        a_tab, b_tab, units = _unit_tables(base, run, ids, grouping)
        names = (str(base.path), str(run.path))
        metrics = [m for m in base.metrics if m in run.metrics]  # e.g. a surface metric only one run computed
        out_rows += _pair_rows(names, (a_tab, b_tab), units, base.classes, metrics, grouping.unit)
        pairs.append(
            {
                "run_a": names[0],
                "run_b": names[1],
                "n_cases": len(ids),
                "unit": grouping.unit,
                "n_units": len(units),
                "grouping": grouping.describe(),
                "only_a": sorted(set(base.table) - set(run.table)),
                "only_b": sorted(set(run.table) - set(base.table)),
            }
        )
    first_ids = sorted(set(base.table) & set(runs[1].table))
    return {
        "runs": [str(d) for d in dirs],
        "unit": groupings[1].unit,
        "grouping": groupings[1].summary(first_ids),
        "pairs": pairs,
        "rows": out_rows,
    }


def format_change(rel: float, digits: int = 0) -> str:
    """``-0.45`` → ``"-45%"`` (``digits`` decimals)."""
    return "n/a" if not math.isfinite(rel) else f"{rel * 100:+.{digits}f}%"


def write_comparison(comparison: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``comparison.csv`` and ``comparison.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "comparison.csv", "json": out / "comparison.json"}
    rows = comparison["rows"]
    write_csv(files["csv"], rows, list(rows[0]) if rows else [])
    write_json(files["json"], comparison)
    return files
