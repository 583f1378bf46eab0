"""Conformal risk control (CRC) of the false-negative (or false-discovery) rate of segmentation masks, as pure
tensor functions.

Reference: Angelopoulos, Bates, Fisch, Lei, Schuster, "Conformal Risk Control", ICLR 2024 (docs/references.md,
[Angelopoulos2024-ICLR]), Theorem 1 (the threshold and its guarantee) and the paper's example of FNR control in
tumour segmentation.

Loss, per case ``i`` and channel ``c`` (a softmax class, or a sigmoid region channel in multilabel mode)
---------------------------------------------------------------------------------------------------------
The conformal mask of parameter ``λ ∈ [0, 1]`` is ``C_λ = {voxels v : p_c(v) ≥ 1 − λ}`` (``λ = 0``: only
voxels with ``p = 1``; ``λ = 1``: every voxel). Its false-negative rate on a case with ground truth ``Y_i``::

    L_i(λ) = 1 − |Y_i ∩ C_λ| / |Y_i|                     (FNR, in [0, 1], so B = 1)

is non-increasing and right-continuous in ``λ`` (``C_λ`` only grows). **Absent structures** (``|Y_i| = 0``):
the FNR is undefined; ``absent="zero"`` (default) counts such a case with loss 0 (nothing to miss) and keeps it
among the ``n`` calibration cases, so the guarantee is over all cases; ``absent="skip"`` leaves such cases out
of the calibration set and of the reported risk, so the guarantee holds over cases where the structure is
present (those cases must be exchangeable among themselves).

The CRC threshold (CRC Theorem 1, with ``B = 1``)::

    λ̂ = inf{ λ : n / (n + 1) · R̂_n(λ) + B / (n + 1) ≤ α },      R̂_n(λ) = (1/n) Σ_i L_i(λ)

gives ``E[L_{n+1}(λ̂)] ≤ α`` for a new case exchangeable with the ``n`` calibration cases (CRC Theorem 1). It is
marginal: an average over the draw of the calibration set and of the new case, not a bound for every case, nor
for every calibration set. When ``α < B / (n + 1)`` no ``λ`` meets the bound: ``λ̂ = 1`` (every voxel in the
mask) with a ``UserWarning``.

The parameter grid (exact, conservative)
----------------------------------------
``λ`` is taken on the grid ``Λ_K = {k / K : k = 0..K}`` with ``K = resolution`` a power of two (default
``2**16``). CRC holds for any parameter set that contains ``λ_max = 1``, so the guarantee is exact on ``Λ_K``.
On that grid each case is summed up by a histogram of the bins ``⌊p K⌋`` (in ``[0, K]``) of its ground-truth
voxels: a voxel is in ``C_{k/K}`` iff ``⌊p K⌋ ≥ K − k``, which for float32/float64 ``p`` and a power-of-two
``K`` is exactly ``p ≥ 1 − k/K`` (no rounding), so the histogram gives every ``L_i(k/K)`` exactly. Compared
with the infimum over all real ``λ`` the grid rounds ``λ̂`` *up* to the next multiple of ``1/K`` (never down):
the mask threshold ``1 − λ̂`` is at most ``1/K`` lower (``1.5e-5`` for ``2**16``), the masks are at most that
much larger, and the guarantee is unchanged. Each case costs at most ``K + 1`` (bin, count) pairs per channel,
whatever its size, so a calibration set streams volume by volume.

False-discovery rate
--------------------
``FDR_i(t) = |C_t \\ Y_i| / |C_t|`` of the mask ``C_t = {p ≥ t}`` (0 for an empty mask) is *not* monotone in
``t``, so CRC is applied to its monotone upper bound ``L_i(t) = sup_{t' ≥ t} FDR_i(t')`` (non-increasing in the
threshold ``t``, ``B = 1``), which bounds the expected FDR by ``α`` too, conservatively. The parameter is the
threshold itself, on the grid ``t = j / K`` with ``j = K + 1`` the empty mask (loss 0, the ``λ_max``):
:func:`fdr_statistics`, :func:`fdr_loss_curves`, :func:`crc_fdr_threshold`, :func:`false_discovery_rate`.

Shapes: probabilities (or logits with ``activation``) ``(B, C, *spatial)``, targets a label map ``(B, *spatial)``
/ ``(B, 1, *spatial)`` or one-hot / multi-hot ``(B, C, *spatial)`` (soft targets binarised at 0.5).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from segcal.functional.inputs import (
    Activation,
    Mode,
    as_label_map,
    as_tensor,
    check_mode,
    check_target,
    to_probabilities,
)
from segcal.functional.overlap import confusion_counts

__all__ = [
    "DEFAULT_RESOLUTION",
    "AbsentRule",
    "CRCResult",
    "FDRStatistics",
    "FNRStatistics",
    "binary_targets",
    "check_alpha",
    "check_resolution",
    "conformal_masks",
    "crc_fdr_threshold",
    "crc_index",
    "crc_threshold",
    "false_discovery_rate",
    "false_negative_rate",
    "fdr_loss_curves",
    "fdr_statistics",
    "fnr_loss_curves",
    "fnr_statistics",
    "probability_bins",
    "threshold_masks",
]

#: default number of grid steps ``K`` of ``λ`` (``λ ∈ {k / K}``); a power of two
DEFAULT_RESOLUTION = 1 << 16
#: slack (per case) by which a loss sum must clear the CRC limit: float64 rounding never makes the bound looser
_TIE_TOL = 1e-12
#: how a case without the structure counts (module docstring)
AbsentRule = Literal["zero", "skip"]


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """``alpha`` as a float in the open interval (0, 1), else ``ValueError`` naming ``name``."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in (0, 1), got {alpha!r}") from None
    if not (0.0 < a < 1.0) or math.isnan(a):
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {alpha!r}")
    return a


def check_resolution(resolution: int) -> int:
    """``resolution`` (the grid size ``K``) as an int, a power of two in ``[2, 2**24]``, else ``ValueError``."""
    r = int(resolution)
    if r != resolution or r < 2 or r > (1 << 24) or r & (r - 1):
        raise ValueError(f"resolution must be a power of two in [2, 2**24], got {resolution!r}")
    return r


def _check_absent(absent: str) -> AbsentRule:
    if absent not in ("zero", "skip"):
        raise ValueError(f"absent must be 'zero' or 'skip', got {absent!r}")
    return absent  # type: ignore[return-value]


def probability_bins(probs: torch.Tensor, resolution: int = DEFAULT_RESOLUTION) -> torch.Tensor:
    """Grid bins ``⌊p K⌋`` (int64, in ``[0, K]``) of probabilities ``p`` (any shape); ``K = resolution``.

    ``p`` is read in float64 (float16 / float32 values are exact there) and ``K`` is a power of two, so
    ``⌊p K⌋ ≥ K − k ⟺ p ≥ 1 − k / K`` holds exactly.
    """
    k = check_resolution(resolution)
    return torch.floor(probs.detach().to(torch.float64) * k).clamp_(0, k).to(torch.int64)


@dataclass(frozen=True)
class FNRStatistics:
    """Sufficient statistics of the FNR loss curves of ``n`` cases and ``C`` channels on the grid ``k / K``.

    Attributes:
        resolution: ``K``.
        gt_voxels: ``(n, C)`` int64, ground-truth voxels ``|Y_i|`` per case and channel.
        case, channel, bin, count: ``(M,)`` int32 each, a sparse histogram: ``count`` ground-truth voxels of
            case ``case`` and channel ``channel`` have ``⌊p K⌋ = bin`` (only non-zero entries are kept): at most
            ``K + 1`` entries (16 bytes each) per case and channel, whatever the volume size.

    Statistics of several batches merge exactly with :meth:`concat` (cases appended in order).
    """

    resolution: int
    gt_voxels: torch.Tensor
    case: torch.Tensor
    channel: torch.Tensor
    bin: torch.Tensor
    count: torch.Tensor

    @property
    def num_cases(self) -> int:
        return int(self.gt_voxels.shape[0])

    @property
    def num_channels(self) -> int:
        return int(self.gt_voxels.shape[1])

    @staticmethod
    def concat(parts: Sequence[FNRStatistics]) -> FNRStatistics:
        """The statistics of all cases of ``parts`` (same resolution and channels), in order."""
        if len(parts) == 0:
            raise ValueError("concat needs at least one FNRStatistics")
        k, c = parts[0].resolution, parts[0].num_channels
        for p in parts:
            if p.resolution != k or p.num_channels != c:
                raise ValueError(
                    f"cannot merge statistics of resolution {p.resolution} with {p.num_channels} channels into "
                    f"resolution {k} with {c} channels"
                )
        offsets = [0]
        for p in parts[:-1]:
            offsets.append(offsets[-1] + p.num_cases)
        return FNRStatistics(
            k,
            torch.cat([p.gt_voxels for p in parts]),
            torch.cat([p.case + o for p, o in zip(parts, offsets, strict=True)]),
            torch.cat([p.channel for p in parts]),
            torch.cat([p.bin for p in parts]),
            torch.cat([p.count for p in parts]),
        )

    def present(self) -> torch.Tensor:
        """``(n, C)`` bool: the structure is present in the case (``|Y_i| > 0``)."""
        return self.gt_voxels > 0


def fnr_statistics(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    mode: Mode = "exclusive",
    activation: Activation = None,
    resolution: int = DEFAULT_RESOLUTION,
) -> FNRStatistics:
    """The :class:`FNRStatistics` of a batch: for each case and channel, the histogram of ``⌊p K⌋`` over the
    ground-truth voxels.

    Args:
        probs: ``(B, C, *spatial)`` probabilities (or logits with ``activation``).
        target: label map ``(B, *spatial)`` / ``(B, 1, *spatial)`` or one-hot / multi-hot ``(B, C, *spatial)``
            (multilabel mode: multi-hot, overlapping regions allowed; soft targets binarised at 0.5).
        mode: ``"exclusive"`` (softmax classes) or ``"multilabel"`` (sigmoid channels).
        activation: ``None`` (``probs`` are probabilities), ``"softmax"`` or ``"sigmoid"``.
        resolution: ``K``, a power of two.
    """
    p, gt, k = _validated(probs, target, mode, activation, resolution)
    return _histograms(p, gt, k)


def _validated(
    probs: torch.Tensor, target: torch.Tensor, mode: Mode, activation: Activation, resolution: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(probabilities, ground truth (B, C, *spatial) bool, K)`` of a batch, validated (shapes, mode, K)."""
    mode = check_mode(mode)
    k = check_resolution(resolution)
    p = to_probabilities(probs, activation, mode, name="probs")
    check_target(target, p.shape, mode)
    return p, binary_targets(target, p.shape[1], p.shape[2:]), k


def _histograms(p: torch.Tensor, gt: torch.Tensor, k: int) -> FNRStatistics:
    """The sparse histograms of ``⌊p K⌋`` over the voxels selected by ``gt`` ``(B, C, *S)`` bool."""
    b, c = p.shape[:2]
    case_of = torch.arange(b, dtype=torch.int64, device=p.device).view(b, *([1] * (p.ndim - 2)))
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for ch in range(c):  # one channel at a time: memory in the ground-truth voxels only
        sel = gt[:, ch]
        key = case_of.expand_as(sel)[sel] * (k + 1) + probability_bins(p[:, ch][sel], k)
        dense = torch.bincount(key, minlength=b * (k + 1))  # linear time; b (K + 1) counters
        uniq = torch.nonzero(dense).flatten()
        parts.append((uniq // (k + 1), torch.full_like(uniq, ch), uniq % (k + 1), dense[uniq]))
    # the sparse statistics are summaries: held on the host, whatever the device of the probabilities
    case, channel, bins, count = (torch.cat(t).to(torch.int32).cpu() for t in zip(*parts, strict=True))
    return FNRStatistics(k, gt.flatten(2).sum(-1).to(torch.int64).cpu(), case, channel, bins, count)


def binary_targets(
    target: torch.Tensor, num_channels: int, spatial_shape: Sequence[int], channels: Sequence[int] | None = None
) -> torch.Tensor:
    """Ground truth ``(B, K, *spatial)`` bool of the ``channels`` (default: all ``num_channels``) from a validated
    label map (one comparison per channel, no float one-hot) or one-hot / multi-hot / soft map (``≥ 0.5``)."""
    chans = list(range(num_channels)) if channels is None else list(channels)
    lab = as_label_map(target, spatial_shape)
    if lab is not None and num_channels == 1:  # one channel: the map itself is the target (as target_to_onehot)
        return (lab != 0).unsqueeze(1)
    if lab is not None:
        return torch.stack([lab == ch for ch in chans], 1)
    dense = target[:, chans]
    return dense if dense.dtype == torch.bool else dense >= 0.5


def _covered_fraction(stats: FNRStatistics) -> torch.Tensor:
    """Per entry: the share of its case's ground truth it holds, ``count / |Y_i|`` (float64)."""
    denom = stats.gt_voxels[stats.case.long(), stats.channel.long()].to(torch.float64)
    return stats.count.to(torch.float64) / denom


def fnr_loss_curves(stats: FNRStatistics) -> torch.Tensor:
    """Dense per-case loss curves ``(n, C, K + 1)`` float64: entry ``k`` is ``L_i(k / K)``, the FNR of the mask
    ``p ≥ 1 − k / K``; a case without the structure has loss 0 at every ``λ`` (``absent="zero"``; select
    :meth:`FNRStatistics.present` for ``"skip"``). Memory ``n · C · (K + 1)`` doubles: for small ``K`` or few
    cases (tests, plots); :func:`crc_threshold` never builds it."""
    covered = _dense_histogram(stats).flip(-1).cumsum(-1)  # index k: bins K .. K - k, the voxels with p >= 1 - k/K
    gt = stats.gt_voxels.unsqueeze(-1)
    return (gt - covered).to(torch.float64) / gt.clamp(min=1).to(torch.float64)  # integer counts: exact 0 at λ = 1


@dataclass(frozen=True)
class FDRStatistics:
    """Sufficient statistics of the FDR loss curves: the histograms of ``⌊p K⌋`` over the ground-truth voxels
    (``positives``) and over the other voxels (``negatives``) of each case and channel (each at most ``K + 1``
    entries per case and channel)."""

    positives: FNRStatistics
    negatives: FNRStatistics

    @property
    def resolution(self) -> int:
        return self.positives.resolution

    @property
    def num_cases(self) -> int:
        return self.positives.num_cases


def fdr_statistics(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    mode: Mode = "exclusive",
    activation: Activation = None,
    resolution: int = DEFAULT_RESOLUTION,
) -> FDRStatistics:
    """The :class:`FDRStatistics` of a batch (arguments as :func:`fnr_statistics`)."""
    p, gt, k = _validated(probs, target, mode, activation, resolution)
    return FDRStatistics(_histograms(p, gt, k), _histograms(p, ~gt, k))


def _dense_histogram(stats: FNRStatistics) -> torch.Tensor:
    """``(n, C, K + 1)`` int64 voxel counts per bin."""
    k, n, c = stats.resolution, stats.num_cases, stats.num_channels
    key = (stats.case.long() * c + stats.channel.long()) * (k + 1) + stats.bin.long()
    hist = torch.bincount(key, weights=stats.count.to(torch.float64), minlength=n * c * (k + 1))
    return hist.round().to(torch.int64).view(n, c, k + 1)  # integer counts (exact in float64 below 2**53)


def fdr_loss_curves(stats: FDRStatistics, *, monotone: bool = True) -> torch.Tensor:
    """Dense per-case FDR curves ``(n, C, K + 2)`` float64 over the mask threshold ``t = j / K``: entry ``j`` is
    the FDR ``|C \\ Y_i| / |C|`` of the mask ``C = {p ≥ j / K}`` (0 for an empty mask; ``j = K + 1`` is the
    empty mask). The FDR is not monotone in ``t``; with ``monotone`` (the loss CRC controls) entry ``j`` is
    ``sup_{j' ≥ j} FDR(j' / K)``, non-increasing in ``t`` and an upper bound of the FDR, so a bound on its
    expectation bounds the expected FDR."""
    k = stats.resolution
    tp_hist, fp_hist = _dense_histogram(stats.positives), _dense_histogram(stats.negatives)
    zero = torch.zeros_like(tp_hist[..., :1])
    tp = torch.cat([tp_hist.flip(-1).cumsum(-1).flip(-1), zero], -1)  # voxels >= j/K
    fp = torch.cat([fp_hist.flip(-1).cumsum(-1).flip(-1), zero], -1)
    assert tp.shape[-1] == k + 2
    fdr = fp.to(torch.float64) / (tp + fp).clamp(min=1).to(torch.float64)
    return fdr.flip(-1).cummax(-1).values.flip(-1) if monotone else fdr


def crc_index(
    loss_sum: torch.Tensor, n: torch.Tensor | int, alpha: float, bound: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CRC grid index ``k̂`` (``λ̂ = k̂ / K``) from summed loss curves (CRC Theorem 1).

    Args:
        loss_sum: ``(..., K + 1)`` float, ``Σ_i L_i(k / K)`` over the ``n`` calibration cases, non-increasing in
            ``k``, with ``L_i(1) = 0`` (the last entry is 0).
        n: number of calibration cases, broadcastable to ``loss_sum.shape[:-1]``.
        alpha: target risk in (0, 1).
        bound: ``B``, an upper bound of every loss (1 for the FNR).

    Returns:
        ``(k̂, achievable)``: int64 and bool of shape ``loss_sum.shape[:-1]``; ``k̂`` is the smallest ``k`` with
        ``n/(n+1) · R̂_n + B/(n+1) ≤ α``, i.e. ``Σ_i L_i(k / K) ≤ (n + 1) α − B``; where no ``k`` qualifies
        (``α < B / (n + 1)``) ``k̂ = K`` and ``achievable`` is False. The sums are float64: a sum within
        ``1e-12 · (n + 1)`` of the limit counts as above it (exact ties resolve to the next, safer ``k``).
    """
    a = check_alpha(alpha)
    if not bound > 0:
        raise ValueError(f"bound must be positive, got {bound!r}")
    if loss_sum.ndim < 1 or loss_sum.shape[-1] < 2:
        raise ValueError(f"loss_sum must have shape (..., K + 1) with K >= 1, got {tuple(loss_sum.shape)}")
    nn = as_tensor(n, loss_sum.device).to(torch.float64).expand(loss_sum.shape[:-1])
    # a float64 sum of ratios can be off by a few ulps: the comparison gives way on the safe side (a later k),
    # so a rounding error never picks a k whose exact loss sum exceeds the limit
    limit = (nn + 1) * a - bound - _TIE_TOL * (nn + 1)
    ok = loss_sum.to(torch.float64) <= limit.unsqueeze(-1)
    achievable = ok.any(-1)
    k = loss_sum.shape[-1] - 1
    first = torch.where(achievable, ok.to(torch.int8).argmax(-1), torch.full_like(achievable, k, dtype=torch.int64))
    return first.to(torch.int64), achievable


@dataclass(frozen=True)
class CRCResult:
    """The CRC threshold per channel (:func:`crc_threshold`).

    Attributes:
        lambdas: ``(C,)`` float64, the parameter ``λ̂ = k̂ / K`` the bound is taken over (FNR: the mask is
            ``p ≥ 1 − λ̂``; FDR: the mask threshold itself).
        thresholds: ``(C,)`` float64, the mask is ``p ≥ threshold`` (FDR: ``1 + 1/K`` is the empty mask).
        index: ``(C,)`` int64, ``k̂``.
        n: ``(C,)`` int64, calibration cases used (all cases, or those with the structure for ``"skip"``).
        achievable: ``(C,)`` bool, whether the bound could be met (``α ≥ 1 / (n + 1)``).
        calibration_risk: ``(C,)`` float64, ``R̂_n(λ̂)``, the mean calibration FNR at ``λ̂``.
    """

    lambdas: torch.Tensor
    thresholds: torch.Tensor
    index: torch.Tensor
    n: torch.Tensor
    achievable: torch.Tensor
    calibration_risk: torch.Tensor


def _names(names: Sequence[str] | None, c: int) -> list[str]:
    out = [f"channel {ch}" for ch in range(c)] if names is None else list(names)
    if len(out) != c:
        raise ValueError(f"names has {len(out)} entries for {c} channels")
    return out


def _warn_unachievable(achievable: torch.Tensor, n: torch.Tensor, alpha: float, names: list[str], what: str) -> None:
    for ch in torch.nonzero(~achievable).flatten().tolist():
        warnings.warn(
            f"{names[ch]}: alpha={alpha} is below 1/(n+1) = {1 / (float(n[ch]) + 1):.4g} for n={int(n[ch])} "
            f"calibration cases, so the conformal bound cannot be met; {what}",
            UserWarning,
            stacklevel=3,
        )


def crc_fdr_threshold(
    loss_sum: torch.Tensor, n: torch.Tensor | int, alpha: float, *, names: Sequence[str] | None = None
) -> CRCResult:
    """The CRC mask threshold per channel for the FDR, from summed monotone FDR curves ``(C, K + 2)``
    (:func:`fdr_loss_curves` summed over the ``n`` calibration cases, so cases can be streamed): ``t̂ = ĵ / K``
    with ``ĵ`` the smallest index meeting the bound of CRC Theorem 1 (``B = 1``); the mask is ``p ≥ t̂``. When the
    bound cannot be met (``α < 1/(n + 1)``) the mask is empty (``t̂ = 1 + 1/K``), with a ``UserWarning``."""
    a = check_alpha(alpha)
    if loss_sum.ndim != 2 or loss_sum.shape[-1] < 3:
        raise ValueError(f"loss_sum must have shape (C, K + 2), got {tuple(loss_sum.shape)}")
    c, k = loss_sum.shape[0], loss_sum.shape[1] - 2
    check_resolution(k)
    nn = as_tensor(n, loss_sum.device).to(torch.float64).expand(c).clone()
    if bool((nn < 1).any()):
        raise ValueError("crc_fdr_threshold needs at least one calibration case per channel")
    index, achievable = crc_index(loss_sum, nn, a)
    _warn_unachievable(achievable, nn, a, _names(names, c), "the mask is empty")
    risk = loss_sum.to(torch.float64).gather(1, index.unsqueeze(1))[:, 0] / nn
    t = index.to(torch.float64) / k
    return CRCResult(t, t.clone(), index, nn.to(torch.int64), achievable, risk)


def crc_threshold(
    stats: FNRStatistics, alpha: float, *, absent: AbsentRule = "zero", names: Sequence[str] | None = None
) -> CRCResult:
    """λ̂ per channel (CRC Theorem 1, ``B = 1``, module docstring) from :class:`FNRStatistics`, exactly on the grid
    ``k / K``, without building per-case curves: ``Σ_i L_i(k/K) = n_present − Σ_{entries, bin ≥ K−k} count /
    |Y_i|``. Warns (``UserWarning``) for a channel where the bound cannot be met (``λ̂ = 1``) and for a channel
    absent from every calibration case (``λ̂`` then carries no information); ``names`` name the channels in
    these warnings (default ``"channel c"``)."""
    a = check_alpha(alpha)
    absent = _check_absent(absent)
    k, c = stats.resolution, stats.num_channels
    if stats.num_cases == 0:
        raise ValueError("crc_threshold needs at least one calibration case")
    names = _names(names, c)
    key = stats.channel.long() * (k + 1) + stats.bin.long()
    weights = torch.bincount(key, weights=_covered_fraction(stats), minlength=c * (k + 1)).view(c, k + 1)
    present = stats.present().sum(0).to(torch.float64)  # (C,)
    loss_sum = (present.unsqueeze(-1) - weights.flip(-1).cumsum(-1)).clamp_(min=0.0)
    loss_sum[:, -1] = 0.0  # λ = 1 covers every voxel (removes float residue of the cumulative sum)
    n = present if absent == "skip" else torch.full_like(present, float(stats.num_cases))
    index, achievable = crc_index(loss_sum, n, a)
    _warn_unachievable(achievable, n, a, names, "lambda_hat = 1 (every voxel in the mask)")
    for ch in torch.nonzero(present == 0).flatten().tolist():
        if bool(achievable[ch]):
            warnings.warn(
                f"{names[ch]}: the structure is absent from every calibration case; lambda_hat = "
                f"{float(index[ch]) / k:.4g} is not informed by any ground truth",
                UserWarning,
                stacklevel=2,
            )
    risk = loss_sum.gather(1, index.unsqueeze(1))[:, 0] / n.clamp(min=1)
    lam = index.to(torch.float64) / k
    return CRCResult(lam, 1.0 - lam, index, n.to(torch.int64), achievable, risk)


def threshold_masks(
    probs: torch.Tensor,
    thresholds: torch.Tensor | Sequence[float],
    *,
    mode: Mode = "exclusive",
    activation: Activation = None,
) -> torch.Tensor:
    """Masks ``(B, C, *spatial)`` bool: ``p_c ≥ t_c`` per channel, ``thresholds`` ``(C,)`` non-negative (above 1:
    an empty mask); compared exactly (float32 where the thresholds are float32 numbers, else float64)."""
    mode = check_mode(mode)
    p = to_probabilities(probs, activation, mode, name="probs")
    t = as_tensor(thresholds, p.device).to(torch.float64).flatten()
    if t.numel() != p.shape[1]:
        raise ValueError(f"thresholds has {t.numel()} values but probs have {p.shape[1]} channels")
    if not bool((t >= 0).all()) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"thresholds must be finite and non-negative, got {t.tolist()}")
    threshold = t.view(1, -1, *([1] * (p.ndim - 2)))
    p = p.detach()
    if p.dtype == torch.float16 or p.dtype == torch.bfloat16:
        p = p.float()
    if p.dtype == torch.float32 and bool((threshold.float().double() == threshold).all()):
        return p >= threshold.float()  # the thresholds are float32 numbers: the float32 comparison is exact
    return p.to(torch.float64) >= threshold


def conformal_masks(
    probs: torch.Tensor,
    lambdas: torch.Tensor | Sequence[float],
    *,
    mode: Mode = "exclusive",
    activation: Activation = None,
) -> torch.Tensor:
    """Conformal masks ``(B, C, *spatial)`` bool: ``p_c ≥ 1 − λ_c`` per channel (compared in float64, exact for
    ``λ`` on the grid ``k / K``). ``lambdas``: ``(C,)`` values in ``[0, 1]``. In exclusive mode the masks of
    different classes may overlap (a voxel can be in the set of two classes)."""
    lam = as_tensor(lambdas).to(torch.float64).flatten()
    if not bool(((lam >= 0) & (lam <= 1)).all()):
        raise ValueError(f"lambdas must lie in [0, 1], got {lam.tolist()}")
    try:
        return threshold_masks(probs, 1.0 - lam, mode=mode, activation=activation)
    except ValueError as exc:
        raise ValueError(str(exc).replace("thresholds has", "lambdas has")) from None


def false_negative_rate(
    masks: torch.Tensor, target: torch.Tensor, *, mode: Mode = "exclusive", absent: AbsentRule = "zero"
) -> torch.Tensor:
    """Per-case FNR ``(B, C)`` float64 of boolean masks ``(B, C, *spatial)``: ``fn / (tp + fn)`` from
    :func:`segcal.functional.overlap.confusion_counts` (``1 − recall``). A case without the structure gets 0
    (``absent="zero"``) or NaN (``"skip"``: not counted)."""
    absent = _check_absent(absent)
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
        raise TypeError("masks must be a boolean tensor (B, C, *spatial)")
    counts = confusion_counts(masks, target, mode=check_mode(mode))
    tp, fn = counts[..., 0], counts[..., 2]
    gt = tp + fn
    empty = torch.zeros_like(gt) if absent == "zero" else torch.full_like(gt, float("nan"))
    return torch.where(gt > 0, fn / gt.clamp(min=1), empty)


def false_discovery_rate(masks: torch.Tensor, target: torch.Tensor, *, mode: Mode = "exclusive") -> torch.Tensor:
    """Per-case FDR ``(B, C)`` float64 of boolean masks ``(B, C, *spatial)``: ``fp / (tp + fp)`` from
    :func:`segcal.functional.overlap.confusion_counts` (``1 − precision``); an empty mask has FDR 0."""
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
        raise TypeError("masks must be a boolean tensor (B, C, *spatial)")
    counts = confusion_counts(masks, target, mode=check_mode(mode))
    tp, fp = counts[..., 0], counts[..., 1]
    return fp / (tp + fp).clamp(min=1)
