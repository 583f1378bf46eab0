"""NumPy ``.npy`` / ``.npz`` files: paired readers and writers (see docs/evaluation.md, "Inputs").

Arrays are stored as given: a probability map is ``(C, *S)`` with the spatial axes in the label's order, a
logits map likewise ``(C, *S)``. In an ``.npz`` archive probabilities are stored under the key
``"probabilities"`` and logits under ``"logits"``; readers take that key, or the archive's only array.

Nothing is ever pickled: readers load with ``allow_pickle=False`` and refuse object arrays, writers refuse
object arrays. Every read problem raises :class:`~segcal.io.case.CaseError` naming the file; every write is
atomic (:func:`~segcal.io._atomic.atomic_write`).
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from segcal.io._atomic import atomic_write
from segcal.io.case import CaseError, check_probability_dtype

__all__ = [
    "LOGITS_KEY",
    "NUMPY_SUFFIXES",
    "PROBABILITIES_KEY",
    "MissingKeyError",
    "UnreadableNumpyError",
    "read_npz",
    "read_numpy",
    "read_numpy_array",
    "read_numpy_logits",
    "read_numpy_probabilities",
    "write_npz",
    "write_numpy",
    "write_numpy_logits",
    "write_numpy_probabilities",
]

NUMPY_SUFFIXES = (".npy", ".npz")
#: ``.npz`` key of a probability map ``(C, *S)``
PROBABILITIES_KEY = "probabilities"
#: ``.npz`` key of a logits map ``(C, *S)``
LOGITS_KEY = "logits"

_UNREADABLE = (OSError, EOFError, zipfile.BadZipFile, zlib.error)


class UnreadableNumpyError(CaseError):
    """A NumPy file that cannot be parsed: corrupt, truncated, or not the expected kind of file."""


class MissingKeyError(CaseError):
    """An ``.npz`` archive without a requested key; ``keys`` lists the archive's keys in stored order."""

    def __init__(self, path: str | Path, problem: str, keys: Sequence[str]) -> None:
        super().__init__(path, problem)
        self.keys = list(keys)


# ------------------------------------------------------------------------------------------------- readers


def _value_problem(exc: ValueError) -> str:
    if "pickle" in str(exc).lower():
        return f"refusing to load a pickled/object array ({exc})"
    return f"cannot read NumPy data (corrupt or truncated?): {exc}"


def _load(p: Path) -> np.ndarray | np.lib.npyio.NpzFile:
    """``np.load(p, allow_pickle=False)`` with every failure turned into a :class:`CaseError`."""
    if not p.exists():
        raise CaseError(p, "file not found")
    try:
        return np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise CaseError(p, _value_problem(exc)) from None
    except _UNREADABLE as exc:
        raise UnreadableNumpyError(p, f"cannot read NumPy file (corrupt or truncated?): {exc}") from None


def _member(p: Path, archive: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:
        raise CaseError(p, f"array {key!r}: {_value_problem(exc)}") from None
    except _UNREADABLE as exc:
        raise UnreadableNumpyError(p, f"cannot read array {key!r} (corrupt or truncated?): {exc}") from None


def _no_object(arr: np.ndarray, p: Path) -> np.ndarray:
    if arr.dtype == object:
        raise CaseError(p, "object arrays are not supported")
    return arr


def _read(path: str | Path, key: str | None, prefer: str | None) -> np.ndarray:
    """The array of ``path``: ``.npy`` as stored; ``.npz`` under ``key`` (required), else under ``prefer``
    when present, else the archive's only array."""
    p = Path(path)
    obj = _load(p)
    if not isinstance(obj, np.lib.npyio.NpzFile):
        return _no_object(obj, p)
    with obj:
        keys = list(obj.files)
        if key is None:
            if prefer is not None and prefer in keys:
                key = prefer
            elif len(keys) != 1:
                hint = prefer if prefer is not None else PROBABILITIES_KEY
                raise CaseError(p, f"archive holds arrays {keys}; expected exactly one (or the key {hint!r})")
            else:
                key = keys[0]
        if key not in keys:
            raise MissingKeyError(p, f"archive has no key {key!r} (keys: {keys})", keys)
        return _no_object(_member(p, obj, key), p)


def read_numpy(path: str | Path, key: str | None = None) -> np.ndarray:
    """Array from ``.npy`` or ``.npz`` (``key``, or the only array in the archive); never unpickles."""
    return _read(path, key, None)


def read_numpy_array(path: str | Path, key: str) -> np.ndarray:
    """Array from ``.npy``, or from ``.npz`` under ``key`` if the archive has it, else its only array."""
    return _read(path, None, key)


def read_npz(path: str | Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive by key: all of them, or exactly ``keys`` (each one required)."""
    p = Path(path)
    obj = _load(p)
    if not isinstance(obj, np.lib.npyio.NpzFile):
        raise UnreadableNumpyError(p, "expected an .npz archive, got a single .npy array")
    with obj:
        files = list(obj.files)
        wanted = files if keys is None else list(keys)
        for key in wanted:
            if key not in files:
                raise MissingKeyError(p, f"missing key {key!r} (found {sorted(files)})", files)
        return {key: _no_object(_member(p, obj, key), p) for key in wanted}


def read_numpy_probabilities(path: str | Path) -> np.ndarray:
    """Probability map ``(C, *S)`` (label axis order) from ``.npy`` or ``.npz`` (key ``"probabilities"`` or the
    only array), as stored; :class:`CaseError` unless floating-point."""
    return check_probability_dtype(read_numpy_array(path, PROBABILITIES_KEY), path)


def read_numpy_logits(path: str | Path) -> np.ndarray:
    """Logits ``(C, *S)`` float32 from ``.npy`` or ``.npz`` (key ``"logits"`` or the only array)."""
    arr = read_numpy_array(path, LOGITS_KEY)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise CaseError(path, f"logits must be a real numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------------- writers


def _check_writable(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    for key, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise ValueError(f"{path}: array {key!r} is an object array; segcal never writes pickles")


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray], *, compressed: bool = True) -> Path:
    """Write ``arrays`` (key → array) as one ``.npz`` archive (zip-deflated if ``compressed``) atomically;
    :func:`read_npz` reads them back."""
    p = Path(path)
    _check_writable(arrays, p)
    save = np.savez_compressed if compressed else np.savez
    with atomic_write(p, "wb") as fh:
        save(fh, **arrays)
    return p


def write_numpy(path: str | Path, array: np.ndarray, *, key: str | None = None, compressed: bool = True) -> Path:
    """Write one array atomically: ``.npy`` as is, ``.npz`` under ``key`` (``None``: NumPy's ``arr_0``);
    :func:`read_numpy` with the same ``key`` reads it back."""
    p = Path(path)
    if p.name.endswith(".npz"):
        return write_npz(p, {key or "arr_0": array}, compressed=compressed)
    if not p.name.endswith(".npy"):
        raise ValueError(f"{p}: unsupported NumPy file name (expected .npy or .npz)")
    _check_writable({"array": array}, p)
    with atomic_write(p, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    return p


def write_numpy_probabilities(path: str | Path, probs: np.ndarray, *, compressed: bool = True) -> Path:
    """Probability map ``(C, *S)`` (label axis order) as ``.npy``, or ``.npz`` key ``"probabilities"``; the
    dtype is kept. :func:`read_numpy_probabilities` reads it back."""
    return write_numpy(path, probs, key=PROBABILITIES_KEY, compressed=compressed)


def write_numpy_logits(path: str | Path, logits: np.ndarray, *, compressed: bool = True) -> Path:
    """Logits ``(C, *S)`` as ``.npy``, or ``.npz`` key ``"logits"``; :func:`read_numpy_logits` reads them back."""
    return write_numpy(path, logits, key=LOGITS_KEY, compressed=compressed)
