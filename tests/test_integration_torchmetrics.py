"""segcal's torchmetrics Metric: parity with torchmetrics' calibration errors (random and adversarial inputs),
MetricCollection, forward / merge_state, constant state size, and DDP sync over two gloo processes."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError
from torchmetrics.functional.classification.calibration_error import _ce_compute

from _ddp_worker import all_data, softmax_data, torchmetrics_rank
from segcal.functional import bin_statistics, calibration_errors, top_label_statistics
from segcal.integrations.torchmetrics import SegmentationCalibrationError

NORMS = {"l1": "ece", "l2": "ece_l2", "max": "mce"}


_softmax_data = softmax_data


def _metric(c: int, m: int, **kw) -> SegmentationCalibrationError:
    return SegmentationCalibrationError(c, m, closed="left", errors=("ece", "ece_l2", "mce"), **kw)


def _assert_top_label_parity(p: torch.Tensor, y: torch.Tensor, m: int, batches: int = 1) -> dict[str, float]:
    """segcal's top-label errors equal torchmetrics' MulticlassCalibrationError for every norm, fed in
    ``batches`` updates; returns the values (for the caller's non-triviality checks)."""
    c = p.shape[1]
    tol = 1e-6 if p.dtype == torch.float64 else 2e-6
    out = {}
    ours = _metric(c, m)
    refs = {n: MulticlassCalibrationError(c, n_bins=m, norm=n) for n in NORMS}
    for chunk_p, chunk_y in zip(p.chunk(batches), y.chunk(batches), strict=True):
        ours.update(chunk_p, chunk_y)
        for r in refs.values():
            r.update(chunk_p, chunk_y)
    res = ours.compute()
    for norm, key in NORMS.items():
        ref = float(refs[norm].compute())
        assert float(res[f"top_label_{key}"]) == pytest.approx(ref, abs=tol), (norm, res, ref)
        out[norm] = ref
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_top_label_equals_torchmetrics_on_random_inputs(dtype):
    p, y = _softmax_data(3, 4, (14, 11), 0, dtype)
    values = _assert_top_label_parity(p, y, 15, batches=3)
    assert min(values.values()) > 0.05
    p3, y3 = _softmax_data(2, 3, (6, 5, 4), 1, dtype)
    assert min(_assert_top_label_parity(p3, y3, 10).values()) > 0.05


def test_marginal_equals_torchmetrics_binary_calibration_error_per_class():
    """The marginal error of class c is torchmetrics' binary calibration error of (p_c, y == c)."""
    p, y = _softmax_data(2, 3, (16, 16), 2, torch.float64)
    ours = SegmentationCalibrationError(3, 15, closed="left", include_background=True, average="none",
                                        errors=("ece", "ece_l2", "mce"), top_label=False)
    ours.update(p, y)
    res = ours.compute()
    assert set(res) == {"ece", "ece_l2", "mce"}
    for c in range(3):
        for norm, key in NORMS.items():
            ref = BinaryCalibrationError(n_bins=15, norm=norm)(p[:, c].reshape(-1), (y == c).reshape(-1).long())
            assert float(res[key][c]) == pytest.approx(float(ref), abs=1e-6)
            assert float(res[key][c]) > 0.02


def test_adversarial_ties_on_edges_zeros_and_ones():
    """Confidences exactly on k/M (M = 8: torchmetrics' linspace edges are exact), exact 0 and 1 probabilities,
    with bin M - 1 holding only confidences of 1: segcal closed='left' and torchmetrics bin alike."""
    m = 8
    g = torch.Generator().manual_seed(5)
    k = torch.tensor([4, 5, 6, 8])[torch.randint(0, 4, (2, 12, 12), generator=g)]  # no 7/8: see below
    top = k.double() / m
    p = torch.stack([top, 1 - top], 1)
    flip = torch.rand(2, 12, 12, generator=g) < 0.5
    p = torch.where(flip[:, None], p.flip(1), p)  # either class on top
    y = (torch.rand(2, 12, 12, generator=g) < p[:, 1]).long()
    y[:, :3] = 1 - y[:, :3]  # some confident mistakes, including at p = 1
    assert bool((p == 1).any()) and bool((p == 0).any())
    values = _assert_top_label_parity(p, y, m)
    assert min(values.values()) > 0.02
    # ties are resolved 'left' (torchmetrics) and not 'right': the same data with closed='right' differ
    right = top_label_statistics(p, y, m, closed="right")
    left = top_label_statistics(p, y, m, closed="left")
    assert not torch.equal(right.count, left.count)


def test_adversarial_one_class_and_one_hot_predictions():
    p, _ = _softmax_data(2, 3, (10, 10), 6, torch.float64)
    y = torch.full((2, 10, 10), 2)  # every voxel one class
    assert min(_assert_top_label_parity(p, y, 10).values()) > 0.1
    hard = torch.nn.functional.one_hot(p.argmax(1), 3).movedim(-1, 1).double()  # only 0 and 1
    _, y2 = _softmax_data(2, 3, (10, 10), 7, torch.float64)
    values = _assert_top_label_parity(hard, y2, 10)
    assert values["l1"] > 0.1


def test_confidence_one_next_to_others_in_the_last_bin_is_the_documented_difference():
    """torchmetrics gives p = 1 a bin of its own; segcal puts it in the last bin [(M-1)/M, 1]. With both in
    the data the values differ, and torchmetrics' own computation with a last edge just above 1 (so that 1
    falls into bin M - 1) gives segcal's value."""
    m = 8
    conf = torch.tensor([7 / 8, 7 / 8, 1.0, 1.0, 0.9, 0.625, 0.75], dtype=torch.float64)
    correct = torch.tensor([1, 1, 0, 0, 1, 1, 1], dtype=torch.float64)  # [7/8, 1): under-confident; 1: over
    p = torch.stack([conf, 1 - conf])[None, :, :, None]  # class 0 on top, with confidence conf
    y = (1 - correct).long()[None, :, None]
    assert p.shape == (1, 2, 7, 1) and y.shape == (1, 7, 1)
    ours = _metric(2, m)
    ours.update(p, y)
    tm = float(MulticlassCalibrationError(2, n_bins=m)(p, y))
    segcal_ece = float(ours.compute()["top_label_ece"])
    assert abs(segcal_ece - tm) > 0.05
    edges = torch.linspace(0, 1, m + 1, dtype=torch.float64)
    edges[-1] = torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    assert float(_ce_compute(conf, correct, edges, norm="l1")) == pytest.approx(segcal_ece, abs=1e-12)


def test_equals_the_functional_core_forward_merge_and_collection():
    p, y = _softmax_data(4, 3, (9, 9), 8, torch.float64)
    metric = SegmentationCalibrationError(3, 20, errors=("ece", "ace", "mce", "ece_l2", "ace_l2"))
    batch_value = metric(p[:2], y[:2])  # forward: this batch's value, accumulated too
    metric(p[2:], y[2:])
    res = metric.compute()
    pooled = calibration_errors(bin_statistics(p, y, 20, include_background=False).pooled())
    top = calibration_errors(top_label_statistics(p, y, 20))
    for e in ("ece", "ace", "mce", "ece_l2", "ace_l2"):
        assert float(res[e]) == pytest.approx(float(pooled[e][0].mean()), rel=1e-12)
        assert float(res[f"top_label_{e}"]) == pytest.approx(
            float(calibration_errors(top_label_statistics(p, y, 20).pooled())[e][0, 0]), rel=1e-12
        )
    assert float(res["ace"]) > 0.05 and top["ece"].shape == (4, 1)
    first = calibration_errors(bin_statistics(p[:2], y[:2], 20, include_background=False).pooled())
    assert float(batch_value["ece"]) == pytest.approx(float(first["ece"][0].mean()), rel=1e-12)
    assert abs(float(batch_value["ece"]) - float(res["ece"])) > 1e-4
    a, b = SegmentationCalibrationError(3, 20), SegmentationCalibrationError(3, 20)
    a.update(p[:1], y[:1])
    b.update(p[1:], y[1:])
    a.merge_state(b)
    assert float(a.compute()["ece"]) == pytest.approx(float(res["ece"]), rel=1e-12)
    coll = MetricCollection({"segcal": SegmentationCalibrationError(3, 15, closed="left"),
                             "tm": MulticlassCalibrationError(3, n_bins=15)}, prefix="val_")
    coll.update(p, y)
    out = coll.compute()
    assert {"val_ece", "val_ace", "val_mce", "val_top_label_ece", "val_tm"} <= set(out)
    assert float(out["val_top_label_ece"]) == pytest.approx(float(out["val_tm"]), abs=1e-6)
    logits = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(9))
    via_logits = SegmentationCalibrationError(3, activation="softmax")
    via_logits.update(logits, y[:2, :5, :5])
    via_probs = SegmentationCalibrationError(3)
    via_probs.update(torch.softmax(logits, 1), y[:2, :5, :5])
    assert float(via_logits.compute()["ace"]) == pytest.approx(float(via_probs.compute()["ace"]), rel=1e-6)
    with pytest.raises(ValueError, match="preds must be"):
        via_probs.update(torch.softmax(logits, 1)[:, :2], y[:2, :5, :5])


def _state_bytes(metric: SegmentationCalibrationError) -> int:
    return sum(v.numel() * v.element_size() for v in metric.metric_state.values())


def test_state_size_does_not_grow_with_voxels_or_images():
    metric = SegmentationCalibrationError(4, 20)
    empty = _state_bytes(metric)
    # (3 kept classes + 1 top-label row) x 3 sums x 20 bins x 8 bytes
    assert empty == (3 + 1) * 3 * 20 * 8 == 1920
    p, y = _softmax_data(1, 4, (4, 4), 10)
    metric.update(p, y)
    one_tiny = _state_bytes(metric)
    for seed in range(6):  # 6 x 3 images of 24 x 24 x 16 voxels
        p, y = _softmax_data(3, 4, (24, 24, 16), 11 + seed)
        metric.update(p, y)
    assert _state_bytes(metric) == one_tiny == empty
    assert float(metric.count.sum()) == 3 * (16 + 18 * 24 * 24 * 16)  # all voxels were counted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sync_over_two_gloo_processes_equals_one_process(tmp_path):
    mp.spawn(torchmetrics_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    single = SegmentationCalibrationError(3, 10)
    single.update(*all_data())
    expected = single.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in expected.items():
            assert float(got["synced"][key]) == pytest.approx(float(value), rel=1e-12), (rank, key)
        # without the sync each rank sees only its share: different values
        assert abs(float(got["local"]["ece"]) - float(expected["ece"])) > 1e-3
    assert float(expected["ece"]) > 0.02


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="integer"):
        SegmentationCalibrationError("3")
    with pytest.raises(ValueError, match="leaves no class"):
        SegmentationCalibrationError(1)
    with pytest.raises(ValueError, match="errors must be among"):
        SegmentationCalibrationError(3, errors=("ece", "brier"))
    with pytest.raises(ValueError, match="average"):
        SegmentationCalibrationError(3, average="micro")
    with pytest.raises(ValueError, match="num_bins"):
        SegmentationCalibrationError(3, num_bins=0)
    metric = SegmentationCalibrationError(3)
    with pytest.raises(ValueError, match="probabilities"):  # logits without activation= fail loudly
        metric.update(torch.randn(1, 3, 4, 4) * 5, torch.zeros(1, 4, 4, dtype=torch.long))
