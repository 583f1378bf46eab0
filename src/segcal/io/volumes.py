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
    read_nifti,
    read_nifti_probabilities,
    write_nifti,
    write_nifti_probabilities,
)
from segcal.io.nnunet import write_nnunet_probabilities
from segcal.io.numpy import (
    LABEL_KEY,
    NUMPY_SUFFIXES,
    PROBABILITIES_KEY,
    metadata_entries,
    read_numpy_record,
    write_npz,
)
from segcal.io.predictions import Prediction, read_prediction

__all__ = [
    "FolderFormat",
    "list_prediction_files",
    "prediction_suffixes",
    "read_label",
    "read_mask",
    "read_probabilities",
    "write_mask_file",
    "write_prediction_file",
]

FolderFormat = Literal["nifti", "npy", "nnunet"]


def prediction_suffixes(fmt: FolderFormat) -> tuple[str, ...]:
    """File endings of prediction files in a folder of format ``fmt``."""
    return NIFTI_SUFFIXES if fmt == "nifti" else (".npz",) if fmt == "nnunet" else NUMPY_SUFFIXES


def read_probabilities(
    paths: Sequence[str | Path], fmt: FolderFormat
) -> tuple[np.ndarray, tuple[float, ...] | None, np.ndarray | None]:
    """Probability map ``(C, *S)`` with its spacing/affine (``None`` when the files hold no geometry).

    * ``nifti``: one 4D file ``(x, y, z, C)`` (classes on the last axis), one 3D file (foreground probability
      of a binary task → ``[1 − p, p]``), or several 3D files ``case_0000, case_0001, ...`` one per class;
    * ``npy``: one ``.npy`` / ``.npz`` array ``(C, *S)`` in the label's axis order (npz: key ``probabilities``
      or the only data array; the voxel size from the entry ``spacing`` when present);
    * ``nnunet``: ``case.npz`` from ``nnUNetv2_predict --save_probabilities``.

    A file that declares logits (:mod:`segcal.io.predictions`) is refused: these readers score probabilities.
    """
    if len(paths) == 0:
        raise CaseError(None, "no prediction file")
    if fmt not in ("nifti", "npy", "nnunet"):
        raise ValueError(f"unknown format {fmt!r}")
    if fmt == "nifti" and len(paths) > 1:
        return read_nifti_probabilities(paths)
    pred = read_prediction(paths[0], fmt, prefer="probabilities")
    if pred.kind == "logits":
        raise CaseError(
            paths[0], f"holds logits (declared by {pred.declared_by}), not probabilities; write the probability "
            "map (segcal predict writes both, `segcal calibrate` writes calibrated probabilities)"
        )
    check_probability_dtype(pred.values, paths[0])
    return pred.values, pred.spacing, pred.affine


def read_label(path: str | Path) -> tuple[np.ndarray, tuple[float, ...] | None, np.ndarray | None]:
    """Integer label map ``(*S)`` with spacing and affine.

    NIfTI: the data, header spacing and affine. NumPy: an ``.npy`` array, or an ``.npz`` key ``label`` (so the
    training cases of ``segcal train``, which hold ``image`` and ``label``, serve as label files) or its only
    data array; spacing from the entry ``spacing`` when present, else ``None``; affine ``None``.
    """
    p = str(path)
    if p.endswith(NIFTI_SUFFIXES):
        data, sp, aff = read_nifti(p)
    else:  # a label file, or a training case (.npz with "image" and "label")
        rec = read_numpy_record(p, (LABEL_KEY,))
        data, sp, aff = rec.array, rec.spacing, None
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


def write_prediction_file(
    src: str | Path,
    out_dir: str | Path,
    probs: np.ndarray,
    fmt: FolderFormat,
    meta: Any = None,
    *,
    calibration: str | None = None,
    spacing: Sequence[float] | None = None,
) -> Path:
    """Write probabilities ``probs`` ``(C, *S)`` (label axis order) as ``out_dir / src.name`` in ``fmt``, declared
    as probabilities (:mod:`segcal.io.predictions`).

    ``npy``: ``.npz`` key ``"probabilities"`` (an ``.npy`` source name is written as ``.npz``, the only NumPy
    file that can say what it holds), ``(C, *S)`` float32, compressed, with the entry ``spacing`` when given;
    ``nifti``: ``(x, y, z, C)`` float32 with the affine and header of the input image ``meta`` and the
    ``intent_name`` ``"probabilities"``; ``nnunet``: ``.npz`` key ``"probabilities"`` ``(C, z, y, x)`` float32.
    ``calibration`` (a text) marks the file as written by ``segcal calibrate``: the ``.npz`` entry
    ``"segcal_calibration"``, or the NIfTI ``descrip``.
    """
    name = Path(src).name
    if fmt == "npy" and name.endswith(".npy"):
        name = name[: -len(".npy")] + ".npz"
    out = Path(out_dir) / name
    probs = probs.astype(np.float32, copy=False)
    if fmt == "nifti":
        return write_nifti_probabilities(out, probs, meta.affine, header=meta.header, descrip=calibration)
    if fmt == "nnunet":
        return write_nnunet_probabilities(out, probs, metadata_entries(calibration=calibration))
    extra = metadata_entries(spacing=spacing, calibration=calibration)
    return write_npz(out, {PROBABILITIES_KEY: probs, **extra}, compressed=True)


def write_mask_file(src: str | Path, out_dir: str | Path, masks: np.ndarray, fmt: FolderFormat, pred: Prediction,
                    note: str) -> Path:
    """Write binary masks ``masks`` ``(K, *S)`` (label axis order) of the prediction file ``src`` into ``out_dir``
    as a label file with the prediction's geometry.

    ``nifti``: ``(x, y, z)`` (one channel) or ``(x, y, z, K)`` uint8 with the affine and header of ``pred`` (the
    prediction as read), ``intent_name`` ``"mask"`` and ``note`` as ``descrip``; other formats: ``<case>.npz`` key
    ``"label"`` ``(*S)`` or ``(K, *S)`` uint8 with the entry ``spacing`` of ``pred``.
    """
    name = Path(src).name
    data = masks.astype(np.uint8)
    data = data[0] if data.shape[0] == 1 else data
    if fmt == "nifti":
        vol = data if masks.shape[0] == 1 else np.moveaxis(data, 0, -1)
        name = name if name.endswith(NIFTI_SUFFIXES) else name + ".nii.gz"
        header = pred.meta.header if pred.meta is not None else None
        return write_nifti(Path(out_dir) / name, np.ascontiguousarray(vol), pred.affine, spacing=pred.spacing,
                           header=header, intent_name="mask", descrip=note)
    stem = name[: -len(".npz")] if name.endswith(".npz") else name[: -len(".npy")]
    return write_npz(Path(out_dir) / f"{stem}.npz", {LABEL_KEY: data, **metadata_entries(spacing=pred.spacing)})
