"""Local temperature scaling (Ding et al., ICCV 2021): a planted spatially varying temperature is learned (local
beats global temperature scaling in held-out NLL and marginal ACE), a constant one gives global temperature
scaling back, argmax is kept, patch training and chunked inference agree with the whole volume, save/load, the
command line and bad input."""

from __future__ import annotations

import re
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _helpers import invoke_cli
from posthoc_helpers import phantom
from segcal.functional.binning import bin_statistics
from segcal.functional.calibration import calibration_error, negative_log_likelihood
from segcal.posthoc import (
    LocalTemperatureScaling,
    NotFittedError,
    TemperatureScaling,
    VectorScaling,
    load_calibrator,
)

torch.set_num_threads(1)

SMALL = {"epochs": 3, "max_patches": 16, "patch_size": 12}  # enough to exercise the machinery, not to calibrate


def planted(
    n: int, shape: tuple[int, ...], seed: int, t_boundary: float, t_inside: float, width: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Observed logits ``z = u · T_true(x)``, labels sampled from ``softmax(u)``, the true posterior logits
    ``u`` ``(n, 3, *shape)`` and ``T_true`` ``(n, 1, *shape)``.

    Three nested classes (background, a shell, a core: random centre and radii per volume); ``u`` rises smoothly
    (``3 · tanh``, 3-voxel ramps) across each boundary, so ``softmax(u)`` is near 0.5 at the boundaries and about
    0.95 inside. ``T_true = t_inside + (t_boundary − t_inside) · exp(−d² / (2 · width²))`` with ``d`` the distance
    to the nearest boundary: ``t_boundary > 1`` makes the logits over-confident at the boundaries, ``t_inside < 1``
    under-confident inside."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    us, ts = [], []
    for _ in range(n):
        centre = [s * (0.35 + 0.3 * float(torch.rand((), generator=g))) for s in shape]
        r_out = min(shape) * (0.25 + 0.1 * float(torch.rand((), generator=g)))
        r_in = r_out * (0.45 + 0.15 * float(torch.rand((), generator=g)))
        rho = torch.sqrt(sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True)))
        shell = 3.0 * torch.tanh((r_out - rho) / 3.0)
        u = torch.stack([torch.zeros_like(shell), shell, shell + 3.0 * torch.tanh((r_in - rho) / 3.0)])
        d = torch.minimum((rho - r_in).abs(), (rho - r_out).abs())
        us.append(u)
        ts.append(t_inside + (t_boundary - t_inside) * torch.exp(-0.5 * (d / width) ** 2))
    u, t = torch.stack(us), torch.stack(ts)[:, None]
    p = torch.softmax(u, 1).movedim(1, -1).reshape(-1, 3)
    y = torch.multinomial(p, 1, generator=g).reshape(n, *shape)
    return u * t, y, u, t


def _nll(probs: torch.Tensor, y: torch.Tensor, mode: str = "exclusive") -> float:
    return float(negative_log_likelihood(probs, y, mode=mode).mean())


def _ace(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Marginal ACE (15 bins) pooled over the volumes, mean over classes."""
    return float(calibration_error(bin_statistics(probs, y, 15).pooled(), "average").nanmean())


def _states_equal(a: LocalTemperatureScaling, b: LocalTemperatureScaling) -> bool:
    sa, sb = a._state(), b._state()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("shape", "n", "patch"), [((40, 40), 8, 24), ((20, 20, 20), 4, 12)], ids=["2d", "3d"]
)
def test_local_beats_global_on_a_planted_spatial_temperature(shape: tuple[int, ...], n: int, patch: int) -> None:
    zv, yv, _, _ = planted(n, shape, seed=0, t_boundary=2.5, t_inside=0.5)
    zt, yt, ut, t_true = planted(n, shape, seed=1, t_boundary=2.5, t_inside=0.5)
    ts = TemperatureScaling().fit(zv, yv)
    lts = LocalTemperatureScaling(epochs=10, max_patches=64, patch_size=patch).fit(zv, yv)
    p_ts, p_lts, oracle = ts.transform(zt), lts.transform(zt), torch.softmax(ut, 1)
    nll_ts, nll_lts, nll_oracle = _nll(p_ts, yt), _nll(p_lts, yt), _nll(oracle, yt)
    # one temperature cannot fix both regimes: global TS stays far from the oracle, local TS closes most of the gap
    assert nll_lts < nll_ts - 0.03
    assert nll_lts - nll_oracle < 0.25 * (nll_ts - nll_oracle)
    assert _ace(p_lts, yt) < 0.5 * _ace(p_ts, yt)
    # the map found the planted regimes: hotter at the boundaries than inside
    t_map = lts.temperature_map(zt)
    hot, cold = t_true > 2.0, t_true < 0.7
    assert float(t_map[hot].mean()) > 1.5 > 0.8 > float(t_map[cold].mean())


@pytest.mark.parametrize("planted_t", [2.0, 0.5])
def test_a_constant_planted_temperature_gives_global_temperature_scaling(planted_t: float) -> None:
    """Tolerance: the map starts at the global temperature and can only drift by fitting the label noise of the
    ~32 000 training voxels (56 patches of 24², 8 held out) with ~820 weights; the held-out patches pick the
    epoch. The held-out NLL of the oracle (the true posterior) is about 0.39; over seeds and planted T in
    {0.5, 1, 2, 3} the drift cost local TS at most 0.001 nats over global TS, and we allow 0.01 (2.5 % of the
    NLL). ACE with 15 bins on 12 800 voxels has a noise floor of about 0.02 (the oracle's own ACE); the measured
    difference was at most 0.0031 and we allow 0.01. The map's mean must be within 5 % of the global temperature
    (measured: 2.5 %; the tolerance of the planted-temperature recovery in tests/test_posthoc.py)."""
    zv, yv, _, _ = planted(8, (40, 40), seed=2, t_boundary=planted_t, t_inside=planted_t)
    zt, yt, _, _ = planted(8, (40, 40), seed=3, t_boundary=planted_t, t_inside=planted_t)
    ts = TemperatureScaling().fit(zv, yv)
    lts = LocalTemperatureScaling(epochs=10, max_patches=64, patch_size=24).fit(zv, yv)
    p_ts, p_lts = ts.transform(zt), lts.transform(zt)
    assert abs(_nll(p_lts, yt) - _nll(p_ts, yt)) < 0.01
    assert abs(_ace(p_lts, yt) - _ace(p_ts, yt)) < 0.01
    assert float(lts.temperature_map(zt).mean()) == pytest.approx(ts.temperature_, rel=0.05)
    assert lts.initial_temperature_ == pytest.approx(planted_t, rel=0.05)


def test_argmax_is_kept_and_probabilities_are_softmax_of_z_over_t() -> None:
    z, y, _, _ = planted(4, (32, 32), seed=4, t_boundary=2.5, t_inside=0.5)
    lts = LocalTemperatureScaling(**SMALL, floor=0.2).fit(z, y)
    t = lts.temperature_map(z)
    assert t.shape == (4, 1, 32, 32)
    assert bool((t >= 0.2).all())
    p = lts.transform(z)
    assert torch.allclose(p, torch.softmax(z / t, 1), atol=1e-6)
    assert torch.allclose(p.sum(1), torch.ones(()), atol=1e-5)
    assert torch.equal(p.argmax(1), z.argmax(1))
    # the calibrated probabilities equal those of any logits z + a (a constant over the classes of a voxel)
    shifted = z + 7.0 * torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lts.transform(shifted), p, atol=1e-5)


def test_multilabel_sigmoid_of_z_over_t_keeps_every_channel_decision() -> None:
    z, y = phantom(n=6, c=2, shape=(32, 32), seed=5, mode="multilabel")
    over = z * 2.5
    lts = LocalTemperatureScaling(mode="multilabel", epochs=10, max_patches=64, patch_size=16).fit(over, y)
    t = lts.temperature_map(over)
    p = lts.transform(over)
    assert torch.allclose(p, torch.sigmoid(over / t), atol=1e-6)
    assert torch.equal(p > 0.5, over > 0)
    assert _nll(p, y, "multilabel") < _nll(torch.sigmoid(over), y, "multilabel") - 0.05
    assert lts.initial_temperature_ == pytest.approx(2.5, rel=0.1)


@cache
def _fitted_2d() -> LocalTemperatureScaling:
    z, y, _, _ = planted(4, (24, 24), seed=17, t_boundary=2.5, t_inside=0.5)
    return LocalTemperatureScaling(epochs=3, max_patches=32, patch_size=12, floor=0.1).fit(z, y)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    h=st.integers(1, 14),
    w=st.integers(1, 14),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    ties=st.booleans(),
    chunk_voxels=st.integers(1, 400),
)
def test_property_argmax_floor_and_chunks_on_random_and_adversarial_logits(
    seed: int, h: int, w: int, scale: float, ties: bool, chunk_voxels: int
) -> None:
    """Any logits — tiny or huge (|z| up to ~1e4), tied classes, volumes smaller than the halo — keep their argmax
    (ties included: the same classes stay tied), get finite probabilities and ``T ≥ floor``, and any chunking
    gives the whole-volume temperatures."""
    lts = _fitted_2d()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 3, h, w, generator=g) * scale
    if ties:
        z[:, 2] = z[:, 1]
    lts.chunk_voxels = 1 << 20
    whole = lts.temperature_map(z)
    assert bool((whole >= 0.1).all()) and bool(torch.isfinite(whole).all())
    p = lts.transform(z)
    assert bool(torch.isfinite(p).all())
    assert torch.equal(p.argmax(1), z.argmax(1))
    if ties:
        assert torch.equal(p[:, 1], p[:, 2])
    lts.chunk_voxels = chunk_voxels
    # float32 convolutions of logits of size ~scale round differently per chunk shape: the pre-activation's
    # rounding error grows with |z| (seen: 4e-5 at |z| ~ 1e4), so the tolerance does too
    atol = 1e-5 * max(1.0, scale / 10)
    assert torch.allclose(lts.temperature_map(z), whole, atol=atol, rtol=1e-5)
    lts.chunk_voxels = 1 << 20


@pytest.mark.parametrize("shape", [(23, 19), (9, 11, 13)], ids=["2d", "3d"])
def test_chunked_inference_equals_the_whole_volume(shape: tuple[int, ...]) -> None:
    z, y = phantom(n=2, c=3, shape=shape, seed=6)
    lts = LocalTemperatureScaling(kernel_size=3, depth=2, epochs=2, max_patches=8, patch_size=8).fit(z * 2, y)
    h = lts.net_.halo
    assert h == 2
    # reference: the whole volume zero-padded by the halo, one pass of the network
    centred = z * 2 - (z * 2).mean(1, keepdim=True)
    whole = lts.net_(F.pad(centred, [h, h] * len(shape)))
    for chunk_voxels in (1, 200, 10**9):  # one slice per chunk, a few slices, everything at once
        lts.chunk_voxels = chunk_voxels
        assert torch.allclose(lts.temperature_map(z * 2), whole, atol=1e-5)


def test_patches_are_bounded_and_seeded_and_streaming_equals_tensor() -> None:
    z, y = phantom(n=6, c=3, shape=(24, 24), seed=7)
    ref = LocalTemperatureScaling(**SMALL, seed=3).fit(z, y)
    assert ref.n_patches_ == 16  # the reservoir: max_patches, not max_patches per volume
    many = LocalTemperatureScaling(**SMALL, seed=3).fit([(z[i % 6], y[i % 6]) for i in range(30)])
    assert many.n_patches_ == 16
    listed = LocalTemperatureScaling(**SMALL, seed=3).fit([(z[i], y[i]) for i in range(6)])
    one_shot = LocalTemperatureScaling(**SMALL, seed=3).fit((z[i], y[i]) for i in range(6))
    assert _states_equal(ref, listed) and _states_equal(ref, one_shot)
    assert ref.losses_ == listed.losses_
    other = LocalTemperatureScaling(**SMALL, seed=4).fit(z, y)
    assert not _states_equal(ref, other)
    few = LocalTemperatureScaling(epochs=1, max_patches=40, patch_size=8).fit(z[:1], y[:1])
    assert few.n_patches_ == 40  # one volume offers max_patches candidates


def test_the_epoch_kept_is_the_best_on_the_held_out_patches() -> None:
    z, y, _, _ = planted(4, (24, 24), seed=19, t_boundary=2.5, t_inside=0.5)
    lts = LocalTemperatureScaling(epochs=4, max_patches=32, patch_size=12).fit(z, y)
    assert len(lts.held_out_losses_) == 5 and len(lts.losses_) == 4
    assert lts.best_epoch_ == int(np.argmin(lts.held_out_losses_))
    last = LocalTemperatureScaling(epochs=4, max_patches=32, patch_size=12, holdout=0).fit(z, y)
    assert last.held_out_losses_ == [] and last.best_epoch_ == 4
    # the start is global temperature scaling: with steps too small to move, T(x) is the global T everywhere
    start = LocalTemperatureScaling(epochs=1, max_patches=32, patch_size=12, lr=1e-12).fit(z, y)
    t = start.temperature_map(z)
    assert torch.allclose(t, torch.full_like(t, start.initial_temperature_), rtol=1e-4)


def test_voxels_outside_the_mask_are_ignored() -> None:
    z, y = phantom(n=3, c=3, shape=(24, 24), seed=8)
    mask = torch.zeros(3, 24, 24, dtype=torch.bool)
    mask[:, 4:16, 2:20] = True
    scrambled = y.clone()
    scrambled[~mask] = (y[~mask] + 1) % 3
    a = LocalTemperatureScaling(**SMALL).fit(z * 2, y, mask)
    b = LocalTemperatureScaling(**SMALL).fit(z * 2, scrambled, mask)
    assert _states_equal(a, b)
    c = LocalTemperatureScaling(**SMALL).fit(z * 2, scrambled)
    assert not _states_equal(a, c)


def test_the_image_as_extra_input_channels() -> None:
    """The planted temperature depends only on the image (2.5 where the image is 1, 0.5 where it is 0), which the
    logits do not show: local TS with the image learns it, local TS on the logits alone cannot."""
    g = torch.Generator().manual_seed(9)
    u, y = phantom(n=8, c=3, shape=(32, 32), seed=9)
    image = F.interpolate((torch.rand(8, 1, 4, 4, generator=g) > 0.5).float(), size=(32, 32), mode="nearest")
    z = u * torch.where(image > 0.5, 2.5, 0.5)
    fit, held = slice(0, 6), slice(6, 8)
    kw = {"epochs": 10, "max_patches": 128, "patch_size": 16}
    with_image = LocalTemperatureScaling(image_channels=1, **kw).fit(z[fit], y[fit], images=image[fit])
    without = LocalTemperatureScaling(**kw).fit(z[fit], y[fit])
    nll_image = _nll(with_image.transform(z[held], images=image[held]), y[held])
    assert nll_image < _nll(without.transform(z[held]), y[held]) - 0.02
    nll_ts = _nll(TemperatureScaling().fit(z[fit], y[fit]).transform(z[held]), y[held])
    nll_oracle = _nll(torch.softmax(u[held], 1), y[held])
    assert nll_image - nll_oracle < 0.5 * (nll_ts - nll_oracle)
    tensor = LocalTemperatureScaling(image_channels=1, **SMALL).fit(z[:3], y[:3], images=image[:3])
    streamed = LocalTemperatureScaling(image_channels=1, **SMALL).fit(
        [(z[i], y[i]) for i in range(3)], images=[image[i] for i in range(3)]
    )
    assert _states_equal(tensor, streamed)


def test_save_load_roundtrip(tmp_path) -> None:
    z, y = phantom(n=2, c=3, shape=(12, 12, 12), seed=10)
    lts = LocalTemperatureScaling(**SMALL, kernel_size=5, depth=1, hidden=4).fit(z * 2, y)
    path = tmp_path / "lts.pt"
    lts.save(path)
    for back in (LocalTemperatureScaling.load(path), load_calibrator(path)):
        assert type(back) is LocalTemperatureScaling
        assert back.spatial_dims_ == 3 and back.kernel_size == 5 and back.hidden == 4
        assert back.initial_temperature_ == lts.initial_temperature_
        assert torch.equal(back.transform(z), lts.transform(z))
    VectorScaling().fit(z, y).save(tmp_path / "vector.pt")
    with pytest.raises(ValueError, match="saved by VectorScaling"):
        LocalTemperatureScaling.load(tmp_path / "vector.pt")
    with pytest.raises(ValueError, match="saved by LocalTemperatureScaling"):
        TemperatureScaling.load(path)


def test_single_class_targets_warn_and_normal_targets_do_not() -> None:
    z, y = phantom(n=2, c=3, shape=(20, 20), seed=11)
    match = "^LocalTemperatureScaling: only one class present in the fitting targets; the fitted temperature map"
    with pytest.warns(UserWarning, match=match):
        LocalTemperatureScaling(**SMALL).fit(z, torch.zeros_like(y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LocalTemperatureScaling(**SMALL).fit(z, y)


def test_a_diverged_fit_is_refused_and_leaves_the_calibrator_unfitted(monkeypatch: pytest.MonkeyPatch) -> None:
    z, y = phantom(n=2, c=3, shape=(16, 16), seed=18)
    train = LocalTemperatureScaling._train

    def diverging(self: LocalTemperatureScaling, reservoir: object, num_classes: int) -> None:
        train(self, reservoir, num_classes)
        self.net_.head.bias.fill_(float("nan"))

    monkeypatch.setattr(LocalTemperatureScaling, "_train", diverging)
    lts = LocalTemperatureScaling(**SMALL)
    with pytest.raises(ValueError, match=r"^LocalTemperatureScaling: the fit diverged .*net\.head\.bias"):
        lts.fit(z, y)
    with pytest.raises(NotFittedError):
        lts.transform(z)


def test_bad_input() -> None:
    z, y = phantom(n=2, c=3, shape=(16, 16), seed=12)
    with pytest.raises(NotFittedError, match="not fitted"):
        LocalTemperatureScaling().transform(z)
    with pytest.raises(NotFittedError):
        LocalTemperatureScaling().save("never.pt")
    with pytest.raises(ValueError, match=r"does not match|shape"):
        LocalTemperatureScaling(**SMALL).fit(z, y[:, :8])
    with pytest.raises(ValueError, match="labels must lie"):
        LocalTemperatureScaling(**SMALL).fit(z, y + 3)
    bad = z.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        LocalTemperatureScaling(**SMALL).fit(bad, y)
    with pytest.raises(ValueError, match="volume 1: logits have 2 classes"):
        LocalTemperatureScaling(**SMALL).fit([(z[0], y[0]), (z[1, :2], y[1].clamp_max(1))])
    with pytest.raises(ValueError, match="volume 1: expected 2D logits, got 3D"):
        volume_3d = (z[1, ..., None].repeat(1, 1, 1, 4), y[1, ..., None].repeat(1, 1, 4))
        LocalTemperatureScaling(**SMALL).fit([(z[0], y[0]), volume_3d])
    with pytest.raises(ValueError, match="no volumes"):
        LocalTemperatureScaling(**SMALL).fit([])
    with pytest.raises(ValueError, match="mask shape"):
        LocalTemperatureScaling(**SMALL).fit(z, y, torch.ones(2, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"no voxels \(empty masks\?\)"):
        LocalTemperatureScaling(**SMALL).fit(z, y, torch.zeros(2, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="targets are required"):
        LocalTemperatureScaling(**SMALL).fit(z)
    lts = LocalTemperatureScaling(**SMALL).fit(z, y)
    with pytest.raises(ValueError, match="fitted on 3"):
        lts.transform(z[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        lts.transform(bad)
    with pytest.raises(ValueError, match="must be 2D like the fitting data, got 3D"):
        lts.transform(z[..., None])
    with pytest.raises(ValueError, match="images were given but image_channels=0"):
        lts.transform(z, images=torch.zeros(2, 1, 16, 16))


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("kernel_size", 4, "kernel_size must be a positive odd integer, got 4"),
        ("epochs", 0, "epochs must be a positive integer, got 0"),
        ("max_patches", -1, "max_patches must be a positive integer, got -1"),
        ("patch_size", 0, "patch_size must be a positive integer, got 0"),
        ("floor", 0.0, "floor must be a positive finite number, got 0.0"),
        ("lr", float("nan"), "lr must be a positive finite number, got nan"),
        ("image_channels", -1, "image_channels must be a non-negative integer, got -1"),
        ("holdout", 1.0, r"holdout must be a share in \[0, 1\), got 1.0"),
    ],
)
def test_bad_options_are_named(option: str, value: object, match: str) -> None:
    z, y = phantom(n=1, c=3, shape=(12, 12), seed=13)
    with pytest.raises(ValueError, match=match):
        LocalTemperatureScaling(**{**SMALL, option: value}).fit(z, y)


def test_bad_images() -> None:
    z, y = phantom(n=2, c=3, shape=(16, 16), seed=14)
    img = torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"image_channels=1 needs images \(pass images=...\)"):
        LocalTemperatureScaling(**SMALL, image_channels=1).fit(z, y)
    with pytest.raises(ValueError, match=r"volume 0: image shape \(2, 2, 16, 16\) does not match \(2, 1, 16, 16\)"):
        LocalTemperatureScaling(**SMALL, image_channels=1).fit(z, y, images=torch.rand(2, 2, 16, 16))
    nan_img = img.clone()
    nan_img[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="image contains NaN"):
        LocalTemperatureScaling(**SMALL, image_channels=1).fit(z, y, images=nan_img)
    vols = [(z[i], y[i]) for i in range(2)]
    with pytest.raises(ValueError, match=r"fewer images than volumes \(none for volume 1\)"):
        LocalTemperatureScaling(**SMALL, image_channels=1).fit(vols, images=[img[0]])
    with pytest.raises(ValueError, match="more images than volumes"):
        LocalTemperatureScaling(**SMALL, image_channels=1).fit(vols, images=[img[0], img[1], img[1]])
    lts = LocalTemperatureScaling(**SMALL, image_channels=1).fit(z, y, images=img)
    with pytest.raises(ValueError, match="needs images"):
        lts.transform(z)


def test_calibrate_cli_lts(tmp_path) -> None:
    zv, yv, _, _ = planted(4, (24, 24), seed=15, t_boundary=2.5, t_inside=0.5)
    zt, _, _, _ = planted(2, (24, 24), seed=16, t_boundary=2.5, t_inside=0.5)
    for name, z in (("val", zv), ("test", zt)):
        (tmp_path / name).mkdir()
        for i in range(z.shape[0]):
            np.savez(tmp_path / name / f"case{i}.npz", logits=z[i].numpy())
    (tmp_path / "lab").mkdir()
    for i in range(4):
        np.save(tmp_path / "lab" / f"case{i}.npy", yv[i].numpy().astype(np.int16))
    out, cal = tmp_path / "out", tmp_path / "lts.pt"
    args = ["calibrate", "--method", "lts", "--val-pred", str(tmp_path / "val"), "--val-labels",
            str(tmp_path / "lab"), "--apply-to", str(tmp_path / "test"), "-o", str(out), "--epochs", "2",
            "--kernel-size", "3", "--seed", "1", "--save-calibrator", str(cal)]
    res = invoke_cli(args)
    assert res.exit_code == 0, res.output
    assert "LocalTemperatureScaling" in res.output
    fitted = load_calibrator(cal)
    assert type(fitted) is LocalTemperatureScaling
    assert (fitted.kernel_size, fitted.epochs, fitted.seed) == (3, 2, 1)
    for i in range(2):
        with np.load(out / f"case{i}.npz") as f:
            probs = f["probabilities"]
        assert np.allclose(probs, fitted.transform(zt[i : i + 1])[0].numpy(), atol=1e-6)
        assert (probs.argmax(0) == zt[i].numpy().argmax(0)).all()


def test_the_docs_example_runs(tmp_path, monkeypatch) -> None:
    """The ``<!-- tested example -->`` block of docs/posthoc.md runs as written (it asserts that local TS beats
    global TS and keeps the argmax)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "posthoc.md").read_text()
    blocks = re.findall(r"<!-- tested example -->\s*\n```python\n(.*?)\n```", text, re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/posthoc.md[lts example]", "exec"), {})
    assert type(load_calibrator(tmp_path / "lts.pt")) is LocalTemperatureScaling


def test_every_calibrator_transform_is_an_inference_result_without_a_graph() -> None:
    """No calibrator hands back probabilities with a partial gradient: ``T(x)`` is computed without autograd, so
    a graph through ``z / T`` alone would be silently wrong; every ``transform`` returns a detached result."""
    from segcal.posthoc import (
        AuxiliaryConvCalibrator,
        DirichletScaling,
        MatrixScaling,
        TemperatureScaling,
        VectorScaling,
    )

    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(2, 3, 12, 12, generator=g)
    y = torch.randint(0, 3, (2, 12, 12), generator=g)
    calibrators = [TemperatureScaling(), VectorScaling(), MatrixScaling(), DirichletScaling(),
                   AuxiliaryConvCalibrator(kernel_size=3, epochs=1),
                   LocalTemperatureScaling(epochs=1, patch_size=8, max_patches=8)]
    for cal in calibrators:
        out = cal.fit(z, y).transform(z.clone().requires_grad_(True))
        assert not out.requires_grad, type(cal).__name__
        torch.testing.assert_close(out.sum(1), torch.ones(2, 12, 12))
