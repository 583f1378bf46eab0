"""Flat-memory fitting: the voxel reservoir (a uniform, seeded, fixed-size sample over the whole dataset), exact
streamed fits, and the patch sample of the convolutional calibrators."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posthoc_helpers import phantom
from segcal.functional.calibration import negative_log_likelihood
from segcal.posthoc import (
    AuxiliaryConvCalibrator,
    LastLayerFineTuner,
    MatrixScaling,
    TemperatureScaling,
    VectorScaling,
    load_calibrator,
)
from segcal.posthoc._base import VoxelReservoir
from segcal.posthoc.conv import PatchReservoir

torch.set_num_threads(1)

#: volumes of unequal sizes: a per-volume quota would over-sample the small ones
SIZES = [10, 200, 35, 500, 1, 120, 134]


def _offer(reservoir: VoxelReservoir, sizes: list[int]) -> None:
    start = 0
    for n in sizes:
        ids = torch.arange(start, start + n, dtype=torch.float32)
        reservoir.add(ids[:, None].repeat(1, 2), torch.ones(n, 2, dtype=torch.uint8))
        start += n


def test_voxel_reservoir_is_a_uniform_sample_of_every_voxel() -> None:
    total, k, runs = sum(SIZES), 100, 300
    counts = torch.zeros(total)
    for seed in range(runs):
        res = VoxelReservoir(k, seed)
        _offer(res, SIZES)
        z, y = res.rows()
        assert z.shape == (k, 2) and y.shape == (k, 2) and len(res) == k and res.seen == total
        ids = z[:, 0].long()
        assert ids.unique().numel() == k  # without replacement
        counts[ids] += 1
    # every voxel is held with probability k / total (binomial: mean 30, sd 5.2); no volume is favoured
    assert counts.min() > 30 - 5 * 5.2 and counts.max() < 30 + 5 * 5.2
    first, big = counts[:10].mean(), counts[245:745].mean()  # the 10-voxel volume vs the 500-voxel volume
    assert abs(float(first) - 30) < 6 and abs(float(big) - 30) < 1.5


def test_voxel_reservoir_is_seeded_and_holds_a_fixed_size() -> None:
    a, b, c = VoxelReservoir(64, 3), VoxelReservoir(64, 3), VoxelReservoir(64, 4)
    for r in (a, b, c):
        _offer(r, SIZES)
    assert torch.equal(a.rows()[0], b.rows()[0]) and not torch.equal(a.rows()[0], c.rows()[0])
    small = VoxelReservoir(5000, 0)
    _offer(small, SIZES)  # fewer voxels than the capacity: all of them, in order
    assert torch.equal(small.rows()[0][:, 0], torch.arange(sum(SIZES), dtype=torch.float32))
    held = VoxelReservoir(50, 0)
    _offer(held, SIZES[:2])
    nbytes = held.rows()[0].untyped_storage().nbytes()
    for _ in range(20):  # many more volumes: the held storage does not grow
        _offer(held, SIZES)
    assert held.rows()[0].untyped_storage().nbytes() == nbytes and len(held) == 50
    mixed = VoxelReservoir(30, 0)  # hard targets first, then soft ones: held as float32
    mixed.add(torch.zeros(40, 2), torch.ones(40, 2, dtype=torch.uint8))
    mixed.add(torch.zeros(400, 2), torch.full((400, 2), 0.5))
    assert mixed.rows()[1].dtype == torch.float32 and set(mixed.rows()[1].unique().tolist()) <= {0.5, 1.0}
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_voxels must be a positive integer"):
            VoxelReservoir(bad, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [TemperatureScaling, VectorScaling, MatrixScaling])
def test_reservoir_fit_holds_max_voxels_and_stays_close_to_the_exact_fit(cls: type) -> None:
    z, y = phantom(n=12, c=3, shape=(32, 32), seed=1)
    z = z * torch.tensor([2.0, 1.5, 2.5]).view(1, 3, 1, 1)
    vols = [(z[i], y[i]) for i in range(12)]
    exact = cls().fit(vols)
    assert exact.n_voxels_ == 12 * 32 * 32
    sub = cls(max_voxels=4000, seed=2).fit(v for v in vols)  # one-shot generator
    assert sub.n_voxels_ == 4000
    again = cls(max_voxels=4000, seed=2).fit(vols)
    assert torch.equal(sub.transform(z), again.transform(z))  # seeded, deterministic
    p_exact, p_sub = exact.transform(z), sub.transform(z)
    nll = [float(negative_log_likelihood(p, y).mean()) for p in (torch.softmax(z, 1), p_exact, p_sub)]
    assert nll[2] < nll[0] - 0.05  # the subsample fit calibrates
    assert nll[2] == pytest.approx(nll[1], abs=0.01)  # and is close to the exact fit


def test_one_shot_generator_without_max_voxels_is_exact_while_it_fits_the_default_reservoir() -> None:
    z, y = phantom(n=5, c=3, shape=(24, 24), seed=3)
    vols = [(z[i] * 2, y[i]) for i in range(5)]
    streamed = TemperatureScaling().fit(vols)
    one_shot = TemperatureScaling().fit(v for v in vols)
    assert one_shot.n_voxels_ == streamed.n_voxels_ == 5 * 24 * 24
    assert one_shot.temperature_ == pytest.approx(streamed.temperature_, rel=1e-6)


def test_a_tensor_is_streamed_item_by_item_with_masks() -> None:
    z, y = phantom(n=4, c=3, shape=(24, 24), seed=4)
    mask = torch.rand(4, 1, 24, 24, generator=torch.Generator().manual_seed(0)) < 0.6
    from_tensor = VectorScaling(chunk_size=100).fit(z * 2, y, mask)
    from_list = VectorScaling().fit([(z[i : i + 1] * 2, y[i : i + 1], mask[i : i + 1]) for i in range(4)])
    assert from_tensor.n_voxels_ == int(mask.sum())
    assert torch.allclose(from_tensor.scale_, from_list.scale_, atol=1e-6)


def test_patch_convolution_equals_the_whole_volume_convolution() -> None:
    """A held patch with its halo gives, on its block, exactly the conv of the whole volume (zero padding at
    the border included); the halo and voxels outside the volume are not valid."""
    torch.manual_seed(0)
    for shape in ((20, 17), (9, 12, 10)):
        z, y = phantom(n=1, c=2, shape=shape, seed=5)
        y1 = torch.nn.functional.one_hot(y, 2).movedim(-1, 1).float()
        conv = AuxiliaryConvCalibrator(kernel_size=3)._make_conv(2, len(shape))
        with torch.no_grad():
            conv.weight.normal_()
        res = PatchReservoir(40, 6, 1, seed=1)
        res.add(z, y1, None)
        zp, _, valid = res.stacked()
        assert zp.shape == (40, 2, *(8,) * len(shape)) and int(valid[0].sum()) <= 6 ** len(shape)
        full = conv(z)[0]
        out = conv(zp)
        for i in range(40):
            v = valid[i]
            assert v.any()
            vals = out[i][:, v]
            # place the patch in the volume by its first valid logit vector (the noisy logits are unique)
            idx = v.nonzero()
            first = idx[0]
            zi = zp[i][(slice(None), *first.tolist())]
            hits = (z[0] == zi.view(-1, *(1,) * len(shape))).all(0).nonzero()
            assert hits.shape[0] == 1
            origin = hits[0] - first
            coords = idx + origin
            ref = full[(slice(None), *coords.T)]
            torch.testing.assert_close(vals, ref, atol=1e-5, rtol=1e-5)


def test_patch_centres_are_uniform_over_the_dataset() -> None:
    """Centres are drawn over every voxel: a volume 4× larger gets about 4× the patches."""
    small = torch.zeros(1, 2, 10, 10)
    large = torch.ones(1, 2, 20, 20)
    onehot = {10: torch.zeros(1, 2, 10, 10), 20: torch.zeros(1, 2, 20, 20)}
    n_large = 0
    for seed in range(30):
        res = PatchReservoir(50, 3, 0, seed=seed)
        res.add(small, onehot[10], None)
        res.add(large, onehot[20], None)
        z, _, _ = res.stacked()
        n_large += int((z[:, 0, 1, 1] == 1).sum())
    share = n_large / (30 * 50)
    assert share == pytest.approx(400 / 500, abs=0.04)


def test_aux_conv_on_patches_calibrates_with_bounded_memory(tmp_path) -> None:
    zv, yv = phantom(n=6, c=3, shape=(40, 40), seed=7)
    zt, yt = phantom(n=6, c=3, shape=(40, 40), seed=8)
    vols = [(zv[i] * 2.5, yv[i]) for i in range(6)]
    cal = AuxiliaryConvCalibrator(kernel_size=3, epochs=15, lr=0.05, patch_size=12, max_patches=64, batch_size=8)
    cal.fit(v for v in vols)  # a one-shot generator is enough: the patches are held
    assert cal.n_patches_ == 64
    before = float(negative_log_likelihood(torch.softmax(zt * 2.5, 1), yt).mean())
    after = float(negative_log_likelihood(cal.transform(zt * 2.5), yt).mean())
    assert after < before - 0.05
    again = AuxiliaryConvCalibrator(kernel_size=3, epochs=15, lr=0.05, patch_size=12, max_patches=64, batch_size=8)
    assert torch.equal(again.fit(vols).conv_.weight, cal.conv_.weight)  # seeded
    cal.save(tmp_path / "aux.pt")
    back = load_calibrator(tmp_path / "aux.pt")
    assert (back.patch_size, back.max_patches, back.batch_size) == (12, 64, 8)
    assert torch.equal(back.transform(zt), cal.transform(zt))
    with pytest.raises(ValueError, match="patch_size must be an integer >= 1"):
        AuxiliaryConvCalibrator(patch_size=0).fit(vols)
    with pytest.raises(ValueError, match="max_patches must be an integer >= 1"):
        AuxiliaryConvCalibrator(patch_size=8, max_patches=0).fit(vols)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        AuxiliaryConvCalibrator(patch_size=8, batch_size=0).fit(vols)
    with pytest.raises(ValueError, match="no voxels"):
        AuxiliaryConvCalibrator(patch_size=8).fit([(zv[0], yv[0], torch.zeros(40, 40, dtype=torch.bool))])


def test_last_layer_finetuner_on_patches() -> None:
    torch.manual_seed(0)
    z, y = phantom(n=4, c=3, shape=(24, 24), seed=11)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1))
    first = net[0].weight.detach().clone()
    before = float(negative_log_likelihood(torch.softmax(net(z), 1).detach(), y).mean())
    seen: list[tuple[int, ...]] = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    tuner = LastLayerFineTuner(net, epochs=30, lr=0.02, patch_size=10, seed=1).fit([(z, y)])
    assert set(seen) == {(4, 3, 10, 10)}  # every training forward pass saw a 10×10 crop
    assert torch.equal(net[0].weight, first)
    assert float(negative_log_likelihood(tuner.transform(z), y).mean()) < before
    with pytest.raises(ValueError, match="patch_size must be a positive integer"):
        LastLayerFineTuner(net, epochs=1, patch_size=0).fit([(z, y)])


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 60), min_size=1, max_size=12),
    capacity=st.integers(1, 150),
    seed=st.integers(0, 2**31 - 1),
)
def test_voxel_reservoir_holds_min_capacity_distinct_rows(sizes: list[int], capacity: int, seed: int) -> None:
    res = VoxelReservoir(capacity, seed)
    _offer(res, sizes)
    z, y = res.rows()
    total = sum(sizes)
    assert res.seen == total and len(res) == min(capacity, total)
    if total:
        ids = z[:, 0].long()
        assert z.shape == (min(capacity, total), 2) and y.shape == z.shape
        assert ids.unique().numel() == ids.numel() and int(ids.min()) >= 0 and int(ids.max()) < total
        assert torch.equal(z[:, 0], z[:, 1])  # rows stay whole
