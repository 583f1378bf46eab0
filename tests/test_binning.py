"""Unit tests of the binning core: bins ``(k/M, (k+1)/M]`` and ties at k/M, kernel paths, BinStats, loss sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcal.functional import _kernels
from segcal.functional.binning import (
    BinStats,
    _bin_statistics_torch,
    bin_edges,
    bin_index,
    bin_statistics,
    hard_bin_sums,
    soft_bin_sums,
)


def _near_edges(m: int, dtype: torch.dtype) -> torch.Tensor:
    """Every edge k/M rounded in ``dtype`` and its two floating-point neighbours, clipped to [0, 1]."""
    e = bin_edges(m, dtype)
    up = torch.nextafter(e, torch.ones_like(e) * 2)
    down = torch.nextafter(e, -torch.ones_like(e))
    return torch.cat([e, up, down]).clamp(0, 1)


def _reference_bin(v: torch.Tensor, m: int, closed: str) -> torch.Tensor:
    """Exact reference: count the edges strictly below (right-closed) or at/below (left-closed) v."""
    e = bin_edges(m, v.dtype)[1:-1]
    if closed == "right":
        k = (v[:, None] > e[None, :]).sum(1)
    else:
        k = (v[:, None] >= e[None, :]).sum(1)
    return k


@pytest.mark.parametrize("closed", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 10, 20, 33, 100])
def test_bin_index_at_and_around_edges(m, dtype, closed):
    v = _near_edges(m, dtype)
    assert torch.equal(bin_index(v, m, closed), _reference_bin(v, m, closed))


@pytest.mark.parametrize("closed", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 7, 10, 20, 33, 100])
def test_kernel_bins_agree_with_bin_index(m, dtype, closed):
    """The numba kernel's guess-and-correct binning equals bucketize at every edge neighbour."""
    v = _near_edges(m, dtype)
    v = torch.cat([v, torch.rand(2000, generator=torch.Generator().manual_seed(m)).to(dtype)])
    p = v.view(1, 1, 1, -1)
    y = torch.zeros(1, 1, v.numel(), dtype=torch.int64)
    stats = bin_statistics(p, y, m, mode="exclusive", closed=closed)
    expected = torch.bincount(bin_index(v, m, closed), minlength=m).double()
    assert torch.equal(stats.count[0, 0], expected)
    t = _bin_statistics_torch(p, y, None, torch.arange(1), None, m, closed)
    assert torch.equal(t[0, 0, 0], expected)


def test_convention_endpoints():
    """p = 0 → bin 0, p = 1 → bin M-1, ties k/M go below when closed right and above when closed left."""
    m = 4
    v = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.1, 0.3], dtype=torch.float64)
    assert bin_index(v, m, "right").tolist() == [0, 0, 1, 2, 3, 0, 1]
    assert bin_index(v, m, "left").tolist() == [0, 1, 2, 3, 3, 0, 1]
    with pytest.raises(ValueError, match="closed must be 'right' or 'left'"):
        bin_index(v, m, "middle")


def test_bin_edges_are_correctly_rounded():
    for m in (3, 7, 10, 20):
        e = bin_edges(m, torch.float32)
        exact = [k / m for k in range(m + 1)]  # Python float64, then rounded once to float32
        assert torch.equal(e, torch.tensor(exact, dtype=torch.float32))


def test_sums_are_float64_of_the_input_values():
    """Half-precision inputs: sum_p is the float64 sum of the half values (no intermediate rounding)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        p1 = torch.rand(1, 1, 50, 40, generator=g).to(dtype)
        p = torch.cat([1 - p1, p1], 1)
        lab = torch.randint(0, 2, (1, 50, 40), generator=g)
        stats = bin_statistics(p, lab, 10, check=False)
        k = bin_index(p, 10).flatten(2)
        ref = torch.zeros(1, 2, 10, dtype=torch.float64).scatter_add_(2, k, p.double().flatten(2))
        assert torch.allclose(stats.sum_p, ref, rtol=1e-14, atol=1e-12)


def test_target_layouts_agree():
    """Label map (B, *S), (B, 1, *S) int or float, one-hot float/bool/uint8 all give the same sums."""
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, 3, 6, 7, 5, generator=g), 1)
    lab = torch.randint(0, 3, (2, 6, 7, 5), generator=g)
    onehot = torch.nn.functional.one_hot(lab, 3).movedim(-1, 1)
    ref = bin_statistics(p, lab, 12)
    for y in (
        lab[:, None],
        lab[:, None].float(),
        lab.to(torch.uint8),
        onehot.float(),
        onehot.bool(),
        onehot.to(torch.uint8),
    ):
        s = bin_statistics(p, y, 12)
        assert torch.equal(s.count, ref.count) and torch.equal(s.sum_y, ref.sum_y)
        assert torch.allclose(s.sum_p, ref.sum_p, rtol=1e-12)
    # 2D label map whose height equals the number of classes is still read as a label map
    p2 = torch.softmax(torch.randn(1, 3, 3, 8, generator=g), 1)
    lab2 = torch.randint(0, 3, (1, 3, 8), generator=g)
    s2 = bin_statistics(p2, lab2, 5)
    assert float(s2.count.sum()) == 3 * 24 and float(s2.sum_y.sum()) == 24


def test_activation_and_background():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 4, (2, 9, 8), generator=g)
    a = bin_statistics(z, lab, 10, activation="softmax")
    b = bin_statistics(torch.softmax(z, 1), lab, 10)
    assert torch.equal(a.count, b.count) and torch.allclose(a.sum_p, b.sum_p)
    nb = bin_statistics(torch.softmax(z, 1), lab, 10, include_background=False)
    assert nb.num_channels == 3
    assert torch.equal(nb.count, b.count[:, 1:]) and torch.equal(nb.sum_y, b.sum_y[:, 1:])
    s = bin_statistics(
        z, (torch.rand(2, 4, 9, 8, generator=g) > 0.5).float(), 10, activation="sigmoid", mode="multilabel"
    )
    assert s.num_channels == 4 and float(s.count.sum()) == 2 * 4 * 72


def test_masks_layouts_and_empty_mask():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(2, 3, 8, 8, generator=g), 1)
    lab = torch.randint(0, 3, (2, 8, 8), generator=g)
    mask = torch.rand(2, 8, 8, generator=g) > 0.5
    a = bin_statistics(p, lab, 10, mask=mask)
    for mk in (mask[:, None], mask.float(), mask.to(torch.uint8)):
        b = bin_statistics(p, lab, 10, mask=mk)
        assert torch.equal(a.count, b.count) and torch.allclose(a.sum_p, b.sum_p)
    assert torch.equal(a.count.sum(-1), mask.sum((1, 2)).double()[:, None].expand(2, 3))
    empty = bin_statistics(p, lab, 10, mask=torch.zeros(2, 8, 8, dtype=torch.bool))
    assert float(empty.count.sum()) == 0
    from segcal.functional.calibration import calibration_errors

    assert all(torch.isnan(v).all() for v in calibration_errors(empty).values())


def test_binstats_helpers_roundtrip():
    g = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(3, 2, 5, 5, generator=g), 1)
    lab = torch.randint(0, 2, (3, 5, 5), generator=g)
    s = bin_statistics(p, lab, 7)
    r = BinStats.from_numpy(s.numpy())
    assert torch.equal(r.count, s.count) and torch.equal(r.sum_p, s.sum_p) and torch.equal(r.sum_y, s.sum_y)
    assert s.num_bins == 7 and s.num_channels == 2
    assert torch.isnan(s.mean_p()[s.count == 0]).all() and not torch.isnan(s.mean_p()[s.count > 0]).any()
    pooled = s.pooled()
    assert pooled.count.shape == (1, 2, 7) and torch.equal(pooled.count, s.count.sum(0, keepdim=True))
    assert torch.equal(BinStats.cat([s, s]).count, torch.cat([s.count, s.count]))
    assert torch.equal((s + s).count, 2 * s.count)


def test_hard_bin_sums_match_and_have_gradient():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(z, 1)
    lab = torch.randint(0, 3, (2, 6, 6), generator=g)
    y = torch.nn.functional.one_hot(lab, 3).movedim(-1, 1).double()
    count, sp, sy = hard_bin_sums(p, y, 10)
    ref = bin_statistics(p.detach(), lab, 10)
    assert torch.equal(count, ref.count) and torch.allclose(sp, ref.sum_p) and torch.equal(sy, ref.sum_y)
    sp.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    # the requires_grad path of bin_statistics falls back to the torch kernel, same values
    s = bin_statistics(p, lab, 10)
    assert torch.equal(s.count, ref.count)


def test_soft_bin_sums_triangular_kernel():
    """Each voxel's weights sum to one and the weighted mean position is p (interior), gradcheck passes."""
    m = 5
    p = torch.tensor([0.05, 0.1, 0.3, 0.52, 0.9, 0.99], dtype=torch.float64).view(1, 1, 2, 3)
    y = torch.ones_like(p)
    w, _, swy = soft_bin_sums(p, y, m)
    assert float(w.sum()) == pytest.approx(6.0)
    assert torch.allclose(swy, w)
    # centres 0.1, 0.3, ..., 0.9: 0.3 is the centre of bin 1; 0.52 is 0.02 above centre 0.5 → 0.9 / 0.1
    w1, _, _ = soft_bin_sums(
        torch.tensor([0.3], dtype=torch.float64).view(1, 1, 1, 1), torch.ones(1, 1, 1, 1), m
    )
    assert w1.flatten().tolist() == pytest.approx([0, 1, 0, 0, 0])
    w2, _, _ = soft_bin_sums(
        torch.tensor([0.52], dtype=torch.float64).view(1, 1, 1, 1), torch.ones(1, 1, 1, 1), m
    )
    assert w2.flatten().tolist() == pytest.approx([0, 0, 0.9, 0.1, 0])
    q = torch.tensor([0.12, 0.33, 0.61, 0.77], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: soft_bin_sums(t.view(1, 1, 2, 2), y[..., :2, :2], m)[1], (q,))


def test_chunk_boundaries_in_kernel():
    """Rows longer than one kernel chunk (and not a multiple of it) are summed completely."""
    n = (1 << 16) * 2 + 12345
    g = torch.Generator().manual_seed(6)
    p1 = torch.rand(1, 1, 1, n, generator=g, dtype=torch.float64)
    p = torch.cat([1 - p1, p1], 1)
    lab = torch.randint(0, 2, (1, 1, n), generator=g)
    mask = torch.rand(1, 1, n, generator=g) > 0.1
    s = bin_statistics(p, lab, 20, mask=mask)
    t = _bin_statistics_torch(p, lab, None, torch.arange(2), mask, 20, "right")
    assert torch.equal(s.count, t[:, :, 0]) and float(s.count[0, 0].sum()) == float(mask.sum())
    assert torch.allclose(s.sum_p, t[:, :, 1], rtol=1e-12) and torch.equal(s.sum_y, t[:, :, 2])
    assert np.isclose(float(s.sum_p.sum()), float((p * mask[:, None]).sum()), rtol=1e-12)


@pytest.mark.parametrize("closed", ["right", "left"])
def test_top_label_fused_kernel_matches_torch_path(closed):
    """Label-map top-label statistics (fused numba kernel) equal the one-hot path (torch max + gather)."""
    from segcal.functional.calibration import top_label_statistics

    g = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.float64):
        p = torch.softmax(torch.randn(2, 4, 9, 7, 5, generator=g) * 2, 1).to(dtype)
        p[:, :, 0] = torch.tensor([0.25, 0.25, 0.5, 0.0], dtype=dtype).view(1, 4, 1, 1)  # ties at k/M
        p[:, :, 1] = torch.tensor([0.4, 0.4, 0.1, 0.1], dtype=dtype).view(1, 4, 1, 1)  # argmax tie: first
        lab = torch.randint(0, 4, (2, 9, 7, 5), generator=g)
        onehot = torch.nn.functional.one_hot(lab, 4).movedim(-1, 1)
        mask = torch.rand(2, 9, 7, 5, generator=g) > 0.2
        for mk in (None, mask):
            a = top_label_statistics(p, lab, 10, mask=mk, closed=closed)
            b = top_label_statistics(p, onehot, 10, mask=mk, closed=closed)
            assert torch.equal(a.count, b.count) and torch.equal(a.sum_y, b.sum_y)
            assert torch.allclose(a.sum_p, b.sum_p, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kernel_validation_and_saturated_inputs(dtype):
    """The fused label-map kernel: saturated (exact 0 / 1) probabilities and every lane / chunk tail bin like
    the torch path; tiny excursions outside [0, 1] within tolerance are clamped, real problems (NaN in a channel
    that is not binned, values out of range, sums off 1) raise the precise error."""
    g = torch.Generator().manual_seed(11)
    n = (1 << 16) + 7  # one full chunk plus a tail that is not a multiple of the lane count
    p = torch.softmax(torch.randn(2, 3, 1, n, generator=g, dtype=torch.float64) * 40, 1).to(dtype)
    p[:, :, 0, :9] = torch.tensor([1.0, 0.0, 0.0], dtype=dtype).view(1, 3, 1)  # exact 0 and 1
    lab = torch.randint(0, 3, (2, 1, n), generator=g)
    for include_background in (True, False):
        s = bin_statistics(p, lab, 20, include_background=include_background)
        first = 0 if include_background else 1
        t = _bin_statistics_torch(p[:, first:], lab, None, torch.arange(first, 3), None, 20, "right")
        assert torch.equal(s.count, t[:, :, 0]) and torch.equal(s.sum_y, t[:, :, 2])
        # float64: float64 sums; float32: fixed-point sums, within 2**-31 per voxel (see _kernels._hist_voxels)
        res = 2.0**-31 if dtype == torch.float32 else 0.0
        assert bool(((s.sum_p - t[:, :, 1]).abs() <= 1e-12 * t[:, :, 1] + res * t[:, :, 0]).all())
    q = p.clone()
    q[0, 1, 0, 5] = -1e-7  # within tolerance: accepted and clamped to 0
    q[0, 0, 0, 5] += 1e-7
    s = bin_statistics(q, lab, 20)
    assert float(s.count[0, 1, 0]) == float(bin_statistics(p, lab, 20).count[0, 1, 0])
    bad = p.clone()
    bad[1, 0, 0, 3] = float("nan")  # background channel, not binned with include_background=False
    with pytest.raises(ValueError, match="NaN"):
        bin_statistics(bad, lab, 20, include_background=False)
    bad = p.clone()
    bad[0, 2, 0, n - 1] = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bin_statistics(bad, lab, 20)
    bad = p.clone()
    bad[1, :, 0, 0] = 0.2
    with pytest.raises(ValueError, match="sum to 1"):
        bin_statistics(bad, lab, 20)


def test_float32_fixed_point_sums_are_bounded_exact_and_order_free():
    """The float32 label-map kernel sums ``round(p * 2**30)`` as integers: every bin's sum of probabilities is
    within ``count * 2**-31`` of the exact sum (adversarial values: rounding ties, tiny and saturated values),
    counts are exact even when a whole chunk saturates one bin, and the result is bitwise the same for any
    order of the voxels and any number of threads."""
    g = torch.Generator().manual_seed(12)
    n = 3 * (1 << 16) + 11
    p1 = torch.rand(n, generator=g, dtype=torch.float64)
    special = torch.tensor([0.0, 1.0, 1e-20, 2.0**-31, 3 * 2.0**-31, 2.0**-30, 0.5 + 2.0**-24, 1 - 2.0**-24])
    p1[: 8 * 1000] = special.repeat(1000)
    p1[-(1 << 16) :] = 1.0  # a whole chunk saturates the top bin
    p1 = p1.to(torch.float32)
    p = torch.stack([1 - p1, p1]).reshape(1, 2, 1, n)
    lab = torch.randint(0, 2, (1, 1, n), generator=g)
    s = bin_statistics(p, lab, 20)
    exact = _bin_statistics_torch(p.double(), lab, None, torch.arange(2), None, 20, "right")
    assert torch.equal(s.count, exact[:, :, 0]) and torch.equal(s.sum_y, exact[:, :, 2])
    err = (s.sum_p - exact[:, :, 1]).abs()
    assert bool((err <= s.count * 2.0**-31 + 1e-12 * exact[:, :, 1]).all())
    assert float(err.max()) > 0  # not a float path in disguise: some rounding happened
    perm = torch.randperm(n, generator=g)
    s_perm = bin_statistics(p[..., perm], lab[..., perm], 20)
    assert torch.equal(s.sum_p, s_perm.sum_p) and torch.equal(s.count, s_perm.count)
    before = _kernels.numba.get_num_threads()
    _kernels.set_threads(1)
    try:
        s_one = bin_statistics(p, lab, 20)
    finally:
        _kernels.set_threads(before)
    assert torch.equal(s.sum_p, s_one.sum_p)


def test_divided_edges_equal_tabulated_edges():
    """The precondition of the table-free bin of the label-map kernel: ``float32(j) / float32(M)`` (one
    correctly rounded division) equals ``bin_edges`` (k / M rounded in float64, then float32) for every j and
    every M up to 5,000 (checked offline up to 200,000); float64 trivially."""
    assert all(_kernels.voxel_kernel_ok(m, np.dtype(np.float32)) for m in range(1, 5001))
    assert all(_kernels.voxel_kernel_ok(m, np.dtype(np.float64)) for m in (1, 3, 7, 10, 20, 100, 999))
    for m in (1, 7, 20, 1000):
        e = bin_edges(m, torch.float32).numpy()
        j = np.arange(m + 1)
        assert np.array_equal(j.astype(np.float32) / np.float32(m), e)


def test_table_fallback_when_divided_edges_differ(monkeypatch):
    """Where the precondition fails (never seen for M <= 200,000, but checked per call) the label-map path
    falls back to the table kernel with the torch checks: same statistics, same errors."""
    g = torch.Generator().manual_seed(13)
    p = torch.softmax(torch.randn(2, 3, 9, 8, 7, generator=g) * 3, 1)
    lab = torch.randint(0, 3, (2, 9, 8, 7), generator=g)
    mask = torch.rand(2, 9, 8, 7, generator=g) > 0.3
    fast = [bin_statistics(p, lab, 20, mask=mk, include_background=bg) for mk in (None, mask) for bg in (1, 0)]
    monkeypatch.setattr(_kernels, "voxel_kernel_ok", lambda m, dtype: False)
    slow = [bin_statistics(p, lab, 20, mask=mk, include_background=bg) for mk in (None, mask) for bg in (1, 0)]
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a.count, b.count) and torch.equal(a.sum_y, b.sum_y)
        assert bool(((a.sum_p - b.sum_p).abs() <= a.count * 2.0**-31 + 1e-12).all())
    bad = p.clone()
    bad[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        bin_statistics(bad, lab, 20)
