"""Smooth ECE per channel from a fine, mergeable histogram (Błasiok & Nakkiran, ICLR 2024; docs/references.md).

For predictions ``f_i`` with outcomes ``y_i`` (one channel, one-vs-rest), the kernel-smoothed residual
``r̂_σ(t) = Σ_i K_σ(t, f_i)(f_i − y_i) / Σ_i K_σ(t, f_i)`` and density ``δ̂_σ(t) = Σ_i K_σ(t, f_i)`` give

    smECE_σ = ∫ |r̂_σ(t)| δ̂_σ(t) dt / ∫ δ̂_σ(t) dt,

with ``K_σ`` the Gaussian kernel reflected at 0 and 1, and smECE = smECE_σ* at the fixed point ``σ* = smECE_σ*``
(the paper's eq. for the automatic bandwidth). The computation follows the authors' reference implementation
(the ``relplot`` package, ``relplot.smECE``): samples deposited linearly on a grid of
``max(2000, 20/σ) // 2 + 1`` nodes, convolved with the reflected kernel, evaluated on ``max(200, 10/σ)`` points
with ``10⁻⁴`` added to the density, and ``σ*`` found by bisection on [0, 1] (10 halvings, tolerance 0.001).

**Pooling.** smECE is not a sum over voxels. segcal computes it from the fine histogram of the kept channel
(``K`` bins of count, Σp, Σy; :func:`segcal.functional.binning.bin_statistics`): each non-empty fine bin is one
weighted point at its mean probability ``Σp / n`` with weight ``n`` and residual sum ``Σp − Σy``. Per image and
pooled (summed fine histograms), the value therefore merges exactly over any split of a dataset. The density
term is deposited exactly (linear deposit is linear in the position); the residual term moves each voxel's
residual to its fine bin's mean, at most one fine-bin width ``1/K``. No closed-form bound is stated: the
difference to ``relplot.smECE`` on the voxels is tested (random and adversarial inputs) and shrinks with ``K``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.signal import fftconvolve

from segcal.functional.binning import BinStats

__all__ = ["smooth_calibration_error", "smooth_ece_points"]


def _deposit(x: np.ndarray, w: np.ndarray, nodes: int) -> np.ndarray:
    values = np.zeros(nodes)
    idx = (x * (nodes - 1)).astype(int).clip(0, nodes - 2)
    frac = x * (nodes - 1) - idx
    np.add.at(values, idx, (1 - frac) * w)
    np.add.at(values, idx + 1, frac * w)
    return values


def _smooth(x: np.ndarray, w: np.ndarray, t: np.ndarray, sigma: float) -> np.ndarray:
    """Reflected-Gaussian smoothing of the weights ``w`` at ``x``, evaluated at ``t`` (linear interpolation)."""
    nodes = max(2000, round(20 / sigma)) // 2 + 1
    values = _deposit(x, w, nodes)
    g = np.linspace(0, 1, nodes)
    ker = np.exp(-((g - 0.5) ** 2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    ext = np.concatenate([np.flip(values)[:-1], values, np.flip(values)[1:]])
    smoothed = fftconvolve(ext, ker, mode="valid")[nodes // 2 : nodes // 2 + nodes]
    inds = (t * (nodes - 1)).astype(int).clip(0, nodes - 2)
    res = (t - inds / (nodes - 1)) * (nodes - 1)
    return smoothed[inds] * (1 - res) + smoothed[inds + 1] * res


def _smece_sigma(x: np.ndarray, n: np.ndarray, resid: np.ndarray, sigma: float) -> float:
    t = np.linspace(0, 1, max(round(10 / sigma), 200))
    dens = _smooth(x, n, t, sigma) + 1e-4
    rs = _smooth(x, resid, t, sigma) / dens
    return float(np.sum(np.abs(rs) * dens) / np.sum(dens))


def smooth_ece_points(x: np.ndarray, n: np.ndarray, resid: np.ndarray, eps: float = 0.001) -> tuple[float, float]:
    """``(smECE, σ*)`` of weighted points: positions ``x`` in [0, 1], weights ``n`` (voxel counts) and residual
    sums ``resid`` (``Σ(p − y)`` of each point's voxels); NaN without any weight."""
    keep = n > 0
    x, n, resid = np.clip(x[keep], 0.0, 1.0), n[keep], resid[keep]
    if not keep.any():
        return float("nan"), float("nan")

    def ok(alpha: float) -> bool:
        return alpha < eps or alpha < _smece_sigma(x, n, resid, alpha)

    if ok(1.0):
        sigma = 1.0
    else:
        hi, lo = 1.0, 0.0
        for _ in range(10):
            mid = (hi + lo) / 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        sigma = hi
    return _smece_sigma(x, n, resid, sigma), sigma


def smooth_calibration_error(fine: BinStats) -> torch.Tensor:
    """Smooth ECE per image and channel ``(B, C)`` float64 from fine bin sums ``(B, C, K)`` (module docstring);
    ``fine.pooled()`` gives the dataset-level value. A channel without voxels gives NaN."""
    count, sp, sy = (x.detach().cpu().to(torch.float64).numpy() for x in (fine.count, fine.sum_p, fine.sum_y))
    b, c, _ = count.shape
    out = np.full((b, c), np.nan)
    for i in range(b):
        for j in range(c):
            n = count[i, j]
            x = np.where(n > 0, sp[i, j] / np.maximum(n, 1), 0.0)
            out[i, j] = smooth_ece_points(x, n, sp[i, j] - sy[i, j])[0]
    return torch.from_numpy(out)
