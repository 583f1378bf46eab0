"""Equal-mass (adaptive) binning ECE from a fine, mergeable equal-width histogram, with a stated error bound.

Equal-mass binning (Nixon et al. 2019, adaptive calibration error, docs/references.md; netcal's
``ECE(equal_intervals=False)``) puts
the ``N`` scored voxels of a channel into ``R`` bins with edges at the empirical quantiles of the probabilities,
``q_r = quantile(p, r / R)`` (linear interpolation between order statistics, as ``numpy.quantile``), ``q_0 = 0``,
``q_R = 1``, bin ``r`` = ``[q_r, q_{r+1})`` (the last one closed), and takes the count-weighted ECE

    ECE_EM = Σ_r (n_r / N) |o_r − e_r| = (1 / N) Σ_r |Σ_{i ∈ r} (y_i − p_i)|.

The exact quantiles need every voxel, so they neither merge over images nor fit a run's store. segcal forms the
equal-mass bins from a fine equal-width histogram instead: ``K`` fine bins of the mergeable sums (count, Σp, Σy)
of :func:`segcal.functional.binning.bin_statistics` (bins ``(k/K, (k+1)/K]``), summed over any set of images.
Each quantile ``q_r`` lies between the order statistics ``v_lo ≤ q_r ≤ v_hi`` of ranks ``⌊t_r⌋`` and ``⌈t_r⌉``
(``t_r = r (N − 1) / R``). When they fall in different fine bins, ``v_lo < q_r ≤ v_hi`` and every voxel of the
lower bin lies below ``q_r``, every voxel of the upper one at or above it; when they fall in the same fine bin,
that bin is *ambiguous* (its voxels may lie on either side of ``q_r``) and is assigned to the lower side. Every
other fine bin lies wholly inside one equal-mass bin and is assigned to it.

**Error bound.** Moving a voxel ``i`` from one equal-mass bin to another changes ``Σ_r |S_r|`` (``S_r`` the bin's
sum of ``y − p``) by at most ``2 |y_i − p_i|``; only voxels of ambiguous fine bins can be misplaced, and over a
fine bin ``j`` ``Σ_i |y_i − p_i| ≤ B_j = min(n_j, Σy_j + Σp_j, 2 n_j − Σy_j − Σp_j)`` (for ``p, y`` in [0, 1]:
``|y − p| ≤ min(1, y + p, 2 − y − p)``). Hence

    |ECE_EM(histogram) − ECE_EM(exact)| ≤ (2 / N) Σ_{j ambiguous} B_j,

computed from the same sums (:func:`equal_mass_calibration_error` returns it). It vanishes when no fine bin
holds both order statistics around a quantile, and is small where the ambiguous fine bins hold few errors (e.g.
the crowded bin near ``p = 0`` of a foreground class, where ``y`` and ``p`` are both near 0).

Nixon et al.'s ACE averages ``|o_r − e_r|`` over ``R`` ranges of exactly ``N / R`` voxels; when every bin holds
``N / R`` voxels the count-weighted and unweighted means coincide, so it equals :func:`equal_mass_calibration_error`
then (up to the quantile convention at the ranges' edges).
"""

from __future__ import annotations

import numpy as np
import torch

from segcal.functional.binning import BinStats

__all__ = ["equal_mass_calibration_error"]


def _one_channel(count: np.ndarray, sum_p: np.ndarray, sum_y: np.ndarray, num_bins: int) -> tuple[float, float]:
    """ECE_EM and its bound for one channel's fine histogram ``(K,)``."""
    n = float(count.sum())
    if n <= 0:
        return float("nan"), float("nan")
    cum = np.cumsum(count)
    t = np.arange(1, num_bins) * (n - 1) / num_bins
    # fine bin holding the (0-based) rank r: the first bin whose cumulative count exceeds r
    j_lo = np.searchsorted(cum, np.floor(t), side="right")
    j_hi = np.searchsorted(cum, np.ceil(t), side="right")
    k = np.arange(count.shape[0])
    group = np.searchsorted(np.sort(j_lo), k, side="left")  # number of edges whose lower rank lies below bin k
    gap = sum_y - sum_p
    s = np.bincount(group, weights=gap, minlength=num_bins)
    ece = float(np.abs(s).sum() / n)
    amb = np.unique(j_lo[j_lo == j_hi])
    amb = amb[amb < count.shape[0]]
    b = np.minimum(count[amb], np.minimum(sum_y[amb] + sum_p[amb], 2 * count[amb] - sum_y[amb] - sum_p[amb]))
    return ece, float(2.0 * np.clip(b, 0, None).sum() / n)


def equal_mass_calibration_error(fine: BinStats, num_bins: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-mass (adaptive) ECE per image and channel and its error bound, each ``(B, C)`` float64.

    Args:
        fine: fine equal-width bin sums ``(B, C, K)`` (``bin_statistics(..., num_bins=K)``; ``.pooled()`` for
            the dataset-level value). ``K`` of a few hundred to thousands keeps the bound small.
        num_bins: ``R``, the number of equal-mass bins (netcal's ``bins``; default 15).

    Returns:
        ``(ece, bound)``: the count-weighted ECE over equal-mass bins formed from the fine histogram (module
        docstring), and the bound on its distance to the exact per-voxel value with quantile edges. A channel
        without voxels gives NaN.
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins (equal-mass bins) must be a positive integer, got {num_bins!r}")
    count, sp, sy = (x.detach().cpu().to(torch.float64).numpy() for x in (fine.count, fine.sum_p, fine.sum_y))
    b, c, _ = count.shape
    ece = np.full((b, c), np.nan)
    bound = np.full((b, c), np.nan)
    for i in range(b):
        for j in range(c):
            ece[i, j], bound[i, j] = _one_channel(count[i, j], sp[i, j], sy[i, j], num_bins)
    return torch.from_numpy(ece), torch.from_numpy(bound)
