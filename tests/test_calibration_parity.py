"""Parity of the calibration core with reference implementations (summary: docs/core-validation.md).

References: MONAI 1.6 ``calibration_binning`` / ``CalibrationErrorMetric``, torchmetrics
``MulticlassCalibrationError`` (top-label), netcal ``ECE``. Tolerances: 1e-6 absolute on float64 inputs,
1e-5 on float32 inputs.

Findings documented by these tests:

* MONAI computes in float32 (``y_pred.float()``) with edges ``linspace(0, 1 + eps32, M + 1)``; with its
  default ``right=False``, ``torch.bucketize`` puts ``p`` in bin ``k`` iff ``edge_k < p <= edge_{k+1}``, i.e.
  the bins are ``(k/M, (k+1)/M]`` (the docstring says ``[left, right)``, the code does the opposite). As
  the edges are inflated by ``1 + eps``, exact float32 ties ``p = k/M`` agree with segcal's
  ``closed="right"``, but the float32 value right *above* ``k/M`` still falls in MONAI's lower bin.
  Hence, for float64 parity we generate probabilities representable in float32 (compute in float32, then
  ``.double()``) so MONAI's internal cast is exact, and adversarial ties are placed exactly on ``k/M``.
* torchmetrics bins are ``[k/M, (k+1)/M)`` (``bucketize(right=True) - 1``) with edges from ``linspace`` in
  the input dtype (not always the correctly rounded k/M), and ``p = 1`` gets its own extra bin ``M``; segcal
  ``closed="left"`` puts ``p = 1`` in bin ``M - 1``. They agree whenever no confidence equals exactly 1.
* netcal ``ECE`` uses ``np.histogramdd`` on ``linspace(0, 1, M + 1)``: bins ``[a, b)``, the last one closed,
  after clipping probabilities into ``[eps, 1 - eps]`` (float64 eps). With 2 classes present netcal scores
  the class-1 probability against ``y`` (= segcal's marginal ECE of channel 1, ``closed="left"``); with more
  than 2 classes it scores the top-label confidence (= segcal's top-label ECE, ``closed="left"``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from segcal.functional.binning import _bin_statistics_torch, bin_statistics
from segcal.functional.calibration import calibration_error, calibration_errors, top_label_statistics
from segcal.functional.inputs import target_to_onehot

monai_cal = pytest.importorskip("monai.metrics.calibration")
from monai.metrics import CalibrationErrorMetric  # noqa: E402
from monai.metrics.calibration import calibration_binning  # noqa: E402

REDUCTIONS = ("expected", "average", "maximum")


# --- data
def f32_softmax(shape: tuple[int, ...], seed: int, scale: float = 3.0) -> torch.Tensor:
    """Softmax probabilities computed in float32 (so MONAI's internal float32 cast is lossless)."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g) * scale, dim=1)


def labels_for(probs: torch.Tensor, seed: int) -> torch.Tensor:
    """Labels sampled from the predicted distribution (so calibration errors are small but non-zero)."""
    g = torch.Generator().manual_seed(seed)
    b, c = probs.shape[:2]
    flat = probs.double().movedim(1, -1).reshape(-1, c)
    lab = torch.multinomial(flat, 1, generator=g)[:, 0]
    return lab.reshape(b, *probs.shape[2:])


def tie_probs(shape: tuple[int, ...], num_bins: int, seed: int) -> torch.Tensor:
    """Two-class probabilities with both channels exactly on float32 edges: p1 = fl(k/M), p0 = fl((M-k)/M).

    (``1 - fl(k/M)`` is not always ``fl((M-k)/M)``; the channels then sum to 1 within float32 rounding.)
    """
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, num_bins + 1, (shape[0], *shape[2:]), generator=g)
    p1 = (k.double() / num_bins).float()
    p0 = ((num_bins - k).double() / num_bins).float()
    return torch.stack([p0, p1], dim=1)


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor, int]]:
    """(name, float32 probabilities, labels, M)."""
    cases = []
    p = f32_softmax((2, 3, 17, 13), 0)
    cases.append(("random2d", p, labels_for(p, 1), 20))
    p = f32_softmax((2, 4, 9, 8, 7), 2)
    cases.append(("random3d", p, labels_for(p, 3), 20))
    # k/16 is exact in float32 and float64: a tie in both dtypes
    p = tie_probs((3, 2, 12, 12), 16, 4)
    cases.append(("ties_k_over_16", p, labels_for(p, 5), 16))
    # k/20 rounded to float32 is a tie only in float32: promoted to float64 it is no longer on the float64
    # edge (e.g. float32(0.3) = 0.30000001192...), so this case is compared on float32 input only
    p = tie_probs((3, 2, 12, 12), 20, 14)
    cases.append(("ties_k_over_20_f32only", p, labels_for(p, 15), 20))
    # exact 0 and 1: a one-hot prediction, half right, half wrong
    lab = torch.randint(0, 3, (2, 10, 10), generator=torch.Generator().manual_seed(6))
    pred_lab = lab.clone()
    pred_lab[:, :5] = (pred_lab[:, :5] + 1) % 3
    cases.append(("exact_0_1", target_to_onehot(pred_lab, 3), lab, 20))
    # single-voxel classes and an all-background image
    p = f32_softmax((2, 4, 8, 8), 7)
    lab = torch.zeros(2, 8, 8, dtype=torch.int64)
    lab[0, 3, 4] = 1
    lab[0, 5, 5] = 2
    lab[0, 0, 0] = 3
    cases.append(("single_voxel_and_all_background", p, lab, 20))
    # one-class image: every voxel is class 1
    p = f32_softmax((1, 3, 6, 5, 4), 8)
    cases.append(("one_class_3d", p, torch.ones(1, 6, 5, 4, dtype=torch.int64), 20))
    return cases


CASES = _cases()
CASE_IDS = [c[0] for c in CASES]


def monai_none(p: torch.Tensor, onehot: torch.Tensor, reduction: str, include_background: bool, m: int):
    metric = CalibrationErrorMetric(
        num_bins=m,
        include_background=include_background,
        calibration_reduction=reduction,
        metric_reduction="none",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric(p, onehot)
        return metric.aggregate().double()


def assert_close_nan(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    a, b = a.double().cpu(), b.double().cpu()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (a, b)
    ok = ~torch.isnan(a)
    if ok.any():
        diff = float((a[ok] - b[ok]).abs().max())
        assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


# --- MONAI
# float32 ties are not ties in float64 (see the case comment), so "f32only" cases run in float32 alone
_BINNING_PARAMS = [
    pytest.param(*case, dtype, id=f"{cid}-{did}")
    for case, cid in zip(CASES, CASE_IDS, strict=True)
    for dtype, did in ((torch.float64, "f64"), (torch.float32, "f32"))
    if not (case[0].endswith("f32only") and dtype == torch.float64)
]


@pytest.mark.parametrize(("name", "p", "lab", "m", "dtype"), _BINNING_PARAMS)
def test_calibration_binning_matches_monai(name, p, lab, m, dtype):
    p = p.to(dtype)
    c = p.shape[1]
    onehot = target_to_onehot(lab, c)
    mean_p, mean_y, counts = calibration_binning(p, onehot, num_bins=m)
    stats = bin_statistics(p, lab, m)
    atol = 1e-6 if dtype == torch.float64 else 1e-5
    assert torch.equal(stats.count, counts.double())
    assert_close_nan(stats.mean_p(), mean_p, atol)
    assert_close_nan(stats.mean_y(), mean_y, atol)


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("name", "p", "lab", "m"), CASES, ids=CASE_IDS)
def test_calibration_error_metric_matches_monai(name, p, lab, m, reduction, include_background):
    c = p.shape[1]
    onehot = target_to_onehot(lab, c)
    dtypes = ((torch.float64, 1e-6), (torch.float32, 1e-5))
    for dtype, atol in dtypes[1:] if name.endswith("f32only") else dtypes:
        pd = p.to(dtype)
        ref = monai_none(pd, onehot.to(dtype), reduction, include_background, m)
        stats = bin_statistics(pd, lab, m, include_background=include_background)
        ours = calibration_error(stats, reduction)
        assert_close_nan(ours, ref, atol)
        # metric_reduction="mean" is the nan-mean over (image, class)
        metric = CalibrationErrorMetric(
            num_bins=m, include_background=include_background, calibration_reduction=reduction
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metric(pd, onehot.to(dtype))
            mean_ref = float(metric.aggregate())
        assert abs(float(ours.nanmean()) - mean_ref) <= atol


def test_monai_dense_target_and_other_bin_counts():
    """One-hot targets (dense path) and M in {5, 7, 10, 15} give MONAI's values too."""
    p = f32_softmax((2, 3, 11, 9), 11).double()
    lab = labels_for(p, 12)
    onehot = target_to_onehot(lab, 3, dtype=torch.float64)
    for m in (5, 7, 10, 15):
        for red in REDUCTIONS:
            ref = monai_none(p, onehot, red, True, m)
            assert_close_nan(calibration_error(bin_statistics(p, onehot, m), red), ref, 1e-6)
            assert_close_nan(calibration_error(bin_statistics(p, lab, m), red), ref, 1e-6)


def test_monai_upper_neighbour_of_edge_differs_documented():
    """The float32 value right above k/M: segcal puts it in bin k (by its convention), MONAI (inflated edges) in k-1."""
    m = 20
    v = torch.nextafter(torch.tensor(0.5, dtype=torch.float32), torch.tensor(1.0))
    p = torch.stack([1 - v.expand(1, 2, 2), v.expand(1, 2, 2)], dim=1)  # (1, 2, 2, 2)
    y = torch.zeros(1, 2, 2, dtype=torch.int64)
    _, _, counts = calibration_binning(p, target_to_onehot(y, 2, spatial_shape=(2, 2)), num_bins=m)
    stats = bin_statistics(p, y, m)
    assert int(stats.count[0, 1].argmax()) == 10  # (0.5, 0.55]
    assert int(counts[0, 1].argmax()) == 9  # MONAI: edge 0.5 * (1 + eps) >= v


# --- torchmetrics
tm = pytest.importorskip("torchmetrics.classification")


def _tm_ce(p: torch.Tensor, lab: torch.Tensor, m: int, norm: str) -> float:
    c = p.shape[1]
    metric = tm.MulticlassCalibrationError(num_classes=c, n_bins=m, norm=norm)
    return float(metric(p.movedim(1, -1).reshape(-1, c), lab.reshape(-1)))


@pytest.mark.parametrize("norm", ["l1", "max"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_top_label_matches_torchmetrics(norm, dtype):
    m = 15
    for shape, seed in (((1, 4, 23, 19), 20), ((1, 3, 8, 7, 6), 21)):
        p = f32_softmax(shape, seed, scale=2.0).to(dtype)
        lab = labels_for(p, seed + 100)
        red = "expected" if norm == "l1" else "maximum"
        ours = float(calibration_error(top_label_statistics(p, lab, m, closed="left"), red)[0, 0])
        ref = _tm_ce(p, lab, m, norm)
        assert abs(ours - ref) <= (1e-6 if dtype == torch.float64 else 1e-5)
        # with no tie at an edge the tie convention does not matter
        ours_r = float(calibration_error(top_label_statistics(p, lab, m, closed="right"), red)[0, 0])
        assert abs(ours_r - ref) <= (1e-6 if dtype == torch.float64 else 1e-5)


def test_top_label_ties_torchmetrics_left_closed():
    """Confidences exactly on k/M (k < M): torchmetrics agrees with closed='left', not with closed='right'.

    M = 8 so that torchmetrics' ``linspace`` edges are exactly k/M; for e.g. M = 10, ``linspace(0, 1, 11)``
    gives 0.7000000000000001 for 0.7, so a confidence of 0.7 falls below torchmetrics' own edge.
    """
    m = 8
    g = torch.Generator().manual_seed(30)
    k = torch.randint(4, m, (1, 16, 16), generator=g)  # top-label confidence in [0.5, 0.875]
    p1 = (k.double() / m).float().double()
    p = torch.stack([1 - p1, p1], dim=1)
    p[:, :, :, :8] = p[:, :, :, :8].flip(1)  # half of the voxels have class 0 on top
    lab = labels_for(p, 31)
    ref = _tm_ce(p, lab, m, "l1")
    left = top_label_statistics(p, lab, m, closed="left")
    right = top_label_statistics(p, lab, m, closed="right")
    assert abs(float(calibration_error(left, "expected")[0, 0]) - ref) <= 1e-6
    # one confidence value per bin, so the ECE is the same; with closed='right' every tie sits one bin lower
    assert torch.equal(left.count[..., 1:], right.count[..., :-1])
    assert not torch.equal(left.count, right.count)


# --- netcal
netcal_metrics = pytest.importorskip("netcal.metrics")


@pytest.mark.parametrize("m", [10, 20])
def test_top_label_ece_matches_netcal(m):
    p = f32_softmax((1, 4, 20, 20, 3), 40, scale=2.0).double()
    lab = labels_for(p, 41)
    assert len(lab.unique()) > 2  # netcal switches to top-label scoring only with > 2 classes present
    x = p.movedim(1, -1).reshape(-1, 4).numpy()
    ref = float(netcal_metrics.ECE(bins=m).measure(x, lab.reshape(-1).numpy()))
    ours = float(calibration_error(top_label_statistics(p, lab, m, closed="left"), "expected")[0, 0])
    assert abs(ours - ref) <= 1e-6


def test_binary_marginal_ece_matches_netcal():
    """Two classes: netcal scores p(class 1) against y = segcal's channel-1 marginal ECE (closed='left')."""
    m = 20
    p = f32_softmax((1, 2, 30, 30), 42).double()
    lab = labels_for(p, 43)
    x = p.movedim(1, -1).reshape(-1, 2).numpy()
    ref = float(netcal_metrics.ECE(bins=m).measure(x, lab.reshape(-1).numpy()))
    ours = float(calibration_error(bin_statistics(p, lab, m, closed="left"), "expected")[0, 1])
    assert abs(ours - ref) <= 1e-6


# --- numba vs pure-torch path
def _both_paths(p, labels, dense, mask, m, closed, first=0):
    from segcal.functional.binning import _bin_statistics_numba

    c = p.shape[1]
    dy = dense[:, first:] if dense is not None else None
    a, _, _ = _bin_statistics_numba(p, labels, dense, first, mask, m, closed)
    t = _bin_statistics_torch(p[:, first:], labels, dy, torch.arange(first, c), mask, m, closed)
    return a, t


@pytest.mark.parametrize("closed", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_numba_and_torch_paths_identical(dtype, closed):
    m = 20
    p = f32_softmax((2, 3, 14, 11, 5), 50)
    # put a quarter of the voxels exactly on edges and some at 0 / 1
    p[:, :, :3] = tie_probs((2, 2, 3, 11, 5), m, 51).repeat(1, 2, 1, 1, 1)[:, :3] * torch.tensor(
        [1.0, 1.0, 0.0]
    ).view(1, 3, 1, 1, 1)
    p[:, :, 3] = target_to_onehot(torch.randint(0, 3, (2, 11, 5)), 3)
    p = p.to(dtype)
    lab = labels_for(p.float(), 52)
    dense = target_to_onehot(lab, 3, dtype=dtype)
    soft = torch.rand(p.shape, generator=torch.Generator().manual_seed(53)).to(dtype)
    mask = torch.rand(2, 14, 11, 5, generator=torch.Generator().manual_seed(54)) > 0.3
    for labels, dy in ((lab, None), (None, dense), (None, soft)):
        for msk in (None, mask):
            for first in (0, 1):
                a, t = _both_paths(p, labels, dy, msk, m, closed, first)
                _assert_same_sums(a, t, fixed_point=labels is not None and dtype == torch.float32)
    # and bin_statistics routes to the numba kernel on CPU: same as the torch path
    stats = bin_statistics(p, lab, m, closed=closed)
    t = _bin_statistics_torch(p, lab, None, torch.arange(3), None, m, closed)
    _assert_same_sums(torch.stack([stats.count, stats.sum_p, stats.sum_y], 2), t, dtype == torch.float32)


def _assert_same_sums(a: torch.Tensor, t: torch.Tensor, fixed_point: bool) -> None:
    """``(..., 3, M)`` sums of two paths: counts and target sums equal, probability sums equal to float64
    rounding, or within the documented resolution of the float32 label-map kernel (``count * 2**-31``)."""
    assert torch.equal(a[..., 0, :], t[..., 0, :])  # counts exact
    assert torch.allclose(a[..., 2, :], t[..., 2, :], rtol=1e-12, atol=1e-9)
    bound = 1e-9 + 1e-12 * t[..., 1, :].abs() + (t[..., 0, :] * 2.0**-31 if fixed_point else 0.0)
    assert bool(((a[..., 1, :] - t[..., 1, :]).abs() <= bound).all())


def test_half_precision_ties_are_resolved_in_input_dtype():
    """float16/bfloat16 probabilities on k/M land where ``closed`` says (edges rounded in the input dtype)."""
    m = 8  # k/8 is exact in every float format
    for dtype in (torch.float16, torch.bfloat16):
        v = (torch.arange(m + 1, dtype=torch.float64) / m).to(dtype)
        p = torch.stack([1 - v, v]).view(1, 2, 1, m + 1)
        lab = torch.zeros(1, 1, m + 1, dtype=torch.int64)
        right = bin_statistics(p, lab, m, closed="right").count[0, 1]
        left = bin_statistics(p, lab, m, closed="left").count[0, 1]
        assert right.tolist() == [2.0] + [1.0] * (m - 1)  # 0 and 1/8 share bin 0
        assert left.tolist() == [1.0] * (m - 1) + [2.0]  # 7/8 and 1 share bin M-1


def test_regions_brats_hand_computation():
    """BraTS regions ET=p3, TC=p1+p3, WT=p1+p2+p3 against a hand computation on both paths."""
    m = 10
    p = f32_softmax((2, 4, 6, 7, 5), 60).double()
    lab = labels_for(p, 61)
    regions = [[3], [1, 3], [1, 2, 3]]
    stats = bin_statistics(p, lab, m, regions=regions)
    rp = torch.stack([p[:, 3], p[:, 1] + p[:, 3], p[:, 1] + p[:, 2] + p[:, 3]], 1).clamp(0, 1)
    ry = torch.stack([lab == 3, (lab == 1) | (lab == 3), lab > 0], 1).double()
    k = torch.bucketize(rp, (torch.arange(1, m, dtype=torch.float64) / m)).flatten(2)  # (k/M, (k+1)/M]
    zeros = torch.zeros(2, 3, m, dtype=torch.float64)
    cnt = zeros.scatter_add(2, k, torch.ones_like(k, dtype=torch.float64))
    sp = zeros.scatter_add(2, k, rp.flatten(2))
    sy = zeros.scatter_add(2, k, ry.flatten(2))
    assert torch.equal(stats.count, cnt)
    assert torch.allclose(stats.sum_p, sp, atol=1e-12)
    assert torch.equal(stats.sum_y, sy)
    t = _bin_statistics_torch(rp, None, ry, torch.arange(3), None, m, "right")
    assert torch.allclose(t, torch.stack([cnt, sp, sy], 2), atol=1e-12)


def test_calibration_errors_keys_and_l2():
    p = f32_softmax((1, 3, 12, 12), 70).double()
    lab = labels_for(p, 71)
    stats = bin_statistics(p, lab, 10)
    errs = calibration_errors(stats)
    assert set(errs) == {"ece", "ace", "mce", "ece_l2", "ace_l2"}
    gap = (stats.mean_y() - stats.mean_p()).abs()
    w = stats.count / stats.count.sum(-1, keepdim=True)
    assert torch.allclose(errs["ece_l2"], (w * gap.nan_to_num() ** 2).sum(-1).sqrt(), atol=1e-12)
    assert torch.allclose(errs["ace_l2"], (gap**2).nanmean(-1).sqrt(), atol=1e-12)
    assert torch.all(errs["ece"] <= errs["ece_l2"] + 1e-12)  # Jensen
