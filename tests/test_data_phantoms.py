"""Phantoms with a known posterior: Bayes-optimal calibration, label frequencies, determinism."""

from __future__ import annotations

import pytest
import torch

from segcal.data.phantoms import make_phantom, temper
from segcal.functional import bin_statistics, calibration_errors


@pytest.mark.parametrize("mode,c", [("exclusive", 3), ("exclusive", 4), ("multilabel", 3)])
def test_shapes_and_consistency(mode: str, c: int) -> None:
    ph = make_phantom((24, 20, 12), num_classes=c, batch=2, seed=3, mode=mode)
    assert ph.probs.shape == (2, c, 24, 20, 12) and ph.probs.dtype == torch.float32
    assert ph.num_classes == c and ph.spatial_shape == (24, 20, 12)
    assert ph.labels.dtype == torch.int64
    assert torch.isfinite(ph.logits).all()
    assert ph.image.shape == (2, 1, 24, 20, 12) and ph.image.dtype == torch.float32
    assert ph.probs.min() >= 0 and ph.probs.max() <= 1
    if mode == "exclusive":
        assert ph.labels.shape == (2, 24, 20, 12)
        assert 0 <= int(ph.labels.min()) and int(ph.labels.max()) < c
        torch.testing.assert_close(ph.probs.sum(1), torch.ones(2, 24, 20, 12))
        torch.testing.assert_close(torch.softmax(ph.logits, 1), ph.probs, atol=1e-6, rtol=1e-5)
        assert ph.onehot().sum(1).eq(1).all()
    else:
        assert ph.labels.shape == (2, c, 24, 20, 12)
        torch.testing.assert_close(torch.sigmoid(ph.logits), ph.probs, atol=1e-5, rtol=1e-4)
        # nested probabilities and labels: ET ⊂ TC ⊂ WT
        assert (ph.probs[:, 1:] <= ph.probs[:, :-1] + 1e-7).all()
        assert (ph.labels[:, 1:] <= ph.labels[:, :-1]).all()


def test_two_dimensional_default() -> None:
    ph = make_phantom()
    assert ph.probs.shape == (2, 3, 64, 64) and ph.labels.shape == (2, 64, 64)


@pytest.mark.parametrize("mode", ["exclusive", "multilabel"])
def test_determinism_by_seed(mode: str) -> None:
    a = make_phantom((32, 32), 3, 2, seed=7, mode=mode)
    b = make_phantom((32, 32), 3, 2, seed=7, mode=mode)
    c = make_phantom((32, 32), 3, 2, seed=8, mode=mode)
    assert torch.equal(a.probs, b.probs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.probs, c.probs) and not torch.equal(a.labels, c.labels)


@pytest.mark.parametrize("mode,c", [("exclusive", 3), ("multilabel", 3)])
def test_bayes_predictor_is_calibrated_and_tempering_is_detected(mode: str, c: int) -> None:
    ph = make_phantom((128, 128), num_classes=c, batch=8, seed=1, mode=mode)
    errs = {}
    for t in (1.0, 0.5, 2.0):
        stats = bin_statistics(temper(ph.probs, t, mode=mode), ph.labels, 20, mode=mode).pooled()
        errs[t] = calibration_errors(stats)
    for c_ in range(c):
        ace1, ece1 = float(errs[1.0]["ace"][0, c_]), float(errs[1.0]["ece"][0, c_])
        assert ace1 < 0.025 and ece1 < 0.005, (c_, ace1, ece1)
        for t in (0.5, 2.0):
            assert float(errs[t]["ace"][0, c_]) > 3 * ace1 + 0.03
            assert float(errs[t]["ece"][0, c_]) > 2 * ece1 + 0.004


def test_temper_from_logits_matches_probs() -> None:
    ph = make_phantom((32, 32), 4, 1, seed=2)
    torch.testing.assert_close(temper(ph.logits, 1.0, logits=True), ph.probs, atol=1e-6, rtol=1e-5)
    sharp = temper(ph.probs, 0.5)
    assert (sharp.amax(1) >= ph.probs.amax(1) - 1e-6).all()  # T < 1 raises the top-label confidence
    soft = temper(ph.probs, 2.0)
    assert (soft.amax(1) <= ph.probs.amax(1) + 1e-6).all()
    ml = make_phantom((32, 32), 2, 1, seed=2, mode="multilabel")
    torch.testing.assert_close(
        temper(ml.logits, 1.0, mode="multilabel", logits=True), ml.probs, atol=1e-5, rtol=1e-4
    )
    with pytest.raises(ValueError, match="temperature"):
        temper(ph.probs, 0.0)


@pytest.mark.parametrize("mode", ["exclusive", "multilabel"])
def test_label_frequencies_match_probabilities(mode: str) -> None:
    ph = make_phantom((96, 96), 4, 6, seed=5, mode=mode)
    if mode == "exclusive":
        freq = torch.bincount(ph.labels.flatten(), minlength=4).double() / ph.labels.numel()
    else:
        freq = ph.labels.double().mean((0, 2, 3))
    expected = ph.probs.double().mean((0, 2, 3))
    n = ph.labels.shape[0] * 96 * 96
    sd = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 5 * sd + 1e-4).all(), (freq, expected)
    # class imbalance and small structures: the smallest class is rare but present
    if mode == "exclusive":
        assert expected[0] > 0.4 and 0.005 < expected[-1] < expected[1]


@pytest.mark.parametrize("mode", ["exclusive", "multilabel"])
def test_annotator_noise_posterior(mode: str) -> None:
    eps = 0.2
    ph = make_phantom((96, 96), 3, 6, seed=4, mode=mode, label_noise=eps)
    if mode == "exclusive":
        torch.testing.assert_close(ph.probs, (1 - eps) * ph.clean_probs + eps / 3)
    else:
        torch.testing.assert_close(ph.probs, (1 - eps) * ph.clean_probs + eps * (1 - ph.clean_probs))
    stats = bin_statistics(ph.probs, ph.labels, 20, mode=mode).pooled()
    assert float(calibration_errors(stats)["ece"].max()) < 0.01
    clean_stats = bin_statistics(ph.clean_probs, ph.labels, 20, mode=mode).pooled()
    assert float(calibration_errors(clean_stats)["ece"].max()) > 0.02  # noise-free map is now miscalibrated


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        make_phantom(mode="soft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        make_phantom((8,))
    with pytest.raises(ValueError, match="num_classes"):
        make_phantom(num_classes=1)
    with pytest.raises(ValueError, match="label_noise"):
        make_phantom(label_noise=1.0)
    with pytest.raises(ValueError, match="blur"):
        make_phantom(blur=0)


def test_image_is_informative_and_labels_unchanged_by_it() -> None:
    ph = make_phantom((64, 64), 4, 2, seed=0)
    means = [float(ph.image[:, 0][ph.labels == c].mean()) for c in range(4)]
    assert means == sorted(means) and means[-1] - means[0] > 0.3
    assert ph.image.std() > 0.05
