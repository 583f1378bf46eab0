"""Property tests (hypothesis) of the mergeable bin sums and the calibration errors derived from them."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcal.functional.binning import BinStats, bin_statistics
from segcal.functional.calibration import calibration_error, calibration_errors, top_label_statistics

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _data(seed: int, b: int, c: int, spatial: tuple[int, ...], mode: str = "exclusive"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, *spatial, generator=g) * 2
    if mode == "exclusive":
        p = torch.softmax(logits, 1).double()
        y = torch.randint(0, c, (b, *spatial), generator=g)
    else:
        p = torch.sigmoid(logits).double()
        y = (torch.rand(b, c, *spatial, generator=g) < p).double()
    return p, y


def _assert_stats_equal(a: BinStats, b: BinStats) -> None:
    assert torch.equal(a.count, b.count)  # counts are exact
    assert torch.allclose(a.sum_p, b.sum_p, rtol=1e-12, atol=1e-10)
    assert torch.allclose(a.sum_y, b.sum_y, rtol=1e-12, atol=1e-10)


shapes = st.sampled_from([(7, 6), (5, 4, 3), (11, 9)])


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(2, 6),
    c=st.integers(2, 4),
    spatial=shapes,
    m=st.integers(1, 25),
    mode=st.sampled_from(["exclusive", "multilabel"]),
    data=st.data(),
)
def test_dataset_split_and_merge(seed, b, c, spatial, m, mode, data):
    """Any split of the images, merged by cat (per image) or by adding pooled sums, equals the whole."""
    p, y = _data(seed, b, c, spatial, mode)
    whole = bin_statistics(p, y, m, mode=mode)
    order = data.draw(st.permutations(range(b)))
    cuts = sorted(data.draw(st.sets(st.integers(1, b - 1), max_size=b - 1)))
    bounds = [0, *cuts, b]
    parts_idx = [order[i:j] for i, j in itertools.pairwise(bounds)]
    parts = [bin_statistics(p[idx], y[idx], m, mode=mode) for idx in parts_idx]
    inv = torch.argsort(torch.tensor([i for idx in parts_idx for i in idx]))
    merged = BinStats.cat(parts)
    merged = BinStats(merged.count[inv], merged.sum_p[inv], merged.sum_y[inv])
    _assert_stats_equal(merged, whole)
    pooled = parts[0].pooled()
    for part in parts[1:]:
        pooled = pooled + part.pooled()
    _assert_stats_equal(pooled, whole.pooled())
    for red in ("expected", "average", "maximum"):
        ref = calibration_error(whole.pooled(), red)
        assert torch.allclose(calibration_error(pooled, red), ref, atol=1e-12)
        macro_whole = calibration_error(whole, red).nanmean(0)
        macro_merged = calibration_error(merged, red).nanmean(0)
        assert torch.allclose(macro_merged, macro_whole, atol=1e-12, equal_nan=True)


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    c=st.integers(1, 4),
    spatial=shapes,
    m=st.integers(1, 25),
    frac=st.floats(0.0, 1.0),
    target_kind=st.sampled_from(["labels", "onehot", "soft"]),
    top_label=st.booleans(),
)
def test_voxel_split_by_masks_adds_up(seed, c, spatial, m, frac, target_kind, top_label):
    """Splitting one image's voxels into two complementary masks and adding the BinStats gives the whole."""
    if c == 1:
        target_kind = "onehot"
    p, lab = _data(seed, 1, c, spatial, "exclusive" if c > 1 else "multilabel")
    if target_kind == "labels":
        y = lab
    elif target_kind == "onehot":
        y = lab if c == 1 else torch.nn.functional.one_hot(lab, c).movedim(-1, 1).double()
    else:
        y = torch.rand(p.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    mode = "exclusive" if c > 1 else "multilabel"
    g = torch.Generator().manual_seed(seed + 2)
    mask = torch.rand(1, *spatial, generator=g) < frac
    fn = top_label_statistics if top_label else bin_statistics
    whole = fn(p, y, m, mode=mode)
    a = fn(p, y, m, mode=mode, mask=mask)
    b = fn(p, y, m, mode=mode, mask=~mask)
    _assert_stats_equal(a + b, whole)
    assert float(a.count.sum() + b.count.sum()) == float(whole.count.sum())


@SETTINGS
@given(seed=st.integers(0, 10_000), c=st.integers(2, 4), spatial=shapes, m=st.integers(1, 25))
def test_voxel_permutation_invariance(seed, c, spatial, m):
    p, lab = _data(seed, 2, c, spatial)
    perm = torch.randperm(lab[0].numel(), generator=torch.Generator().manual_seed(seed))
    p2 = p.flatten(2)[:, :, perm].reshape(p.shape)
    lab2 = lab.flatten(1)[:, perm].reshape(lab.shape)
    _assert_stats_equal(bin_statistics(p2, lab2, m), bin_statistics(p, lab, m))
    _assert_stats_equal(top_label_statistics(p2, lab2, m), top_label_statistics(p, lab, m))


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    c=st.integers(2, 4),
    spatial=shapes,
    m=st.integers(1, 30),
    mode=st.sampled_from(["exclusive", "multilabel"]),
    sharp=st.floats(0.1, 20.0),
)
def test_error_ordering_and_range(seed, c, spatial, m, mode, sharp):
    """ECE <= MCE, ACE <= MCE, L1 <= L2 <= MCE, every value in [0, 1] (NaN only for empty channels)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, c, *spatial, generator=g) * sharp
    if mode == "exclusive":
        p, y = torch.softmax(logits, 1), torch.randint(0, c, (1, *spatial), generator=g)
    else:
        p, y = torch.sigmoid(logits), (torch.rand(1, c, *spatial, generator=g) > 0.5).float()
    for stats in (bin_statistics(p, y, m, mode=mode), top_label_statistics(p, y, m, mode=mode)):
        e = calibration_errors(stats)
        tol = 1e-12
        for v in e.values():
            assert not torch.isnan(v).any()
            assert (v >= 0).all() and (v <= 1 + tol).all()
        assert (e["ece"] <= e["mce"] + tol).all()
        assert (e["ace"] <= e["mce"] + tol).all()
        assert (e["ece"] <= e["ece_l2"] + tol).all() and (e["ece_l2"] <= e["mce"] + tol).all()
        assert (e["ace"] <= e["ace_l2"] + tol).all() and (e["ace_l2"] <= e["mce"] + tol).all()


def _phantom(seed: int, shape: tuple[int, ...] = (48, 48, 24), c: int = 3):
    """Smooth posterior q (softmax of blurred logits) and labels sampled from q with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, c, *shape, generator=g)
    for _ in range(3):
        z = torch.nn.functional.avg_pool3d(z, 5, stride=1, padding=2, count_include_pad=False)
    z = z / z.std() * 2.5
    q = torch.softmax(z.double(), 1)
    lab = torch.multinomial(q.movedim(1, -1).reshape(-1, c), 1, generator=g)[:, 0].reshape(1, *shape)
    return z.double(), q, lab


@pytest.mark.parametrize("seed", [0, 1])
def test_bayes_optimal_is_calibrated_and_tempered_is_not(seed):
    """The true posterior scores near-zero ECE/ACE; temperature-scaled versions (T=0.5, T=2) do not."""
    z, q, lab = _phantom(seed)
    m = 15
    n = lab.numel()
    bayes = calibration_errors(bin_statistics(q, lab, m))
    bayes_top = calibration_errors(top_label_statistics(q, lab, m))
    # sampling noise: |o_k - e_k| ~ sqrt(e(1-e)/n_k); ECE ~ M / sqrt(N) at worst
    assert float(bayes["ece"].max()) < 0.01, bayes["ece"]
    assert float(bayes_top["ece"].max()) < 0.01
    assert float(bayes["ace"].max()) < 0.03, bayes["ace"]
    assert n > 50_000
    for t in (0.5, 2.0):
        qt = torch.softmax(z / t, 1)
        tempered = calibration_errors(bin_statistics(qt, lab, m))
        tempered_top = calibration_errors(top_label_statistics(qt, lab, m))
        assert float(tempered["ece"].min()) > 3 * float(bayes["ece"].max()), (t, tempered["ece"])
        assert float(tempered["ace"].min()) > 2 * float(bayes["ace"].max()), (t, tempered["ace"])
        assert float(tempered_top["ece"].min()) > 0.03, (t, tempered_top["ece"])
