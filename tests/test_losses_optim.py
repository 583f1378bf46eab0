"""Minimising the ACE losses on the logits of an over-confident predictor improves calibration."""

from __future__ import annotations

import math

import pytest
import torch

from segcal.functional.binning import bin_statistics
from segcal.functional.calibration import calibration_error
from segcal.losses import HardL1ACELoss, SoftL1ACELoss


def _phantom(size: int = 48, seed: int = 0):
    """Smooth 3-class posterior q (B=1), labels sampled from q, over-confident logits 3·ln q."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = torch.sqrt(xx**2 + yy**2)
    f1 = 4 * (0.55 - r)  # disc
    f2 = 3 * (xx - 0.2) + 1.5 * torch.sin(3 * yy)  # smooth band
    logits_q = torch.stack([torch.zeros_like(r), f1, f2])[None]
    q = torch.softmax(logits_q, 1)
    u = torch.rand(1, size, size, generator=g)
    labels = (u.unsqueeze(1) > q.cumsum(1)).sum(1).clamp(max=2)  # inverse-CDF sampling
    logits = 3.0 * q.clamp_min(1e-6).log()  # k * logit(q), k = 3: over-confident
    return q, labels, logits


def _ace(logits: torch.Tensor, labels: torch.Tensor) -> float:
    stats = bin_statistics(logits.detach(), labels, 20, activation="softmax", include_background=True)
    return float(calibration_error(stats, "average").nanmean())


@pytest.mark.parametrize(("cls", "steps"), [(HardL1ACELoss, 60), (SoftL1ACELoss, 150)])
def test_ace_loss_descent_halves_marginal_ace(cls, steps):
    torch.manual_seed(0)
    q, labels, logits0 = _phantom()
    ace_q = _ace(q.clamp_min(1e-6).log(), labels)
    ace0 = _ace(logits0, labels)
    assert ace0 > 2 * ace_q  # the predictor is clearly mis-calibrated, the posterior is not
    logits = logits0.clone().requires_grad_(True)
    loss = cls(softmax=True, to_onehot_y=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss(logits, labels.unsqueeze(1)).backward()
        opt.step()
    ace1 = _ace(logits, labels)
    assert math.isfinite(ace1)
    assert ace1 <= 0.5 * ace0, (ace0, ace1)
