"""Evaluation regions: the dilated bounding box of the ground-truth foreground, the boundary band, region label
maps.

Mehrtash et al., IEEE TMI 2020 (docs/references.md) restrict their calibration metrics to the bounding box of
the foreground dilated by 8 mm in-plane and 2 slices out of plane; here the margin is given in mm per spatial
axis and converted to voxels with the voxel spacing (``ceil(margin_mm / spacing)``).

The boundary band (:func:`boundary_band_mask`) holds the voxels within ``d`` mm of a boundary, where
miscalibration of segmentation networks concentrates: a boundary voxel is a voxel with a face neighbour
(6-connectivity in 3D, 4 in 2D) of another label, and a voxel is in the band when the Euclidean distance
between its centre and the nearest boundary voxel's centre, in mm with the anisotropic spacing, is at most ``d``
(``d = 0`` keeps the boundary voxels themselves, on both sides of every interface).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["BOUNDARIES", "boundary_band_mask", "boundary_voxels", "dilated_bbox_mask", "parse_region_spec"]

#: which label map's boundary the band follows
BOUNDARIES = ("reference", "prediction", "union")


def dilated_bbox_mask(
    label_or_onehot: torch.Tensor | np.ndarray,
    spacing: Sequence[float],
    margin_mm: Sequence[float] | float = (8.0, 8.0, 4.0),
    *,
    background: int = 0,
) -> torch.Tensor | np.ndarray:
    """Boolean mask ``(*S)`` of the foreground bounding box dilated by ``margin_mm`` per axis.

    Args:
        label_or_onehot: an integer label map ``(*S)`` (foreground = label != ``background``), or a one-hot /
            multi-hot / soft map ``(C, *S)`` (foreground = any channel other than ``background`` >= 0.5).
            ``len(spacing)`` tells the number of spatial dims.
        spacing: voxel size in mm per spatial axis.
        margin_mm: margin in mm per spatial axis (one number for all axes); default ``(8, 8, 4)``.
        background: the background label / channel index.

    Returns:
        A mask of the input's type (``torch.bool`` tensor or ``bool`` ndarray) with shape ``(*S)``, clipped to
        the image. A volume without foreground gives an all-False mask (metrics on it are NaN, never zero).
    """
    n_sp = len(spacing)
    is_torch = isinstance(label_or_onehot, torch.Tensor)
    arr = label_or_onehot.detach().cpu().numpy() if is_torch else np.asarray(label_or_onehot)
    if arr.ndim == n_sp:
        fg = arr != background
    elif arr.ndim == n_sp + 1:
        keep = [c for c in range(arr.shape[0]) if c != background] if arr.shape[0] > 1 else [0]
        fg = (arr[keep] >= 0.5).any(0)
    else:
        raise ValueError(
            f"label_or_onehot must be (*S) or (C, *S) with {n_sp} spatial dims (len(spacing)), "
            f"got shape {arr.shape}"
        )
    margins = (
        [float(margin_mm)] * n_sp if isinstance(margin_mm, int | float) else [float(m) for m in margin_mm]
    )
    if len(margins) != n_sp:
        raise ValueError(f"margin_mm has {len(margins)} values but there are {n_sp} spatial dims")
    if any(s <= 0 for s in spacing) or any(m < 0 for m in margins):
        raise ValueError(f"spacing must be positive and margins non-negative, got {spacing} and {margins}")
    mask = np.zeros(fg.shape, dtype=bool)
    if fg.any():
        sl = []
        for ax in range(n_sp):
            other = tuple(a for a in range(n_sp) if a != ax)
            idx = np.flatnonzero(fg.any(axis=other))
            pad = math.ceil(margins[ax] / float(spacing[ax]) - 1e-9)
            sl.append(slice(max(0, idx[0] - pad), min(fg.shape[ax], idx[-1] + pad + 1)))
        mask[tuple(sl)] = True
    return torch.from_numpy(mask).to(label_or_onehot.device) if is_torch else mask


def boundary_voxels(label: np.ndarray) -> np.ndarray:
    """Boolean map ``(*S)`` of the voxels of an integer label map ``(*S)`` that have a face neighbour of
    another label (both sides of every interface; the image border is no boundary)."""
    lab = np.asarray(label)
    out = np.zeros(lab.shape, dtype=bool)
    for ax in range(lab.ndim):
        lo = [slice(None)] * lab.ndim
        hi = [slice(None)] * lab.ndim
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        diff = lab[tuple(lo)] != lab[tuple(hi)]
        out[tuple(lo)] |= diff
        out[tuple(hi)] |= diff
    return out


def boundary_band_mask(
    label: torch.Tensor | np.ndarray,
    spacing: Sequence[float],
    band_mm: float,
    *,
    prediction: torch.Tensor | np.ndarray | None = None,
    boundary: str = "reference",
) -> torch.Tensor | np.ndarray:
    """Boolean mask ``(*S)`` of the voxels within ``band_mm`` mm of a boundary (module docstring).

    Args:
        label: the reference label map ``(*S)`` (integers; the boundaries between any two labels count).
        spacing: voxel size in mm per spatial axis (``len(spacing) == label.ndim``).
        band_mm: the half-width ``d >= 0`` of the band in mm.
        prediction: the predicted label map ``(*S)`` (the argmax), needed for ``boundary="prediction"`` /
            ``"union"``.
        boundary: ``"reference"`` (the ground-truth boundary), ``"prediction"`` (the predicted one) or
            ``"union"`` (voxels near either).

    Returns:
        A mask of ``label``'s type (``torch.bool`` tensor or ``bool`` ndarray). A map without a boundary (one
        label everywhere) gives an all-False mask (metrics on it are NaN, never zero). The distance transform
        (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``) runs on the box around the
        boundary voxels widened by the band, so its cost follows the boundary, not the volume.
    """
    from scipy.ndimage import distance_transform_edt

    is_torch = isinstance(label, torch.Tensor)
    lab = label.detach().cpu().numpy() if is_torch else np.asarray(label)
    if len(spacing) != lab.ndim:
        raise ValueError(f"spacing has {len(spacing)} values but the label map has {lab.ndim} spatial dims")
    if any(not (math.isfinite(float(s)) and float(s) > 0) for s in spacing):
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    if not (math.isfinite(float(band_mm)) and float(band_mm) >= 0):
        raise ValueError(f"band_mm must be a non-negative number of mm, got {band_mm!r}")
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {', '.join(BOUNDARIES)}, got {boundary!r}")
    edge = np.zeros(lab.shape, dtype=bool)
    if boundary in ("reference", "union"):
        edge |= boundary_voxels(lab)
    if boundary in ("prediction", "union"):
        if prediction is None:
            raise ValueError(f"boundary={boundary!r} needs the predicted label map (prediction=)")
        pred = prediction.detach().cpu().numpy() if isinstance(prediction, torch.Tensor) else np.asarray(prediction)
        if pred.shape != lab.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from the label map's {lab.shape}")
        edge |= boundary_voxels(pred)
    mask = np.zeros(lab.shape, dtype=bool)
    if edge.any():
        box = []
        for ax in range(lab.ndim):
            idx = np.flatnonzero(edge.any(axis=tuple(a for a in range(lab.ndim) if a != ax)))
            pad = math.floor(float(band_mm) / float(spacing[ax]) + 1e-9)
            box.append(slice(max(0, idx[0] - pad), min(lab.shape[ax], idx[-1] + pad + 1)))
        dist = distance_transform_edt(~edge[tuple(box)], sampling=[float(s) for s in spacing])
        mask[tuple(box)] = dist <= float(band_mm) * (1 + 1e-12) + 1e-12
    return torch.from_numpy(mask).to(label.device) if is_torch else mask


def parse_region_spec(spec: str) -> tuple[list[str], list[list[int]]]:
    """Parse ``"ET=3;TC=1,3;WT=1,2,3"`` into ``(["ET", "TC", "WT"], [[3], [1, 3], [1, 2, 3]])``."""
    names: list[str] = []
    regions: list[list[int]] = []
    for part in [p.strip() for p in spec.split(";") if p.strip()]:
        if "=" not in part:
            raise ValueError(f"region {part!r} must look like NAME=label[,label...] (e.g. 'TC=1,3')")
        name, labels = part.split("=", 1)
        try:
            ids = [int(x) for x in labels.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"region {part!r}: labels must be integers") from None
        if not name.strip() or not ids:
            raise ValueError(f"region {part!r} needs a name and at least one label")
        names.append(name.strip())
        regions.append(ids)
    if not regions:
        raise ValueError(f"no region in {spec!r}")
    return names, regions
