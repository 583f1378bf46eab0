"""Per-bin sums of many values into few bins, without atomic contention on a GPU.

Every histogram of segcal (the bins of the metrics, the hard / soft bins of the calibration losses) adds
millions of values into a few dozen bins. On a GPU, ``scatter_add`` / ``bincount`` do this with atomic
additions, and with so few destinations thousands of threads wait on the same addresses: the profile of the
hard mL1-ACE loss on an H200 spent 94 % of its time in ``scatter_add`` (``benchmarks/check_cuda.py
--profile``). :func:`spread_bin_sum` gives each of ``G`` interleaved groups of positions its own copy of the
bins (``G x M`` destinations instead of ``M``), then adds the copies: the same sums (up to the order of the
floating-point additions), differentiable like ``scatter_add``, and on the CPU the plain ``scatter_add``.
"""

from __future__ import annotations

import torch

__all__ = ["contended_atomics", "spread_bin_sum"]

#: copies of the bins on a GPU; the position ``n`` adds into copy ``n % SPREAD``
SPREAD = 512


def contended_atomics(device: torch.device) -> bool:
    """Whether few-bin ``scatter_add`` / ``bincount`` on ``device`` contend on atomics (a CUDA GPU), so the
    per-bin sums take :func:`spread_bin_sum`'s spread copies."""
    return device.type == "cuda"


def spread_bin_sum(
    index: torch.Tensor, values: torch.Tensor, num_bins: int, spread: bool | None = None
) -> torch.Tensor:
    """``out[r, k] = Σ_n values[r, n] · [index[r, n] == k]``, differentiable in ``values``.

    Args:
        index: bin index ``(R, N)`` or ``(1, N)`` (shared by every row) int64 in ``[0, num_bins)``.
        values: ``(R, N)`` floating values (the gradient flows to them).
        num_bins: ``M``, the number of bins.
        spread: use the spread copies (default: on a CUDA device only; ``True`` tests that path on the CPU).

    Returns:
        ``(R, M)`` sums in ``values``' dtype. Off the GPU this is ``scatter_add``; on a GPU the positions are
        spread over :data:`SPREAD` copies of the bins first (see the module docstring).
    """
    r, n = values.shape
    if index.shape[0] == 1 and r > 1:
        index = index.expand(r, n)
    out = values.new_zeros(r, num_bins)
    if spread is None:
        spread = contended_atomics(index.device)
    if not spread or n < 2 * SPREAD:
        return out.scatter_add(1, index, values)
    body = n - n % SPREAD
    copies = torch.arange(SPREAD, device=index.device) * num_bins
    first = index[:1] if index.stride(0) == 0 else index  # a shared index is spread once
    spread_index = (first[:, :body].reshape(first.shape[0], -1, SPREAD) + copies).reshape(first.shape[0], body)
    spread_index = spread_index.expand(r, body)
    spread_sums = values.new_zeros(r, SPREAD * num_bins).scatter_add(1, spread_index, values[:, :body])
    out = spread_sums.view(r, SPREAD, num_bins).sum(1)
    if body < n:
        out = out.scatter_add(1, index[:, body:], values[:, body:])
    return out
