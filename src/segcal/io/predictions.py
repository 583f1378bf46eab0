"""The prediction-file contract: what a prediction file holds, probabilities or logits, and how segcal knows it
(see docs/workflow.md, "The prediction-file contract").

A file's kind is **declared**, in this order of precedence:

1. by the format: an nnU-Net prediction folder holds probabilities (``case.npz`` key ``"probabilities"``);
2. by the file: an ``.npz`` key ``"probabilities"`` or ``"logits"`` (an archive with both gives the one the
   reader prefers: ``segcal calibrate`` prefers logits, ``segcal evaluate`` probabilities); a NIfTI header whose
   ``intent_name`` is ``"probabilities"`` or ``"logits"`` (segcal writes it);
3. by the folder: the ``kind`` of its ``segcal.json`` sidecar (:mod:`segcal.io.sidecar`);
4. by the user: ``kind="probabilities" | "logits"`` (``--pred-kind`` on the command line), which may fill in an
   undeclared kind but never overrides a declared one: a contradiction is an error naming the file.

A file nothing declares (a plain ``.npy``, an ``.npz`` with one unnamed array, a NIfTI map from another tool)
is read as probabilities *provisionally*: the reader that uses it must check that its values are a probability
map and refuse the file otherwise, since it cannot tell what it holds (``segcal calibrate`` does so with
:func:`segcal.posthoc.folders.check_prediction_values`; ``segcal evaluate`` checks every probability map).

Files written by ``segcal calibrate`` (or by ``segcal predict`` with a temperature or a calibrator) carry a
calibration mark (an ``.npz`` entry ``"segcal_calibration"``, a NIfTI ``descrip`` starting with
``"segcal calibrated:"``, and the sidecar's ``calibration``), so they are never calibrated a second time, even
after being copied to another folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from segcal.io.case import CaseError, check_probability_dtype
from segcal.io.nifti import (
    nifti_declared_kind,
    nifti_description,
    nifti_image_data,
    nifti_to_probabilities,
    read_nifti_image,
)
from segcal.io.nnunet import read_nnunet_record
from segcal.io.numpy import LOGITS_KEY, PROBABILITIES_KEY, read_numpy_record
from segcal.io.sidecar import SIDECAR_NAME, FolderInfo, PredictionKind, read_folder_info

__all__ = ["CALIBRATION_MARK", "KindOption", "Prediction", "calibration_mark", "read_prediction"]

#: what the user may say about a prediction folder: nothing (``auto``) or its kind
KindOption = Literal["auto", "probabilities", "logits"]
#: start of the calibration mark of a file (its NIfTI ``descrip``, its npz entry ``segcal_calibration``)
CALIBRATION_MARK = "segcal calibrated:"


@dataclass
class Prediction:
    """One prediction file as read.

    Attributes:
        values: ``(C, *S)`` in label order (NIfTI ``(x, y, z, C)`` and nnU-Net ``(C, z, y, x)`` are reordered),
            as stored (probabilities or logits, see ``kind``).
        kind: what ``values`` are.
        declared_by: how the kind is known, for messages (``"its npz key 'logits'"``, ``"PATH/segcal.json"``,
            ...); ``None`` when nothing declared it and probabilities are assumed (check the values).
        spacing: voxel size in mm (NIfTI header, or the ``.npz`` entry ``spacing``), else ``None``.
        affine: ``4 x 4`` voxel-to-world matrix of a NIfTI file, else ``None``.
        meta: what :func:`segcal.io.write_prediction_file` needs to write a file of the same format (the NIfTI
            image for ``nifti``, else ``None``).
        calibration: the file's calibration mark (text), set on files written by ``segcal calibrate``.
    """

    values: np.ndarray
    kind: PredictionKind
    declared_by: str | None
    spacing: tuple[float, ...] | None = None
    affine: np.ndarray | None = None
    meta: Any = None
    calibration: str | None = None


def _resolve(path: Path, declared: PredictionKind | None, how: str, option: KindOption, info: FolderInfo,
             ) -> tuple[PredictionKind, str | None]:
    """The kind of ``path`` from what the file declares (``declared`` by ``how``), the sidecar and the user."""
    if declared is None and info.kind is not None:
        declared, how = info.kind, str(path.parent / SIDECAR_NAME)
    if declared is not None:
        if option != "auto" and option != declared:
            raise CaseError(
                path, f"holds {declared} (declared by {how}) but {option} were requested (--pred-kind {option}); "
                "a declared kind is never overridden"
            )
        return declared, how
    if option != "auto":
        return option, f"--pred-kind {option}"
    return "probabilities", None


def _read_numpy(path: Path, prefer: PredictionKind) -> tuple[np.ndarray, PredictionKind | None, str, Any]:
    other = LOGITS_KEY if prefer == PROBABILITIES_KEY else PROBABILITIES_KEY
    rec = read_numpy_record(path, (prefer, other))
    declared = rec.key if rec.key in (PROBABILITIES_KEY, LOGITS_KEY) else None
    return rec.array, declared, f"its npz key {rec.key!r}", rec


def read_prediction(
    path: str | Path,
    fmt: Literal["nifti", "npy", "nnunet"],
    *,
    kind: KindOption = "auto",
    prefer: PredictionKind = "probabilities",
    info: FolderInfo | None = None,
) -> Prediction:
    """Read one prediction file of a folder of format ``fmt`` and tell what it holds (module docstring).

    Args:
        path: the file (``.npy`` / ``.npz``, NIfTI ``(x, y, z, C)`` or a 2D/3D binary foreground map, nnU-Net
            ``case.npz``).
        fmt: the folder format (:func:`segcal.io.detect_format`).
        kind: what the user says the file holds (``auto``: nothing); never overrides a declared kind.
        prefer: the array taken from an ``.npz`` holding both ``probabilities`` and ``logits``.
        info: the folder's sidecar (read from ``path``'s folder when ``None``).

    Raises:
        CaseError: naming the file, when it cannot be read or the user's kind contradicts the declared one.
    """
    p = Path(path)
    info = read_folder_info(p.parent) if info is None else info
    if kind not in ("auto", "probabilities", "logits"):
        raise ValueError(f"kind must be 'auto', 'probabilities' or 'logits', got {kind!r}")
    if fmt == "nnunet":
        resolved, how = _resolve(p, "probabilities", "the nnU-Net format", kind, info)
        rec = read_nnunet_record(p)
        return Prediction(rec.array, resolved, how, calibration=rec.calibration)
    if fmt == "npy":
        values, declared, how, rec = _read_numpy(p, prefer)
        resolved, how = _resolve(p, declared, how, kind, info)
        spacing = rec.spacing or info.spacing
        return Prediction(values, resolved, how, spacing, calibration=rec.calibration)
    if fmt != "nifti":
        raise ValueError(f"unknown format {fmt!r}")
    image = read_nifti_image(p)
    data, spacing, affine = nifti_image_data(image, p)
    check_probability_dtype(data, p)
    resolved, how = _resolve(p, nifti_declared_kind(image), "its NIfTI header (intent_name)", kind, info)
    descrip = nifti_description(image)
    mark = descrip if descrip.startswith(CALIBRATION_MARK) else None
    if resolved == "probabilities":
        values = nifti_to_probabilities(data, p)
    elif data.ndim == 4:
        values = np.moveaxis(data, -1, 0)
    else:
        raise CaseError(p, f"expected a 4D (x, y, z, C) logits map, got shape {data.shape}")
    return Prediction(values, resolved, how, spacing, affine, image, mark)


def calibration_mark(pred: Prediction, info: FolderInfo) -> str | None:
    """Why ``pred`` is already calibrated (its own mark, or its folder's sidecar), else ``None``."""
    if pred.calibration is not None:
        return pred.calibration
    if info.calibration is not None:
        return f"the folder's {SIDECAR_NAME}: {info.calibration}"
    return None
