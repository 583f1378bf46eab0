"""Metrics of the peers: parity with MetricsReloaded (cwECE, rbs), netcal (equal-mass ECE) and relplot (smooth
ECE), the stated bound of the histogram equal-mass ECE, merge properties of every pooled metric, and the stateful
metric.

The MetricsReloaded reference below is a port of the formulas of MetricsReloaded (Maier-Hein et al., Nature
Methods 2024), file ``metrics/calibration_measures.py`` (``class_wise_expectation_calibration_error``,
``brier_score``, ``root_brier_score``), kept as written there: bins ``(l, u]`` from ``np.arange(0, 1.00001,
1 / nbins)`` (so ``p = 0`` is in no bin), sums over the bins divided by all samples.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcal.functional.adaptive import equal_mass_calibration_error
from segcal.functional.binning import BinStats, bin_statistics
from segcal.functional.calibration import classwise_calibration_error, root_brier_score
from segcal.functional.scoring import (
    PEER_CASE_METRICS,
    PEER_CLASS_METRICS,
    CaseStatistics,
    case_statistics,
    image_metrics,
    pooled_metrics,
)
from segcal.functional.smooth import smooth_calibration_error, smooth_ece_points
from segcal.metrics import SegmentationCalibrationMetric

# ------------------------------------------------------------------------------------------ references


def _mr_cwece(pred: np.ndarray, ref: np.ndarray, nbins: int = 10, *, include_zero: bool = False) -> float:
    """MetricsReloaded's cwECE (``pred`` ``(N, K)``, ``ref`` ``(N,)`` labels). ``include_zero`` puts ``p = 0``
    into the first bin (segcal's convention), the one change from the original."""
    range_values = np.arange(0, 1.00001, 1.0 / nbins)
    n, k_classes = pred.shape
    out = []
    for k in range(k_classes):
        pk = pred[:, k]
        vals = []
        for i, (lo, up) in enumerate(itertools.pairwise(range_values)):
            sel = (pk > lo) & (pk <= up)
            if include_zero and i == 0:
                sel |= pk == 0
            m = int(sel.sum())
            vals.append(0.0 if m == 0 else m * abs((ref[sel] == k).mean() - pk[sel].mean()))
        out.append(np.sum(vals) / n)
    return float(np.sum(out) / k_classes)


def _mr_rbs(pred: np.ndarray, ref: np.ndarray) -> float:
    onehot = np.eye(pred.shape[1])[ref]
    return float(np.sqrt(np.mean(np.sum(np.square(onehot - pred), 1))))


def _equal_mass_exact(p: np.ndarray, y: np.ndarray, r: int) -> float:
    """The exact per-voxel equal-mass ECE of netcal's ``ECE(equal_intervals=False)``: edges ``np.quantile(p,
    linspace(0, 1, R + 1))`` with the first 0 and the last 1, bins ``[q_r, q_{r+1})``, count-weighted gaps."""
    q = np.quantile(p, np.linspace(0, 1, r + 1))
    q[0], q[-1] = 0.0, 1.0
    idx = np.clip(np.searchsorted(q[1:-1], p, side="right"), 0, r - 1)
    s = np.bincount(idx, weights=y - p, minlength=r)
    return float(np.abs(s).sum() / p.size)


def _volume(rng: np.random.Generator, n_img: int, c: int, shape=(6, 5, 4), temp: float = 2.0):
    logits = torch.from_numpy(rng.normal(0, temp, (n_img, c, *shape)))
    probs = torch.softmax(logits, 1)
    lab = torch.from_numpy(rng.integers(0, c, (n_img, *shape)))
    return probs, lab


def _flat(probs: torch.Tensor, lab: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    c = probs.shape[1]
    return probs.movedim(1, -1).reshape(-1, c).numpy(), lab.reshape(-1).numpy()


# --------------------------------------------------------------------------------- MetricsReloaded parity


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bins", [10, 7])
def test_cwece_and_rbs_equal_metricsreloaded_on_random_inputs(seed: int, bins: int) -> None:
    rng = np.random.default_rng(seed)
    probs, lab = _volume(rng, 1, 4)
    stats = case_statistics(probs, lab, bins, include_background=True, fine_bins=50)
    v = image_metrics(stats)
    pred, ref = _flat(probs, lab)
    assert float(v["cw_ece"][0, 0]) == pytest.approx(_mr_cwece(pred, ref, bins), rel=1e-12, abs=1e-15)
    assert float(v["rbs"][0, 0]) == pytest.approx(_mr_rbs(pred, ref), rel=1e-12)


def test_cwece_differs_from_metricsreloaded_only_by_p_zero() -> None:
    """Adversarial: exact zeros and ones, one class absent. MetricsReloaded drops p = 0 from every bin (but keeps
    it in N); segcal bins it in bin 0. With that one change the values agree; the rbs agrees as is."""
    rng = np.random.default_rng(3)
    p = rng.dirichlet([0.3, 0.3, 0.3], size=200)
    p[:40] = [1.0, 0.0, 0.0]
    p[40:60] = [0.0, 0.0, 1.0]
    ref = rng.integers(0, 2, 200)  # class 2 never in the reference
    probs = torch.from_numpy(p.T.reshape(1, 3, 20, 10, 1).copy())
    lab = torch.from_numpy(ref.reshape(1, 20, 10, 1))
    v = image_metrics(case_statistics(probs, lab, 10, include_background=True, fine_bins=20))
    seg = float(v["cw_ece"][0, 0])
    assert seg == pytest.approx(_mr_cwece(p, ref, 10, include_zero=True), rel=1e-12)
    assert abs(seg - _mr_cwece(p, ref, 10)) > 1e-3  # the documented difference is real here
    assert float(v["rbs"][0, 0]) == pytest.approx(_mr_rbs(p, ref), rel=1e-12)


def test_cwece_rbs_all_one_class_and_empty_mask() -> None:
    probs = torch.full((1, 2, 4, 4, 2), 0.5, dtype=torch.float64)
    lab = torch.zeros((1, 4, 4, 2), dtype=torch.int64)
    v = image_metrics(case_statistics(probs, lab, 10, include_background=True, fine_bins=10))
    pred, ref = _flat(probs, lab)
    assert float(v["cw_ece"][0, 0]) == pytest.approx(_mr_cwece(pred, ref), abs=1e-15) == 0.5
    assert float(v["rbs"][0, 0]) == pytest.approx(_mr_rbs(pred, ref))
    empty = torch.zeros((1, 4, 4, 2), dtype=torch.bool)
    w = image_metrics(case_statistics(probs, lab, 10, mask=empty, fine_bins=10))
    for name in (*PEER_CLASS_METRICS, *PEER_CASE_METRICS):
        assert torch.isnan(w[name]).all(), name  # never a silent zero


def test_classwise_and_root_brier_formulas() -> None:
    count = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    stats = BinStats(count, torch.tensor([[[0.2, 0.0], [0.1, 0.9]]]), torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]))
    # class 0: one bin, gap |0 - 0.1| = 0.1; class 1: (1/2)(0.1) + (1/2)(0.1) = 0.1
    assert classwise_calibration_error(stats).tolist() == pytest.approx([0.1])
    assert root_brier_score(torch.tensor([[0.09, 0.16]])).tolist() == pytest.approx([0.5])


# ------------------------------------------------------------------------------- equal-mass ECE vs netcal


def test_equal_mass_reference_equals_netcal() -> None:
    from netcal.metrics import ECE

    rng = np.random.default_rng(0)
    for r in (5, 10, 15):
        p = rng.beta(0.4, 0.6, 2000)
        y = (rng.random(2000) < p**1.2).astype(np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = ECE(r, equal_intervals=False).measure(p, y)
        assert _equal_mass_exact(p, y.astype(float), r) == pytest.approx(ref, abs=1e-9)


def _binary_case(p: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.from_numpy(np.stack([1 - p, p]).reshape(1, 2, -1, 1, 1).copy())
    return probs, torch.from_numpy(y.astype(np.int64).reshape(1, -1, 1, 1))


@pytest.mark.parametrize("fine", [100, 1000, 10_000])
def test_equal_mass_histogram_within_bound_of_netcal(fine: int) -> None:
    from netcal.metrics import ECE

    rng = np.random.default_rng(fine)
    p = rng.beta(0.3, 0.5, 3000)
    y = (rng.random(3000) < p**1.3).astype(np.int64)
    probs, lab = _binary_case(p, y)
    ece, bound = equal_mass_calibration_error(bin_statistics(probs, lab, fine, include_background=False), 15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ECE(15, equal_intervals=False).measure(p, y)
    assert abs(float(ece[0, 0]) - ref) <= float(bound[0, 0]) + 1e-9
    assert float(bound[0, 0]) < 0.1


def _adversarial(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = 1500
    p = rng.random(n)
    if kind == "zeros":  # a third exactly 0, ties at the quantiles (netcal refuses these)
        p[: n // 3] = 0.0
    elif kind == "ones":
        p[: n // 4] = 1.0
    elif kind == "grid":  # every value on a fine-bin edge
        p = rng.integers(0, 11, n) / 10
    y = (rng.random(n) < p).astype(float)
    if kind == "all_zero_class":
        y[:] = 0.0
    elif kind == "all_one_class":
        y[:] = 1.0
    return p, y


@pytest.mark.parametrize("kind", ["zeros", "ones", "grid", "all_zero_class", "all_one_class"])
@pytest.mark.parametrize("fine", [50, 2000])
def test_equal_mass_within_bound_on_adversarial_inputs(kind: str, fine: int) -> None:
    rng = np.random.default_rng(7)
    p, y = _adversarial(kind, rng)
    probs, lab = _binary_case(p, y)
    ece, bound = equal_mass_calibration_error(bin_statistics(probs, lab, fine, include_background=False), 10)
    exact = _equal_mass_exact(p, y, 10)
    assert abs(float(ece[0, 0]) - exact) <= float(bound[0, 0]) + 1e-12


def test_equal_mass_exact_when_no_fine_bin_is_ambiguous() -> None:
    """Two values far apart, each filling a fine bin: no fine bin holds both order statistics around the
    quantile, so the bound is 0 and the value exact."""
    p = np.r_[np.full(50, 0.2), np.full(50, 0.8)]
    y = np.r_[np.zeros(45), np.ones(5), np.ones(30), np.zeros(20)]
    probs, lab = _binary_case(p, y)
    ece, bound = equal_mass_calibration_error(bin_statistics(probs, lab, 100, include_background=False), 2)
    assert float(bound[0, 0]) == 0.0
    assert float(ece[0, 0]) == pytest.approx(_equal_mass_exact(p, y, 2), abs=1e-12)
    assert float(ece[0, 0]) == pytest.approx((abs(5 - 10) + abs(30 - 40)) / 100, abs=1e-12)


def test_equal_mass_rejects_bad_bins() -> None:
    stats = BinStats(torch.ones(1, 1, 4), torch.ones(1, 1, 4) / 2, torch.ones(1, 1, 4) / 2)
    with pytest.raises(ValueError, match="equal-mass bins"):
        equal_mass_calibration_error(stats, 0)


# ------------------------------------------------------------------------------------- smooth ECE vs relplot


@pytest.mark.parametrize("kind", ["random", "zeros", "ones", "grid", "all_zero_class", "all_one_class"])
def test_smooth_ece_equals_relplot_on_points_and_is_close_from_the_histogram(kind: str) -> None:
    import relplot

    rng = np.random.default_rng(11)
    if kind == "random":
        p = rng.beta(0.3, 0.5, 3000)
        y = (rng.random(3000) < p**1.3).astype(float)
    else:
        p, y = _adversarial(kind, rng)
    ref = float(relplot.smECE(p, y))
    assert smooth_ece_points(p, np.ones(p.size), p - y)[0] == pytest.approx(ref, abs=1e-9)
    probs, lab = _binary_case(p, y)
    got = float(smooth_calibration_error(bin_statistics(probs, lab, 1000, include_background=False))[0, 0])
    assert abs(got - ref) < 2e-3


# ----------------------------------------------------------------------------------------- merge properties

_SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _stats(seed: int, n_img: int, fine: int = 200) -> tuple[CaseStatistics, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    probs, lab = _volume(rng, n_img, 3, shape=(5, 4, 3), temp=3.0)
    probs[0, :, 0, 0, 0] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # exact 0 and 1
    return case_statistics(probs, lab, 8, fine_bins=fine), probs, lab


@_SETTINGS
@given(seed=st.integers(0, 10_000), split=st.lists(st.booleans(), min_size=5, max_size=5))
def test_pooled_peer_metrics_do_not_depend_on_the_split(seed: int, split: list[bool]) -> None:
    stats, _, _ = _stats(seed, 5)
    a = [i for i, s in enumerate(split) if s]
    b = [i for i, s in enumerate(split) if not s]
    parts = [CaseStatistics.cat([stats.select(i) for i in part]) for part in (a, b) if part]
    merged = CaseStatistics.cat(parts)
    whole, again = pooled_metrics(stats), pooled_metrics(merged)
    for name in (*PEER_CLASS_METRICS, *PEER_CASE_METRICS):
        assert torch.allclose(whole[name], again[name], rtol=1e-12, atol=1e-15, equal_nan=True), name


@_SETTINGS
@given(seed=st.integers(0, 10_000), n_img=st.integers(1, 4))
def test_pooled_equal_mass_within_bound_of_exact_over_all_voxels(seed: int, n_img: int) -> None:
    stats, probs, lab = _stats(seed, n_img)
    pooled = pooled_metrics(stats)
    pred, ref = _flat(probs, lab)
    for j, c in enumerate((1, 2)):  # the kept channels (background left out)
        exact = _equal_mass_exact(pred[:, c], (ref == c).astype(float), 8)
        assert abs(float(pooled["adaptive_ece"][j]) - exact) <= float(pooled["adaptive_ece_bound"][j]) + 1e-12


def test_pooled_values_are_those_of_the_stacked_voxels() -> None:
    stats, probs, lab = _stats(11, 3)
    pooled = pooled_metrics(stats)
    pred, ref = _flat(probs, lab)
    onehot = np.eye(3)[ref]
    assert float(pooled["rbs"][0]) == pytest.approx(np.sqrt(np.mean(((onehot - pred)[:, 1:] ** 2).sum(1))))
    ent = -(pred * np.log(np.clip(pred, 1e-7, 1))).sum(1).mean()
    assert float(pooled["mean_entropy"][0]) == pytest.approx(ent, rel=1e-6)
    assert float(pooled["mean_confidence"][0]) == pytest.approx(pred.max(1).mean(), rel=1e-12)
    per_class = [
        np.sum([abs(((ref == c) & s).sum() - pred[s, c].sum()) for s in _bins_of(pred[:, c], 8)]) / len(ref)
        for c in (1, 2)
    ]
    assert float(pooled["cw_ece"][0]) == pytest.approx(np.mean(per_class), rel=1e-12)


def _bins_of(p: np.ndarray, m: int) -> list[np.ndarray]:
    k = np.clip(np.ceil(p * m) - 1, 0, m - 1)
    return [k == i for i in range(m)]


@pytest.mark.parametrize("mode", ["exclusive", "multilabel"])
def test_uncertainty_scores_equal_the_ood_scores(mode: str) -> None:
    from segcal.functional.uncertainty import ood_score

    rng = np.random.default_rng(2)
    probs, lab = _volume(rng, 3, 3)
    target = lab
    if mode == "multilabel":
        probs = torch.sigmoid(torch.from_numpy(rng.normal(0, 2, probs.shape)))
        target = torch.from_numpy(rng.integers(0, 2, probs.shape))
    v = image_metrics(case_statistics(probs, target, 10, mode=mode, fine_bins=50))
    assert torch.allclose(v["mean_entropy"][:, 0], ood_score(probs, "mean_entropy", mode), rtol=1e-10)
    assert torch.allclose(1 - v["mean_confidence"][:, 0], ood_score(probs, "max_probability", mode), rtol=1e-10)


def test_statistics_without_fine_bins_have_no_peer_metrics_and_store_as_before() -> None:
    rng = np.random.default_rng(0)
    probs, lab = _volume(rng, 2, 3)
    stats = case_statistics(probs, lab, 10)
    assert stats.fine is None and stats.entropy_sum is None
    assert not set(image_metrics(stats)) & {*PEER_CLASS_METRICS, *PEER_CASE_METRICS}
    core = {"bins", "top", "counts", "brier_sum", "mae_sum", "nll_sum", "n_voxels", "hd95", "hd", "assd", "nsd"}
    assert set(stats.to_numpy()) == core  # no peers-group array
    with_fine = case_statistics(probs, lab, 10, fine_bins=30)
    with pytest.raises(ValueError, match="fine_bins"):
        CaseStatistics.cat([stats, with_fine])
    back = CaseStatistics.from_numpy(with_fine.to_numpy())
    assert torch.equal(back.fine, with_fine.fine)


# ------------------------------------------------------------------------------------------ stateful metric


def test_stateful_metric_peers_merge_exactly() -> None:
    rng = np.random.default_rng(5)
    probs, lab = _volume(rng, 4, 3)
    one = SegmentationCalibrationMetric(num_bins=10, fine_bins=100)
    one.update(probs, lab)
    a = SegmentationCalibrationMetric(num_bins=10, fine_bins=100)
    b = SegmentationCalibrationMetric(num_bins=10, fine_bins=100)
    a.update(probs[:1], lab[:1])
    b.update(probs[1:], lab[1:])
    r1, r2 = one.compute(), (a + b).compute()
    for name in (*PEER_CLASS_METRICS, *PEER_CASE_METRICS):
        assert torch.allclose(r1.pooled[name], r2.pooled[name], rtol=1e-12), name
        assert r1.per_image[name].shape[0] == 4
    with pytest.raises(ValueError, match="different settings"):
        a.merge(SegmentationCalibrationMetric(num_bins=10))
