"""Overlap and boundary metrics: Dice, IoU, precision, recall, HD95.

Counts are computed from hard masks: the predicted class is ``argmax`` in exclusive mode and ``p >= threshold``
in multilabel mode (and for probability-threshold sweeps). Per image ``b`` and class ``c`` the mergeable
confusion counts ``tp, fp, fn`` give

* Dice = 2 TP / (2 TP + FP + FN), IoU = TP / (TP + FP + FN), precision = TP / (TP + FP), recall = TP / (TP + FN).

Empty cases (documented choice): when prediction **and** ground truth are both empty the structure is correctly
absent and every overlap score is 1.0 (HD95 = 0.0). When only one of them is empty, Dice = IoU = 0.0, and a
ratio whose denominator is zero (precision with nothing predicted, recall with nothing to find) is 0.0; HD95
is NaN (undefined distance) and is reported as such, never silently replaced by a number.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from segcal.functional.inputs import (
    Activation,
    Mode,
    check_mode,
    check_target,
    region_probabilities,
    region_targets,
    select_channels,
    target_to_onehot,
    to_probabilities,
)

__all__ = [
    "confusion_counts",
    "dice_from_counts",
    "hard_prediction",
    "hausdorff_distance_95",
    "iou_from_counts",
    "overlap_scores",
    "precision_from_counts",
    "recall_from_counts",
]


def hard_prediction(probs: torch.Tensor, mode: Mode, threshold: float | None = None) -> torch.Tensor:
    """One-hot / multi-hot hard mask ``(B, C, *spatial)`` (bool) from probabilities.

    Exclusive mode uses ``argmax`` unless ``threshold`` is given (then ``p_c >= threshold`` per channel, the
    probability-thresholding of DSC++ §2.5); multilabel mode uses ``p >= threshold`` (default 0.5).
    """
    if mode == "exclusive" and threshold is None:
        arg = probs.argmax(1, keepdim=True)
        return torch.zeros_like(probs, dtype=torch.bool).scatter_(1, arg, True)
    return probs >= (0.5 if threshold is None else threshold)


def _hard_masks(
    pred: torch.Tensor,
    target: torch.Tensor,
    activation: Activation,
    mode: Mode,
    regions: Sequence[Sequence[int]] | None,
    threshold: float | None,
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor, Mode]:
    """Hard prediction and reference masks ``(B, C, *spatial)`` bool (region channels when ``regions`` is set,
    then in multilabel mode) and the mode they are in. A boolean ``pred`` is taken as an already hard mask;
    soft targets are binarised at 0.5."""
    if pred.dtype == torch.bool:
        if regions is not None:
            raise ValueError("regions need probabilities, not a hard mask")
        if check:
            check_target(target, pred.shape, mode)
        return pred, target_to_onehot(target, pred.shape[1], spatial_shape=pred.shape[2:]) >= 0.5, mode
    probs = to_probabilities(pred, activation, "exclusive" if regions is not None else mode, check=check)
    if check:
        check_target(target, probs.shape, "exclusive" if regions is not None else mode)
    c = probs.shape[1]
    if regions is not None:
        y = region_targets(target, regions, c, probs.shape[2:]) >= 0.5
        probs = region_probabilities(probs, regions)
        mode = "multilabel"
    else:
        y = target_to_onehot(target, c, spatial_shape=probs.shape[2:]) >= 0.5
    return hard_prediction(probs, mode, threshold), y, mode


def confusion_counts(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    activation: Activation = None,
    mode: Mode = "exclusive",
    include_background: bool = True,
    mask: torch.Tensor | None = None,
    regions: Sequence[Sequence[int]] | None = None,
    threshold: float | None = None,
    check: bool = True,
) -> torch.Tensor:
    """``(B, C, 3)`` float64 counts ``(tp, fp, fn)`` per image and class.

    ``pred`` are probabilities/logits ``(B, C, *spatial)``; a boolean ``pred`` is taken as an already hard mask.
    Soft targets are binarised at 0.5.
    """
    hard, y, mode = _hard_masks(pred, target, activation, check_mode(mode), regions, threshold, check)
    if mask is not None:
        m = mask[:, 0] if mask.ndim == hard.ndim else mask
        m = m.bool().unsqueeze(1)
        hard = hard & m
        y = y & m
    dims = tuple(range(2, hard.ndim))
    tp = (hard & y).sum(dims)
    fp = (hard & ~y).sum(dims)
    fn = (~hard & y).sum(dims)
    counts = torch.stack([tp, fp, fn], dim=-1).to(torch.float64)
    return select_channels(counts, include_background, mode)


def _ratio(num: torch.Tensor, den: torch.Tensor, both_empty: torch.Tensor) -> torch.Tensor:
    out = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return torch.where(both_empty, torch.ones_like(out), out)


def _split(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tp, fp, fn = counts.unbind(-1)
    both_empty = (tp + fp + fn) == 0
    return tp, fp, fn, both_empty


def dice_from_counts(counts: torch.Tensor) -> torch.Tensor:
    tp, fp, fn, e = _split(counts)
    return _ratio(2 * tp, 2 * tp + fp + fn, e)


def iou_from_counts(counts: torch.Tensor) -> torch.Tensor:
    tp, fp, fn, e = _split(counts)
    return _ratio(tp, tp + fp + fn, e)


def precision_from_counts(counts: torch.Tensor) -> torch.Tensor:
    tp, fp, _fn, e = _split(counts)
    return _ratio(tp, tp + fp, e)


def recall_from_counts(counts: torch.Tensor) -> torch.Tensor:
    tp, _fp, fn, e = _split(counts)
    return _ratio(tp, tp + fn, e)


def overlap_scores(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dice, IoU, precision and recall from ``(…, 3)`` confusion counts (see module docstring for empties)."""
    return {
        "dice": dice_from_counts(counts),
        "iou": iou_from_counts(counts),
        "precision": precision_from_counts(counts),
        "recall": recall_from_counts(counts),
    }


def hausdorff_distance_95(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    activation: Activation = None,
    mode: Mode = "exclusive",
    include_background: bool = False,
    spacing: Sequence[float] | None = None,
    regions: Sequence[Sequence[int]] | None = None,
    threshold: float | None = None,
    check: bool = True,
) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance per image and class ``(B, C)`` float64, in physical units.

    Surface distances are computed by MONAI (``compute_hausdorff_distance``, Euclidean, ``percentile=95``),
    scaled by ``spacing`` (mm per spatial axis; default 1). Both masks empty → 0.0; exactly one empty → NaN.
    """
    from monai.metrics import compute_hausdorff_distance

    hard, y, mode = _hard_masks(pred, target, activation, check_mode(mode), regions, threshold, check)
    hard = select_channels(hard, include_background, mode)
    y = select_channels(y, include_background, mode)
    n_sp = hard.ndim - 2
    if spacing is not None and len(spacing) != n_sp:
        raise ValueError(f"spacing has {len(spacing)} values but the images have {n_sp} spatial dims")
    sp = [float(s) for s in spacing] if spacing is not None else None
    p_any = hard.flatten(2).any(-1)
    y_any = y.flatten(2).any(-1)
    out = torch.full(hard.shape[:2], float("nan"), dtype=torch.float64)
    both = p_any & y_any
    out[~p_any & ~y_any] = 0.0
    if bool(both.any()):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd = compute_hausdorff_distance(
                hard.float(), y.float(), include_background=True, percentile=95, spacing=sp
            ).to(torch.float64)
        out = torch.where(both.cpu(), hd.cpu(), out)
    return out
