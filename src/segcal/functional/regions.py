"""Evaluation regions: the dilated bounding box of the ground-truth foreground, region label maps.

Mehrtash et al., IEEE TMI 2020 (docs/references.md) restrict their calibration metrics to the bounding box of
the foreground dilated by 8 mm in-plane and 2 slices out of plane; here the margin is given in mm per spatial
axis and converted to voxels with the voxel spacing (``ceil(margin_mm / spacing)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["dilated_bbox_mask", "parse_region_spec"]


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
