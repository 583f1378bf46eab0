"""segcal's MONAI metrics, Ignite handlers and post-transforms, checked against MONAI itself and segcal's core.

Every equality is on inputs whose values are far from zero (asserted), with real MONAI / Ignite objects.
"""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import CalibrationError, from_engine
from monai.metrics import CalibrationErrorMetric, HausdorffDistanceMetric
from monai.transforms import Activationsd, AsDiscreted, Compose

from segcal.functional import bin_statistics, calibration_errors, hausdorff_distance_95
from segcal.integrations.monai import (
    CalibrateLogits,
    CalibrateLogitsd,
    CalibrationHandler,
    CalibrationMetric,
    HausdorffDistance95Handler,
    HausdorffDistance95Metric,
    SegcalMetric,
)
from segcal.posthoc import LastLayerFineTuner, NotFittedError, TemperatureScaling

REDUCTIONS = ("expected", "average", "maximum")


def _data(b: int = 3, c: int = 3, shape: tuple[int, ...] = (12, 10), seed: int = 0):
    """float32 softmax probabilities (MONAI casts to float32, so the comparison is exact) and label maps drawn
    against them (miscalibrated: the labels follow a flatter distribution)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(b, c, *shape, generator=g) * 2.5, 1)
    flat = torch.softmax(p.log() / 2.5, 1).movedim(1, -1).reshape(-1, c).double()
    y = torch.multinomial(flat, 1, generator=g)[:, 0].reshape(b, *shape)
    return p, y, torch.nn.functional.one_hot(y, c).movedim(-1, 1).float()


@pytest.mark.parametrize("red", REDUCTIONS)
@pytest.mark.parametrize("include_background", [True, False])
def test_calibration_metric_equals_monai_calibration_error_metric(red, include_background):
    p, y, onehot = _data()
    ours = CalibrationMetric(num_bins=10, include_background=include_background, calibration_reduction=red)
    ref = CalibrationErrorMetric(num_bins=10, include_background=include_background, calibration_reduction=red)
    for i in range(3):  # three iterations: a batch tensor, a list of channel-first tensors, a label-map batch
        sl = slice(i, i + 1)
        if i == 0:
            batch = ours(y_pred=p[sl], y=onehot[sl])
        elif i == 1:
            batch = ours(y_pred=list(p[sl]), y=list(onehot[sl]))
        else:
            batch = ours(y_pred=p[sl], y=y[sl])
        ref_batch = ref(y_pred=p[sl], y=onehot[sl])
        torch.testing.assert_close(batch.float(), ref_batch, atol=1e-6, rtol=0)
    per_image = ours.get_buffer()
    assert per_image.shape == (3, 3 if include_background else 2)
    assert float(per_image.min()) > 0.02  # non-trivial values
    torch.testing.assert_close(per_image.float(), ref.get_buffer(), atol=1e-6, rtol=0)
    for reduction in ("mean", "sum", "mean_batch", "mean_channel", "none"):
        torch.testing.assert_close(
            ours.aggregate(reduction).float(), ref.aggregate(reduction), atol=1e-6, rtol=0
        )
    assert len(ours) == 3
    ours.reset()
    assert ours.get_buffer() is None and len(ours) == 0
    with pytest.raises(ValueError, match="no image"):
        ours.aggregate()


def test_not_nans_and_the_buffered_statistics_give_every_error():
    p, y, _ = _data(b=4, seed=1)
    metric = CalibrationMetric(num_bins=15, calibration_reduction="average", get_not_nans=True)
    metric(y_pred=p[:2], y=y[:2])
    metric(y_pred=p[2:], y=y[2:])
    value, not_nans = metric.aggregate()
    stats = bin_statistics(p, y, 15, include_background=False)
    per_image = calibration_errors(stats)
    torch.testing.assert_close(metric.get_buffer(), per_image["ace"])
    torch.testing.assert_close(value.double(), per_image["ace"].mean().reshape(value.shape))
    assert float(not_nans) == 4  # MONAI's "mean": images with a non-NaN value
    torch.testing.assert_close(metric.results()["mce"], per_image["mce"])
    pooled = calibration_errors(stats.pooled())
    torch.testing.assert_close(metric.pooled()["ece"], pooled["ece"][0])
    assert float(pooled["ece"].min()) > 0.01
    torch.testing.assert_close(metric.bin_stats().count, stats.count)


def test_logits_with_activation_and_other_metrics():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 9, 9, generator=g) * 3
    y = torch.randint(0, 3, (2, 9, 9), generator=g)
    metric = SegcalMetric("dice", activation="softmax")
    values = metric(y_pred=logits, y=y)
    ref = SegcalMetric("dice")(y_pred=torch.softmax(logits, 1), y=y)
    torch.testing.assert_close(values, ref)
    assert float(values.max()) > 0.1
    per_case = SegcalMetric("top_label_ece", num_bins=10)(y_pred=torch.softmax(logits, 1), y=y)
    assert per_case.shape == (2, 1) and float(per_case.min()) > 0.05
    with pytest.raises(ValueError, match="metric_name"):
        SegcalMetric("mae")
    with pytest.raises(ValueError, match="calibration_reduction"):
        CalibrationMetric(calibration_reduction="maximum", norm="l2")


def _shifted_squares(shift: int):
    """A 2-class volume whose predicted square is the true one shifted by ``shift`` voxels along axis 1."""
    y = torch.zeros(1, 10, 10, 6, dtype=torch.long)
    y[0, 3:7, 2:6, 1:5] = 1
    pred_lab = torch.roll(y, shift, dims=2)
    p = torch.nn.functional.one_hot(pred_lab, 2).movedim(-1, 1).float() * 0.8 + 0.1
    return p, y


def test_hd95_in_mm_from_metatensor_affine():
    p, y = _shifted_squares(1)
    affine = torch.diag(torch.tensor([1.5, 4.5, 2.0, 1.0], dtype=torch.float64))
    metric = HausdorffDistance95Metric()
    value = metric(y_pred=MetaTensor(p, affine=affine), y=MetaTensor(y, affine=affine))
    # the surface moved one voxel along the axis of 4.5 mm voxels: 4.5 mm, not 1 voxel
    assert float(value) == pytest.approx(4.5)
    ref = HausdorffDistanceMetric(include_background=False, percentile=95)
    onehot = torch.nn.functional.one_hot(y, 2).movedim(-1, 1).float()
    ref(y_pred=(p > 0.5).float(), y=onehot, spacing=[1.5, 4.5, 2.0])
    assert float(ref.aggregate()) == pytest.approx(4.5)
    plain = HausdorffDistance95Metric()(y_pred=p, y=y)  # no metadata: voxels
    assert float(plain) == pytest.approx(1.0)
    explicit = HausdorffDistance95Metric(spacing=(1.0, 3.0, 1.0))(y_pred=MetaTensor(p, affine=affine), y=y)
    assert float(explicit) == pytest.approx(3.0)  # an explicit spacing wins over the metadata


def test_hd95_per_image_spacing_of_a_collated_batch_and_a_list():
    p1, y1 = _shifted_squares(1)
    p2, y2 = _shifted_squares(2)
    a1 = torch.diag(torch.tensor([1.0, 2.5, 1.0, 1.0], dtype=torch.float64))
    a2 = torch.diag(torch.tensor([1.0, 0.7, 1.0, 1.0], dtype=torch.float64))
    items = [MetaTensor(p1[0], affine=a1), MetaTensor(p2[0], affine=a2)]
    labels = [y1, y2]  # (1, *S) channel-first label maps
    metric = HausdorffDistance95Metric()
    values = metric(y_pred=items, y=labels)
    expected = torch.cat([
        hausdorff_distance_95(p1, y1, spacing=(1.0, 2.5, 1.0)),
        hausdorff_distance_95(p2, y2, spacing=(1.0, 0.7, 1.0)),
    ])
    torch.testing.assert_close(values, expected)
    assert values[0, 0] == pytest.approx(2.5) and values[1, 0] == pytest.approx(1.4)
    from monai.data import list_data_collate

    batch = list_data_collate([{"p": items[0]}, {"p": items[1]}])["p"]
    assert batch.is_batch
    torch.testing.assert_close(HausdorffDistance95Metric()(y_pred=batch, y=torch.cat([y1, y2])), expected)


class _Net(torch.nn.Module):
    """A fixed 1x1 convolution: image (B, 1, *S) -> 3-class logits, deterministic."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[[-3.0]]], [[[0.5]]], [[[3.0]]]]))
            self.conv.bias.copy_(torch.tensor([1.0, 0.2, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _evaluator_data(n: int = 4):
    g = torch.Generator().manual_seed(7)
    items = []
    for i in range(n):
        img = torch.randn(1, 12, 12, generator=g)
        lab = torch.bucketize(img + 0.6 * torch.randn(1, 12, 12, generator=g), torch.tensor([-0.5, 0.5]))
        affine = torch.diag(torch.tensor([1.0 + i, 2.0, 1.0, 1.0], dtype=torch.float64))
        items.append({"image": MetaTensor(img, affine=affine), "label": MetaTensor(lab.float(), affine=affine)})
    return items


def _run_evaluator(postprocessing, key_metric, additional):
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(_evaluator_data(), batch_size=2),
        network=_Net(),
        postprocessing=postprocessing,
        key_val_metric=key_metric,
        additional_metrics=additional,
    )
    evaluator.run()
    return evaluator.state


@pytest.mark.parametrize("red", REDUCTIONS)
def test_supervised_evaluator_handler_equals_monai_handler(red):
    post = Compose([Activationsd("pred", softmax=True), AsDiscreted("label", to_onehot=3)])
    io = from_engine(["pred", "label"])
    state = _run_evaluator(
        post,
        {"segcal": CalibrationHandler(num_bins=10, calibration_reduction=red, output_transform=io)},
        {"monai": CalibrationError(num_bins=10, include_background=False, calibration_reduction=red,
                                   output_transform=io)},
    )
    assert state.metrics["segcal"] == pytest.approx(state.metrics["monai"], abs=1e-6)
    assert state.metrics["segcal"] > 0.01
    details = state.metric_details
    assert details["segcal"].shape == (4, 2)
    torch.testing.assert_close(details["segcal"].float(), details["monai"], atol=1e-6, rtol=0)


def test_supervised_evaluator_calibrated_pipeline_and_hd95_in_mm():
    """A post-processing chain with CalibrateLogitsd instead of a softmax; the handlers see the calibrated
    probabilities, and HD95 comes out in mm from each image's affine."""
    data = _evaluator_data()
    net = _Net()
    logits = torch.cat([net(d["image"].as_tensor()[None]) for d in data]).detach()
    labels = torch.cat([d["label"].as_tensor().long() for d in data])
    ts = TemperatureScaling().fit(logits, labels)
    assert abs(ts.temperature_ - 1.0) > 0.05  # the calibrator changes the probabilities
    post = Compose([CalibrateLogitsd("pred", ts)])
    io = from_engine(["pred", "label"])
    state = _run_evaluator(
        post,
        {"ace": CalibrationHandler(num_bins=10, calibration_reduction="average", output_transform=io)},
        {"hd95": HausdorffDistance95Handler(output_transform=io)},
    )
    probs = ts.transform(logits)
    expected = calibration_errors(bin_statistics(probs, labels, 10, include_background=False))["ace"]
    assert state.metrics["ace"] == pytest.approx(float(expected.mean()), rel=1e-6)
    hd = torch.cat([
        hausdorff_distance_95(probs[i : i + 1], labels[i : i + 1], spacing=(1.0 + i, 2.0)) for i in range(4)
    ])
    voxels = hausdorff_distance_95(probs, labels)
    assert not torch.allclose(hd, voxels)  # the spacing matters on these images
    torch.testing.assert_close(state.metric_details["hd95"], hd)
    assert state.metrics["hd95"] == pytest.approx(float(hd.nanmean()), rel=1e-6)


def test_calibrate_logits_transforms(tmp_path):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 3, 8, 8, generator=g) * 4
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    ts = TemperatureScaling().fit(logits, labels)
    one = MetaTensor(logits[0], affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])), meta={"case": "a"})
    out = CalibrateLogits(ts)(one)
    assert isinstance(out, MetaTensor) and out.meta["case"] == "a"
    torch.testing.assert_close(out.pixdim, one.pixdim)
    expected = ts.transform(logits[:1])[0]
    torch.testing.assert_close(out.as_tensor(), expected)
    assert not torch.allclose(expected, torch.softmax(logits[0], 0), atol=1e-3)
    ts.save(tmp_path / "ts.pt")
    d = CalibrateLogitsd(["pred"], tmp_path / "ts.pt")({"pred": logits[1], "other": 1})
    torch.testing.assert_close(d["pred"], ts.transform(logits[1:])[0])
    assert d["other"] == 1
    with pytest.raises(NotFittedError):
        CalibrateLogits(TemperatureScaling())
    with pytest.raises(TypeError, match="LastLayerFineTuner"):
        CalibrateLogits(LastLayerFineTuner(_Net()))


def test_bad_calls_are_named():
    p, y = _shifted_squares(1)
    with pytest.raises(ValueError, match="3 values per image"):
        HausdorffDistance95Metric(spacing=(1.0, 2.0))(y_pred=p, y=y)
    with pytest.raises(ValueError, match="per-image spacings"):
        HausdorffDistance95Metric()(y_pred=p, y=y, spacing=[(1.0, 1.0, 1.0)] * 2)
    with pytest.raises(ValueError, match="needs the ground truth"):
        CalibrationMetric()(y_pred=p)
    with pytest.raises(ValueError, match="probabilities"):
        CalibrationMetric()(y_pred=p * 5 - 2, y=y)
    with pytest.raises(ValueError, match="closed"):
        CalibrationMetric(closed="both")


def test_buffers_gather_over_two_gloo_processes_as_one_process(tmp_path) -> None:
    """Under torch.distributed (2 gloo processes, uneven shares of 3 and 1 images), MONAI's buffers gather
    segcal's per-image statistics: every rank's per-image values, aggregate and pooled values equal one
    process's over all images."""
    import socket

    import torch.multiprocessing as mp

    from _ddp_worker import all_data, monai_rank

    # one process first: it also compiles the kernels into numba's cache, which the two children then load
    single = SegcalMetric("ace", num_bins=10)
    single(*all_data())
    expected = {"per_image": single.get_buffer(), "aggregate": single.aggregate(), "pooled": single.pooled()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(monai_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert expected["per_image"].shape == (4, 2) and float(expected["aggregate"]) > 0.02
    for rank in range(2):
        got = torch.load(tmp_path / f"monai_rank{rank}.pt")
        torch.testing.assert_close(got["per_image"], expected["per_image"], rtol=1e-12, atol=0)
        torch.testing.assert_close(got["aggregate"], expected["aggregate"], rtol=1e-12, atol=0)
        for key, value in expected["pooled"].items():
            torch.testing.assert_close(got["pooled"][key], value, rtol=1e-12, atol=0, equal_nan=True, msg=key)
