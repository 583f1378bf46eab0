"""Bad input: one clear ValueError/TypeError that names the argument and the problem."""

from __future__ import annotations

import pytest
import torch

from segcal.functional.binning import BinStats, bin_edges, bin_statistics
from segcal.functional.calibration import (
    brier_score,
    calibration_error,
    negative_log_likelihood,
    top_label_statistics,
)
from segcal.functional.overlap import confusion_counts, hausdorff_distance_95


def _good(b: int = 2, c: int = 3, spatial: tuple[int, ...] = (6, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(b, c, *spatial, generator=g), 1)
    lab = torch.randint(0, c, (b, *spatial), generator=g)
    return p, lab


ENTRY_POINTS = {
    "bin_statistics": lambda p, y, **kw: bin_statistics(p, y, 10, **kw),
    "top_label_statistics": lambda p, y, **kw: top_label_statistics(p, y, 10, **kw),
    "negative_log_likelihood": lambda p, y, **kw: negative_log_likelihood(p, y, **kw),
    "brier_score": lambda p, y, **kw: brier_score(p, y, **kw),
    "confusion_counts": lambda p, y, **kw: confusion_counts(p, y, **kw),
    "hausdorff_distance_95": lambda p, y, **kw: hausdorff_distance_95(p, y, **kw),
}
FNS = list(ENTRY_POINTS.values())
IDS = list(ENTRY_POINTS)


def test_good_input_passes():
    p, lab = _good()
    for fn in FNS:
        fn(p, lab)


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_shape_mismatch(fn):
    p, lab = _good()
    with pytest.raises(ValueError, match=r"target shape \(2, 3, 6, 4\) does not match prediction shape"):
        fn(p, torch.zeros(2, 3, 6, 4))
    with pytest.raises(ValueError, match=r"target shape .* does not match prediction shape"):
        fn(p, lab[:, :, :4])  # label map with wrong spatial size
    with pytest.raises(ValueError, match="target has batch size 1 but the prediction has 2"):
        fn(p, lab[:1])


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_integer_predictions(fn):
    _, lab = _good()
    with pytest.raises(TypeError, match=r"prediction must be a floating-point tensor .*got torch.int64"):
        fn(torch.ones(2, 3, 6, 5, dtype=torch.int64), lab)


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_not_a_tensor(fn):
    p, lab = _good()
    with pytest.raises(TypeError, match=r"prediction must be a torch.Tensor, got ndarray"):
        fn(p.numpy(), lab)
    with pytest.raises(TypeError, match=r"target must be a torch.Tensor, got list"):
        fn(p, lab.tolist())


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_probabilities_outside_unit_interval(fn):
    p, lab = _good()
    with pytest.raises(ValueError, match=r"must hold probabilities in \[0, 1\] but spans .*activation="):
        fn(p * 3 - 1, lab)
    with pytest.raises(ValueError, match=r"must hold probabilities in \[0, 1\]"):
        fn(p * 2, lab)


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_not_summing_to_one_in_exclusive_mode(fn):
    p, lab = _good()
    bad = p.clone()
    bad[:, 0] *= 0.5
    msg = r"exclusive mode needs class probabilities that sum to 1 .*multilabel"
    with pytest.raises(ValueError, match=msg):
        fn(bad, lab)
    # the same tensor is fine as independent channels
    if fn is not ENTRY_POINTS["top_label_statistics"]:
        fn(bad, (torch.nn.functional.one_hot(lab, 3).movedim(-1, 1)).float(), mode="multilabel")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_nan_inf_predictions(fn, bad_value):
    p, lab = _good()
    p = p.clone()
    p[0, 1, 2, 3] = bad_value
    p[1, 0, 0, 0] = bad_value
    with pytest.raises(ValueError, match="prediction contains 2 NaN/Inf values"):
        fn(p, lab)
    with pytest.raises(ValueError, match="prediction contains 2 NaN/Inf values"):
        fn(p, lab, activation="softmax")


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_nan_in_target(fn):
    p, lab = _good()
    y = torch.nn.functional.one_hot(lab, 3).movedim(-1, 1).float()
    y[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="target contains NaN/Inf"):
        fn(p, y)


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_labels_outside_class_range(fn):
    p, lab = _good()
    msg = r"labels must lie in \[0, 2\] for 3 classes, found values in "
    with pytest.raises(ValueError, match=msg + r"\[0, 3\]"):
        fn(p, torch.where(lab == 2, 3, lab))
    with pytest.raises(ValueError, match=msg + r"\[-1, "):
        fn(p, torch.where(lab == 2, -1, lab))


def test_check_target_without_the_label_range() -> None:
    """``label_range=False`` leaves out only the range of an exclusive label map (its caller checks it in a pass of
    its own); the structure is still checked, and multilabel label maps keep their range check."""
    from segcal.functional.inputs import check_label_range, check_target

    p, lab = _good()
    outside = torch.where(lab == 2, 3, lab)
    check_target(outside, p.shape, "exclusive", label_range=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\] for 3 classes, found values in \[0, 3\]"):
        check_label_range(outside, 3)
    with pytest.raises(ValueError, match="batch size"):
        check_target(outside[:1], p.shape, "exclusive", label_range=False)
    with pytest.raises(ValueError, match="labels must lie"):
        check_target(outside, p.shape, "multilabel", label_range=False)


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_empty_tensors(fn):
    with pytest.raises(ValueError, match=r"prediction is empty \(shape \(2, 3, 0, 5\)\)"):
        fn(torch.zeros(2, 3, 0, 5), torch.zeros(2, 0, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="prediction is empty"):
        fn(torch.zeros(0, 3, 4, 5), torch.zeros(0, 4, 5, dtype=torch.int64))


@pytest.mark.parametrize("fn", FNS, ids=IDS)
def test_wrong_ndim(fn):
    msg = r"shape \(B, C, \*spatial\) with 2 or 3 spatial dims, got shape \(2, 3, 7\)"
    with pytest.raises(ValueError, match=msg):
        fn(torch.full((2, 3, 7), 1 / 3), torch.zeros(2, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="with 2 or 3 spatial dims, got shape"):
        fn(torch.full((1, 2, 2, 2, 2, 2), 0.5), torch.zeros(1, 2, 2, 2, 2, dtype=torch.int64))


@pytest.mark.parametrize("bad", [0, -3, 2.5, "20", None])
def test_bad_num_bins(bad):
    p, lab = _good()
    with pytest.raises(ValueError, match="num_bins must be a positive integer, got"):
        bin_statistics(p, lab, bad)
    with pytest.raises(ValueError, match="num_bins must be a positive integer"):
        top_label_statistics(p, lab, bad)
    with pytest.raises(ValueError, match="num_bins must be a positive integer"):
        bin_edges(bad)


def test_bad_mask():
    p, lab = _good()
    with pytest.raises(ValueError, match=r"mask shape \(2, 6, 4\) must be \(B, \*spatial\) = \(2, 6, 5\)"):
        bin_statistics(p, lab, 10, mask=torch.ones(2, 6, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask shape \(1, 6, 5\) must be"):
        bin_statistics(p, lab, 10, mask=torch.ones(1, 6, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be binary \(0/1 or bool\)"):
        bin_statistics(p, lab, 10, mask=torch.full((2, 6, 5), 0.5))
    with pytest.raises(TypeError, match=r"mask must be a torch.Tensor, got ndarray"):
        bin_statistics(p, lab, 10, mask=torch.ones(2, 6, 5).numpy())
    with pytest.raises(ValueError, match=r"mask shape .* must be"):
        top_label_statistics(p, lab, 10, mask=torch.ones(2, 6, 4, dtype=torch.bool))


def test_bad_options():
    p, lab = _good()
    with pytest.raises(ValueError, match="mode must be 'exclusive' or 'multilabel', got 'softmax'"):
        bin_statistics(p, lab, mode="softmax")
    with pytest.raises(ValueError, match="activation must be None, 'softmax' or 'sigmoid', got 'relu'"):
        bin_statistics(p, lab, activation="relu")
    with pytest.raises(ValueError, match="closed must be 'right' or 'left', got 'both'"):
        bin_statistics(p, lab, closed="both")
    with pytest.raises(ValueError, match="activation='softmax' implies mode='exclusive'"):
        bin_statistics(p, torch.ones_like(p), activation="softmax", mode="multilabel")
    with pytest.raises(ValueError, match="a label map cannot describe overlapping multilabel channels"):
        bin_statistics(p, lab, mode="multilabel")
    with pytest.raises(ValueError, match="include_background=False needs at least 2 channels"):
        bin_statistics(torch.ones(2, 1, 6, 5), torch.zeros(2, 1, 6, 5), include_background=False)
    with pytest.raises(ValueError, match=r"region class 4 is outside \[0, 2\]"):
        bin_statistics(p, lab, regions=[[1], [1, 4]])
    with pytest.raises(ValueError, match="every region must contain at least one class"):
        bin_statistics(p, lab, regions=[[1], []])
    with pytest.raises(ValueError, match="spacing has 3 values but the images have 2 spatial dims"):
        hausdorff_distance_95(p, lab, spacing=(1.0, 1.0, 2.0))
    stats = bin_statistics(p, lab, 10)
    with pytest.raises(ValueError, match="reduction must be 'expected', 'average' or 'maximum', got 'mean'"):
        calibration_error(stats, "mean")
    with pytest.raises(ValueError, match="norm must be 'l1' or 'l2', got 'l3'"):
        calibration_error(stats, "expected", "l3")


def test_soft_target_out_of_range_and_binstats_shapes():
    p, _ = _good()
    with pytest.raises(ValueError, match=r"soft targets must lie in \[0, 1\], found \[0, 2\]"):
        bin_statistics(p, torch.full_like(p, 2.0).index_fill_(0, torch.tensor([0]), 0.0), 10)
    with pytest.raises(ValueError, match="a label map must hold integer class indices"):
        bin_statistics(p, torch.full((2, 6, 5), 0.5), 10)
    s = bin_statistics(p, torch.zeros(2, 6, 5, dtype=torch.int64), 10)
    with pytest.raises(ValueError, match=r"cannot add BinStats of shapes \(2, 3, 10\) and \(2, 3, 5\)"):
        _ = s + bin_statistics(p, torch.zeros(2, 6, 5, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match=r"BinStats tensors must all have shape \(B, C, M\)"):
        BinStats(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"expected a \(B, C, 3, M\) array"):
        BinStats.from_numpy(s.numpy()[:, :, :2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("closed", ["right", "left"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
def test_kernel_flags_out_of_range_values_whose_voxel_sums_to_one(dtype, closed, masked, include_background):
    """The fused kernels validate with one channel-sum check per voxel (a value outside [0, 1] or NaN is summed
    as 8): a voxel whose values are out of range but still sum to 1, or that holds a NaN, in any channel
    (the background too, which is only validated when excluded), deep in a multi-chunk image, is caught by
    every compiled variant (tie convention x mask x dtype)."""
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, 3, 300, 250, generator=g, dtype=dtype), 1)  # 75,000 voxels: two chunks
    lab = torch.randint(0, 3, (2, 300, 250), generator=g)
    mask = torch.rand(2, 300, 250, generator=g) > 0.3 if masked else None
    kw = {"closed": closed, "mask": mask}
    bin_statistics(p, lab, 20, include_background=include_background, **kw)
    top_label_statistics(p, lab, 20, **kw)
    for ch in (0, 1):
        shifted = p.clone()
        shifted[1, ch, 290, 7] += 1.0  # > 1 ...
        shifted[1, 2, 290, 7] -= 1.0  # ... and < 0: the voxel still sums to 1
        with pytest.raises(ValueError, match=r"must hold probabilities in \[0, 1\]"):
            bin_statistics(shifted, lab, 20, include_background=include_background, **kw)
        with pytest.raises(ValueError, match=r"must hold probabilities in \[0, 1\]"):
            top_label_statistics(shifted, lab, 20, **kw)
        nan = p.clone()
        nan[1, ch, 290, 7] = float("nan")
        with pytest.raises(ValueError, match="prediction contains 1 NaN/Inf values"):
            bin_statistics(nan, lab, 20, include_background=include_background, **kw)
        with pytest.raises(ValueError, match="prediction contains 1 NaN/Inf values"):
            top_label_statistics(nan, lab, 20, **kw)


@pytest.mark.parametrize("bad", [True, 10**8, 10_001])
def test_num_bins_bool_and_absurd_counts_are_refused(bad):
    from segcal.evaluation import EvalConfig
    from segcal.functional.binning import MAX_BINS

    p = torch.full((1, 2, 4, 4), 0.5)
    lab = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=f"num_bins must be a positive integer.*{bad}"):
        bin_statistics(p, lab, bad)
    with pytest.raises(ValueError, match="num_bins"):
        EvalConfig(num_bins=bad)
    assert bin_statistics(p, lab, MAX_BINS).num_bins == MAX_BINS
