"""Uncertainty maps, segment entropy (Ensembles eq. 7), Pearson r, AUROC and failure thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from segcal.functional.uncertainty import (
    auroc,
    binary_entropy,
    choose_threshold,
    entropy_map,
    flag_failures,
    mutual_information,
    ood_score,
    pearson_logit_dice,
    pearsonr,
    segment_mean_entropy,
)


def test_entropy_maps() -> None:
    p = torch.softmax(torch.randn(2, 4, 5, 6), 1)
    h = entropy_map(p)
    assert h.shape == (2, 1, 5, 6)
    assert torch.allclose(h[:, 0], -(p * p.log()).sum(1), atol=1e-6)
    uniform = torch.full((1, 4, 3, 3), 0.25)
    assert torch.allclose(entropy_map(uniform), torch.full((1, 1, 3, 3), math.log(4)))
    b = torch.tensor([0.5, 0.0, 1.0, 0.2]).view(1, 1, 2, 2)
    hb = entropy_map(b, "multilabel")
    assert hb[0, 0, 0, 0] == pytest.approx(math.log(2))
    assert float(hb[0, 0, 0, 1]) < 1e-5 and float(hb[0, 0, 1, 0]) < 1e-5
    assert float(hb[0, 0, 1, 1]) == pytest.approx(-(0.2 * math.log(0.2) + 0.8 * math.log(0.8)), rel=1e-5)
    assert torch.allclose(entropy_map(b), hb)  # one channel = binary


def test_mutual_information() -> None:
    a = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
    b = torch.tensor([0.1, 0.9]).view(1, 2, 1, 1)
    mean = (a + b) / 2
    mi = mutual_information(mean, (entropy_map(a) + entropy_map(b)) / 2)
    expected = math.log(2) - float(binary_entropy(torch.tensor(0.9)))
    assert float(mi) == pytest.approx(expected, rel=1e-5)
    assert float(mutual_information(a, entropy_map(a))) == pytest.approx(0.0, abs=1e-7)


def test_segment_mean_entropy_eq7() -> None:
    p = torch.zeros(1, 3, 2, 2)
    p[0, :, 0, 0] = torch.tensor([0.1, 0.7, 0.2])
    p[0, :, 0, 1] = torch.tensor([0.2, 0.6, 0.2])
    p[0, :, 1, 0] = torch.tensor([0.8, 0.1, 0.1])
    p[0, :, 1, 1] = torch.tensor([0.9, 0.05, 0.05])
    s = segment_mean_entropy(p)
    assert s.shape == (1, 2)
    expected = float((binary_entropy(torch.tensor(0.7)) + binary_entropy(torch.tensor(0.6))) / 2)
    assert float(s[0, 0]) == pytest.approx(expected, rel=1e-6)
    assert torch.isnan(s[0, 1])  # class 2 is never predicted
    assert segment_mean_entropy(p, include_background=True).shape == (1, 3)


def test_pearson_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = 0.5 * x + rng.normal(size=30)
    r, p = pearsonr(x, y)
    ref = stats.pearsonr(x, y)
    assert r == pytest.approx(ref.statistic, rel=1e-10)
    assert p == pytest.approx(ref.pvalue, rel=1e-6)
    dice = 1 / (1 + np.exp(-y))
    r2, _ = pearson_logit_dice(x, dice, eps=1e-9)
    assert r2 == pytest.approx(ref.statistic, rel=1e-6)
    with pytest.raises(ValueError, match="at least 3"):
        pearsonr([1, 2], [1, 2])
    with pytest.raises(ValueError, match="constant"):
        pearsonr([1, 1, 1], [1, 2, 3])


def test_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(1)
    pos = rng.integers(0, 5, 40).astype(float) + 1  # many ties
    neg = rng.integers(0, 5, 60).astype(float)
    ref = roc_auc_score(np.r_[np.ones(40), np.zeros(60)], np.r_[pos, neg])
    assert auroc(pos, neg) == pytest.approx(ref, abs=1e-12)
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert auroc([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError):
        auroc([], [1.0])


def test_ood_scores_separate_shifted_cases() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, 16, 16, generator=g)
    sharp, blurry = torch.softmax(z * 6, 1), torch.softmax(z * 0.7, 1)
    for kind in ("segment_entropy", "max_probability", "mean_entropy"):
        s_in, s_out = ood_score(sharp, kind), ood_score(blurry, kind)
        assert s_in.shape == (6,)
        assert auroc(s_out, s_in) == 1.0
    with pytest.raises(ValueError, match="kind"):
        ood_score(sharp, "nope")  # type: ignore[arg-type]


def test_choose_threshold_and_flags() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.35])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    t = choose_threshold(scores, labels, "youden")
    assert t == pytest.approx(0.35)
    assert flag_failures(scores, t).tolist() == [False, False, False, True, True, True, True, True]
    ts = choose_threshold(scores, labels, "sensitivity", target_sensitivity=0.75)
    assert ts == pytest.approx(0.6)
    with pytest.raises(ValueError, match="both positive and negative"):
        choose_threshold(scores, np.ones(8))
