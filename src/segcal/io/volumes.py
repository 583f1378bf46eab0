"""One case's volumes in any folder format: probability maps, label maps and masks, read and written with the
format dispatched in one place (see docs/evaluation.md, "Inputs").

Formats: ``nifti`` (:mod:`segcal.io.nifti`), ``npy`` (:mod:`segcal.io.numpy`) and ``nnunet``
(:mod:`segcal.io.nnunet`). Every array returned here is in **label order**: a probability map is ``(C, *S)``
with ``*S`` the spatial axes of the label file as it is stored (NIfTI ``(x, y, z)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from segcal.io.case import CaseError, check_probability_dtype
from segcal.io.nifti import (
    NIFTI_SUFFIXES,
    nifti_to_probabilities,
    read_nifti,
    read_nifti_image,
    read_nifti_probabilities,
    write_nifti_probabilities,
)
from segcal.io.nnunet import read_nnunet_probabilities, write_nnunet_probabilities
from segcal.io.numpy import (
    NUMPY_SUFFIXES,
    read_numpy,
    read_numpy_logits,
    read_numpy_probabilities,
    write_numpy_probabilities,
)

__all__ = [
    "FolderFormat",
    "list_prediction_files",
    "prediction_suffixes",
    "read_label",
    "read_mask",
    "read_prediction_file",
    "read_probabilities",
    "write_prediction_file",
]

FolderFormat = Literal["nifti", "npy", "nnunet"]


def prediction_suffixes(fmt: FolderFormat) -> tuple[str, ...]:
    """File endings of prediction files in a folder of format ``fmt``."""
    return NIFTI_SUFFIXES if fmt == "nifti" else (".npz",) if fmt == "nnunet" else NUMPY_SUFFIXES


def read_probabilities(
    paths: Sequence[str | Path], fmt: FolderFormat
) -> tuple[np.ndarray, tuple[float, ...] | None, np.ndarray | None]:
    """Probability map ``(C, *S)`` with its spacing/affine (``None`` when the format has no geometry).

    * ``nifti``: one 4D file ``(x, y, z, C)`` (classes on the last axis), one 3D file (foreground probability
      of a binary task → ``[1 − p, p]``), or several 3D files ``case_0000, case_0001, ...`` one per class;
    * ``npy``: one ``.npy`` / ``.npz`` array ``(C, *S)`` in the label's axis order (npz: key ``probabilities``
      or the only array);
    * ``nnunet``: ``case.npz`` from ``nnUNetv2_predict --save_probabilities``.
    """
    if len(paths) == 0:
        raise CaseError(None, "no prediction file")
    if fmt == "nnunet":
        return read_nnunet_probabilities(paths[0]), None, None
    if fmt == "npy":
        return read_numpy_probabilities(paths[0]), None, None
    if fmt != "nifti":
        raise ValueError(f"unknown format {fmt!r}")
    return read_nifti_probabilities(paths)


def read_label(path: str | Path) -> tuple[np.ndarray, tuple[float, ...] | None, np.ndarray | None]:
    """Integer label map ``(*S)`` with spacing and affine (``None`` for NumPy files)."""
    p = str(path)
    if p.endswith(NIFTI_SUFFIXES):
        data, sp, aff = read_nifti(p)
    else:
        data, sp, aff = read_numpy(p), None, None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            raise CaseError(p, "label map contains NaN/Inf")
        if not np.array_equal(data, np.round(data)):
            raise CaseError(p, f"label map must hold integer class indices, got non-integral values ({data.dtype})")
        data = data.astype(np.int64)
    elif not np.issubdtype(data.dtype, np.integer):
        raise CaseError(p, f"label map must be an integer array, got dtype {data.dtype}")
    if data.size == 0:
        raise CaseError(p, "label map is empty")
    return data, sp, aff


def read_mask(path: str | Path) -> np.ndarray:
    """Binary region mask ``(*S)`` (non-zero = inside)."""
    data, _, _ = read_label(path)
    return data != 0


def list_prediction_files(folder: str | Path, fmt: FolderFormat) -> dict[str, Path]:
    """Case name (file name without its ending) → file, one prediction file per case, sorted by name.

    Raises ``FileNotFoundError`` when ``folder`` is not a directory and ``ValueError`` when it holds no
    prediction file of format ``fmt``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    suffixes = prediction_suffixes(fmt)
    cases: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        suf = next((s for s in suffixes if p.name.endswith(s)), None)
        if p.is_file() and suf is not None:
            cases[p.name[: -len(suf)]] = p
    if not cases:
        raise ValueError(f"{folder}: no {'/'.join(suffixes)} files found (format {fmt})")
    return cases


def read_prediction_file(path: str | Path, fmt: FolderFormat) -> tuple[np.ndarray, Any]:
    """``(array (C, *S), meta)`` of one prediction file, in label order; ``meta`` is what
    :func:`write_prediction_file` needs to write a file of the same format (the NIfTI image for ``nifti``,
    else ``None``).

    ``npy``: **logits** as stored, float32 (:func:`~segcal.io.numpy.read_numpy_logits`); ``nifti``:
    probabilities from a 4D ``(x, y, z, C)`` map (or a 3D binary foreground probability ``p`` → classes
    ``[1 − p, p]``); ``nnunet``: probabilities ``(C, z, y, x)`` → ``(C, x, y, z)``.
    """
    if fmt == "npy":
        return read_numpy_logits(path), None
    if fmt == "nnunet":
        return read_nnunet_probabilities(path), None
    image = read_nifti_image(path)
    data, _, _ = read_nifti(path)  # raises CaseError naming the file when corrupt
    check_probability_dtype(data, path)
    return nifti_to_probabilities(data, path), image


def write_prediction_file(
    src: str | Path, out_dir: str | Path, probs: np.ndarray, fmt: FolderFormat, meta: Any = None
) -> Path:
    """Write probabilities ``probs`` ``(C, *S)`` (label axis order) as ``out_dir / src.name`` in ``fmt``.

    ``npy``: ``.npy`` array or ``.npz`` key ``"probabilities"``, ``(C, *S)`` float32 (compressed); ``nifti``:
    ``(x, y, z, C)`` float32 with the affine and header of the input image ``meta``; ``nnunet``: ``.npz`` key
    ``"probabilities"`` ``(C, z, y, x)`` float32.
    """
    out = Path(out_dir) / Path(src).name
    probs = probs.astype(np.float32, copy=False)
    if fmt == "nifti":
        return write_nifti_probabilities(out, probs, meta.affine, header=meta.header)
    if fmt == "nnunet":
        return write_nnunet_probabilities(out, probs)
    return write_numpy_probabilities(out, probs, compressed=True)
