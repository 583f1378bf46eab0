"""NIfTI files: paired readers and writers with affine and spacing (see docs/evaluation.md, "Inputs").

Data keep the axes of the file, ``(x, y, z[, t])``; a probability map stored in NIfTI has its classes on the
last axis, ``(x, y, z, C)``, and is returned by :func:`read_nifti_probabilities` as ``(C, x, y, z)`` (label
order). Spacing is the voxel size in mm of the (up to three) spatial axes, read from the header zooms; the
affine is the ``4 x 4`` voxel-to-world matrix. Read problems raise :class:`~segcal.io.case.CaseError` naming
the file; writes are atomic (``.nii.gz`` gzip-compressed with level 1 and a zero timestamp, as nibabel does).

Before any data is read the header is checked against the file (:mod:`segcal.io._sizes`): the data offset plus
shape x item size must fit in a ``.nii`` file's size; for ``.nii.gz`` it must agree with the gzip trailer
(ISIZE, the uncompressed size modulo 2**32; when it does not, the stream is counted) and fit in what deflate can
expand the file to; and the data must not exceed the memory available.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segcal.io._atomic import atomic_write
from segcal.io._sizes import check_fits_memory, claim, deflate_bound, human_bytes
from segcal.io.case import CaseError, check_probability_dtype, same_geometry

__all__ = [
    "NIFTI_SUFFIXES",
    "nifti_declared_kind",
    "nifti_description",
    "nifti_image_data",
    "nifti_to_probabilities",
    "read_nifti",
    "read_nifti_image",
    "read_nifti_probabilities",
    "write_nifti",
    "write_nifti_probabilities",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: gzip level of written ``.nii.gz`` files (nibabel's default)
_GZIP_LEVEL = 1
#: chunk size when a gzip stream is counted
_COUNT_CHUNK = 1 << 20
_CORRUPT = "cannot read NIfTI file (corrupt or truncated?)"


def _gzip_length(p: Path, limit: int) -> int:
    """Uncompressed length of the gzip file ``p``, counted in chunks up to ``limit`` (nothing kept)."""
    total = 0
    try:
        with gzip.open(p, "rb") as gz:
            while total < limit:
                chunk = gz.read(min(_COUNT_CHUNK, limit - total))
                if not chunk:
                    break
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise CaseError(p, f"{_CORRUPT}: {type(exc).__name__}: {exc}") from None
    return total


def _gzip_holds(p: Path, needed: int) -> tuple[int, str]:
    """``(held, text)``: how many of the ``needed`` uncompressed bytes the gzip file ``p`` holds, and in words.
    ``needed`` when the trailer's ISIZE agrees (modulo 2**32) and deflate can reach it; the deflate bound when
    it cannot; else the counted length."""
    size = p.stat().st_size
    bound = deflate_bound(size)
    if needed > bound:
        return bound, f"a gzip file of {human_bytes(size)} cannot hold more than {human_bytes(bound)}"
    with open(p, "rb") as fh:
        fh.seek(max(size - 4, 0))
        isize = int.from_bytes(fh.read(4), "little")
    held = needed if isize == needed % 2**32 else _gzip_length(p, needed)
    return held, f"the file holds {human_bytes(held)} uncompressed"


def _check_sizes(p: Path, image: Any) -> None:
    """Rule: the data offset + shape x item size of the image's data block fits in what the file holds
    (``.nii``: its size; ``.nii.gz``: its uncompressed size), and the data fit in the memory available."""
    proxy = image.dataobj
    if not hasattr(proxy, "offset"):
        return
    nbytes, described = claim(proxy.shape, np.dtype(proxy.dtype))
    offset = int(proxy.offset)
    needed = offset + nbytes
    if p.name.endswith(".gz"):
        held, holds = _gzip_holds(p, needed)
    else:
        held = p.stat().st_size
        holds = f"the file holds {human_bytes(held)}"
    if held < needed:
        raise CaseError(p, f"{_CORRUPT}: header claims {described} at offset {offset} but {holds}")
    check_fits_memory(p, nbytes, described)


def read_nifti_image(path: str | Path) -> Any:
    """The (lazily loaded) nibabel image of ``path``, its header checked against the file size and the memory
    available before any data is read; :class:`CaseError` if missing, unreadable or impossible."""
    import nibabel as nib

    p = Path(path)
    if not p.exists():
        raise CaseError(p, "file not found")
    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types for corrupt / truncated files
        raise CaseError(p, f"{_CORRUPT}: {type(exc).__name__}: {exc}") from None
    _check_sizes(p, img)
    return img


def read_nifti(
    path: str | Path, dtype: np.dtype | type | None = None
) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """``(data, spacing, affine)`` of a NIfTI file; data axes ``(x, y, z[, t])``, as stored (scaled by the
    header's slope/intercept) or as ``dtype``; spacing of the first ``min(3, ndim)`` axes; affine float64."""
    p = Path(path)
    return nifti_image_data(read_nifti_image(p), p, dtype)


def nifti_image_data(
    img: Any, path: str | Path, dtype: np.dtype | type | None = None
) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """:func:`read_nifti` of an image already opened by :func:`read_nifti_image` (its header already checked)."""
    p = Path(path)
    try:
        data = np.asanyarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:  # truncated data blocks fail only when read
        raise CaseError(p, f"cannot read NIfTI file (corrupt or truncated?): {type(exc).__name__}: {exc}") from None
    n_sp = min(3, data.ndim)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:n_sp])
    return data, spacing, np.asarray(img.affine, dtype=np.float64)


def nifti_to_probabilities(data: np.ndarray, path: str | Path) -> np.ndarray:
    """``(C, *S)`` probabilities from one NIfTI array: ``(x, y, z, C)`` (classes last) or a 2D/3D foreground
    probability ``p`` of a binary task (→ classes ``[1 − p, p]``)."""
    if data.ndim == 4:
        return np.moveaxis(data, -1, 0)
    if data.ndim in (2, 3):
        return np.stack([1 - data, data])
    raise CaseError(path, f"expected a 3D or 4D (x, y, z, C) probability map, got shape {data.shape}")


def read_nifti_probabilities(
    paths: Sequence[str | Path],
) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """Probability map ``(C, x, y, z)`` with its spacing and affine from NIfTI file(s).

    One file: ``(x, y, z, C)`` (classes on the last axis) or a 3D foreground probability of a binary task
    (→ ``[1 − p, p]``); several files ``case_0000, case_0001, ...``: one 3D map per class, all of the same
    shape, spacing and affine.
    """
    if len(paths) == 0:
        raise CaseError(None, "no prediction file")
    arrays = []
    spacing: tuple[float, ...] | None = None
    affine: np.ndarray | None = None
    for p in paths:
        data, sp, aff = read_nifti(p)
        check_probability_dtype(data, p)
        if spacing is None:
            spacing, affine, first = sp, aff, p
        elif not same_geometry(sp, aff, spacing, affine):
            raise CaseError(p, f"spacing/affine differ from the other class file {first}")
        arrays.append(data)
    assert spacing is not None and affine is not None
    if len(arrays) == 1:
        return nifti_to_probabilities(arrays[0], paths[0]), spacing, affine
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise CaseError(paths[0], f"per-class probability files have different shapes {sorted(shapes)}")
    return np.stack(arrays), spacing, affine


def write_nifti(
    path: str | Path,
    data: np.ndarray,
    affine: np.ndarray | None = None,
    *,
    spacing: Sequence[float] | None = None,
    header: Any = None,
    intent_name: str | None = None,
    descrip: str | None = None,
) -> Path:
    """Write ``data`` (axes ``(x, y, z[, t])``) as NIfTI (``.nii`` or gzip ``.nii.gz``) atomically.

    The geometry is ``affine``, or ``diag(spacing, 1)`` when only ``spacing`` is given (identity when neither
    is). With ``header`` (e.g. the header of the input image) a copy of it is used, with the data type set to
    that of ``data`` and no intensity scaling (slope 1, intercept 0); a NIfTI-2 header gives a NIfTI-2 file.
    ``intent_name`` (at most 16 bytes) and ``descrip`` (at most 80 bytes) set those header fields.
    :func:`read_nifti` reads back ``(data, spacing, affine)``.
    """
    import nibabel as nib

    p = Path(path)
    if not p.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{p}: unsupported NIfTI file name (expected .nii or .nii.gz)")
    if affine is None:
        affine = np.eye(4)
        if spacing is not None:
            affine[: len(spacing), : len(spacing)] = np.diag([float(s) for s in spacing])
    if header is None:
        img = nib.Nifti1Image(data, affine)
    else:
        header = header.copy()
        header.set_data_dtype(data.dtype)
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = klass(data, affine, header)
        img.header.set_slope_inter(1.0, 0.0)
    if intent_name is not None:
        img.header.set_intent(img.header.get_intent()[0], (), name=intent_name)
    if descrip is not None:
        img.header["descrip"] = descrip.encode("utf-8")[:80]
    with atomic_write(p, "wb") as fh:
        if p.name.endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=_GZIP_LEVEL, mtime=0) as gz:
                img.to_stream(gz)
        else:
            img.to_stream(fh)
    return p


def write_nifti_probabilities(
    path: str | Path,
    probs: np.ndarray,
    affine: np.ndarray | None = None,
    *,
    header: Any = None,
    kind: str = "probabilities",
    descrip: str | None = None,
) -> Path:
    """Probability (or, with ``kind="logits"``, logits) map ``(C, x, y, z)`` (label order) as float32 NIfTI
    ``(x, y, z, C)`` (classes last), with ``affine`` / ``header`` as in :func:`write_nifti`; the header's
    ``intent_name`` says what the file holds (:func:`nifti_declared_kind`). :func:`read_nifti_probabilities`
    reads it back."""
    vol = np.ascontiguousarray(np.moveaxis(probs.astype(np.float32, copy=False), 0, -1))
    return write_nifti(path, vol, affine, header=header, intent_name=kind, descrip=descrip)


def nifti_declared_kind(image: Any) -> str | None:
    """What a NIfTI prediction says it holds: its header's ``intent_name`` when that is ``"probabilities"`` or
    ``"logits"`` (as segcal writes it), else ``None``."""
    name = str(image.header.get_intent()[2]).strip()
    return name if name in ("probabilities", "logits") else None


def nifti_description(image: Any) -> str:
    """The header's ``descrip`` text (``""`` when empty)."""
    raw = image.header["descrip"]
    raw = raw.item() if hasattr(raw, "item") else raw
    return raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else str(raw).strip()
