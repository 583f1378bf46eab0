"""Conformal risk control of the false-negative rate: the guarantee on phantoms with a known posterior, the
threshold against a literal reference, masks, streaming, files and bad inputs."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segcal.data.phantoms import make_phantom
from segcal.functional.conformal import (
    FNRStatistics,
    conformal_masks,
    crc_fdr_threshold,
    crc_index,
    crc_threshold,
    false_discovery_rate,
    false_negative_rate,
    fdr_loss_curves,
    fdr_statistics,
    fnr_loss_curves,
    fnr_statistics,
    probability_bins,
    threshold_masks,
)
from segcal.posthoc import ConformalRiskControl, NotFittedError, TemperatureScaling, load_calibrator

K_TEST = 1 << 10  # a coarser grid keeps the dense per-case curves small; CRC is exact on any grid


def _split_risks(
    curves: torch.Tensor, n_cal: int, alpha: float, n_splits: int, seed: int, measured: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean test loss ``(n_splits, C)`` of CRC over random calibration/test splits of a pool of cases.

    ``curves`` ``(N, C, L)`` are the per-case loss curves, computed once; each split sums the curves of its
    calibration cases (one matrix product for all splits), picks ``k̂`` with :func:`crc_index` and averages the
    test cases' losses at ``k̂`` (of ``measured`` when given: the FDR itself where ``curves`` is its monotone
    upper bound).
    """
    measured = curves if measured is None else measured
    n, c, k1 = curves.shape
    gen = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(n_splits, n, generator=gen), dim=1)
    cal = torch.zeros(n_splits, n, dtype=torch.float64).scatter_(1, order[:, :n_cal], 1.0)
    sums = (cal @ curves.reshape(n, c * k1)).view(n_splits, c, k1)
    k_hat, achievable = crc_index(sums, n_cal, alpha)
    assert bool(achievable.all())
    at_k = measured[:, torch.arange(c).view(1, c), k_hat]  # (N, splits, C): every case's loss at each split's k̂
    return torch.einsum("sn,nsc->sc", 1.0 - cal, at_k) / (n - n_cal)


@pytest.mark.parametrize("mode", ["exclusive", "multilabel"])
def test_mean_test_fnr_is_at_most_alpha_over_random_splits(mode: str) -> None:
    """CRC Theorem 1 on 300 phantoms whose labels are sampled voxel-wise from known probabilities.

    Conditional on the pool, a uniformly random split makes calibration and test cases exchangeable, so the
    expected test FNR over splits is at most alpha exactly. The splits are independent draws given the pool, so
    the mean over S splits has standard error sd / sqrt(S); with S = 400 the Monte-Carlo mean exceeds its
    expectation by more than 3 standard errors with probability about 0.001 (and the pool and the splits are
    seeded, so the test is deterministic). We also check the bound is not vacuous: the mean stays within
    2 / (n + 1) (CRC Theorem 2's lower bound, n calibration cases) plus the grid's and the loss jumps' slack of
    alpha.
    """
    alpha, n_cal, n_splits = 0.1, 150, 400
    ph = make_phantom((12, 12, 12), 3, 300, seed=7, mode=mode)  # type: ignore[arg-type]
    stats = fnr_statistics(ph.probs, ph.labels, mode=mode, resolution=K_TEST)  # type: ignore[arg-type]
    assert bool(stats.present().all())
    risks = _split_risks(fnr_loss_curves(stats), n_cal, alpha, n_splits, seed=11)
    mean = risks.mean(0)
    se = risks.std(0) / math.sqrt(n_splits)
    print(f"{mode}: alpha - mean test FNR per channel = {(alpha - mean).tolist()}, SE = {se.tolist()}")
    assert bool((mean <= alpha + 3 * se).all()), (mean, se)
    assert bool((mean >= alpha - 2 / (n_cal + 1) - 0.02).all()), mean


@pytest.mark.parametrize("mode", ["exclusive", "multilabel"])
def test_mean_test_fdr_is_at_most_alpha_over_random_splits(mode: str) -> None:
    """The FDR variant on the same phantoms: λ̂ is chosen on the monotone upper bound of the FDR (the loss CRC
    controls), the FDR itself is measured; same Monte-Carlo reasoning (mean over 400 splits within 3 standard
    errors). The masks are not empty (the bound is met with a real threshold)."""
    alpha, n_cal, n_splits = 0.2, 150, 400
    ph = make_phantom((12, 12, 12), 3, 300, seed=8, mode=mode)  # type: ignore[arg-type]
    stats = fdr_statistics(ph.probs, ph.labels, mode=mode, resolution=K_TEST)  # type: ignore[arg-type]
    upper, fdr = fdr_loss_curves(stats), fdr_loss_curves(stats, monotone=False)
    assert bool((upper >= fdr).all()) and bool((upper.diff(dim=-1) <= 0).all())
    risks = _split_risks(upper, n_cal, alpha, n_splits, seed=12, measured=fdr)
    bound = _split_risks(upper, n_cal, alpha, n_splits, seed=12)
    se = bound.std(0) / math.sqrt(n_splits)
    print(f"{mode}: alpha - mean test FDR = {(alpha - risks.mean(0)).tolist()}, "
          f"alpha - mean monotone bound = {(alpha - bound.mean(0)).tolist()}")
    assert bool((bound.mean(0) <= alpha + 3 * se).all())
    assert bool((risks.mean(0) <= bound.mean(0)).all())
    result = crc_fdr_threshold(upper[:n_cal].sum(0), n_cal, alpha)
    assert bool(result.achievable.all()) and bool((result.thresholds < 1).all())
    masks = threshold_masks(ph.probs[n_cal:], result.thresholds, mode=mode)  # type: ignore[arg-type]
    assert bool(masks.flatten(2).any(-1).float().mean() > 0.5)


def test_guarantee_counts_absent_structures_as_zero_or_skips_them() -> None:
    """A structure removed from a third of the cases: with ``absent="zero"`` the mean over all test cases is
    within the bound; with ``"skip"`` the mean over the cases that have it is."""
    alpha, n_cal, n_splits = 0.1, 120, 300
    ph = make_phantom((10, 10, 10), 2, 240, seed=3)
    labels = ph.labels.clone()
    labels[::3][labels[::3] == 1] = 0  # class 1 absent from every third case
    stats = fnr_statistics(ph.probs, labels, resolution=K_TEST)
    present = stats.present()[:, 1]
    assert int(present.sum()) == 160
    curves = fnr_loss_curves(stats)[:, 1:]
    risks = _split_risks(curves, n_cal, alpha, n_splits, seed=5)[:, 0]
    assert float(risks.mean()) <= alpha + 3 * float(risks.std()) / math.sqrt(n_splits)
    keep = FNRStatistics(
        stats.resolution, stats.gt_voxels[present], *_entries_of(stats, present)
    )
    risks_skip = _split_risks(fnr_loss_curves(keep)[:, 1:], 80, alpha, n_splits, seed=6)[:, 0]
    assert float(risks_skip.mean()) <= alpha + 3 * float(risks_skip.std()) / math.sqrt(n_splits)
    # "skip" calibrates on the present cases only: its threshold is that of the kept statistics
    lam_skip = crc_threshold(stats, alpha, absent="skip").lambdas[1]
    assert float(lam_skip) == float(crc_threshold(keep, alpha).lambdas[1])
    assert int(crc_threshold(stats, alpha, absent="skip").n[1]) == 160


def _entries_of(stats: FNRStatistics, keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The sparse entries of the kept cases, renumbered."""
    new_index = torch.cumsum(keep.to(torch.int64), 0) - 1
    sel = keep[stats.case]
    return new_index[stats.case[sel]], stats.channel[sel], stats.bin[sel], stats.count[sel]


def _reference_lambda(p: np.ndarray, y: np.ndarray, alpha: float, k: int) -> tuple[float, Fraction]:
    """CRC read literally, in exact rational arithmetic: for each λ = j/K, the mask p ≥ 1 − λ, each case's FNR
    (0 without structure), the first λ with n/(n+1) · mean + 1/(n+1) ≤ α (1 if none); returns λ and the slack
    α − (n/(n+1) · mean + 1/(n+1)) there."""
    n = p.shape[0]
    a = Fraction(alpha)
    for j in range(k + 1):
        lam = j / k
        losses = []
        for i in range(n):
            gt = y[i].astype(bool)
            if gt.sum() == 0:
                losses.append(Fraction(0))
                continue
            hit = (p[i].astype(np.float64) >= 1.0 - lam) & gt
            losses.append(Fraction(int(gt.sum() - hit.sum()), int(gt.sum())))
        slack = a - (Fraction(n, n + 1) * sum(losses) / n + Fraction(1, n + 1))
        if slack >= 0:
            return lam, slack
    return 1.0, Fraction(-1)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(9, 30),
    alpha=st.one_of(st.floats(0.1, 0.6), st.sampled_from([0.1, 0.2, 0.25, 0.3, 0.5])),
    seed=st.integers(0, 2**31 - 1),
    on_edges=st.booleans(),
)
def test_threshold_matches_a_literal_reference(n: int, alpha: float, seed: int, on_edges: bool) -> None:
    """Random probabilities, and adversarial ones lying exactly on the grid's edges (1 − k/K), at 0 and 1,
    with ties and empty structures, and alphas that make exact ties likely: the threshold equals the literal
    reading of the λ̂ of CRC Theorem 1."""
    k = 16
    rng = np.random.default_rng(seed)
    p = rng.random((n, 1, 5, 4, 3)).astype(np.float32)
    if on_edges:
        p = (rng.integers(0, k + 1, size=p.shape) / k).astype(np.float32)
    y = (rng.random(p.shape) < 0.4).astype(np.int64)
    y[rng.random(n) < 0.2] = 0  # some cases without the structure
    stats = fnr_statistics(torch.from_numpy(p), torch.from_numpy(y), mode="multilabel", resolution=k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = float(crc_threshold(stats, alpha).lambdas[0])
    expected, slack = _reference_lambda(p[:, 0], y[:, 0], alpha, k)
    # equal, except that an exact tie (slack 0 up to float64 rounding) resolves to the next, safer λ
    assert got == expected or (got == expected + 1 / k and slack <= Fraction(1, 10**11)), (got, expected, slack)


def _reference_fdr_threshold(p: np.ndarray, y: np.ndarray, alpha: float, k: int) -> tuple[float, Fraction]:
    """The FDR threshold read literally, in exact arithmetic: for each t = j/K (j = 0 .. K + 1) the mask p ≥ t,
    each case's FDR, its running maximum over the larger thresholds, the first t meeting the CRC bound."""
    n = p.shape[0]
    fdr = np.zeros((n, k + 2), dtype=object)
    for i in range(n):
        gt = y[i].astype(bool)
        for j in range(k + 2):
            mask = p[i].astype(np.float64) >= j / k
            fdr[i, j] = Fraction(int((mask & ~gt).sum()), int(mask.sum())) if mask.any() else Fraction(0)
        for j in range(k, -1, -1):
            fdr[i, j] = max(fdr[i, j], fdr[i, j + 1])
    for j in range(k + 2):
        slack = Fraction(alpha) - (Fraction(n, n + 1) * sum(fdr[:, j]) / n + Fraction(1, n + 1))
        if slack >= 0:
            return j / k, slack
    return (k + 1) / k, Fraction(-1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(9, 25), alpha=st.floats(0.1, 0.7), seed=st.integers(0, 2**31 - 1), on_edges=st.booleans())
def test_fdr_threshold_matches_a_literal_reference(n: int, alpha: float, seed: int, on_edges: bool) -> None:
    k = 16
    rng = np.random.default_rng(seed)
    p = rng.random((n, 1, 4, 3, 3)).astype(np.float32)
    if on_edges:
        p = (rng.integers(0, k + 1, size=p.shape) / k).astype(np.float32)
    y = (rng.random(p.shape) < p).astype(np.int64)  # informative labels: the FDR falls with the threshold
    y[rng.random(n) < 0.2] = 0
    stats = fdr_statistics(torch.from_numpy(p), torch.from_numpy(y), mode="multilabel", resolution=k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = float(crc_fdr_threshold(fdr_loss_curves(stats).sum(0), n, alpha).thresholds[0])
    expected, slack = _reference_fdr_threshold(p[:, 0], y[:, 0], alpha, k)
    assert got == expected or (got == expected + 1 / k and slack <= Fraction(1, 10**11)), (got, expected, slack)


def test_fdr_masks_reproduce_the_curves_and_agree_with_torchmetrics() -> None:
    from torchmetrics.functional.classification import binary_precision

    ph = make_phantom((9, 10, 11), 3, 12, seed=3)
    stats = fdr_statistics(ph.probs, ph.labels, resolution=K_TEST)
    res = crc_fdr_threshold(fdr_loss_curves(stats).sum(0), 12, 0.3)
    masks = threshold_masks(ph.probs, res.thresholds)
    fdr = false_discovery_rate(masks, ph.labels)
    torch.testing.assert_close(fdr, fdr_loss_curves(stats, monotone=False)[:, torch.arange(3), res.index],
                               rtol=0, atol=1e-12)
    onehot = ph.onehot().bool()
    for b in range(3):
        for c in range(3):
            if bool(masks[b, c].any()):
                precision = binary_precision(masks[b, c].flatten().int(), onehot[b, c].flatten().int())
                assert abs(float(fdr[b, c]) - (1 - float(precision))) < 1e-6
    empty = torch.zeros_like(masks)
    assert bool((false_discovery_rate(empty, ph.labels) == 0).all())  # an empty mask discovers nothing


def test_fdr_calibrator_streams_saves_and_reports(tmp_path) -> None:
    ph = make_phantom((10, 10, 10), 3, 40, seed=10)
    crc = ConformalRiskControl(0.25, loss="fdr", resolution=K_TEST)
    crc.fit([(ph.probs[i : i + 1], ph.labels[i : i + 1]) for i in range(30)])
    stats = fdr_statistics(ph.probs[:30, 1:], ph.onehot()[:30, 1:], mode="multilabel", resolution=K_TEST)
    assert torch.equal(crc.thresholds_, crc_fdr_threshold(fdr_loss_curves(stats).sum(0), 30, 0.25).thresholds)
    crc.save(tmp_path / "fdr.pt")
    back = load_calibrator(tmp_path / "fdr.pt")
    assert back.loss == "fdr" and torch.equal(back.thresholds_, crc.thresholds_)
    rep = back.report(ph.probs[30:], ph.labels[30:])
    expected = false_discovery_rate(back.predict_masks(ph.probs[30:]), ph.onehot()[30:, 1:], mode="multilabel")
    torch.testing.assert_close(rep.mean_risk(), expected.mean(0))
    assert rep.rows()[0]["loss"] == "fdr"
    with pytest.raises(ValueError, match="loss must be 'fnr' or 'fdr'"):
        ConformalRiskControl(0.2, loss="dice").fit(ph.probs, ph.labels)  # type: ignore[arg-type]


def test_masks_reproduce_the_curves_and_fnr_agrees_with_torchmetrics() -> None:
    """The FNR of the masks p ≥ 1 − λ̂ equals the loss curve at k̂, case by case, and 1 − torchmetrics' recall."""
    from torchmetrics.functional.classification import binary_recall

    ph = make_phantom((9, 10, 11), 3, 12, seed=2)
    stats = fnr_statistics(ph.probs, ph.labels, resolution=K_TEST)
    res = crc_threshold(stats, 0.15)
    masks = conformal_masks(ph.probs, res.lambdas)
    fnr = false_negative_rate(masks, ph.labels)
    curves = fnr_loss_curves(stats)
    expected = curves[:, torch.arange(3), res.index]
    torch.testing.assert_close(fnr, expected, rtol=0, atol=1e-12)
    onehot = ph.onehot().bool()
    for b in range(3):
        for c in range(3):
            recall = binary_recall(masks[b, c].flatten().int(), onehot[b, c].flatten().int())
            assert abs(float(fnr[b, c]) - (1 - float(recall))) < 1e-6
    # the calibration risk reported is the mean curve value at k̂
    torch.testing.assert_close(res.calibration_risk, expected.mean(0), rtol=0, atol=1e-12)


def test_curves_are_non_increasing_and_bins_are_exact_on_the_grid() -> None:
    ph = make_phantom((8, 8, 8), 3, 6, seed=4)
    curves = fnr_loss_curves(fnr_statistics(ph.probs, ph.labels, resolution=64))
    assert bool((curves.diff(dim=-1) <= 1e-12).all())
    assert bool((curves[..., -1] == 0).all())  # λ = 1: every voxel in the mask
    k = 1 << 16
    edges = torch.tensor([0.0, 1 / k, 0.5, 1 - 1 / k, 1.0, 0.25 - 2**-30], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        p = edges.to(dtype)
        bins = probability_bins(p, k)
        for j in (0, 1, k // 2, k - 1, k):
            assert torch.equal(bins >= k - j, p.double() >= 1 - j / k)


def test_threshold_is_monotone_in_alpha() -> None:
    ph = make_phantom((10, 10, 10), 3, 40, seed=9)
    stats = fnr_statistics(ph.probs, ph.labels, resolution=1 << 12)
    lams = torch.stack([crc_threshold(stats, a).lambdas for a in np.linspace(0.03, 0.9, 30)])
    assert bool((lams.diff(dim=0) <= 0).all())
    assert bool((lams[0] > lams[-1]).all())


def test_alpha_below_one_over_n_plus_one_gives_every_voxel_with_a_warning() -> None:
    ph = make_phantom((8, 8, 8), 2, 5, seed=1)
    with pytest.warns(UserWarning, match="cannot be met"):
        crc = ConformalRiskControl(alpha=0.1).fit(ph.probs, ph.labels)  # 0.1 < 1/6
    assert float(crc.lambdas_[0]) == 1.0 and not bool(crc.achievable_[0])
    assert bool(crc.predict_masks(ph.probs).all())


def test_streamed_fit_equals_batch_fit_and_statistics_merge_exactly() -> None:
    ph = make_phantom((10, 9, 8), 3, 20, seed=5, mode="multilabel")
    batch = ConformalRiskControl(0.2, mode="multilabel", activation="sigmoid").fit(ph.logits, ph.labels)
    with pytest.raises(ValueError, match=r"volume 0: a 4-D prediction .* is ambiguous"):
        ConformalRiskControl(0.2, mode="multilabel").fit([(ph.probs[0], ph.labels[0])])
    volumes = [(ph.logits[i : i + 1], ph.labels[i : i + 1]) for i in range(20)]  # one (1, C, *S) volume at a time
    streamed = ConformalRiskControl(0.2, mode="multilabel", activation="sigmoid").fit(volumes)
    assert torch.equal(batch.lambdas_, streamed.lambdas_)
    whole = fnr_statistics(ph.probs, ph.labels, mode="multilabel", resolution=256)
    parts = [fnr_statistics(ph.probs[s : s + 7], ph.labels[s : s + 7], mode="multilabel", resolution=256)
             for s in range(0, 20, 7)]
    merged = FNRStatistics.concat(parts)
    assert torch.equal(fnr_loss_curves(merged), fnr_loss_curves(whole))
    # multilabel masks of nested regions overlap: a voxel is in several channels' sets
    masks = batch.predict_masks(ph.logits)
    assert masks.shape == ph.probs.shape and bool((masks.sum(1) > 1).any())


def test_exclusive_calibrates_foreground_classes_and_the_report_measures_the_risk() -> None:
    ph = make_phantom((10, 10, 10), 3, 80, seed=6)
    crc = ConformalRiskControl(0.1).fit(ph.probs[:50], ph.labels[:50])
    assert crc.channels_ == [1, 2] and crc.lambdas_.shape == (2,)
    rep = crc.report([(ph.probs[i], ph.labels[i]) for i in range(50, 80)])
    masks = crc.predict_masks(ph.probs[50:])
    fnr = false_negative_rate(masks, ph.onehot()[50:, 1:], mode="multilabel")
    torch.testing.assert_close(rep.mean_risk(), fnr.mean(0))
    rows = rep.rows()
    assert [r["channel"] for r in rows] == [1, 2] and all(r["cases"] == 30 for r in rows)
    all_classes = ConformalRiskControl(0.1, include_background=True).fit(ph.probs[:50], ph.labels[:50])
    assert all_classes.channels_ == [0, 1, 2]
    torch.testing.assert_close(all_classes.lambdas_[1:], crc.lambdas_)


def test_save_load_round_trip(tmp_path) -> None:
    ph = make_phantom((8, 8, 8), 3, 30, seed=8)
    crc = ConformalRiskControl(0.2, absent="skip", resolution=1 << 12).fit(ph.probs, ph.labels)
    crc.save(tmp_path / "crc.pt")
    back = load_calibrator(tmp_path / "crc.pt")
    assert isinstance(back, ConformalRiskControl)
    assert torch.equal(back.lambdas_, crc.lambdas_) and back.channels_ == crc.channels_
    assert (back.alpha, back.absent, back.resolution, back.mode) == (0.2, "skip", 1 << 12, "exclusive")
    assert torch.equal(back.predict_masks(ph.probs), crc.predict_masks(ph.probs))
    with pytest.raises(ValueError, match="not TemperatureScaling"):
        TemperatureScaling.load(tmp_path / "crc.pt")


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_alpha_outside_the_open_unit_interval_is_refused(alpha: float) -> None:
    ph = make_phantom((8, 8, 8), 2, 3, seed=0)
    with pytest.raises(ValueError, match="alpha must lie in the open interval"):
        ConformalRiskControl(alpha).fit(ph.probs, ph.labels)
    stats = fnr_statistics(ph.probs, ph.labels, resolution=64)
    with pytest.raises(ValueError, match="alpha"):
        crc_threshold(stats, alpha)


def test_bad_inputs_give_one_clear_error() -> None:
    ph = make_phantom((8, 8, 8), 3, 4, seed=0)
    with pytest.raises(ValueError, match="power of two"):
        fnr_statistics(ph.probs, ph.labels, resolution=1000)
    with pytest.raises(ValueError, match="shape"):
        fnr_statistics(ph.probs, ph.labels[:, :4])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        fnr_statistics(ph.probs, ph.labels + 1)
    with pytest.raises(ValueError, match="sum to 1"):
        fnr_statistics(ph.probs * 0.5, ph.labels)
    bad = ph.probs.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fnr_statistics(bad, ph.labels)
    with pytest.raises(ValueError, match="2 or 3 spatial dims"):
        fnr_statistics(ph.probs[:, :, 0, 0], ph.labels[:, 0, 0])
    with pytest.raises(NotFittedError):
        ConformalRiskControl().predict_masks(ph.probs)
    with pytest.raises(ValueError, match=r"volume 1: .*labels must lie"):
        ConformalRiskControl(0.5).fit([(ph.probs[0], ph.labels[0]), (ph.probs[1], ph.labels[1] + 5)])
    with pytest.raises(ValueError, match="volume 1: has 2 channels"):
        ConformalRiskControl(0.5).fit([(ph.probs[0], ph.labels[0]), (ph.probs[1, :2], ph.labels[1].clamp(max=1))])
    with pytest.raises(ValueError, match="absent must be"):
        ConformalRiskControl(0.5, absent="one").fit(ph.probs, ph.labels)  # type: ignore[arg-type]
    crc = ConformalRiskControl(0.5).fit(ph.probs, ph.labels)
    with pytest.raises(ValueError, match="2 channels but the calibrator was fitted on 3"):
        crc.predict_masks(ph.probs[:, :2])
    with pytest.raises(ValueError, match=r"lambdas must lie in \[0, 1\]"):
        conformal_masks(ph.probs, [0.1, 1.5, 0.2])
    with pytest.raises(TypeError, match="boolean"):
        false_negative_rate(ph.probs, ph.labels)


def test_structure_absent_from_every_calibration_case_warns() -> None:
    ph = make_phantom((8, 8, 8), 3, 12, seed=2)
    labels = ph.labels.clone()
    labels[labels == 2] = 0
    with pytest.warns(UserWarning, match="channel 2: the structure is absent from every calibration case"):
        ConformalRiskControl(0.3).fit(ph.probs, labels)


# ------------------------------------------------------------------------------------------- command line
def _write_npy_folders(root, probs: torch.Tensor, labels: torch.Tensor, name: str) -> tuple:
    pred, lab = root / f"{name}_pred", root / f"{name}_lab"
    pred.mkdir()
    lab.mkdir()
    for i in range(probs.shape[0]):
        np.savez(pred / f"case{i:03d}.npz", probabilities=probs[i].numpy(), spacing=np.array([1.0, 1.0, 2.0]))
        np.save(lab / f"case{i:03d}.npy", labels[i].numpy().astype(np.int16))
    return pred, lab


def test_cli_fit_apply_evaluate_on_npy_folders(tmp_path) -> None:
    from _helpers import invoke_cli
    from segcal.io import read_label

    ph = make_phantom((8, 9, 10), 3, 40, seed=12)
    cal_pred, cal_lab = _write_npy_folders(tmp_path, ph.probs[:25], ph.labels[:25], "cal")
    test_pred, test_lab = _write_npy_folders(tmp_path, ph.probs[25:], ph.labels[25:], "test")
    crc_file = tmp_path / "crc.pt"
    res = invoke_cli(["conformal", "fit", "--cal-pred", str(cal_pred), "--labels", str(cal_lab), "--alpha", "0.2",
                      "-o", str(crc_file)])
    assert res.exit_code == 0, res.output
    crc = load_calibrator(crc_file)
    api = ConformalRiskControl(0.2).fit(ph.probs[:25], ph.labels[:25])
    assert torch.equal(crc.lambdas_, api.lambdas_)  # the command is the API on the files
    out = tmp_path / "masks"
    res = invoke_cli(["conformal", "apply", "--crc", str(crc_file), "--pred", str(test_pred), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("case*.npz"))) == 15 and (out / "conformal.json").is_file()
    mask, spacing, _ = read_label(out / "case000.npz")  # the first test case
    assert spacing == (1.0, 1.0, 2.0)
    assert np.array_equal(mask.astype(bool), api.predict_masks(ph.probs[25:26])[0].numpy())
    # a calibrator fitted on logits through the API applies to probability files: the command never re-activates
    ConformalRiskControl(0.2, activation="softmax").fit(ph.logits[:25], ph.labels[:25]).save(tmp_path / "lg.pt")
    res = invoke_cli(["conformal", "apply", "--crc", str(tmp_path / "lg.pt"), "--pred", str(test_pred),
                      "-o", str(tmp_path / "masks_lg")])
    assert res.exit_code == 0, res.output
    assert np.array_equal(read_label(tmp_path / "masks_lg" / "case000.npz")[0], mask)
    report = tmp_path / "report.json"
    res = invoke_cli(["conformal", "evaluate", "--crc", str(crc_file), "--test-pred", str(test_pred),
                      "--test-labels", str(test_lab), "-o", str(report)])
    assert res.exit_code == 0, res.output
    import json

    rows = json.loads(report.read_text())["channels"]
    expected = api.report(ph.probs[25:], ph.labels[25:]).mean_risk()
    assert [r["channel"] for r in rows] == [1, 2]
    assert np.allclose([r["mean_risk"] for r in rows], expected.numpy(), rtol=0, atol=1e-12)


def test_cli_nifti_masks_keep_the_prediction_geometry_and_multilabel_regions(tmp_path) -> None:
    from _helpers import invoke_cli
    from segcal.io import read_nifti, write_nifti_probabilities

    ph = make_phantom((8, 9, 10), 3, 12, seed=13, mode="multilabel")
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [10.0, -4.0, 3.0]
    folders = {name: tmp_path / name for name in ("pred", "lab")}
    for f in folders.values():
        f.mkdir()
    for i in range(12):
        write_nifti_probabilities(folders["pred"] / f"c{i}.nii.gz", ph.probs[i].numpy(), affine)
        np.save(folders["lab"] / f"c{i}.npy", ph.labels[i].numpy().astype(np.uint8))  # multi-hot (C, *S)
    crc_file = tmp_path / "crc.pt"
    res = invoke_cli(["conformal", "fit", "--cal-pred", str(folders["pred"]), "--labels", str(folders["lab"]),
                      "--alpha", "0.3", "--mode", "multilabel", "-o", str(crc_file)])
    assert res.exit_code == 0, res.output
    api = ConformalRiskControl(0.3, mode="multilabel").fit(ph.probs, ph.labels)
    assert torch.equal(load_calibrator(crc_file).lambdas_, api.lambdas_)
    out = tmp_path / "masks"
    res = invoke_cli(["conformal", "apply", "--crc", str(crc_file), "--pred", str(folders["pred"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    data, spacing, aff = read_nifti(out / "c3.nii.gz")
    assert data.shape == (8, 9, 10, 3) and np.allclose(aff, affine) and np.allclose(spacing, (0.8, 0.9, 2.5))
    expected = load_calibrator(crc_file).predict_masks(ph.probs[3:4])[0].numpy()
    assert np.array_equal(np.moveaxis(data, -1, 0).astype(bool), expected)
    assert "declares" not in res.output


def test_cli_bad_inputs(tmp_path) -> None:
    from _helpers import invoke_cli

    ph = make_phantom((8, 8, 8), 2, 6, seed=14)
    pred, lab = _write_npy_folders(tmp_path, ph.probs, ph.labels, "cal")
    base = ["conformal", "fit", "--cal-pred", str(pred), "--labels", str(lab), "-o", str(tmp_path / "c.pt")]
    res = invoke_cli([*base, "--alpha", "1.5"])
    assert res.exit_code == 2 and "--alpha must lie in the open interval" in res.output
    res = invoke_cli([*base, "--resolution", "1000"])
    assert res.exit_code == 2 and "--resolution must be a power of two" in res.output
    res = invoke_cli([*base, "--alpha", "0.05"])  # 0.05 < 1/7: every voxel, with a warning
    assert res.exit_code == 0 and "cannot be met" in res.output
    np.save(lab / "case002.npy", (ph.labels[2].numpy() + 7).astype(np.int16))
    res = invoke_cli([*base, "--alpha", "0.3"])
    assert res.exit_code == 1 and "case002.npy" in res.output and "labels must lie in [0, 1]" in res.output
    np.save(lab / "case002.npy", ph.labels[2].numpy().astype(np.int16))
    (pred / "case003.npz").write_bytes(b"not a zip")
    res = invoke_cli([*base, "--alpha", "0.3"])
    assert res.exit_code == 1 and "case003.npz" in res.output
    res = invoke_cli(["conformal", "apply", "--crc", str(tmp_path / "missing.pt"), "--pred", str(pred),
                      "-o", str(tmp_path / "m")])
    assert res.exit_code == 1 and "missing.pt" in res.output
    res = invoke_cli(["conformal", "apply", "--crc", str(tmp_path / "c.pt"), "--pred", str(pred), "-o", str(pred)])
    assert res.exit_code == 2


def test_the_documented_example_runs(tmp_path, monkeypatch) -> None:
    """docs/conformal.md's ``<!-- tested example -->`` python block runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "conformal.md").read_text()
    blocks = re.findall(r"<!-- tested example -->\s*\n```python\n(.*?)\n```", text, re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/conformal.md", "exec"), {"__name__": "__main__"})


def test_cli_fdr(tmp_path) -> None:
    import json

    from _helpers import invoke_cli

    ph = make_phantom((8, 9, 10), 3, 30, seed=15)
    cal_pred, cal_lab = _write_npy_folders(tmp_path, ph.probs[:20], ph.labels[:20], "cal")
    test_pred, test_lab = _write_npy_folders(tmp_path, ph.probs[20:], ph.labels[20:], "test")
    crc_file, report = tmp_path / "fdr.pt", tmp_path / "fdr.json"
    res = invoke_cli(["conformal", "fit", "--cal-pred", str(cal_pred), "--labels", str(cal_lab), "--alpha", "0.3",
                      "--loss", "fdr", "--resolution", "1024", "-o", str(crc_file)])
    assert res.exit_code == 0, res.output
    api = ConformalRiskControl(0.3, loss="fdr", resolution=1024).fit(ph.probs[:20], ph.labels[:20])
    assert torch.equal(load_calibrator(crc_file).thresholds_, api.thresholds_)
    res = invoke_cli(["conformal", "evaluate", "--crc", str(crc_file), "--test-pred", str(test_pred),
                      "--test-labels", str(test_lab), "-o", str(report)])
    assert res.exit_code == 0, res.output
    rows = json.loads(report.read_text())["channels"]
    assert {r["loss"] for r in rows} == {"fdr"}
    expected = api.report(ph.probs[20:], ph.labels[20:]).mean_risk()
    assert np.allclose([r["mean_risk"] for r in rows], expected.numpy(), rtol=0, atol=1e-12)
    res = invoke_cli(["conformal", "fit", "--cal-pred", str(cal_pred), "--labels", str(cal_lab), "--loss", "dice",
                      "-o", str(crc_file)])
    assert res.exit_code == 2
