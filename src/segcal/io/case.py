"""One evaluated case (:class:`Case`), its files before reading (:class:`CaseFiles`) and the read error
(:class:`CaseError`) shared by every reader of :mod:`segcal.io` (see docs/evaluation.md, "Inputs").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "GEOMETRY_ATOL",
    "Case",
    "CaseError",
    "CaseFiles",
    "check_probability_dtype",
    "same_geometry",
    "shape_mismatch",
    "to_label_grid",
]

#: tolerance on spacing (mm) and affine entries when prediction and label geometry are compared
GEOMETRY_ATOL = 1e-3


class CaseError(ValueError):
    """A problem with one case's files; ``path`` names the offending file (``None`` if not file-specific)."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


@dataclass
class Case:
    """One evaluated case.

    Attributes:
        case_id: identifier shared by prediction and label files (extensions and ``_0000`` suffixes stripped).
        probabilities: ``(C, *S)`` float array (float16/float32/float64 as stored), spatial axes in label order.
        label: ``(*S)`` integer label map (or ``None`` when only a soft reference is given).
        reference: optional soft reference ``(C, *S)`` in [0, 1] (e.g. mean of several annotators).
        spacing: voxel size in mm per spatial axis of ``*S``.
        affine: ``4 x 4`` voxel-to-world matrix (``None`` for plain NumPy data).
        mask: optional region mask ``(*S)`` bool.
        paths: source files by role (``prediction``, ``label``, ``reference``, ``mask``).
    """

    case_id: str
    probabilities: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None
    reference: np.ndarray | None = None
    mask: np.ndarray | None = None
    paths: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class CaseFiles:
    """The files of one case, before reading: ``prediction`` may be several per-class NIfTI files."""

    case_id: str
    prediction: list[str]
    label: str
    reference: list[str] | None = None
    mask: str | None = None


def check_probability_dtype(arr: np.ndarray, path: str | Path) -> np.ndarray:
    """``arr`` itself if it is a floating-point array; else :class:`CaseError` naming ``path``."""
    if not np.issubdtype(arr.dtype, np.floating):
        raise CaseError(path, f"probabilities must be a floating-point array, got dtype {arr.dtype}")
    return arr


def same_geometry(
    sp_a: Sequence[float], aff_a: np.ndarray | None, sp_b: Sequence[float], aff_b: np.ndarray | None
) -> bool:
    """Whether two spacings (and affines, where both are known) agree within :data:`GEOMETRY_ATOL`."""
    if len(sp_a) != len(sp_b) or not np.allclose(sp_a, sp_b, atol=GEOMETRY_ATOL):
        return False
    if aff_a is not None and aff_b is not None and not np.allclose(aff_a, aff_b, atol=GEOMETRY_ATOL):
        return False
    return True


def to_label_grid(values: np.ndarray, label_shape: Sequence[int]) -> np.ndarray:
    """``values`` ``(C, *S)`` on the label's grid: a 2D slice stored as NIfTI ``(X, Y, 1)`` and one stored as
    ``(X, Y)`` are the same grid, so a singleton third spatial axis is dropped (or added) to match
    ``label_shape``; any other shape is returned unchanged (the caller reports the mismatch)."""
    spatial = tuple(values.shape[1:])
    label_shape = tuple(label_shape)
    if len(spatial) == 3 and len(label_shape) == 2 and spatial == (*label_shape, 1):
        return values[..., 0]
    if len(spatial) == 2 and len(label_shape) == 3 and label_shape == (*spatial, 1):
        return values[..., None]
    return values


def shape_mismatch(
    pred_path: str | Path, pred_spatial: Sequence[int], label_path: str | Path, label_shape: Sequence[int], fmt: str
) -> CaseError:
    """The error for a prediction whose spatial shape is not its label's, naming both files (with the axis-order
    hint for nnU-Net files)."""
    hint = " (nnU-Net files are (C, z, y, x) against the label's (x, y, z))" if fmt == "nnunet" else ""
    return CaseError(
        pred_path,
        f"shape mismatch: probabilities have spatial shape {tuple(pred_spatial)}, label {label_path} has "
        f"{tuple(label_shape)}{hint}",
    )
