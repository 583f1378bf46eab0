"""The files of an evaluated run folder, read and written in one place (see docs/evaluation.md, "Outputs",
and docs/report.md).

* ``cases.csv``: one row per case × class, ``case_id, class, status, <metrics>, tp, fp, fn, n_voxels, error``;
  a failed case has one row with ``status == "failed"`` and its ``error``. The column list is the writer's
  caller's (the evaluation's);
* ``failed.csv``: ``case_id, error`` of the failed cases;
* ``bins.npz``: ``case_ids (N,)`` unicode, ``bin_stats (N, C, 3, M)`` float64 (count, Σp, Σy),
  ``class_names (C,)`` unicode, and the other per-case sums every metric derives from (:data:`STATISTICS_KEYS`:
  ``top (N, 1, 3, M)``, ``counts (N, C, 3)``, ``brier_sum`` / ``mae_sum`` / ``hd95 (N, C)``, ``nll_sum`` /
  ``n_voxels (N,)``; absent in folders written before they were added; the surface metrics ``hd`` / ``assd`` /
  ``nsd (N, C)`` only in runs that computed them, :data:`OPTIONAL_STATISTICS_KEYS`); uncompressed, no pickled
  objects;
* ``subjects.csv``: one row per subject × class when the run's cases are grouped into subjects,
  ``subject, class, n_cases, <metrics>, tp, fp, fn, n_voxels``;
* a grouping file (``segcal evaluate --groups``): a CSV table with the columns ``case_id, subject``;
* ``summary.json``: strict JSON (NaN / Inf written as ``null``), indented by 2.

:func:`read_run` is the one reader of a run folder; :func:`read_case_metrics` the per-case metric table built
from the same ``cases.csv`` reader. Every writer is atomic (:func:`~segcal.io._atomic.atomic_write`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcal.io._atomic import atomic_write, write_text
from segcal.io.case import CaseError
from segcal.io.numpy import read_npz, write_npz

__all__ = [
    "BINS_NPZ",
    "CASES_CSV",
    "FAILED_CSV",
    "OPTIONAL_STATISTICS_KEYS",
    "STATISTICS_KEYS",
    "SUBJECTS_CSV",
    "SUMMARY_JSON",
    "RunBins",
    "RunFolder",
    "metrics_by_case",
    "read_bins_npz",
    "read_case_metrics",
    "read_cases_csv",
    "read_failed_csv",
    "read_groups_csv",
    "read_run",
    "read_subjects_csv",
    "read_summary_json",
    "to_strict_json",
    "write_bins_npz",
    "write_cases_csv",
    "write_csv",
    "write_failed_csv",
    "write_json",
    "write_subjects_csv",
    "write_summary_json",
]

CASES_CSV = "cases.csv"
FAILED_CSV = "failed.csv"
BINS_NPZ = "bins.npz"
SUMMARY_JSON = "summary.json"
SUBJECTS_CSV = "subjects.csv"
#: the per-case sums of ``bins.npz`` besides ``bin_stats`` (the fields of
#: :class:`segcal.functional.scoring.CaseStatistics` other than ``bins``), with their number of axes
STATISTICS_KEYS: dict[str, int] = {
    "top": 4, "counts": 3, "brier_sum": 2, "mae_sum": 2, "nll_sum": 1, "n_voxels": 1, "hd95": 2,
}
#: optional per-case values of ``bins.npz``, present only in runs evaluated with them: the surface metrics besides
#: HD95 ``(N, C)`` (a file written before them is read without them) and the peers group's sums (fine bin sums,
#: voxel entropy sum)
OPTIONAL_STATISTICS_KEYS: dict[str, int] = {"hd": 2, "assd": 2, "nsd": 2, "fine": 4, "entropy_sum": 1}
_KEY_COLUMNS = ("case_id", "class")
_BIN_KEYS = ("case_ids", "bin_stats", "class_names")


@dataclass
class RunBins:
    """The content of ``bins.npz``: ``bin_stats`` ``(N, C, 3, M)`` float64 (count, Σp, Σy) of the cases
    ``case_ids`` (``N``) and classes ``class_names`` (``C``)."""

    case_ids: list[str]
    bin_stats: np.ndarray
    class_names: list[str]
    #: the other per-case sums (:data:`STATISTICS_KEYS` → arrays with ``N`` rows), or None when the file has
    #: only the marginal bins
    statistics: dict[str, np.ndarray] | None = None


@dataclass
class RunFolder:
    """The parsed files of one run folder; a missing optional file (``summary.json``, ``bins.npz``) is
    ``None``."""

    run_dir: Path
    cases: list[dict[str, Any]]
    summary: dict[str, Any] | None
    bins: RunBins | None
    #: the rows of ``subjects.csv`` (None when the run's cases are not grouped into subjects)
    subjects: list[dict[str, Any]] | None = None


# ---------------------------------------------------------------------------------------------- generic


def to_strict_json(obj: Any) -> Any:
    """``obj`` with every NaN / Inf float replaced by ``None`` (nested dicts, lists and tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_strict_json(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as strict JSON (:func:`to_strict_json`), indented by 2, written atomically."""
    return write_text(path, json.dumps(to_strict_json(obj), indent=2))


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """A CSV table with header ``columns`` and one line per row (absent keys left empty), written atomically;
    no ``columns`` gives an empty file."""
    with atomic_write(path, "w", newline="") as fh:
        if columns:
            w = csv.DictWriter(fh, fieldnames=list(columns))
            w.writeheader()
            w.writerows(rows)
    return Path(path)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV table with a header line, as dicts of strings (the reader of :func:`write_csv`)."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# -------------------------------------------------------------------------------------------- cases.csv


def write_cases_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """``cases.csv``: header ``columns`` (starting with ``case_id, class``), one line per case × class row;
    :func:`read_cases_csv` reads it back."""
    return write_csv(path, rows, columns)


def _to_float(v: str | None) -> float:
    if v is None or v.strip() == "":
        return math.nan
    try:
        return float(v)
    except ValueError:
        return math.nan


def read_cases_csv(path: str | Path, float_columns: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Rows of ``cases.csv`` as dicts of strings, ``status`` defaulting to ``"ok"``; the ``float_columns``
    present are parsed to floats (empty or unparsable cells → NaN)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: cases.csv is missing (run `segcal evaluate` first)")
    floats = tuple(float_columns)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = set(_KEY_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        rows = []
        for r in reader:
            row: dict[str, Any] = dict(r)
            row.setdefault("status", "ok")  # segcal evaluate writes only ok cases (failed ones: failed.csv)
            for m in floats:
                if m in row:
                    row[m] = _to_float(row[m])
            rows.append(row)
    return rows


def metrics_by_case(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """``(case_id, class) → {column: value}`` of the ok rows: every column other than ``case_id, class,
    status, error`` as a float (empty cells → NaN)."""
    out = {}
    for r in rows:
        row = dict(r)
        if row.pop("status", "ok") != "ok":
            continue
        row.pop("error", None)
        key = (row.pop("case_id"), row.pop("class"))
        out[key] = {k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()}
    return out


def read_case_metrics(path: str | Path) -> dict[tuple[str, str], dict[str, float]]:
    """:func:`metrics_by_case` of the ``cases.csv`` at ``path``."""
    return metrics_by_case(read_cases_csv(path))


# ------------------------------------------------------------------------------------------- failed.csv


def write_failed_csv(path: str | Path, failed: Iterable[tuple[str, str]]) -> Path:
    """``failed.csv``: header ``case_id, error`` and one line per ``(case_id, error)``."""
    with atomic_write(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "error"])
        w.writerows(failed)
    return Path(path)


def read_failed_csv(path: str | Path) -> list[tuple[str, str]]:
    """``(case_id, error)`` pairs of ``failed.csv``."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return [(r["case_id"], r["error"]) for r in csv.DictReader(fh)]


# --------------------------------------------------------------------------------------------- bins.npz


def write_bins_npz(
    path: str | Path,
    case_ids: Sequence[str],
    bin_stats: np.ndarray,
    class_names: Sequence[str],
    *,
    statistics: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """``bins.npz`` (uncompressed): ``case_ids (N,)`` and ``class_names (C,)`` unicode, ``bin_stats
    (N, C, 3, M)`` float64, and the other per-case sums ``statistics`` (keys :data:`STATISTICS_KEYS`, float64);
    :func:`read_bins_npz` reads it back."""
    ids = np.array(list(case_ids), dtype=str)
    arrays = {
        "case_ids": ids.astype("U") if ids.size else np.zeros(0, dtype="U1"),
        "bin_stats": np.asarray(bin_stats).astype(np.float64),
        "class_names": np.array(list(class_names), dtype="U"),
    }
    for key, value in (statistics or {}).items():
        if key not in STATISTICS_KEYS and key not in OPTIONAL_STATISTICS_KEYS:
            known = sorted({**STATISTICS_KEYS, **OPTIONAL_STATISTICS_KEYS})
            raise ValueError(f"bins.npz: unknown statistics key {key!r} (known: {known})")
        arrays[key] = np.asarray(value).astype(np.float64)
    return write_npz(path, arrays, compressed=False)


def _read_statistics(path: Path, arrays: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray] | None:
    """The per-case sums besides the bins (None when the file has none; ``ValueError`` when only some, or with
    a wrong shape)."""
    present = [k for k in STATISTICS_KEYS if k in arrays]
    if not present:
        return None
    missing = [k for k in STATISTICS_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path}: has per-case statistics {present} but lacks {missing}")
    out = {}
    optional = {k: n for k, n in OPTIONAL_STATISTICS_KEYS.items() if k in arrays}
    for key, ndim in {**STATISTICS_KEYS, **optional}.items():
        arr = np.asarray(arrays[key], dtype=np.float64)
        if arr.ndim != ndim or arr.shape[0] != n:
            raise ValueError(f"{path}: {key} must have {ndim} axes and {n} rows, got shape {arr.shape}")
        out[key] = arr
    return out


def read_bins_npz(path: str | Path) -> RunBins:
    """``bins.npz``, checked: the three arrays present, ``bin_stats`` ``(N, C, 3, M)`` finite with
    non-negative counts, ``case_ids (N,)`` and ``class_names (C,)`` matching; ``ValueError`` otherwise."""
    path = Path(path)
    try:
        arrays = read_npz(path)
    except CaseError as exc:  # not a zip / truncated / would need pickle / a plain .npy array
        raise ValueError(f"{path}: unreadable bins file ({exc.problem})") from exc
    missing = set(_BIN_KEYS) - set(arrays)
    if missing:
        raise ValueError(f"{path}: missing array(s) {sorted(missing)}")
    ids, arr, names = (arrays[k] for k in _BIN_KEYS)
    if arr.ndim != 4 or arr.shape[2] != 3:
        raise ValueError(f"{path}: bin_stats must be (N, C, 3, M), got shape {arr.shape}")
    if ids.shape != (arr.shape[0],) or names.shape != (arr.shape[1],):
        raise ValueError(f"{path}: case_ids {ids.shape} / class_names {names.shape} do not match bin_stats {arr.shape}")
    if not np.isfinite(arr).all() or (arr[:, :, 0] < 0).any():
        raise ValueError(f"{path}: bin_stats holds NaN/Inf or negative counts")
    stats = _read_statistics(path, arrays, arr.shape[0])
    return RunBins([str(s) for s in ids], arr, [str(s) for s in names], stats)


# ----------------------------------------------------------------------------------------- subjects.csv


def write_subjects_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """``subjects.csv``: header ``columns`` (starting with ``subject, class``), one line per subject × class
    row; :func:`read_subjects_csv` reads it back."""
    return write_csv(path, rows, columns)


def read_subjects_csv(path: str | Path, float_columns: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Rows of ``subjects.csv`` as dicts of strings, ``n_cases`` as an int and the ``float_columns`` present as
    floats (empty or unparsable cells → NaN)."""
    rows = read_csv(path)
    floats = tuple(float_columns)
    for row in rows:
        if "n_cases" in row:
            row["n_cases"] = int(row["n_cases"])  # type: ignore[assignment]
        for m in floats:
            if m in row:
                row[m] = _to_float(row[m])  # type: ignore[assignment]
    return rows  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ groups file


def read_groups_csv(path: str | Path) -> dict[str, str]:
    """``case_id → subject`` from a CSV table with the columns ``case_id`` and ``subject`` (other columns are
    ignored). ``ValueError`` naming the file for a missing column, an empty cell or a case listed twice with
    two subjects."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: grouping file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = {str(h).strip() for h in reader.fieldnames or ()}
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: not a readable CSV table ({exc})") from None
    missing = {"case_id", "subject"} - header
    if missing:
        raise ValueError(f"{path}: a grouping file needs the columns case_id and subject; missing {sorted(missing)}")
    out: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        row = {str(k).strip(): (v or "").strip() for k, v in row.items() if k is not None}
        cid, subject = row.get("case_id", ""), row.get("subject", "")
        if not cid or not subject:
            raise ValueError(f"{path}: line {line} has an empty case_id or subject")
        if out.get(cid, subject) != subject:
            raise ValueError(f"{path}: case {cid!r} is listed with two subjects ({out[cid]!r} and {subject!r})")
        out[cid] = subject
    return out


# ----------------------------------------------------------------------------------------- summary.json


def write_summary_json(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """``summary.json``: ``summary`` as strict JSON (:func:`write_json`); :func:`read_summary_json` reads it."""
    return write_json(path, dict(summary))


def read_summary_json(path: str | Path) -> dict[str, Any] | None:
    """The JSON object of ``summary.json`` (``None`` if the file is missing); ``ValueError`` if it is not a
    JSON object."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


# ------------------------------------------------------------------------------------------- run folder


def read_run(run_dir: str | Path, float_columns: Iterable[str] = ()) -> RunFolder:
    """Read a run folder: ``cases.csv`` (required; ``float_columns`` parsed as in :func:`read_cases_csv`),
    ``summary.json``, ``bins.npz`` and ``subjects.csv`` (optional)."""
    run_dir = Path(run_dir)
    cases = read_cases_csv(run_dir / CASES_CSV, float_columns)
    summary = read_summary_json(run_dir / SUMMARY_JSON)
    bins_path = run_dir / BINS_NPZ
    bins = read_bins_npz(bins_path) if bins_path.is_file() else None
    subjects_path = run_dir / SUBJECTS_CSV
    subjects = read_subjects_csv(subjects_path, float_columns) if subjects_path.is_file() else None
    return RunFolder(run_dir, cases, summary, bins, subjects)
