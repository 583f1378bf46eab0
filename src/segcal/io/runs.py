"""The files of an evaluated run folder, read and written in one place (see docs/evaluation.md, "Outputs",
and docs/report.md).

* ``cases.csv``: one row per case × class, ``case_id, class, status, <metrics>, tp, fp, fn, n_voxels, error``;
  a failed case has one row with ``status == "failed"`` and its ``error``. The column list is the writer's
  caller's (the evaluation's);
* ``failed.csv``: ``case_id, error`` of the failed cases;
* ``bins.npz``: ``case_ids (N,)`` unicode, ``bin_stats (N, C, 3, M)`` float64 (count, Σp, Σy),
  ``class_names (C,)`` unicode; uncompressed, no pickled objects;
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
    "SUMMARY_JSON",
    "RunBins",
    "RunFolder",
    "metrics_by_case",
    "read_bins_npz",
    "read_case_metrics",
    "read_cases_csv",
    "read_failed_csv",
    "read_run",
    "read_summary_json",
    "to_strict_json",
    "write_bins_npz",
    "write_cases_csv",
    "write_csv",
    "write_failed_csv",
    "write_json",
    "write_summary_json",
]

CASES_CSV = "cases.csv"
FAILED_CSV = "failed.csv"
BINS_NPZ = "bins.npz"
SUMMARY_JSON = "summary.json"
_KEY_COLUMNS = ("case_id", "class")
_BIN_KEYS = ("case_ids", "bin_stats", "class_names")


@dataclass
class RunBins:
    """The content of ``bins.npz``: ``bin_stats`` ``(N, C, 3, M)`` float64 (count, Σp, Σy) of the cases
    ``case_ids`` (``N``) and classes ``class_names`` (``C``)."""

    case_ids: list[str]
    bin_stats: np.ndarray
    class_names: list[str]


@dataclass
class RunFolder:
    """The parsed files of one run folder; a missing optional file (``summary.json``, ``bins.npz``) is
    ``None``."""

    run_dir: Path
    cases: list[dict[str, Any]]
    summary: dict[str, Any] | None
    bins: RunBins | None


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
    path: str | Path, case_ids: Sequence[str], bin_stats: np.ndarray, class_names: Sequence[str]
) -> Path:
    """``bins.npz`` (uncompressed): ``case_ids (N,)`` and ``class_names (C,)`` unicode, ``bin_stats
    (N, C, 3, M)`` float64; :func:`read_bins_npz` reads it back."""
    ids = np.array(list(case_ids), dtype=str)
    arrays = {
        "case_ids": ids.astype("U") if ids.size else np.zeros(0, dtype="U1"),
        "bin_stats": np.asarray(bin_stats).astype(np.float64),
        "class_names": np.array(list(class_names), dtype="U"),
    }
    return write_npz(path, arrays, compressed=False)


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
    return RunBins([str(s) for s in ids], arr, [str(s) for s in names])


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
    ``summary.json`` and ``bins.npz`` (optional)."""
    run_dir = Path(run_dir)
    cases = read_cases_csv(run_dir / CASES_CSV, float_columns)
    summary = read_summary_json(run_dir / SUMMARY_JSON)
    bins_path = run_dir / BINS_NPZ
    bins = read_bins_npz(bins_path) if bins_path.is_file() else None
    return RunFolder(run_dir, cases, summary, bins)
