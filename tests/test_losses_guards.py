"""Loss input guards (NaN/Inf, logits without an activation) and loss-spec guards (weights, argument types),
each one clear ``ValueError`` naming the loss or the term (docs/losses.md)."""

from __future__ import annotations

import re

import pytest
import torch

from _helpers import LOSS_NAMES
from segcal.losses import CompositeLoss, DiceLoss, HardL1ACELoss, loss_from_string

NO_ACTIVATION = "got values outside [0, 1]: pass softmax=True or sigmoid=True for logits"


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 6, 5, generator=g) * 3, torch.randint(0, 3, (2, 1, 6, 5), generator=g)


@pytest.mark.parametrize("spec", LOSS_NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_loss_rejects_nan_and_inf_inputs(spec: str, bad: float) -> None:
    x, y = _data()
    x[1, 2, 3, 4] = bad
    loss = loss_from_string(spec, softmax=True, to_onehot_y=True)
    with pytest.raises(ValueError, match=r"input contains 1 NaN/Inf values"):
        loss(x, y)


@pytest.mark.parametrize("spec", LOSS_NAMES)
def test_every_loss_rejects_logits_without_an_activation(spec: str) -> None:
    x, y = _data()
    loss = loss_from_string(spec, to_onehot_y=True)
    with pytest.raises(ValueError, match=r"input spans \[-\d.*, \d.*\]; .*" + re.escape(NO_ACTIVATION)):
        loss(x, y)
    assert torch.isfinite(loss(torch.softmax(x, 1), y))  # probabilities are accepted
    assert torch.isfinite(loss_from_string(spec, to_onehot_y=True, other_act=lambda t: torch.softmax(t, 1))(x, y))


def test_hard_ace_names_itself_and_the_missing_flag() -> None:
    x, y = _data(1)
    with pytest.raises(ValueError, match=r"^HardL1ACELoss: input spans \[") as info:
        HardL1ACELoss(to_onehot_y=True)(x, y)
    assert str(info.value).endswith(NO_ACTIVATION)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^HardL1ACELoss: input contains 1 NaN/Inf values"):
        HardL1ACELoss(softmax=True, to_onehot_y=True)(x, y)
    probs = torch.rand(2, 3, 6, 5)
    probs[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        HardL1ACELoss(to_onehot_y=True)(probs, y)


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ("dice:-1", r"loss term 'dice:-1': the weight must be a finite number >= 0, got -1\.0"),
        ("-2*dice+ce", r"loss term '-2\*dice': the weight must be a finite number >= 0"),
        ("dice+ace:1e999", r"loss term 'ace:1e999': the weight must be a finite number >= 0, got inf"),
        ("ace(num_bins=True)", r"loss term 'ace': num_bins must be int, got the bool True"),
        ("focal(gamma=True)", r"loss term 'focal': gamma must be float, got the bool True"),
        ("ace(num_bins=10**8)", r"loss term 'ace\(num_bins=10\*\*8\)': value of 'num_bins' must be a literal"),
        ("ace(num_bins=100000000)", r"loss term 'ace' \(HardL1ACELoss\): num_bins .* at most 10000"),
        ("soft_ace(num_bins=0)", r"loss term 'soft_ace' \(SoftL1ACELoss\): num_bins must be a positive integer"),
        ("dice(smooth_nr=1e999)", r"loss term 'dice\(smooth_nr=1e999\)': value of 'smooth_nr' must be finite"),
    ],
)
def test_loss_spec_rejects_bad_weights_and_arguments(spec: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        loss_from_string(spec)


def test_valid_specs_and_python_weights() -> None:
    assert loss_from_string("dice(batch=True)").batch
    assert loss_from_string("ace(ignore_empty_classes=True, num_bins=15):0").losses[0].num_bins == 15
    with pytest.raises(ValueError, match=r"loss term 'dice': the weight must be a finite number >= 0"):
        CompositeLoss({"dice": (-1.0, DiceLoss())})
    with pytest.raises(ValueError, match="num_bins must be a positive integer"):
        HardL1ACELoss(num_bins=True)
