"""Probability thresholding sweep (DSC++ §2.5) with bootstrap CIs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from posthoc_helpers import phantom
from segcal.functional.overlap import confusion_counts, dice_from_counts
from segcal.functional.thresholding import (
    default_thresholds,
    pick_threshold,
    threshold_counts,
    threshold_curves,
    threshold_sweep,
)


def test_sweep_matches_direct_counts_and_is_monotone() -> None:
    z, y = phantom(n=5, c=3, shape=(24, 24), seed=30)
    p = torch.softmax(z, 1)
    ts = default_thresholds()
    assert ts.numel() == 19 and float(ts[0]) == pytest.approx(0.05) and float(ts[-1]) == pytest.approx(0.95)
    counts = threshold_counts(p, y, 1, ts)
    assert counts.shape == (5, 19, 3)
    direct = confusion_counts(p, y, threshold=0.5)[:, 1]
    assert torch.equal(counts[:, 9], direct)
    curves = threshold_curves(counts, ts, n_bootstrap=200, seed=0)
    assert bool((curves["recall"].diff() <= 1e-12).all())  # recall falls as T rises
    d_half = dice_from_counts(direct).mean()
    assert float(curves["dice"][9]) == pytest.approx(float(d_half))
    for m in ("recall", "precision", "dice"):
        assert bool((curves[f"{m}_lo"] <= curves[m] + 1e-12).all())
        assert bool((curves[m] <= curves[f"{m}_hi"] + 1e-12).all())
    again = threshold_sweep(p, y, 1, ts, n_bootstrap=200, seed=0)
    assert torch.equal(again["dice_lo"], curves["dice_lo"])  # seeded


def test_bootstrap_ci_matches_numpy_percentile() -> None:
    counts = torch.tensor([[[5.0, 1, 2]], [[3, 3, 0]], [[0, 2, 4]], [[8, 0, 1]]])
    curves = threshold_curves(counts, [0.5], n_bootstrap=500, seed=1)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 4, (500, 4), generator=gen).numpy()
    per_case = (2 * counts[:, 0, 0] / (2 * counts[:, 0, 0] + counts[:, 0, 1] + counts[:, 0, 2])).numpy()
    boot = per_case[idx].mean(1)
    assert float(curves["dice_lo"][0]) == pytest.approx(np.quantile(boot, 0.025))
    assert float(curves["dice_hi"][0]) == pytest.approx(np.quantile(boot, 0.975))


def test_pick_threshold() -> None:
    curves = {
        "threshold": torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64),
        "recall": torch.tensor([0.99, 0.95, 0.9, 0.8, 0.5], dtype=torch.float64),
        "precision": torch.tensor([0.5, 0.7, 0.8, 0.9, 0.97], dtype=torch.float64),
        "dice": torch.tensor([0.6, 0.8, 0.85, 0.84, 0.6], dtype=torch.float64),
    }
    assert pick_threshold(curves, min_recall=0.9) == pytest.approx(0.5)
    assert pick_threshold(curves, min_precision=0.9) == pytest.approx(0.7)
    assert pick_threshold(curves) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no threshold"):
        pick_threshold(curves, min_recall=0.999)


def test_threshold_bad_input() -> None:
    z, y = phantom(n=2, c=3, shape=(8, 8), seed=31)
    p = torch.softmax(z, 1)
    with pytest.raises(ValueError, match="class_index"):
        threshold_counts(p, y, 3)
    with pytest.raises(ValueError, match="thresholds"):
        threshold_counts(p, y, 1, [0.0, 0.5])
    with pytest.raises(ValueError, match=r"\(B, T, 3\)"):
        threshold_curves(torch.zeros(3, 3))
