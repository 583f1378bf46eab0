"""Calibration metrics, all derived from :class:`~segcal.functional.binning.BinStats` (papers: docs/references.md).

Per image ``b`` and channel ``c`` with, per non-empty bin ``k``, ``n_k`` voxels, expected frequency
``e_k = Σp / n_k`` and observed frequency ``o_k = Σy / n_k``:

* marginal ECE  = Σ_k (n_k / N) |o_k − e_k|                    (ACE-MICCAI eq. 1; Ensembles eq. 5 per class)
* marginal ACE  = (1 / K⁺) Σ_{k non-empty} |o_k − e_k|          (ACE-MICCAI eq. 3)
* marginal MCE  = max_{k non-empty} |o_k − e_k|                 (ACE-MICCAI eq. 4)
* L2 variants: ECE₂ = sqrt(Σ_k (n_k / N)(o_k − e_k)²), ACE₂ = sqrt(mean_k (o_k − e_k)²) (RMS calibration error).

Empty bins are excluded, never counted as zero. A channel with no voxel at all (e.g. an empty region mask)
gives NaN. Averaging the marginal values over channels gives mL1-ECE / mL1-ACE / mL1-MCE.

Top-label calibration (PostHoc eq. 3, Ensembles eq. 5) bins the confidence ``max_c p_c`` against the accuracy
``argmax == label``, reusing the same binning core.

Metrics of the peers, from the same sums:

* class-wise ECE (Kumar et al. 2019, "Verified Uncertainty Calibration", as MetricsReloaded's ``cwECE``;
  Maier-Hein et al. 2024; papers: docs/references.md):
  ``cwECE = (1 / K) Σ_c ECE_c``, the mean of the marginal ECEs over the scored channels
  (:func:`classwise_calibration_error`);
* root Brier score (Gruber & Buettner 2022, MetricsReloaded's ``rbs``): ``RBS = sqrt((1/N) Σ_i Σ_c (p_ic − y_ic)²)``,
  the root of the per-class Brier scores summed over the scored channels (:func:`root_brier_score`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from segcal.functional import _kernels, _triton, inputs
from segcal.functional.binning import (
    BinStats,
    Closed,
    _prepare_mask,
    bin_edges,
    bin_statistics,
    check_num_bins,
)
from segcal.functional.inputs import (
    Activation,
    Mode,
    as_label_map,
    check_mode,
    check_probabilities,
    check_target,
    region_probabilities,
    region_targets,
    select_channels,
    target_to_onehot,
    to_probabilities,
)

Reduction = Literal["expected", "average", "maximum"]
Norm = Literal["l1", "l2"]

#: probabilities are clipped into [EPS, 1 - EPS] before taking logarithms (NLL).
EPS = 1e-7

__all__ = [
    "EPS",
    "brier_score",
    "calibration_error",
    "calibration_errors",
    "classwise_calibration_error",
    "mean_absolute_error",
    "negative_log_likelihood",
    "root_brier_score",
    "top_label_statistics",
]


def calibration_error(
    stats: BinStats, reduction: Reduction = "average", norm: Norm = "l1", min_count: int = 1
) -> torch.Tensor:
    """Calibration error per image and channel, ``(B, C)`` float64, from bin sums.

    Args:
        stats: per-image bin sums (``BinStats.pooled()`` for the dataset-level value).
        reduction: ``"expected"`` (ECE, count-weighted), ``"average"`` (ACE, unweighted over non-empty bins) or
            ``"maximum"`` (MCE).
        norm: ``"l1"`` (absolute gaps) or ``"l2"`` (root of the mean squared gap); ignored for ``"maximum"``.
        min_count: bins with fewer voxels are treated as empty (reliability diagrams in Ensembles hide
            bins with < 1000 voxels); default 1 = every non-empty bin.
    """
    if reduction not in ("expected", "average", "maximum"):
        raise ValueError(f"reduction must be 'expected', 'average' or 'maximum', got {reduction!r}")
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    valid = stats.count >= max(1, min_count)
    n = torch.where(valid, stats.count, torch.zeros_like(stats.count))
    safe = n.clamp_min(1)
    gap = torch.where(valid, (stats.sum_y - stats.sum_p) / safe, torch.zeros_like(n)).abs()
    if norm == "l2" and reduction != "maximum":
        gap = gap * gap
    n_valid = valid.sum(-1)
    empty = n_valid == 0
    if reduction == "expected":
        total = n.sum(-1)
        out = (gap * n).sum(-1) / total.clamp_min(1)
    elif reduction == "average":
        out = gap.sum(-1) / n_valid.clamp_min(1)
    else:
        out = torch.where(valid, gap, torch.full_like(gap, -1.0)).amax(-1)
    if norm == "l2" and reduction != "maximum":
        out = out.sqrt()
    return torch.where(empty, torch.full_like(out, torch.nan), out)


def calibration_errors(stats: BinStats, min_count: int = 1) -> dict[str, torch.Tensor]:
    """All calibration errors per image and channel: ``ece, ace, mce, ece_l2, ace_l2``, each ``(B, C)``."""
    return {
        "ece": calibration_error(stats, "expected", "l1", min_count),
        "ace": calibration_error(stats, "average", "l1", min_count),
        "mce": calibration_error(stats, "maximum", "l1", min_count),
        "ece_l2": calibration_error(stats, "expected", "l2", min_count),
        "ace_l2": calibration_error(stats, "average", "l2", min_count),
    }


def classwise_calibration_error(stats: BinStats) -> torch.Tensor:
    """Class-wise ECE per image, ``(B,)`` float64: the mean over channels of the marginal (count-weighted, L1)
    ECE, ``cwECE = (1/K) Σ_c Σ_k (n_ck / N) |o_ck − e_ck|`` (Kumar et al. 2019; MetricsReloaded ``cwECE``).

    It averages the channels of ``stats`` (MetricsReloaded averages every class, background included: pass
    ``include_background=True`` statistics for its value). Channels without voxels are left out; NaN when none
    has any.
    """
    ece = calibration_error(stats, "expected", "l1")
    finite = torch.isfinite(ece)
    total = torch.where(finite, ece, torch.zeros_like(ece)).sum(-1)
    k = finite.sum(-1)
    return torch.where(k > 0, total / k.clamp_min(1), torch.nan)


def root_brier_score(brier: torch.Tensor) -> torch.Tensor:
    """Root Brier score per image, ``(B,)`` float64, from the per-class Brier scores ``(B, C)`` (mean squared
    error of each class probability, :func:`brier_score`): ``sqrt(Σ_c BS_c)`` = ``sqrt((1/N) Σ_i Σ_c
    (p_ic − y_ic)²)`` (Gruber & Buettner 2022; MetricsReloaded ``rbs``, which sums every class: pass the
    background's Brier score too for its value). NaN where any channel is NaN (no voxel scored)."""
    return brier.to(torch.float64).sum(-1).clamp_min(0).sqrt()


def top_label_statistics(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_bins: int = 20,
    *,
    activation: Activation = None,
    mode: Mode = "exclusive",
    mask: torch.Tensor | None = None,
    closed: Closed = "right",
    check: bool = True,
) -> BinStats:
    """Top-label bin sums: confidence vs accuracy.

    Exclusive mode: confidence = ``max_c p_c``, accuracy = ``argmax_c p_c == label`` → ``(B, 1, M)``.
    Multilabel (each channel a binary problem, e.g. one sigmoid output): confidence = ``max(p, 1 − p)``,
    accuracy = ``(p >= 0.5) == y`` → ``(B, C, M)``, one binary top-label curve per channel.
    """
    mode = check_mode(mode)
    fast = _top_label_numba(pred, target, num_bins, activation, mode, mask, closed, check)
    if fast is not None:
        return fast
    if activation is None and isinstance(pred, torch.Tensor):
        # no clamped copy of the input: the confidences are clamped by bin_statistics (after validation)
        if check:
            check_probabilities(pred, mode)
        probs = pred
    else:
        probs = to_probabilities(pred, activation, mode, check=check)
    if check:
        check_target(target, probs.shape, mode)
    c = probs.shape[1]
    spatial = probs.shape[2:]
    if mode == "exclusive" and c > 1:
        conf, arg = probs.max(dim=1, keepdim=True)
        onehot_like = target.ndim == probs.ndim and target.shape[1] == c
        lab = None if onehot_like else as_label_map(target, spatial)
        if lab is not None:  # hard labels: 1 if the predicted class is the label
            correct = arg == lab.unsqueeze(1)
            if _triton.available(conf, num_bins) and closed in ("right", "left"):  # the GPU kernel: label 0 (its
                # hits) marks a correct voxel
                wrong = (~correct[:, 0]).to(torch.uint8)
                msk = _prepare_mask(mask, conf.shape[0], spatial, conf.device)
                out = _triton.label_bin_sums(conf, wrong, 0, msk, bin_edges(num_bins, conf.dtype), closed)
                return BinStats(out[:, :, 0], out[:, :, 1], out[:, :, 2])
        else:  # one-hot / soft targets: the reference probability of the predicted class
            correct = target.gather(1, arg)
            if correct.dtype not in (torch.bool, torch.uint8):
                correct = correct.to(torch.float32)
    else:
        y = target_to_onehot(target, c, spatial_shape=spatial).to(torch.float32)
        pc = probs.clamp(0.0, 1.0)
        conf = torch.maximum(pc, 1 - pc)
        correct = (pc >= 0.5).to(torch.float32) * y + (pc < 0.5).to(torch.float32) * (1 - y)
    return bin_statistics(conf, correct, num_bins, mode="multilabel", mask=mask, closed=closed, check=False)


def _top_label_numba(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_bins: int,
    activation: Activation,
    mode: Mode,
    mask: torch.Tensor | None,
    closed: Closed,
    check: bool,
) -> BinStats | None:
    """One fused numba pass (validate, max/argmax, bin) for float32/float64 CPU probabilities with a label
    map in exclusive mode; ``None`` when the input does not qualify (the torch path then handles it)."""
    if not (
        isinstance(pred, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and activation is None
        and mode == "exclusive"
        and pred.ndim in (4, 5)
        and pred.shape[1] > 1
        and pred.device.type == "cpu"
        and pred.dtype in (torch.float32, torch.float64)
        and not pred.requires_grad
        and closed in ("right", "left")
    ):
        return None
    b, c, *spatial = pred.shape
    if target.ndim == pred.ndim and target.shape[1] == c:
        return None  # one-hot / soft target
    check_num_bins(num_bins)
    if check:
        inputs.check_prediction(pred, finite=False)
        check_target(target, pred.shape, mode)
    lab = as_label_map(target, spatial)
    if lab is None:
        return None
    mask_t = _prepare_mask(mask, b, spatial)
    s = int(np.prod(spatial))
    if lab.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
        lab = lab.to(torch.int64)
    p_np = pred.reshape(b, c, s).numpy()
    if not _kernels.voxel_kernel_ok(num_bins, p_np.dtype):
        return None
    use_mask = mask_t is not None
    mask_np = mask_t.reshape(b, s).numpy().view(np.uint8) if use_mask else np.zeros((1, 1), np.uint8)
    out = np.zeros((b, 1, 3, num_bins))
    vstats = np.zeros(b * ((s + _kernels._CHUNK - 1) // _kernels._CHUNK))
    lab_np = lab.reshape(b, s).numpy()
    thr = min(inputs.PROB_ATOL * max(1, c), 6.0)  # < 7: see _kernels._mark_sums_off
    exact = p_np.dtype == np.float64
    right = closed == "right"
    _kernels._hist_top_label(p_np, lab_np, mask_np, use_mask, right, check, thr, exact, out, vstats)
    if check and vstats.sum() > 0:
        check_probabilities(pred, mode)  # something is off: the precise checks name the problem
    t = torch.from_numpy(out)
    return BinStats(t[:, :, 0], t[:, :, 1], t[:, :, 2])


def _voxel_weights(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    m = mask[:, 0] if (mask.ndim == like.ndim and mask.shape[1] == 1) else mask
    return m.to(torch.float64).unsqueeze(1)


def _masked_mean(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Mean over spatial dims of ``(B, C, *spatial)`` → ``(B, C)`` (NaN where the mask is empty)."""
    x = x.to(torch.float64)
    dims = tuple(range(2, x.ndim))
    if w is None:
        return x.mean(dims)
    num = (x * w).sum(dims)
    den = w.expand_as(x).sum(dims)
    return torch.where(den > 0, num / den.clamp_min(1), torch.nan)


def _prepared(
    pred: torch.Tensor,
    target: torch.Tensor,
    activation: Activation,
    mode: Mode,
    regions: Sequence[Sequence[int]] | None,
    check: bool,
) -> tuple[torch.Tensor, torch.Tensor, Mode]:
    mode = check_mode(mode)
    probs = to_probabilities(pred, activation, "exclusive" if regions is not None else mode, check=check)
    if check:
        check_target(target, probs.shape, "exclusive" if regions is not None else mode)
    c = probs.shape[1]
    if regions is not None:
        sp = probs.shape[2:]
        return region_probabilities(probs, regions), region_targets(target, regions, c, sp), "multilabel"
    return probs, target_to_onehot(target, c, dtype=probs.dtype, spatial_shape=probs.shape[2:]), mode


def negative_log_likelihood(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    activation: Activation = None,
    mode: Mode = "exclusive",
    mask: torch.Tensor | None = None,
    regions: Sequence[Sequence[int]] | None = None,
    eps: float = EPS,
    check: bool = True,
) -> torch.Tensor:
    """Mean negative log-likelihood per image, ``(B,)`` float64 (Ensembles eq. 3).

    Exclusive: ``−(1/N) Σ_i Σ_k y_ik ln p_ik`` (soft targets give the cross-entropy to the reference).
    Multilabel: the mean binary cross-entropy over channels and voxels. Probabilities are clipped into
    ``[eps, 1 − eps]`` (default ``1e-7``). Voxels outside ``mask`` are ignored.
    """
    probs, y, mode = _prepared(pred, target, activation, mode, regions, check)
    p = probs.to(torch.float64).clamp(eps, 1 - eps)
    y = y.to(torch.float64)
    w = _voxel_weights(mask, probs)
    if mode == "exclusive":
        per_voxel = -(y * p.log()).sum(1, keepdim=True)
        return _masked_mean(per_voxel, w)[:, 0]
    per = -(y * p.log() + (1 - y) * (1 - p).log())
    return _masked_mean(per, w).mean(1)


def brier_score(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    activation: Activation = None,
    mode: Mode = "exclusive",
    include_background: bool = True,
    mask: torch.Tensor | None = None,
    regions: Sequence[Sequence[int]] | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Brier score per image and class, ``(B, C)`` float64: mean over voxels of ``(p_c − y_c)²``.

    The mean over classes of the result is Ensembles eq. 4 (with ``include_background=True``).
    """
    probs, y, mode = _prepared(pred, target, activation, mode, regions, check)
    sq = (probs.to(torch.float64) - y.to(torch.float64)) ** 2
    w = _voxel_weights(mask, probs)
    return select_channels(_masked_mean(sq, w).unsqueeze(-1), include_background, mode)[..., 0]


def mean_absolute_error(
    pred: torch.Tensor,
    reference: torch.Tensor,
    *,
    activation: Activation = None,
    mode: Mode = "exclusive",
    include_background: bool = True,
    mask: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Mean ``|p_c − r_c|`` per image and class ``(B, C)`` against a soft reference probability map ``r``."""
    mode = check_mode(mode)
    probs = to_probabilities(pred, activation, mode, check=check)
    if check:
        check_target(reference, probs.shape, mode, name="reference")
    if reference.shape != probs.shape:
        raise ValueError("reference must be a probability map with the prediction's shape (B, C, *spatial)")
    err = (probs.to(torch.float64) - reference.to(torch.float64)).abs()
    w = _voxel_weights(mask, probs)
    return select_channels(_masked_mean(err, w).unsqueeze(-1), include_background, mode)[..., 0]

