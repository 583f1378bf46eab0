"""Probability overlay with TP/FP/FN contours (ACE-MICCAI Fig. 4)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from segcal.plots._common import new_figure

__all__ = ["OVERLAY_COLORS", "probability_overlay"]

#: contour colours of the three outcome regions
OVERLAY_COLORS = {"TP": "#2ca02c", "FP": "#d62728", "FN": "#1f77b4"}


def _as2d(x: object, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()  # type: ignore[union-attr]
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D slice (H, W), got shape {arr.shape}")
    return arr


def probability_overlay(
    image2d: object,
    prob2d: object,
    pred_mask2d: object,
    gt_mask2d: object,
    *,
    alpha: float = 0.55,
    min_prob: float = 0.01,
    cmap: str = "inferno",
    title: str | None = None,
) -> Figure:
    """A 2-D slice with the predicted probability overlaid and TP/FP/FN contours.

    Args:
        image2d: ``(H, W)`` intensity image (drawn in grey, robustly scaled to its 1st–99th percentile).
        prob2d: ``(H, W)`` foreground probability in [0, 1]; values below ``min_prob`` are transparent.
        pred_mask2d, gt_mask2d: ``(H, W)`` binary prediction and ground truth.

    The contours outline true positives (pred ∧ gt, green), false positives (pred ∧ ¬gt, red) and false
    negatives (¬pred ∧ gt, blue); the legend gives the voxel count of each.
    """
    img = _as2d(image2d, "image2d").astype(np.float64)
    prob = _as2d(prob2d, "prob2d").astype(np.float64)
    pred = _as2d(pred_mask2d, "pred_mask2d").astype(bool)
    gt = _as2d(gt_mask2d, "gt_mask2d").astype(bool)
    shapes = {img.shape, prob.shape, pred.shape, gt.shape}
    if len(shapes) != 1:
        raise ValueError(
            f"image2d, prob2d, pred_mask2d and gt_mask2d must have one shape, got {sorted(shapes)}"
        )
    if not np.isfinite(prob).all() or prob.min() < 0 or prob.max() > 1:
        raise ValueError("prob2d must hold finite probabilities in [0, 1]")
    fig = new_figure(5.0, 4.4)
    ax = fig.add_subplot()
    lo, hi = np.percentile(img, [1, 99]) if np.isfinite(img).all() else (0.0, 1.0)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
    im = ax.imshow(
        np.ma.masked_less(prob, min_prob), cmap=cmap, vmin=0, vmax=1, alpha=alpha, interpolation="nearest"
    )
    regions = {"TP": pred & gt, "FP": pred & ~gt, "FN": ~pred & gt}
    handles = []
    for name, reg in regions.items():
        if reg.any():
            ax.contour(reg.astype(float), levels=[0.5], colors=[OVERLAY_COLORS[name]], linewidths=1.2)
        label = f"{name} ({int(reg.sum())} px)"
        handles.append(Line2D([], [], color=OVERLAY_COLORS[name], lw=1.5, label=label))
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.set_axis_off()
    fig.colorbar(im, ax=ax, shrink=0.8, label="predicted probability")
    if title:
        ax.set_title(title, fontsize=10)
    return fig
