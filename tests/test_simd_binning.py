"""The AVX2 voxel kernel (``segcal.functional._simd.hist_voxels``) against the portable
numba kernel (``_kernels._hist_voxels``): the same counts and fixed-point sums, bit for bit, on adversarial
inputs (every bin edge and its float32 neighbours, 0, 1, -0.0, saturated rows that stress the 32-bit lane
sums, masks, uint8 and int64 labels outside the channels, rows that are not a multiple of 8 or of a block), and
the same flags on invalid inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcal.functional import _kernels, _simd
from segcal.functional._simd import avx2_available
from segcal.functional.binning import bin_statistics

pytestmark = pytest.mark.skipif(not avx2_available(), reason="the AVX2 kernel needs an AVX2 CPU")


def _edge_values(m: int) -> np.ndarray:
    """Every float32 edge k/M, its two neighbours, 0, 1 and the float32 just below the dominant thresholds."""
    k = np.arange(m + 1, dtype=np.float32)
    edges = k / np.float32(m)
    vals = np.concatenate([edges, np.nextafter(edges, np.float32(-1)), np.nextafter(edges, np.float32(2))])
    return np.clip(vals, 0, 1).astype(np.float32)


def _case(rng: np.random.Generator, c: int, s: int, m: int, lab_dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """``(1, C, S)`` float32 with softmax rows, some voxels replaced by edge values (channel sums then off 1, so
    callers validate such cases with a loose threshold), and a ``(1, S)`` label map with a few labels outside
    the channels (``C``; for int64 also -1, 255, 256 + 1, 2**32 + 1 and -2**63, which must not match a channel)."""
    logits = rng.normal(size=(1, c, s)) * 3.0
    logits[0, 0] += 2.0
    p = np.exp(logits)
    p = (p / p.sum(1, keepdims=True)).astype(np.float32)
    edges = _edge_values(m)
    sel = rng.random((1, c, s)) < 0.15
    p[sel] = rng.choice(edges, size=int(sel.sum()))
    lab = rng.integers(0, c, size=(1, s)).astype(lab_dtype)
    lab[0, rng.random(s) < 0.02] = c
    if lab_dtype == np.int64:  # narrowed to uint8 per block by the AVX2 kernel: none of these may match a channel
        for outside in (-1, 255, 256 + 1, 2**32 + 1, -(2**63)):
            lab[0, rng.random(s) < 0.01] = outside
    return p, lab


def _run(p, lab, first, mask, m, right, validate, simd, labels_max=None):
    b, c, s = p.shape
    chunk = _kernels.task_chunk(s, b)
    vstats = np.zeros(b * ((s + chunk - 1) // chunk))
    out = np.zeros((b, c - first, 3, m))
    use_mask = mask is not None
    mask_np = mask if use_mask else np.zeros((1, 1), np.uint8)
    thr = 10.0 if not validate else 1e-3 * c
    thr = min(thr, 6.0)
    if simd:
        t0, t1, per_call = _simd.thresholds(m, right)
        _simd.hist_voxels(p, lab, first, mask_np, use_mask, right, validate, thr, chunk, t0, t1, per_call,
                          _simd.COMPACTION_TABLE, out, vstats,
                          np.zeros(vstats.shape, np.int64) if labels_max is None else labels_max)
    else:
        _kernels._hist_voxels(p, lab, first, mask_np, use_mask, right, validate, thr, False, chunk, out, vstats)
    return out, vstats


@pytest.mark.parametrize("m", [1, 2, 3, 7, 20, 257])
@pytest.mark.parametrize("right", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_simd_kernel_equals_portable_kernel(m: int, right: bool, masked: bool) -> None:
    rng = np.random.default_rng(m * 4 + 2 * right + masked)
    s = 8192 * 2 + 8 * 37 + 5  # two whole blocks, a partial one, a tail of 5
    p, lab = _case(rng, 3, s, m, np.uint8)
    mask = (rng.random((1, s)) < 0.7).astype(np.uint8) if masked else None
    for first in (0, 1):
        for validate in (False, True):
            new, new_flags = _run(p, lab, first, mask, m, right, validate, simd=True)
            old, old_flags = _run(p, lab, first, mask, m, right, validate, simd=False)
            assert np.array_equal(new, old), (first, validate)
            assert (new_flags.sum() > 0) == (old_flags.sum() > 0)


@pytest.mark.parametrize("lab_dtype", [np.uint8, np.int64])
def test_simd_kernel_label_dtypes(lab_dtype: type) -> None:
    rng = np.random.default_rng(7)
    p, lab = _case(rng, 4, 3001, 20, lab_dtype)
    for right in (True, False):
        new, _ = _run(p, lab, 0, None, 20, right, False, simd=True)
        old, _ = _run(p, lab, 0, None, 20, right, False, simd=False)
        assert np.array_equal(new, old)
    no_mask = np.zeros((1, 1), np.uint8)
    assert _simd.applies(p, lab, no_mask) == _simd.ENABLED
    assert not _simd.applies(p, lab.astype(np.int32), no_mask)  # portable kernel
    many = np.zeros((1, 256, 8), np.float32)  # int64 labels narrow to uint8 only below 256 channels
    assert _simd.applies(many, np.zeros((1, 8), np.uint8), no_mask) == _simd.ENABLED
    assert not _simd.applies(many, np.zeros((1, 8), np.int64), no_mask)
    # the labels outside the channels are nobody's hit
    assert new[:, :, 2].sum() == np.isin(lab, np.arange(4)).sum()


@pytest.mark.parametrize("m", [1, 2, 20])
def test_simd_lane_sums_do_not_wrap(m: int) -> None:
    """Long rows of the largest bin-0 value (every voxel a miss) and of the smallest bin-(M-1) value (every
    voxel a hit): the 32-bit lane sums would wrap without the per-call group limit."""
    s = 8192 * 3
    for right in (True, False):
        t0, t1, _ = _simd.thresholds(m, right)
        below = np.nextafter(t0, np.float32(-1))
        p = np.empty((1, 2, s), np.float32)
        p[0, 0] = below
        p[0, 1] = t1
        lab = np.ones((1, s), np.uint8)
        new, _ = _run(p, lab, 0, None, m, right, False, simd=True)
        old, _ = _run(p, lab, 0, None, m, right, False, simd=False)
        assert np.array_equal(new, old)
        assert new[0, 0, 0].sum() == s and new[0, 1, 0].sum() == s


@pytest.mark.parametrize("bad", [np.nan, 1.5, -0.1, np.inf, -np.inf])
def test_simd_kernel_flags_and_clamps_invalid_values(bad: float) -> None:
    rng = np.random.default_rng(3)
    p, lab = _case(rng, 3, 1000, 20, np.uint8)
    p[0, :] = p[0, :] / p[0, :].sum(0, keepdims=True)
    for where in (17, 1000 - 3):  # in a group / in the tail
        q = p.copy()
        q[0, 1, where] = bad
        new, new_flags = _run(q, lab, 0, None, 20, True, True, simd=True)
        assert new_flags.sum() > 0
        # without validation, values are clamped into [0, 1] (NaN -> 0) as in the portable kernel
        new, _ = _run(q, lab, 0, None, 20, True, False, simd=True)
        old, _ = _run(q, lab, 0, None, 20, True, False, simd=False)
        assert np.array_equal(new, old)


def test_bin_statistics_same_with_and_without_simd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the public function: validated float32 softmax with a bool mask and ``-0.0`` values (flagged by
    the AVX2 pass, cleared by the precise checks, binned as 0)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 4, 33, 41, 9, generator=g) * 4, 1)
    probs[0, 0, 0, 0, :3] += probs[0, 1, 0, 0, :3]  # channel 1's share moved to channel 0
    probs[0, 1, 0, 0, :3] = -0.0
    labels = torch.randint(0, 4, (2, 33, 41, 9), generator=g)
    mask = torch.rand(2, 33, 41, 9, generator=g) < 0.8
    for kwargs in ({}, {"mask": mask}, {"closed": "left"}):
        monkeypatch.setattr(_simd, "ENABLED", True)
        new = bin_statistics(probs, labels, 15, **kwargs)
        monkeypatch.setattr(_simd, "ENABLED", False)
        old = bin_statistics(probs, labels, 15, **kwargs)
        for a, b in zip((new.count, new.sum_p, new.sum_y), (old.count, old.sum_p, old.sum_y), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError):
        bad = probs.clone()
        bad[1, 2, 3, 4, 5] = 1.5
        monkeypatch.setattr(_simd, "ENABLED", True)
        bin_statistics(bad, labels, 15)


def test_avx2_follows_numba_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """A numba target other than the host (``NUMBA_CPU_NAME=generic``) gets the AVX2 kernel only when its features
    name AVX2: compiling AVX2 intrinsics for a target without it would fail."""
    from numba.core import config

    monkeypatch.setattr(config, "CPU_NAME", "generic")
    monkeypatch.setattr(config, "CPU_FEATURES", "")
    assert not avx2_available()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx,+avx2,+popcnt")
    assert avx2_available()
    monkeypatch.setattr(config, "CPU_NAME", None)
    monkeypatch.setattr(config, "CPU_FEATURES", None)
    assert avx2_available()  # this machine (the module is skipped without AVX2)



@pytest.mark.parametrize("lab_dtype", [np.uint8, np.int64])
def test_simd_kernel_reports_the_largest_label(lab_dtype: type) -> None:
    """With validation the kernel reports each task's largest label as narrowed, so that a label outside the
    channels anywhere (in a group, in the tail, outside the mask) gives a maximum >= C."""
    rng = np.random.default_rng(11)
    s = 8192 * 2 + 8 * 37 + 5
    p, _ = _case(rng, 3, s, 20, np.uint8)
    chunk = _kernels.task_chunk(s, 1)
    tasks = (s + chunk - 1) // chunk
    base = rng.integers(0, 3, size=(1, s)).astype(lab_dtype)
    mask = np.zeros((1, s), np.uint8)  # every voxel outside the mask: the labels are checked all the same
    outside = [3, 200, 254] + ([255, 256, 2**32 + 1, -1, -(2**63)] if lab_dtype == np.int64 else [255])
    for where in (17, s - 2):
        for value in outside:
            lab = base.copy()
            lab[0, where] = value
            for msk in (None, mask):
                labels_max = np.zeros(tasks, np.int64)
                _run(p, lab, 0, msk, 20, True, True, simd=True, labels_max=labels_max)
                expect = value if 0 <= value < 255 else 255
                assert labels_max.max() == expect and labels_max.max() >= 3, (where, value)
    labels_max = np.zeros(tasks, np.int64)
    _run(p, base, 1, None, 20, True, True, simd=True, labels_max=labels_max)
    assert labels_max.max() == base.max() < 3


@pytest.mark.parametrize("lab_dtype", [torch.uint8, torch.int64, torch.int32])
def test_bin_statistics_label_range_error_unchanged(lab_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The label range is checked in the kernel's pass on the AVX2 path and by ``check_label_range`` elsewhere:
    the same error either way, before the probabilities' own errors, and none with ``check=False``."""
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(2, 3, 17, 19, 11, generator=g) * 3, 1)
    labels = torch.randint(0, 3, (2, 17, 19, 11), generator=g).to(lab_dtype)
    values = [3, 7] + ([-1, 2**40] if lab_dtype == torch.int64 else [])
    for enabled in (True, False):
        monkeypatch.setattr(_simd, "ENABLED", enabled)
        bin_statistics(probs, labels, 10)  # valid: no error
        for value in values:
            for where in ((0, 0, 0, 0), (1, 16, 18, 10)):  # first and last voxel
                bad = labels.clone()
                bad[where] = value
                lo, hi = min(0, value), max(2, value)
                msg = rf"target: labels must lie in \[0, 2\] for 3 classes, found values in \[{lo}, {hi}\]"
                with pytest.raises(ValueError, match=msg):
                    bin_statistics(probs, bad, 10)
                with pytest.raises(ValueError, match=msg):  # the label error comes first
                    bin_statistics(probs * 1.5, bad, 10)
                with pytest.raises(ValueError, match=msg):  # outside the mask too
                    bin_statistics(probs, bad, 10, mask=torch.zeros(2, 17, 19, 11, dtype=torch.bool))
                bin_statistics(probs, bad, 10, check=False)  # unchecked: nobody's hit, no error
