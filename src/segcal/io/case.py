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
    "check_spatial_shapes",
    "drop_singleton_z",
    "is_2d_slice",
    "match_2d_grid",
    "same_geometry",
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


def drop_singleton_z(
    arr: np.ndarray, sp: tuple[float, ...] | None
) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """``arr`` ``(..., X, Y, 1)`` as ``(..., X, Y)``, its spacing cut to the two axes left: a 2D slice stored
    with a singleton third spatial axis (``segcal predict --format nifti`` writes 2D probabilities as
    ``(X, Y, 1, C)``)."""
    return arr[..., 0], (tuple(sp[:2]) if sp is not None else None)


def is_2d_slice(arr: np.ndarray, lead: int) -> bool:
    """Whether ``arr`` has three spatial axes after ``lead`` leading ones and the third is a singleton."""
    return arr.ndim == lead + 3 and arr.shape[-1] == 1


def match_2d_grid(
    probs: np.ndarray, p_sp: tuple[float, ...] | None, label: np.ndarray, l_sp: tuple[float, ...] | None
) -> tuple[np.ndarray, tuple[float, ...] | None, np.ndarray, tuple[float, ...] | None]:
    """Probabilities ``(C, X, Y, 1)`` against a 2D label ``(X, Y)``, or ``(C, X, Y)`` against a label
    ``(X, Y, 1)``: the singleton third spatial axis (and its spacing) dropped so both are 2D."""
    if label.ndim == 2 and is_2d_slice(probs, 1):
        probs, p_sp = drop_singleton_z(probs, p_sp)
    elif probs.ndim == 3 and is_2d_slice(label, 0):
        label, l_sp = drop_singleton_z(label, l_sp)
    return probs, p_sp, label, l_sp


def check_spatial_shapes(
    values: np.ndarray, label: np.ndarray, pred_path: str | Path, label_path: str | Path, fmt: str
) -> None:
    """Rule: a prediction ``(C, *S)`` has its label's spatial shape ``*S``; else :class:`CaseError` naming both
    files (with the axis-order hint for nnU-Net files)."""
    if values.ndim != label.ndim + 1:
        raise CaseError(
            pred_path,
            f"probabilities {values.shape} (C, *S) do not fit the label {label.shape} of {label_path}",
        )
    if values.shape[1:] != label.shape:
        hint = " (nnU-Net files are (C, z, y, x) against the label's (x, y, z))" if fmt == "nnunet" else ""
        raise CaseError(
            pred_path,
            f"shape mismatch: probabilities have spatial shape {values.shape[1:]}, label {label_path} has "
            f"{label.shape}{hint}",
        )
