"""Post-hoc calibrators: planted-parameter recovery, NLL/ACE improvement, netcal agreement, streaming,
save/load and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from posthoc_helpers import phantom
from segcal.functional.binning import bin_statistics
from segcal.functional.calibration import calibration_error, negative_log_likelihood
from segcal.posthoc import (
    AuxiliaryConvCalibrator,
    LastLayerFineTuner,
    NotFittedError,
    TemperatureScaling,
    VectorScaling,
    load_calibrator,
)

torch.set_num_threads(1)


def _nll(probs: torch.Tensor, y: torch.Tensor, mode: str = "exclusive") -> float:
    return float(negative_log_likelihood(probs, y, mode=mode).mean())


def _ace(probs: torch.Tensor, y: torch.Tensor, mode: str = "exclusive") -> float:
    stats = bin_statistics(probs, y, 15, mode=mode).pooled()
    return float(calibration_error(stats, "average").nanmean())


@pytest.mark.parametrize("planted", [2.0, 0.5])
def test_temperature_recovers_planted(planted: float) -> None:
    z, y = phantom(n=8, c=3, shape=(48, 48), seed=1)
    ts = TemperatureScaling().fit(z * planted, y)
    assert ts.temperature_ == pytest.approx(planted, rel=0.05)


def test_temperature_streaming_equals_tensor_and_subsampling() -> None:
    z, y = phantom(n=6, c=3, shape=(32, 32), seed=2)
    full = TemperatureScaling().fit(z * 2, y).temperature_
    vols = [(z[i] * 2, y[i]) for i in range(z.shape[0])]  # (C, H, W), (H, W) volumes, re-iterable list
    streamed = TemperatureScaling(chunk_size=500).fit(vols).temperature_
    assert streamed == pytest.approx(full, rel=1e-6)
    gen = ((z[i : i + 1] * 2, y[i : i + 1]) for i in range(z.shape[0]))  # one-shot generator
    sub = TemperatureScaling(max_voxels_per_volume=600, seed=3).fit(gen)
    assert sub.n_voxels_ == 6 * 600
    assert sub.temperature_ == pytest.approx(2.0, rel=0.15)
    again = TemperatureScaling(max_voxels_per_volume=600, seed=3).fit(vols).temperature_
    assert again == pytest.approx(sub.temperature_, rel=1e-9)  # seeded subsample


def test_temperature_mask_ignores_voxels() -> None:
    z, y = phantom(n=4, c=2, shape=(32, 32), seed=3)
    mask = torch.zeros(4, 32, 32, dtype=torch.bool)
    mask[:, :16] = True
    bad = z.clone()
    bad[:, :, 16:] *= 10  # wildly miscalibrated outside the mask
    t_mask = TemperatureScaling().fit(bad * 2, y, mask).temperature_
    t_ref = TemperatureScaling().fit(z[:, :, :16] * 2, y[:, :16]).temperature_
    assert t_mask == pytest.approx(t_ref, rel=1e-5)


def test_temperature_matches_netcal() -> None:
    netcal_scaling = pytest.importorskip("netcal.scaling")
    z, y = phantom(n=4, c=3, shape=(40, 40), seed=4)
    z = z * 1.7
    ours = TemperatureScaling().fit(z, y).temperature_
    flat = torch.softmax(z, 1).movedim(1, -1).reshape(-1, 3).double().numpy()
    ref = netcal_scaling.TemperatureScaling()
    ref.fit(flat, y.reshape(-1).numpy())
    # netcal's parameter multiplies the log-probabilities: T = 1 / weight
    t_netcal = 1.0 / float(np.asarray(ref.temperature).ravel()[0])
    assert ours == pytest.approx(t_netcal, rel=0.01)


def test_vector_scaling_recovers_per_class_scales() -> None:
    z, y = phantom(n=8, c=3, shape=(48, 48), seed=5)
    scales = torch.tensor([0.5, 1.0, 2.0])
    vs = VectorScaling().fit(z / scales.view(1, -1, 1, 1), y)
    assert torch.allclose(vs.scale_.float(), scales, rtol=0.08)
    assert vs.bias_.abs().max() < 0.1


def test_platt_binary_two_parameters() -> None:
    z, y = phantom(n=6, c=1, shape=(48, 48), seed=6, mode="multilabel")
    vs = VectorScaling(mode="multilabel").fit(z / 2 - 0.5, y)
    assert vs.scale_.numel() == 1 and vs.bias_.numel() == 1
    assert float(vs.scale_) == pytest.approx(2.0, rel=0.08)
    assert float(vs.bias_) == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TemperatureScaling(),
        lambda: VectorScaling(),
        lambda: AuxiliaryConvCalibrator(kernel_size=3, epochs=30, lr=0.05),
    ],
    ids=["ts", "vector", "aux"],
)
def test_calibrators_improve_miscalibrated_and_keep_calibrated(make) -> None:
    zv, yv = phantom(n=6, c=3, shape=(40, 40), seed=7)
    zt, yt = phantom(n=6, c=3, shape=(40, 40), seed=8)
    for factor in (2.5, 0.4):  # over- and under-confident
        cal = make().fit(zv * factor, yv)
        before = torch.softmax(zt * factor, 1)
        after = cal.transform(zt * factor)
        assert torch.allclose(after.sum(1), torch.ones(()), atol=1e-5)
        assert _nll(after, yt) < _nll(before, yt) - 0.01
        assert _ace(after, yt) < _ace(before, yt)
    cal = make().fit(zv, yv)  # already calibrated input
    ref = torch.softmax(zt, 1)
    assert _nll(cal.transform(zt), yt) < _nll(ref, yt) + 0.01
    assert _ace(cal.transform(zt), yt) < _ace(ref, yt) + 0.01


def test_multilabel_temperature() -> None:
    z, y = phantom(n=6, c=2, shape=(40, 40), seed=9, mode="multilabel")
    ts = TemperatureScaling(mode="multilabel").fit(z * 2, y)
    assert ts.temperature_ == pytest.approx(2.0, rel=0.05)
    p = ts.transform(z * 2)
    assert torch.allclose(p, torch.sigmoid(z * 2 / ts.temperature_), atol=1e-6)


def test_aux_conv_3d_streaming_and_identity_init() -> None:
    z, y = phantom(n=3, c=2, shape=(12, 12, 12), seed=10)
    vols = [(z[i] * 3, y[i]) for i in range(3)]
    cal = AuxiliaryConvCalibrator(kernel_size=3, epochs=40, lr=0.01).fit(vols)
    assert isinstance(cal.conv_, torch.nn.Conv3d)
    assert _nll(cal.transform(z * 3), y) < _nll(torch.softmax(z * 3, 1), y)
    ident = AuxiliaryConvCalibrator(kernel_size=5)._make_conv(2, 3)
    assert torch.allclose(ident(z * 3), z * 3, atol=1e-5)
    with pytest.raises(TypeError, match="re-iterable"):
        AuxiliaryConvCalibrator(epochs=2).fit(v for v in vols)


def test_last_layer_finetuner_trains_only_last_conv() -> None:
    torch.manual_seed(0)
    z, y = phantom(n=4, c=3, shape=(24, 24), seed=11)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1))
    images = z  # the "image" is the calibrated logit map; the net must learn to pass it through
    first = net[0].weight.detach().clone()
    tuner = LastLayerFineTuner(net, epochs=30, lr=0.02)
    before = _nll(torch.softmax(net(images), 1).detach(), y)
    tuner.fit([(images, y)])
    assert tuner.layer_name_ == "2"
    assert torch.equal(net[0].weight, first)
    assert tuner.losses_[-1] < tuner.losses_[0]
    assert _nll(tuner.transform(images), y) < before


def test_save_load_roundtrip_and_wrong_method(tmp_path) -> None:
    z, y = phantom(n=2, c=3, shape=(24, 24), seed=12)
    ts = TemperatureScaling().fit(z * 2, y)
    vs = VectorScaling().fit(z * 2, y)
    aux = AuxiliaryConvCalibrator(kernel_size=3, epochs=2).fit(z * 2, y)
    for cal, cls in ((ts, TemperatureScaling), (vs, VectorScaling), (aux, AuxiliaryConvCalibrator)):
        path = tmp_path / f"{cls.method}.pt"
        cal.save(path)
        back = cls.load(path)
        assert torch.allclose(back.transform(z), cal.transform(z))
        assert type(load_calibrator(path)) is cls
    with pytest.raises(ValueError, match="saved by VectorScaling"):
        TemperatureScaling.load(tmp_path / "vector.pt")
    junk = tmp_path / "junk.pt"
    torch.save({"a": torch.zeros(1)}, junk)
    with pytest.raises(ValueError, match="not a segcal calibrator"):
        TemperatureScaling.load(junk)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="not a segcal calibrator"):
        load_calibrator(tmp_path / "text.pt")


def test_bad_input() -> None:
    z, y = phantom(n=2, c=3, shape=(16, 16), seed=13)
    with pytest.raises(NotFittedError, match="not fitted"):
        TemperatureScaling().transform(z)
    with pytest.raises(NotFittedError):
        VectorScaling().save("never.pt")
    with pytest.raises(ValueError, match=r"does not match|shape"):
        TemperatureScaling().fit(z, y[:, :8])
    with pytest.raises(ValueError, match="labels must lie"):
        TemperatureScaling().fit(z, y + 3)
    bad = z.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        TemperatureScaling().fit(bad, y)
    with pytest.raises(ValueError, match="volume 1: logits have 2 classes"):
        TemperatureScaling().fit([(z[0], y[0]), (z[1, :2], y[1].clamp_max(1))])
    ts = TemperatureScaling().fit(z, y)
    with pytest.raises(ValueError, match="fitted on 3"):
        ts.transform(z[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        ts.transform(bad)
    with pytest.raises(ValueError, match="targets are required"):
        TemperatureScaling().fit(z)
    with pytest.raises(ValueError, match="no volumes"):
        TemperatureScaling().fit([])
    with pytest.raises(ValueError, match="mask shape"):
        TemperatureScaling().fit(z, y, torch.ones(2, 8, 8, dtype=torch.bool))
