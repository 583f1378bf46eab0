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

from collections.abc import Sequence
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
    class_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """Hard-binned marginal L1 calibration error per image and class ``(B, C)`` (ACE-MICCAI eq. 1-4).

    ``target``: ``(B, C, *spatial)`` one-hot / soft, or an integer label map ``(B, *spatial)`` read without a
    one-hot (``class_ids``: the class of each channel, default ``0..C-1``; see
    :func:`~segcal.functional.binning.hard_bin_sums`).
    Bins ``(k/M, (k+1)/M]`` from :func:`~segcal.functional.binning.hard_bin_sums`; per non-empty bin
    ``e_k = Σp / n_k`` and ``o_k = Σy / n_k``. ``"average"``: mean over non-empty bins of ``|o_k − e_k|``
    (mL1-ACE); ``"expected"``: the ``n_k / N``-weighted sum (mL1-ECE); ``"maximum"``: largest gap (mL1-MCE).
    The bin assignment is piecewise constant, so the gradient flows through ``e_k`` only:
    ``∂ACE/∂p_i = sign(e_k − o_k) / (n_k K⁺)`` for ``p_i`` in bin ``k`` and ``K⁺`` non-empty bins.
    """
    count, sum_p, sum_y = hard_bin_sums(probs.contiguous(), target, num_bins, closed, class_ids)
    return _reduce_bins(count, sum_p, sum_y, count > 0, reduction)


def soft_calibration_error(
    probs: torch.Tensor,
    target: torch.Tensor,
    num_bins: int = 20,
    reduction: CalibrationReduction = "average",
    min_weight: float = 1e-3,
    class_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """Soft-binned marginal L1 calibration error per image and class ``(B, C)`` (ACE-journal).

    ``target``: ``(B, C, *spatial)`` one-hot / soft, or an integer label map ``(B, *spatial)`` read without a
    one-hot on the CPU (``class_ids``: the class of each channel, default ``0..C-1``; see
    :func:`~segcal.functional.binning.soft_bin_sums`).

    Each probability is shared linearly between its two nearest bin centres ``(k + ½)/M``
    (:func:`~segcal.functional.binning.soft_bin_sums`); per bin ``e_k = Σwp / Σw``, ``o_k = Σwy / Σw``.
    Bins with total weight ``Σ w < min_weight`` are excluded. Gradients flow through the weights and the sums.
    """
    weight, sum_wp, sum_wy = soft_bin_sums(probs, target, num_bins, class_ids)
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


# -- neighbourhood smoothing of targets and logit penalties (NACL, SVLS, MbLS, FLSD-53) -------------------------

Padding = Literal["zeros", "replicate"]


def _check_odd_size(kernel_size: int) -> int:
    """Rule: a spatial kernel has an odd edge length ``>= 1`` (centred on the voxel, same-size output)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    return kernel_size


def _check_sigma(sigma: float) -> None:
    """Rule: a Gaussian's ``σ`` is a finite number ``> 0`` (a bool is not a width)."""
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not 0 < float(sigma) < float("inf"):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")


def mean_kernel(kernel_size: int, ndim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Box kernel ``1 / k^d`` of shape ``(k,) * ndim`` (NACL's mean ``τ``; MONAI's ``MeanFilter`` divided by
    ``k^d``). ``kernel_size`` ``k`` must be odd."""
    k = _check_odd_size(kernel_size)
    return torch.full((k,) * ndim, 1.0 / k**ndim, dtype=dtype)


def gaussian_erf_kernel_1d(sigma: float, truncated: float = 4.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1-D Gaussian kernel by the error-function approximation, truncated at ``truncated · σ`` (NACL's Gaussian
    ``τ``, the same discretisation as MONAI's ``GaussianFilter``).

    Tap ``x ∈ {−t, …, t}``, ``t = int(max(σ · truncated, 0.5) + 0.5)``:
    ``w_x = ½ [erf((x + ½)/(σ√2)) − erf((x − ½)/(σ√2))]`` (not renormalised: the mass beyond ``t`` is dropped).
    """
    _check_sigma(sigma)
    tail = int(max(float(sigma) * truncated, 0.5) + 0.5)
    x = torch.arange(-tail, tail + 1, dtype=torch.float64)
    t = 1.0 / ((2.0**0.5) * sigma)
    w = 0.5 * (torch.erf(t * (x + 0.5)) - torch.erf(t * (x - 0.5)))
    return w.clamp_min(0).to(dtype)


def svls_kernel(kernel_size: int, sigma: float, ndim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The SVLS kernel of shape ``(k,) * ndim`` (Islam & Glocker, IPMI 2021, Sec. 2, "centre weight rule").

    A sampled Gaussian ``g_i = exp(−‖i − c‖² / (2σ²))`` on the ``k^d`` grid around the centre ``c``; the centre
    weight is then **replaced by the sum of its neighbours' weights** and the kernel normalised to sum 1, so the
    centre always weighs ``½`` and neighbour ``i`` weighs ``g_i / (2 Σ_{j≠c} g_j)`` (for any ``σ``). A kernel
    of size 1 is the identity (no smoothing).
    """
    k = _check_odd_size(kernel_size)
    _check_sigma(sigma)
    if k == 1:
        return torch.ones((1,) * ndim, dtype=dtype)
    r = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    d2 = sum(g.pow(2) for g in torch.meshgrid(*([r] * ndim), indexing="ij"))
    g = torch.exp(-d2 / (2.0 * sigma**2))
    centre = (k // 2,) * ndim
    g[centre] = 0.0
    g = g / g.sum()  # neighbours sum to 1
    g[centre] = 1.0  # the centre equals the sum of its neighbours
    return (g / 2.0).to(dtype)


def smooth_target(target: torch.Tensor, kernel: torch.Tensor, padding: Padding = "zeros") -> torch.Tensor:
    """Filter every channel of ``target`` ``(B, C, *spatial)`` with ``kernel``; same shape out.

    ``kernel``: a ``(k,) * d`` tensor (one dense depthwise convolution) or a 1-D ``(k,)`` tensor applied along
    each of the ``d`` spatial axes in turn (separable). ``padding``: ``"zeros"`` (NACL, as MONAI's filters) or
    ``"replicate"`` (SVLS: border voxels see copies of themselves, so a constant map stays constant).
    """
    d = target.ndim - 2
    if d not in (2, 3):
        raise ValueError(f"target must be (B, C, *spatial) with 2 or 3 spatial dims, got {tuple(target.shape)}")
    if padding not in ("zeros", "replicate"):
        raise ValueError(f"padding must be 'zeros' or 'replicate', got {padding!r}")
    c = target.shape[1]
    w = kernel.to(device=target.device, dtype=target.dtype)
    conv = F.conv2d if d == 2 else F.conv3d
    mode = "constant" if padding == "zeros" else "replicate"
    if w.ndim == 1 and d > 1:
        out = target
        for axis in range(d):
            shape = [1] * d
            shape[axis] = -1
            pad = [0] * (2 * d)
            pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = (w.numel() - 1) // 2
            out = conv(F.pad(out, pad, mode=mode), w.view(shape).expand(c, 1, *w.view(shape).shape), groups=c)
        return out
    if w.ndim != d:
        raise ValueError(f"kernel must be 1-D or {d}-D for a {d}-D target, got shape {tuple(w.shape)}")
    pad = [p for s in reversed(w.shape) for p in ((s - 1) // 2, (s - 1) // 2)]
    return conv(F.pad(target, pad, mode=mode), w.expand(c, 1, *w.shape), groups=c)


def neighbour_penalty_terms(
    logits: torch.Tensor, smoothed_target: torch.Tensor, distance: Literal["l1", "l2"] = "l1"
) -> torch.Tensor:
    """NACL's penalty per image and class ``(B, C)`` (Murugesan et al., MICCAI 2023, eq. 4):
    the voxel mean of ``|τ(y) − z|`` (``"l1"``) or ``(τ(y) − z)²`` (``"l2"``), with ``z`` the logits and
    ``τ(y)`` the neighbourhood-smoothed one-hot target (:func:`smooth_target`)."""
    diff = smoothed_target - logits
    if distance == "l1":
        out = diff.abs()
    elif distance == "l2":
        out = diff.pow(2)
    else:
        raise ValueError(f"distance must be 'l1' or 'l2', got {distance!r}")
    return out.mean(_spatial_dims(out, False))


def logit_margin_terms(logits: torch.Tensor, margin: float = 10.0) -> torch.Tensor:
    """MbLS margin penalty per image and class ``(B, C)`` (Liu et al., CVPR 2022, eq. 9):
    the voxel mean of ``max(0, max_k z_k − z_c − m)`` over logits ``z`` ``(B, C, *spatial)``; zero when every
    logit distance ``d_c = max_k z_k − z_c`` is at most the margin ``m``."""
    dist = logits.amax(1, keepdim=True) - logits
    out = F.relu(dist - margin)
    return out.mean(_spatial_dims(out, False))


def sample_dependent_gamma_mask(p_true: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """FLSD-53's schedule as a mask (Mukhoti et al., NeurIPS 2020, Sec. 5): ``True`` where the probability of
    the true class ``p_true < threshold`` (there ``γ = 5``, elsewhere ``γ = 3``). No gradient flows through the
    choice of ``γ`` (a piecewise-constant function of ``p``)."""
    return p_true.detach() < threshold


__all__ += [
    "gaussian_erf_kernel_1d",
    "logit_margin_terms",
    "mean_kernel",
    "neighbour_penalty_terms",
    "sample_dependent_gamma_mask",
    "smooth_target",
    "svls_kernel",
]
