"""The GPU form of the per-bin sums (``segcal.functional._scatter.spread_bin_sum``) equals ``scatter_add``, and
the torch paths of the binning core (the CUDA code) give the numba results with it, run here on the CPU."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segcal.functional import binning
from segcal.functional._scatter import SPREAD, spread_bin_sum


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5 * SPREAD + 7),
    rows=st.integers(1, 3),
    bins=st.integers(1, 30),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_spread_bin_sum_equals_scatter_add(n: int, rows: int, bins: int, shared: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, bins, (1 if shared else rows, n), generator=g)
    values = torch.rand(rows, n, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(rows, bins, dtype=torch.float64).scatter_add(1, index.expand(rows, n), values)
    weights = torch.rand(rows, bins, generator=g, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), values)
    for spread in (False, True):
        out = spread_bin_sum(index, values, bins, spread=spread)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad((out * weights).sum(), values)
        assert torch.equal(grad, g_ref)  # the gradient of a sum is the weight of its bin, whatever the order


@pytest.fixture
def spread_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The binning core's torch paths take the spread copies on the CPU too (as they do on a GPU)."""
    monkeypatch.setattr(binning, "spread_bin_sum", functools.partial(spread_bin_sum, spread=True))
    monkeypatch.setattr(binning, "contended_atomics", lambda device: True)


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(2, 4, 17, 13, 9, generator=g, dtype=torch.float64), 1)
    probs[0, :, 0, 0, :] = torch.tensor([0.0, 0.25, 0.25, 0.5], dtype=torch.float64)[:, None]  # on bin edges
    return probs, torch.randint(0, 4, (2, 17, 13, 9), generator=g)


@pytest.mark.usefixtures("spread_everywhere")
def test_bin_statistics_torch_path_equals_numba() -> None:
    probs, lab = _case()
    ref = binning.bin_statistics(probs, lab, 20)  # numba
    out = binning._bin_statistics_torch(probs, lab.long(), None, torch.arange(4), None, 20, "right")
    torch.testing.assert_close(out, torch.stack([ref.count, ref.sum_p, ref.sum_y], 2), rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("spread_everywhere")
def test_hard_and_soft_loss_sums_torch_paths_equal_numba() -> None:
    probs, lab = _case(1)
    y = torch.nn.functional.one_hot(lab, 4).movedim(-1, 1).to(torch.float64)
    p, yr = probs.reshape(2, 4, -1), y.reshape(2, 4, -1)
    w = torch.rand(3, 2, 4, 20, dtype=torch.float64)
    results = []
    for run in (
        lambda a: binning._HardBinSums.apply(a, yr, 20, "right", True),
        lambda a: binning._HardBinSums.apply(a, yr, 20, "right", False),
        lambda a: binning.soft_bin_sums(a, yr, 20),
        lambda a: binning._soft_bin_sums_torch(a, yr, 20),
    ):
        a = p.clone().requires_grad_(True)
        sums = run(a)
        (grad,) = torch.autograd.grad(sum((s * wk).sum() for s, wk in zip(sums, w, strict=True)), a)
        results.append((torch.stack(sums), grad))
    for (numba_sums, numba_grad), (torch_sums, torch_grad) in (results[:2], results[2:]):
        torch.testing.assert_close(torch_sums, numba_sums, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(torch_grad, numba_grad, rtol=1e-10, atol=1e-10)
