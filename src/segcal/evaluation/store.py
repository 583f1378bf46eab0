"""Resumable, loss-free result store: one SQLite file (WAL) per run folder, one transaction per finished case.

A run killed at any point (even SIGKILL) leaves every committed case intact; rerunning the same command skips
them. Each row counts how many times its case was computed (``n_computed``) so tests can prove that finished
cases are never recomputed. The run configuration's hash is stored once; opening the store with another
configuration is refused unless ``overwrite`` is set.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcal.functional.scoring import CaseStatistics

__all__ = ["CaseResult", "ConfigMismatchError", "ResultStore", "config_hash", "input_fingerprint", "same_inputs"]

DB_NAME = "results.sqlite"


class ConfigMismatchError(RuntimeError):
    """The output folder holds results of a different configuration."""


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def input_fingerprint(paths: list[str], *, content: bool = False, extra: str = "") -> str:
    """Identity of a case's input files, as a JSON string: ``stat``, a SHA-256 over each file's absolute path,
    size and modification time (nanoseconds), and with ``content`` also ``content``, a SHA-256 of their bytes
    (slower; catches a file rewritten with the same size within the timestamp resolution). A missing file
    gives a fingerprint that matches nothing stored. ``extra``: input facts stated outside the case's files
    (the voxel spacing of a folder sidecar), hashed into ``stat``. Compare two with :func:`same_inputs`."""
    st_hash = hashlib.sha256(extra.encode())
    c_hash = hashlib.sha256() if content else None
    for p in paths:
        path = Path(p).resolve()
        st_hash.update(str(path).encode())
        try:
            st = path.stat()
        except OSError:
            st_hash.update(b"missing")
            continue
        st_hash.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        if c_hash is not None:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    c_hash.update(block)
    return json.dumps({"stat": st_hash.hexdigest(), "content": c_hash.hexdigest() if c_hash else None})


def same_inputs(stored: str | None, current: str) -> bool:
    """Whether a stored case was computed from the current input files: same paths, sizes and times, and, when
    ``current`` carries a content hash, the same contents (a stored case without one is not trusted then)."""
    if stored is None:
        return False
    try:
        old = json.loads(stored)
    except ValueError:
        return False
    new = json.loads(current)
    if old.get("stat") != new["stat"]:
        return False
    return new["content"] is None or old.get("content") == new["content"]


@dataclass
class CaseResult:
    """One case's outcome (``None`` fields if failed).

    ``metrics`` holds the case's :class:`~segcal.functional.scoring.CaseStatistics` other than the marginal bins
    (``"stats"``: field -> nested lists, one image), its ``shape``, the ``spacing`` its mm metrics used (and
    ``spacing_assumed``: whether that is 1 mm for want of any geometry) and ``num_classes`` (the prediction's
    ``C``); ``class_names`` are ``class_k`` (label value ``k``) or region names: the run's class names are
    applied when the outputs are written; ``bins`` ``(C, 3, M)``
    float64 are the marginal bin sums. Every metric value is derived from these sums when the outputs are
    written (:mod:`segcal.evaluation.outputs`), so a metric is defined in one place.
    """

    case_id: str
    status: str  # "ok" | "failed"
    error: str | None = None
    class_names: list[str] | None = None
    metrics: dict[str, Any] | None = None
    bins: np.ndarray | None = None
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    @classmethod
    def from_statistics(
        cls,
        case_id: str,
        class_names: list[str],
        stats: CaseStatistics,
        *,
        shape: list[int],
        spacing: list[float],
        num_classes: int | None = None,
        spacing_assumed: bool = False,
        seconds: float = 0.0,
        peak_rss_mb: float = 0.0,
    ) -> CaseResult:
        """An ``ok`` result from one image's statistics; ``spacing`` is the voxel size the mm metrics used
        (``spacing_assumed``: 1 mm for a case without any geometry), ``num_classes`` the prediction's classes
        ``C`` (background included, whatever was scored)."""
        arrays = stats.to_numpy()
        bins = arrays.pop("bins")[0]
        metrics = {
            "stats": {k: v[0].tolist() for k, v in arrays.items()},
            "shape": shape,
            "spacing": spacing,
            "spacing_assumed": spacing_assumed,
            "num_classes": num_classes,
        }
        return cls(case_id, "ok", None, class_names, metrics, bins, seconds, peak_rss_mb)

    def statistics(self) -> CaseStatistics:
        """The stored statistics as a one-image :class:`~segcal.functional.scoring.CaseStatistics`."""
        if self.metrics is None or self.bins is None:
            raise ValueError(f"case {self.case_id} has no statistics (status {self.status})")
        arrays = {k: np.asarray(v, dtype=np.float64)[None] for k, v in self.metrics["stats"].items()}
        return CaseStatistics.from_numpy({**arrays, "bins": np.asarray(self.bins)[None]})


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    case_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT,
    class_names TEXT,
    metrics TEXT,
    bins BLOB,
    bins_shape TEXT,
    config_hash TEXT NOT NULL,
    seconds REAL,
    peak_rss_mb REAL,
    n_computed INTEGER NOT NULL DEFAULT 1,
    finished_at REAL,
    fingerprint TEXT
);
"""


class ResultStore:
    """SQLite store in ``out_dir/results.sqlite``."""

    def __init__(self, out_dir: str | Path, config: dict[str, Any], *, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / DB_NAME
        self.config = config
        self.hash = config_hash(config)
        self.conn = sqlite3.connect(self.path, timeout=60)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SCHEMA)
        columns = {r[1] for r in self.conn.execute("PRAGMA table_info(cases)")}
        if "fingerprint" not in columns:  # a store written before fingerprints: its rows are never resumed
            with self.conn:
                self.conn.execute("ALTER TABLE cases ADD COLUMN fingerprint TEXT")
        row = self.conn.execute("SELECT value FROM meta WHERE key='config_hash'").fetchone()
        if row is not None and row[0] != self.hash:
            if not overwrite:
                old = self.conn.execute("SELECT value FROM meta WHERE key='config'").fetchone()
                self.conn.close()
                raise ConfigMismatchError(
                    f"{self.out_dir} holds results of a different configuration "
                    f"(stored: {old[0] if old else '?'}; "
                    f"now: {json.dumps(config, sort_keys=True, default=str)}). "
                    "Use another output folder, or --overwrite to discard the stored results."
                )
        if overwrite or row is None or row[0] != self.hash:
            with self.conn:
                self.conn.execute("DELETE FROM cases")
                self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('config_hash', ?)", (self.hash,))
                self.conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('config', ?)",
                    (json.dumps(config, sort_keys=True, default=str),),
                )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def finished(self, *, include_failed: bool = True) -> set[str]:
        """Ids of cases already recorded under this configuration (``ok``, and ``failed`` unless
        ``include_failed`` is False)."""
        return set(self.fingerprints(include_failed=include_failed))

    def fingerprints(self, *, include_failed: bool = True) -> dict[str, str | None]:
        """``case_id -> fingerprint of its input files`` of the cases recorded under this configuration."""
        q = "SELECT case_id, fingerprint FROM cases WHERE config_hash=?"
        q += "" if include_failed else " AND status='ok'"
        return dict(self.conn.execute(q, (self.hash,)))

    def drop(self, case_ids: list[str]) -> None:
        """Forget these cases (inputs that vanished), in one transaction."""
        with self.conn:
            self.conn.executemany("DELETE FROM cases WHERE case_id=?", [(c,) for c in case_ids])

    def mark_failed(self, case_id: str, error: str) -> None:
        """Turn a recorded case into a failed one (its inputs' fingerprint is kept: it is not recomputed until
        they change)."""
        with self.conn:
            self.conn.execute(
                "UPDATE cases SET status='failed', error=?, class_names=NULL, metrics=NULL, bins=NULL, "
                "bins_shape=NULL WHERE case_id=?",
                (error, case_id),
            )

    def put(self, res: CaseResult, fingerprint: str | None = None) -> None:
        """Record one case in its own transaction (a recomputed case increments ``n_computed``);
        ``fingerprint`` identifies the input files it was computed from (:func:`input_fingerprint`)."""
        blob = shape = None
        if res.bins is not None:
            arr = np.ascontiguousarray(res.bins, dtype=np.float64)
            blob, shape = arr.tobytes(), json.dumps(list(arr.shape))
        with self.conn:
            self.conn.execute(
                """INSERT INTO cases (case_id, status, error, class_names, metrics, bins, bins_shape,
                       config_hash, seconds, peak_rss_mb, n_computed, finished_at, fingerprint)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)
                   ON CONFLICT(case_id) DO UPDATE SET status=excluded.status, error=excluded.error,
                       class_names=excluded.class_names, metrics=excluded.metrics, bins=excluded.bins,
                       bins_shape=excluded.bins_shape, config_hash=excluded.config_hash,
                       seconds=excluded.seconds, peak_rss_mb=excluded.peak_rss_mb,
                       n_computed=cases.n_computed + 1, finished_at=excluded.finished_at,
                       fingerprint=excluded.fingerprint""",
                (
                    res.case_id,
                    res.status,
                    res.error,
                    json.dumps(res.class_names) if res.class_names is not None else None,
                    json.dumps(res.metrics, allow_nan=True) if res.metrics is not None else None,
                    blob,
                    shape,
                    self.hash,
                    res.seconds,
                    res.peak_rss_mb,
                    time.time(),
                    fingerprint,
                ),
            )

    def results(self) -> list[CaseResult]:
        """All cases recorded under this configuration, sorted by case id."""
        out = []
        for row in self.conn.execute(
            "SELECT case_id, status, error, class_names, metrics, bins, bins_shape, seconds, peak_rss_mb "
            "FROM cases WHERE config_hash=? ORDER BY case_id",
            (self.hash,),
        ):
            cid, status, err, names, metrics, blob, shape, sec, rss = row
            bins = np.frombuffer(blob, dtype=np.float64).reshape(json.loads(shape)).copy() if blob else None
            out.append(
                CaseResult(
                    cid,
                    status,
                    err,
                    json.loads(names) if names else None,
                    json.loads(metrics) if metrics else None,
                    bins,
                    sec or 0.0,
                    rss or 0.0,
                )
            )
        return out

    def compute_counts(self) -> dict[str, int]:
        """``case_id → n_computed``."""
        return dict(self.conn.execute("SELECT case_id, n_computed FROM cases"))
