"""NumPy ``.npy`` / ``.npz`` files: paired readers and writers (see docs/evaluation.md, "Inputs").

Arrays are stored as given: a probability map is ``(C, *S)`` with the spatial axes in the label's order, a
logits map likewise ``(C, *S)``. In an ``.npz`` archive probabilities are stored under the key
``"probabilities"`` and logits under ``"logits"``, a label map under ``"label"``; readers take that key, or the
archive's only data array. Two optional entries describe the case instead of holding values
(:data:`METADATA_KEYS`): ``"spacing"``, the voxel size in mm over ``*S`` (NumPy files have no header for it), and
``"segcal_calibration"``, which marks a file written by ``segcal calibrate`` (see docs/workflow.md, "The
prediction-file contract").

Nothing is ever pickled: readers load with ``allow_pickle=False`` and refuse object arrays, writers refuse
object arrays. Before any data is read the headers are checked against the file (:mod:`segcal.io._sizes`): an
``.npy`` header's shape x item size must equal the data bytes of the file, an ``.npz`` member's header must
equal the member's uncompressed size (which deflate bounds by its compressed size), and no array may exceed
the memory available. Every read problem raises :class:`~segcal.io.case.CaseError` naming the file; every write
is atomic (:func:`~segcal.io._atomic.atomic_write`).
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from segcal.io._atomic import atomic_write
from segcal.io._sizes import check_fits_memory, claim, deflate_bound, human_bytes
from segcal.io.case import CaseError, check_probability_dtype

__all__ = [
    "CALIBRATION_KEY",
    "LABEL_KEY",
    "LOGITS_KEY",
    "METADATA_KEYS",
    "NUMPY_SUFFIXES",
    "PROBABILITIES_KEY",
    "SPACING_KEY",
    "MissingKeyError",
    "NumpyRecord",
    "UnreadableNumpyError",
    "metadata_entries",
    "read_npz",
    "read_numpy",
    "read_numpy_array",
    "read_numpy_logits",
    "read_numpy_probabilities",
    "read_numpy_record",
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
#: ``.npz`` key of a label map ``(*S)`` (training cases also hold ``image``)
LABEL_KEY = "label"
#: ``.npz`` key of the voxel size in mm, a 1-D array over the spatial axes ``*S``
SPACING_KEY = "spacing"
#: ``.npz`` key marking a file written by ``segcal calibrate`` (a JSON text: method and fitted parameters)
CALIBRATION_KEY = "segcal_calibration"
#: ``.npz`` entries that describe a case rather than hold its values
METADATA_KEYS = (SPACING_KEY, CALIBRATION_KEY)

_UNREADABLE = (OSError, EOFError, zipfile.BadZipFile, zlib.error)
_NPY_MAGIC = np.lib.format.MAGIC_PREFIX
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
#: header readers by format version; 3.0 has the layout of 2.0 (its header is UTF-8, the numbers ASCII)
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
    (3, 0): np.lib.format.read_array_header_2_0,
}


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


def _header_claim(fh: IO[bytes]) -> tuple[int, str] | None:
    """``(nbytes, description)`` claimed by the ``.npy`` header at the start of ``fh`` (left just after the
    header); ``None`` for object arrays and unknown versions, which ``np.load`` refuses itself."""
    reader = _HEADER_READERS.get(np.lib.format.read_magic(fh))
    if reader is None:
        return None
    shape, _, dtype = reader(fh)
    return None if dtype.hasobject else claim(shape, dtype)


def _check_npy(p: Path, fh: IO[bytes]) -> None:
    """Rule: an ``.npy`` header's shape x item size equals the data bytes of the file and fits in memory."""
    found = _header_claim(fh)
    if found is None:
        return
    nbytes, described = found
    held = p.stat().st_size - fh.tell()
    if held != nbytes:
        raise UnreadableNumpyError(
            p, f"cannot read NumPy file (corrupt or truncated?): header claims {described} but the file holds "
            f"{human_bytes(held)} of data"
        )
    check_fits_memory(p, nbytes, described)


def _member_bound(info: zipfile.ZipInfo, archive_size: int) -> int | None:
    """The most bytes a zip member can expand to (stored: its size; deflated: the deflate bound); ``None``
    for other compressions."""
    compressed = min(info.compress_size, archive_size)
    if info.compress_type == zipfile.ZIP_STORED:
        return compressed
    return deflate_bound(compressed) if info.compress_type == zipfile.ZIP_DEFLATED else None


def _check_member(p: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive_size: int) -> None:
    """Rule: a member's uncompressed size (``ZipInfo.file_size``) is one its compressed bytes can hold, and
    its ``.npy`` header's shape x item size equals that size less the header."""
    key = info.filename.removesuffix(".npy")
    bound = _member_bound(info, archive_size)
    if bound is not None and info.file_size > bound:
        raise UnreadableNumpyError(
            p, f"cannot read array {key!r} (corrupt or truncated?): the archive claims {human_bytes(info.file_size)}"
            f" for it, more than its {human_bytes(info.compress_size)} of compressed data can hold"
        )
    with zf.open(info) as fh:
        if fh.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
            check_fits_memory(p, info.file_size, f"{human_bytes(info.file_size)} for array {key!r}")
            return
        fh.seek(0)
        found = _header_claim(fh)
        held = info.file_size - fh.tell()
    if found is None:
        return
    nbytes, described = found
    if held != nbytes:
        raise UnreadableNumpyError(
            p, f"cannot read array {key!r} (corrupt or truncated?): header claims {described} but the archive "
            f"holds {human_bytes(max(held, 0))} of data for it"
        )
    check_fits_memory(p, nbytes, f"{described} for array {key!r}")


def _check_sizes(p: Path) -> None:
    """Check the headers of ``p`` (``.npy`` or ``.npz``, told by content) before any data is read."""
    with open(p, "rb") as fh:
        magic = fh.read(len(_NPY_MAGIC))
        fh.seek(0)
        if magic == _NPY_MAGIC:
            _check_npy(p, fh)
            return
    if magic[:4] in _ZIP_MAGICS:
        archive_size = p.stat().st_size
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                _check_member(p, zf, info, archive_size)


def _load(p: Path) -> np.ndarray | np.lib.npyio.NpzFile:
    """``np.load(p, allow_pickle=False)`` after the header checks, with every failure turned into a
    :class:`CaseError`."""
    if not p.exists():
        raise CaseError(p, "file not found")
    try:
        _check_sizes(p)
        return np.load(p, allow_pickle=False)
    except CaseError:
        raise
    except ValueError as exc:
        raise CaseError(p, _value_problem(exc)) from None
    except _UNREADABLE as exc:
        raise UnreadableNumpyError(p, f"cannot read NumPy file (corrupt or truncated?): {exc}") from None
    except MemoryError:
        raise CaseError(p, "not enough memory to read the file") from None


def _member(p: Path, archive: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:
        raise CaseError(p, f"array {key!r}: {_value_problem(exc)}") from None
    except _UNREADABLE as exc:
        raise UnreadableNumpyError(p, f"cannot read array {key!r} (corrupt or truncated?): {exc}") from None
    except MemoryError:
        raise CaseError(p, f"array {key!r}: not enough memory to read it") from None


def _no_object(arr: np.ndarray, p: Path) -> np.ndarray:
    if arr.dtype == object:
        raise CaseError(p, "object arrays are not supported")
    return arr


def _pick_key(p: Path, keys: list[str], key: str | None, prefer: Sequence[str]) -> str:
    """The archive key to read: ``key`` (required), else the first of ``prefer`` present, else the archive's
    only array that is not case metadata (:data:`METADATA_KEYS`)."""
    if key is None:
        key = next((k for k in prefer if k in keys), None)
    if key is None:
        data = [k for k in keys if k not in METADATA_KEYS]
        if len(data) != 1:
            hint = " or ".join(repr(k) for k in prefer) or repr(PROBABILITIES_KEY)
            raise CaseError(p, f"archive holds arrays {keys}; expected exactly one (or the key {hint})")
        key = data[0]
    if key not in keys:
        raise MissingKeyError(p, f"archive has no key {key!r} (keys: {keys})", keys)
    return key


def _spacing_entry(p: Path, archive: np.lib.npyio.NpzFile) -> tuple[float, ...] | None:
    """The voxel size stored under :data:`SPACING_KEY`: a 1-D array of 1 to 3 finite positive numbers."""
    if SPACING_KEY not in archive.files:
        return None
    sp = _member(p, archive, SPACING_KEY)
    ok = sp.ndim == 1 and 1 <= sp.size <= 3 and np.issubdtype(sp.dtype, np.number)
    if not ok or not (np.isfinite(sp).all() and (sp > 0).all()):
        raise CaseError(p, f"{SPACING_KEY!r} must be 1 to 3 positive voxel sizes in mm, got {sp.tolist()!r}")
    return tuple(float(v) for v in sp)


def _calibration_entry(p: Path, archive: np.lib.npyio.NpzFile) -> str | None:
    if CALIBRATION_KEY not in archive.files:
        return None
    mark = _member(p, archive, CALIBRATION_KEY)
    return str(mark.reshape(-1)[0]) if mark.size else ""


@dataclass
class NumpyRecord:
    """One array of a NumPy file with what the file says about it.

    Attributes:
        array: the data, as stored.
        key: the ``.npz`` key it was read from (``None`` for ``.npy``).
        keys: every key of the archive (empty for ``.npy``).
        spacing: voxel size in mm from the archive's ``spacing`` entry, else ``None``.
        calibration: the archive's ``segcal_calibration`` entry (a JSON text), set on files written by
            ``segcal calibrate``, else ``None``.
    """

    array: np.ndarray
    key: str | None = None
    keys: list[str] = field(default_factory=list)
    spacing: tuple[float, ...] | None = None
    calibration: str | None = None


def read_numpy_record(path: str | Path, prefer: Sequence[str] = (), *, key: str | None = None) -> NumpyRecord:
    """The data array of ``path`` with its metadata: ``.npy`` as stored; ``.npz`` under ``key`` (required), else
    under the first of ``prefer`` that the archive has, else the archive's only array besides the metadata
    entries ``spacing`` and ``segcal_calibration``. Never unpickles."""
    p = Path(path)
    obj = _load(p)
    if not isinstance(obj, np.lib.npyio.NpzFile):
        return NumpyRecord(_no_object(obj, p))
    with obj:
        keys = list(obj.files)
        chosen = _pick_key(p, keys, key, prefer)
        array = _no_object(_member(p, obj, chosen), p)
        return NumpyRecord(array, chosen, keys, _spacing_entry(p, obj), _calibration_entry(p, obj))


def _read(path: str | Path, key: str | None, prefer: str | None) -> np.ndarray:
    """The array of ``path`` (:func:`read_numpy_record`)."""
    return read_numpy_record(path, () if prefer is None else (prefer,), key=key).array


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


def metadata_entries(
    *, spacing: Sequence[float] | None = None, calibration: str | None = None
) -> dict[str, np.ndarray]:
    """The ``.npz`` metadata entries of a case (:data:`METADATA_KEYS`): ``spacing`` as float64 and the
    calibration mark as a 0-d unicode array (never an object array); ``None`` values are left out.
    :func:`read_numpy_record` reads them back."""
    out: dict[str, np.ndarray] = {}
    if spacing is not None:
        out[SPACING_KEY] = np.asarray(spacing, dtype=np.float64)
    if calibration is not None:
        out[CALIBRATION_KEY] = np.array(calibration)
    return out


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
