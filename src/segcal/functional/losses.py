"""Pure, differentiable loss terms on per-image tensors.

Every function takes probabilities ``probs`` ``(B, C, *spatial)`` and a one-hot / multi-hot / soft target
``target`` of the same shape (already activated, channel-selected and one-hot encoded by the
:mod:`segcal.losses` wrappers) and returns the **unreduced** term, usually ``(B, C)`` (one value per image and
class). Nothing here loops over images or classes in Python.

Calibration terms reuse the binning core (:func:`segcal.functional.binning.hard_bin_sums` and
:func:`~segcal.functional.binning.soft_bin_sums`), so the bins of the losses are the bins of the metrics
(``(k/M, (k+1)/M]``, ``p = 0`` in bin 0; see the README's Conventions).

Notation (DSC++ paper, eq. 8-9, 16, 21): with ``p`` the probability of class ``c`` and ``y`` its target,
``TP = Σ p·y``, ``FP_γ = Σ (p·(1 − y))^γ``, ``FN_γ = Σ ((1 − p)·y)^γ``; ``γ = 1`` gives the plain terms.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from segcal.functional.binning import Closed, hard_bin_sums, soft_bin_sums

CalibrationReduction = Literal["average", "expected", "maximum"]

#: probabilities are clipped into [LOG_EPS, 1] before logarithms when the loss is given probabilities.
LOG_EPS = 1e-7

__all__ = [
    "LOG_EPS",
    "asymmetric_focal_terms",
    "asymmetric_focal_tversky_terms",
    "binary_cross_entropy_terms",
    "dice_terms",
    "focal_terms",
    "focal_tversky_terms",
    "hard_calibration_error",
    "log_probabilities",
    "overlap_terms",
    "soft_calibration_error",
    "tversky_terms",
]


def _spatial_dims(x: torch.Tensor, batch: bool) -> list[int]:
    dims = list(range(2, x.ndim))
    return [0, *dims] if batch else dims


def overlap_terms(
    probs: torch.Tensor, target: torch.Tensor, fpfn_gamma: float = 1.0, batch: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(TP, FP_γ, FN_γ)``, each ``(B, C)`` (``(1, C)`` with ``batch=True``), DSC++ eq. 8-9.

    ``FP_γ = Σ_i (p_i (1 − y_i))^γ`` and ``FN_γ = Σ_i ((1 − p_i) y_i)^γ``; the exponent ``γ`` is the DSC++
    focal parameter (``γ = 1``: the plain DSC / Tversky terms).
    """
    dims = _spatial_dims(probs, batch)
    tp = (probs * target).sum(dims)
    fp = probs * (1 - target)
    fn = (1 - probs) * target
    if fpfn_gamma != 1:
        fp = fp.pow(fpfn_gamma)
        fn = fn.pow(fpfn_gamma)
    fp, fn = fp.sum(dims), fn.sum(dims)
    if batch:
        return tp.unsqueeze(0), fp.unsqueeze(0), fn.unsqueeze(0)
    return tp, fp, fn


def dice_terms(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    squared_pred: bool = False,
    jaccard: bool = False,
    batch: bool = False,
) -> torch.Tensor:
    """Dice loss ``1 − (2 Σ p y + s_nr) / (Σ p + Σ y + s_dr)`` per image and class ``(B, C)`` (DSC++ eq. 3-4).

    Same formula and smoothing as MONAI's ``DiceLoss`` (``squared_pred``: ``Σ p² + Σ y²`` in the denominator;
    ``jaccard``: the soft Jaccard/IoU loss).
    """
    dims = _spatial_dims(probs, batch)
    inter = (probs * target).sum(dims)
    if squared_pred:
        den = (probs * probs).sum(dims) + (target * target).sum(dims)
    else:
        den = probs.sum(dims) + target.sum(dims)
    if jaccard:
        den = 2.0 * (den - inter)
    f = 1.0 - (2.0 * inter + smooth_nr) / (den + smooth_dr)
    return f.unsqueeze(0) if batch else f


def tversky_terms(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    fpfn_gamma: float = 1.0,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
) -> torch.Tensor:
    """Tversky loss ``1 − TI`` per image and class ``(B, C)`` (DSC++ eq. 15-16; ``++`` with ``fpfn_gamma``).

    ``TI = (TP + s_nr) / (TP + α FP_γ + β FN_γ + s_dr)``: ``α`` weighs false positives, ``β`` false negatives
    (MONAI's convention). ``α = β = 1/2`` with ``γ`` gives DSC++ (eq. 9).
    """
    tp, fp, fn = overlap_terms(probs, target, fpfn_gamma, batch)
    return 1.0 - (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr)


def focal_tversky_terms(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    gamma: float,
    fpfn_gamma: float = 1.0,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
) -> torch.Tensor:
    """Focal Tversky loss ``(1 − TI)^(1/γ)`` per image and class (DSC++ eq. 17)."""
    t = tversky_terms(
        probs,
        target,
        alpha=alpha,
        beta=beta,
        fpfn_gamma=fpfn_gamma,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        batch=batch,
    )
    # (1 - TI) >= tiny keeps the derivative of x^(1/γ) finite at a perfect prediction
    return t.clamp_min(1e-12).pow(1.0 / gamma)


def binary_cross_entropy_terms(
    probs: torch.Tensor, target: torch.Tensor, beta: float = 0.5, eps: float = LOG_EPS
) -> torch.Tensor:
    """Modified (β-weighted) binary cross-entropy of the Combo loss, mean over voxels ``(B, C)`` (eq. 14).

    ``−(1/N) Σ_i [β y ln p + (1 − β)(1 − y) ln(1 − p)]`` with ``p`` clipped into ``[eps, 1 − eps]``.
    """
    p = probs.clamp(eps, 1 - eps)
    out = -(beta * target * p.log() + (1 - beta) * (1 - target) * (1 - p).log())
    return out.mean(_spatial_dims(out, False))


def asymmetric_focal_terms(
    log_probs: torch.Tensor, target: torch.Tensor, rare: torch.Tensor, *, gamma: float, delta: float
) -> torch.Tensor:
    """Asymmetric focal loss per image and class ``(B, C)``, multi-class (Unified Focal, DSC++ eq. 19).

    Per voxel and class, ``CE_c = −y_c ln p_c``; rare (foreground) classes keep ``δ · CE_c``, the others are
    focally suppressed, ``(1 − δ)(1 − p_c)^γ · CE_c``. Summed over classes and averaged over voxels
    gives eq. 19. ``rare`` is a boolean ``(C,)`` tensor.
    """
    ce = -target * log_probs
    p = log_probs.exp()
    shape = [1, -1] + [1] * (log_probs.ndim - 2)
    rare_b = rare.view(shape)
    w = torch.where(rare_b, torch.full_like(p, delta), (1 - delta) * (1 - p).clamp_min(1e-12).pow(gamma))
    out = w * ce
    return out.mean(_spatial_dims(out, False))


def asymmetric_focal_tversky_terms(
    probs: torch.Tensor,
    target: torch.Tensor,
    rare: torch.Tensor,
    *,
    gamma: float,
    delta: float,
    fpfn_gamma: float = 1.0,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """Asymmetric focal Tversky loss per image and class ``(B, C)`` (DSC++ eq. 20-21).

    ``TI_c = TP / (TP + (1 − δ) FP_γ' + δ FN_γ')``; the loss is ``1 − TI_c`` for the other classes and
    ``(1 − TI_c)^(1 − γ)`` for the rare classes (focal enhancement); ``γ'`` is the ``++`` exponent.
    """
    t = tversky_terms(
        probs,
        target,
        alpha=1 - delta,
        beta=delta,
        fpfn_gamma=fpfn_gamma,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
    )
    enhanced = t.clamp_min(1e-12).pow(1 - gamma)
    return torch.where(rare.view(1, -1), enhanced, t)


def _reduce_bins(
    count: torch.Tensor, sum_p: torch.Tensor, sum_y: torch.Tensor, valid: torch.Tensor, reduction: str
) -> torch.Tensor:
    """Calibration error ``(B, C)`` from (possibly soft) bin sums; invalid bins are excluded."""
    safe = torch.where(valid, count, torch.ones_like(count))
    diff = torch.where(valid, sum_p - sum_y, torch.zeros_like(sum_p))
    if reduction == "average":  # ACE-MICCAI eq. 3
        gap = diff.abs() / safe
        return gap.sum(-1) / valid.sum(-1).clamp_min(1).to(gap.dtype)
    if reduction == "expected":  # eq. 1: Σ_k (n_k / N) |o_k − e_k| = Σ_k |Σy − Σp| / N
        total = torch.where(valid, count, torch.zeros_like(count)).sum(-1)
        return diff.abs().sum(-1) / total.clamp_min(1e-12)
    if reduction == "maximum":  # eq. 4
        gap = diff.abs() / safe
        return torch.where(valid, gap, torch.zeros_like(gap)).amax(-1)
    raise ValueError(f"reduction must be 'average', 'expected' or 'maximum', got {reduction!r}")


def hard_calibration_error(
    probs: torch.Tensor,
    target: torch.Tensor,
    num_bins: int = 20,
    reduction: CalibrationReduction = "average",
    closed: Closed = "right",
) -> torch.Tensor:
    """Hard-binned marginal L1 calibration error per image and class ``(B, C)`` (ACE-MICCAI eq. 1-4).

    Bins ``(k/M, (k+1)/M]`` from :func:`~segcal.functional.binning.hard_bin_sums`; per non-empty bin
    ``e_k = Σp / n_k`` and ``o_k = Σy / n_k``. ``"average"``: mean over non-empty bins of ``|o_k − e_k|``
    (mL1-ACE); ``"expected"``: the ``n_k / N``-weighted sum (mL1-ECE); ``"maximum"``: largest gap (mL1-MCE).
    The bin assignment is piecewise constant, so the gradient flows through ``e_k`` only:
    ``∂ACE/∂p_i = sign(e_k − o_k) / (n_k K⁺)`` for ``p_i`` in bin ``k`` and ``K⁺`` non-empty bins.
    """
    count, sum_p, sum_y = hard_bin_sums(probs.contiguous(), target, num_bins, closed)
    return _reduce_bins(count, sum_p, sum_y, count > 0, reduction)


def soft_calibration_error(
    probs: torch.Tensor,
    target: torch.Tensor,
    num_bins: int = 20,
    reduction: CalibrationReduction = "average",
    min_weight: float = 1e-3,
) -> torch.Tensor:
    """Soft-binned marginal L1 calibration error per image and class ``(B, C)`` (ACE-journal).

    Each probability is shared linearly between its two nearest bin centres ``(k + ½)/M``
    (:func:`~segcal.functional.binning.soft_bin_sums`); per bin ``e_k = Σwp / Σw``, ``o_k = Σwy / Σw``.
    Bins with total weight ``Σ w < min_weight`` are excluded. Gradients flow through the weights and the sums.
    """
    weight, sum_wp, sum_wy = soft_bin_sums(probs, target, num_bins)
    return _reduce_bins(weight, sum_wp, sum_wy, weight >= min_weight, reduction)


def log_probabilities(
    x: torch.Tensor, activation: Literal["softmax", "sigmoid"] | None, eps: float = LOG_EPS
) -> torch.Tensor:
    """Numerically stable ``ln p`` from logits (``log_softmax`` / ``logsigmoid``) or from probabilities."""
    if activation == "softmax":
        return F.log_softmax(x, dim=1)
    if activation == "sigmoid":
        return F.logsigmoid(x)
    return x.clamp_min(eps).log()


def focal_terms(
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    activation: Literal["softmax", "sigmoid"] | None,
    multilabel: bool,
    gamma: float = 2.0,
    alpha: float | torch.Tensor | None = None,
    eps: float = LOG_EPS,
) -> torch.Tensor:
    """Focal loss per voxel and class ``(B, C, *spatial)`` (DSC++ eq. 2; MONAI's ``FocalLoss`` conventions).

    Exclusive: ``−α_c (1 − p_c)^γ y_c ln p_c`` (scalar ``α``: ``1 − α`` for class 0, ``α`` for the others).
    Multilabel: the binary focal loss ``−α_t (1 − p_t)^γ ln p_t`` per channel, ``α_t = α`` if ``y = 1`` else
    ``1 − α`` (a per-class ``α`` weighs only the positives). ``x`` holds logits when ``activation`` is set.
    """
    if not multilabel:
        logp = log_probabilities(x, activation, eps)
        loss = -(1 - logp.exp()).clamp_min(1e-12).pow(gamma) * logp * target
        if alpha is not None:
            a = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)
            if a.ndim == 0:
                a = torch.cat([(1 - a).view(1), a.view(1).expand(target.shape[1] - 1)])
            loss = loss * a.view([1, -1] + [1] * (loss.ndim - 2))
        return loss
    if activation == "sigmoid":
        ce = F.binary_cross_entropy_with_logits(x, target, reduction="none")
        log_1mpt = F.logsigmoid(-x * (target * 2 - 1))  # ln(1 − p_t)
        loss = (log_1mpt * gamma).exp() * ce
    else:
        p = x.clamp(eps, 1 - eps)
        ce = -(target * p.log() + (1 - target) * (1 - p).log())
        pt = target * p + (1 - target) * (1 - p)
        loss = (1 - pt).clamp_min(1e-12).pow(gamma) * ce
    if alpha is not None:
        a = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)
        if a.ndim == 0:
            loss = loss * (target * a + (1 - target) * (1 - a))
        else:
            a = a.view([1, -1] + [1] * (loss.ndim - 2))
            loss = loss * torch.where(target == 1, a, torch.ones_like(a))
    return loss
