"""Overlap and boundary metrics: Dice, IoU, precision, recall; HD95 and the other surface metrics of hard masks.

Counts are computed from hard masks: the predicted class is ``argmax`` in exclusive mode and ``p >= threshold``
in multilabel mode (and for probability-threshold sweeps). Per image ``b`` and class ``c`` the mergeable
confusion counts ``tp, fp, fn`` give

* Dice = 2 TP / (2 TP + FP + FN), IoU = TP / (TP + FP + FN), precision = TP / (TP + FP), recall = TP / (TP + FN).

Empty cases (documented choice): when prediction **and** ground truth are both empty the structure is correctly
absent and every overlap score is 1.0 (HD95 = 0.0). When only one of them is empty, Dice = IoU = 0.0, and a
ratio whose denominator is zero (precision with nothing predicted, recall with nothing to find) is 0.0; HD95
is NaN (undefined distance) and is reported as such, never silently replaced by a number.

The surface metrics (HD95, HD, ASSD, NSD) are defined and computed in :mod:`segcal.functional.surface`;
:func:`surface_scores` only turns probabilities into the hard masks they are computed on (the same masks as the
confusion counts) and applies the convention above to a structure absent from both masks (distances 0.0, NSD
1.0; MONAI gives NaN there). In exclusive mode with a label map it builds one class's boolean masks at a time
from a ``uint8`` argmax, never a one-hot copy of the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from segcal.functional.inputs import (
    Activation,
    Mode,
    as_label_map,
    check_mode,
    check_target,
    region_probabilities,
    region_targets,
    select_channels,
    target_to_onehot,
    to_probabilities,
)
from segcal.functional.surface import SURFACE_METRICS, check_tolerances, surface_metrics

__all__ = [
    "confusion_counts",
    "dice_from_counts",
    "hard_prediction",
    "hausdorff_distance_95",
    "iou_from_counts",
    "overlap_scores",
    "precision_from_counts",
    "recall_from_counts",
    "surface_scores",
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

    ``max(q95(D_AB), q95(D_BA))`` of the directed boundary distances (:mod:`segcal.functional.surface`; equal to
    MONAI's ``HausdorffDistanceMetric(percentile=95)``), scaled by ``spacing`` (mm per spatial axis; default 1).
    Both masks empty → 0.0; exactly one empty → NaN.
    """
    return surface_scores(
        pred, target, activation=activation, mode=mode, include_background=include_background, spacing=spacing,
        regions=regions, threshold=threshold, metrics=("hd95",), check=check,
    )["hd95"]


def surface_scores(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    activation: Activation = None,
    mode: Mode = "exclusive",
    include_background: bool = False,
    spacing: Sequence[float] | None = None,
    regions: Sequence[Sequence[int]] | None = None,
    threshold: float | None = None,
    metrics: Sequence[str] = SURFACE_METRICS,
    nsd_tolerance_mm: float | Sequence[float] = 1.0,
    check: bool = True,
) -> dict[str, torch.Tensor]:
    """Surface metrics (``"hd95"``, ``"hd"``, ``"assd"``, ``"nsd"``) per image and class ``{name: (B, C)}``
    float64 of the hard masks of ``pred`` ``(B, C, *spatial)`` (probabilities / logits, or a boolean hard mask)
    against ``target``, in mm with ``spacing``; ``nsd_tolerance_mm``: one tolerance for every kept channel or
    one per kept channel. Definitions and the crop in :mod:`segcal.functional.surface`; a structure absent from
    both masks scores 0.0 (NSD 1.0), exactly one empty: HD95 NaN, HD / ASSD ``inf``, NSD 0.0 (MONAI's)."""
    mode = check_mode(mode)
    lean = _lean_inputs(pred, target, activation, mode, regions, threshold, check)
    if lean is None:
        hard, y, eff = _hard_masks(pred, target, activation, mode, regions, threshold, check)
        hard = select_channels(hard, include_background, eff)
        y = select_channels(y, include_background, eff)
        return surface_metrics(
            hard, y, spacing=spacing, metrics=metrics, nsd_tolerance_mm=nsd_tolerance_mm, both_empty="absent"
        )
    probs, lab = lean
    first = 0 if include_background else 1
    if probs.shape[1] - first < 1:
        raise ValueError("include_background=False needs at least 2 channels")
    b, c = probs.shape[0], probs.shape[1] - first
    tols = check_tolerances(nsd_tolerance_mm, c)
    out: dict[str, torch.Tensor] = {}
    for i in range(b):
        am = _argmax_uint8(probs[i])
        for k in range(c):
            cls = k + first
            vals = surface_metrics(
                torch.from_numpy(am == cls)[None, None], (lab[i] == cls)[None, None], spacing=spacing,
                metrics=metrics, nsd_tolerance_mm=tols[k], both_empty="absent",
            )
            for m, v in vals.items():
                out.setdefault(m, torch.full((b, c), float("nan"), dtype=torch.float64, device="cpu"))[i, k] = v[0, 0]
        del am
    return out


def _lean_inputs(
    pred: torch.Tensor,
    target: torch.Tensor,
    activation: Activation,
    mode: Mode,
    regions: Sequence[Sequence[int]] | None,
    threshold: float | None,
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(probabilities, label map (B, *S))`` when the masks can be built one class at a time (exclusive argmax
    of probabilities against a label map), else None (also for inputs that are not tensors: the general path
    raises the error naming them)."""
    if not (isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor)):
        return None
    if mode != "exclusive" or regions is not None or threshold is not None or activation is not None:
        return None
    if pred.dtype == torch.bool or not pred.is_floating_point() or pred.ndim < 3 or pred.shape[1] < 2:
        return None
    if target.is_floating_point() or target.dtype == torch.bool:
        return None
    lab = as_label_map(target, pred.shape[2:])
    if lab is None or lab.shape[0] != pred.shape[0]:
        return None
    if check:
        pred = to_probabilities(pred, None, mode, check=True)
        check_target(target, pred.shape, mode)
    return pred, lab.cpu()


def _argmax_uint8(probs: torch.Tensor) -> np.ndarray:
    """``argmax`` over the channels of ``(C, *S)`` as a ``uint8`` / ``int16`` array ``(*S)``; ties go to the first
    channel, as :func:`hard_prediction` (a later channel wins only when strictly larger). Computed in slabs of
    the first spatial axis: the running maximum never covers more than a slab."""
    spatial = tuple(probs.shape[1:])
    p = probs.detach().cpu().numpy()
    out = np.zeros(spatial, dtype=np.uint8 if probs.shape[0] <= 256 else np.int16)
    step = max(1, (1 << 20) // max(1, math.prod(spatial[1:])))
    for j in range(0, spatial[0], step):
        best = p[0, j : j + step].copy()
        am = out[j : j + step]
        for c in range(1, p.shape[0]):
            win = p[c, j : j + step] > best
            am[win] = c
            np.maximum(best, p[c, j : j + step], out=best)
    return out
