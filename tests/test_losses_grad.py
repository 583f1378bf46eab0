"""Gradients of the segcal losses: gradcheck in float64 and the analytic hard-ACE gradient."""

from __future__ import annotations

import pytest
import torch

from segcal.functional.losses import hard_calibration_error, soft_calibration_error
from segcal.losses import (
    AsymmetricUnifiedFocalLoss,
    AsymmetricUnifiedFocalPlusPlusLoss,
    ComboLoss,
    ComboPlusPlusLoss,
    CrossEntropyLoss,
    DiceLoss,
    DSCPlusPlusLoss,
    FocalLoss,
    FocalTverskyLoss,
    FocalTverskyPlusPlusLoss,
    HardL1ACELoss,
    SoftL1ACELoss,
    TverskyLoss,
    TverskyPlusPlusLoss,
    loss_from_string,
)

SMOOTH = [
    DiceLoss,
    DSCPlusPlusLoss,
    TverskyLoss,
    TverskyPlusPlusLoss,
    FocalTverskyLoss,
    FocalTverskyPlusPlusLoss,
    ComboLoss,
    ComboPlusPlusLoss,
    AsymmetricUnifiedFocalLoss,
    AsymmetricUnifiedFocalPlusPlusLoss,
    FocalLoss,
    CrossEntropyLoss,
]


@pytest.mark.parametrize("cls", SMOOTH, ids=lambda c: c.__name__)
@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
def test_gradcheck_smooth_losses(cls, act):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    if act == "softmax":
        y = torch.randint(0, 3, (2, 1, 2, 2), generator=g)
        loss = cls(softmax=True, to_onehot_y=True)
    else:
        y = (torch.rand(2, 3, 2, 2, generator=g) > 0.5).double()
        loss = cls(sigmoid=True)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x,), eps=1e-6, atol=1e-5)


def _probs_off_edges(shape, num_bins, g, kernel_kinks):
    """Probabilities at least 0.1/M away from every point where the loss is not smooth."""
    k = torch.randint(1 if kernel_kinks else 0, num_bins - (1 if kernel_kinks else 0), shape, generator=g)
    off = (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5) * 0.6  # in [-0.3, 0.3]
    # hard bins: kinks at edges k/M -> stay near centres; soft bins: kinks at centres -> stay near edges
    base = k.double() if kernel_kinks else k.double() + 0.5
    return ((base + off) / num_bins).requires_grad_(True)


@pytest.mark.parametrize("variant", ["ace", "ece", "mce"])
def test_gradcheck_hard_ace(variant):
    g = torch.Generator().manual_seed(1)
    p = _probs_off_edges((2, 2, 4, 4), 5, g, kernel_kinks=False)
    y = (torch.rand(2, 2, 4, 4, generator=g) > 0.5).double()
    loss = HardL1ACELoss(num_bins=5, variant=variant, mode="multilabel")
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (p,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["ace", "ece", "mce"])
def test_gradcheck_soft_ace(variant):
    g = torch.Generator().manual_seed(2)
    p = _probs_off_edges((2, 2, 4, 4), 5, g, kernel_kinks=True)
    y = (torch.rand(2, 2, 4, 4, generator=g) > 0.5).double()
    loss = SoftL1ACELoss(num_bins=5, variant=variant, mode="multilabel", min_weight=1e-3)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (p,), eps=1e-6, atol=1e-6)


def test_gradcheck_hard_ace_through_softmax():
    """Logits near zero give probabilities near 1/3, well inside bin (0.3, 0.35] for M = 20."""
    g = torch.Generator().manual_seed(3)
    x = (0.02 * torch.randn(1, 3, 3, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, 3, (1, 1, 3, 3), generator=g)
    loss = HardL1ACELoss(softmax=True, to_onehot_y=True)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x,), eps=1e-6, atol=1e-6)


def test_hard_ace_analytic_gradient():
    # M = 4 bins (0, .25], (.25, .5], (.5, .75], (.75, 1]
    p = torch.tensor([0.10, 0.15, 0.60, 0.65, 0.70, 0.90], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    # bin 0: e = .125, o = .5 (e < o); bin 2: e = .65, o = 1/3 (e > o); bin 3: e = .9, o = 1 (e < o)
    pt = p.view(1, 1, 2, 3).clone().requires_grad_(True)
    ace = hard_calibration_error(pt, y.view(1, 1, 2, 3), num_bins=4)
    expected_value = (abs(0.125 - 0.5) + abs(0.65 - 1 / 3) + abs(0.9 - 1.0)) / 3
    torch.testing.assert_close(ace, torch.tensor([[expected_value]], dtype=torch.float64))
    ace.sum().backward()
    k_plus = 3
    expected = torch.tensor(
        [
            -1 / (2 * k_plus),
            -1 / (2 * k_plus),
            1 / (3 * k_plus),
            1 / (3 * k_plus),
            1 / (3 * k_plus),
            -1 / k_plus,
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(pt.grad.reshape(-1), expected)
    # the module gives the same (one image, one class, probabilities in)
    pm = p.view(1, 1, 2, 3).clone().requires_grad_(True)
    HardL1ACELoss(num_bins=4, mode="multilabel")(pm, y.view(1, 1, 2, 3)).backward()
    torch.testing.assert_close(pm.grad.reshape(-1), expected)


def test_hard_ace_matches_metric_core():
    """Forward value of the loss equals the metric from the binning core (one formula, one place)."""
    from segcal.functional.binning import bin_statistics
    from segcal.functional.calibration import calibration_error

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 8, 5, generator=g)
    y = torch.randint(0, 3, (2, 9, 8, 5), generator=g)
    p = torch.softmax(x, 1)
    stats = bin_statistics(p, y, 20, include_background=True)
    for variant, red in [("ace", "average"), ("ece", "expected"), ("mce", "maximum")]:
        loss = HardL1ACELoss(variant=variant, softmax=True, to_onehot_y=True, reduction="none")(
            x, y.unsqueeze(1)
        )
        torch.testing.assert_close(loss.double(), calibration_error(stats, red), rtol=1e-5, atol=1e-6)


def test_soft_ace_close_to_hard_for_many_bins_and_gradient_through_weights():
    g = torch.Generator().manual_seed(5)
    p = torch.rand(1, 1, 40, 40, generator=g, dtype=torch.float64)
    y = (torch.rand(1, 1, 40, 40, generator=g, dtype=torch.float64) < p).double()
    s = soft_calibration_error(p, y, 10)
    h = hard_calibration_error(p, y, 10)
    assert float((s - h).abs()) < 0.05
    # gradient through weights: it differs from the gradient through the sums alone
    pt = p.clone().requires_grad_(True)
    soft_calibration_error(pt, y, 10).sum().backward()
    assert torch.isfinite(pt.grad).all() and pt.grad.abs().sum() > 0


def test_composite_gradient_is_weighted_sum():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 5, 5), generator=g)
    comp = loss_from_string("dice:1,ce:0.5,ace:0.3", softmax=True, to_onehot_y=True)
    ref = (
        DiceLoss(softmax=True, to_onehot_y=True)(x, y)
        + 0.5 * CrossEntropyLoss(softmax=True, to_onehot_y=True)(x, y)
        + 0.3 * HardL1ACELoss(softmax=True, to_onehot_y=True)(x, y)
    )
    (gc,) = torch.autograd.grad(comp(x, y), x)
    (gr,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(gc, gr)
