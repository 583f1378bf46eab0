"""Edge cases, AMP, torch.compile, argument validation and the loss-string parser."""

from __future__ import annotations

import pytest
import torch

from _helpers import LOSS_NAMES
from segcal.losses import (
    CompositeLoss,
    DiceLoss,
    DSCPlusPlusLoss,
    HardL1ACELoss,
    SoftL1ACELoss,
    loss_from_string,
    parse_loss_spec,
    valid_loss_names,
)


def _finite_loss_and_grad(loss, x, y):
    x = x.detach().clone().requires_grad_(True)
    v = loss(x, y)
    v.backward()
    return bool(torch.isfinite(v).all()) and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("spec", LOSS_NAMES)
def test_edge_cases_no_nan(spec):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, 4, generator=g)  # 3D
    cases = {
        "all background": torch.zeros(2, 1, 6, 5, 4, dtype=torch.long),
        "single class": torch.full((2, 1, 6, 5, 4), 2, dtype=torch.long),
        "random": torch.randint(0, 3, (2, 1, 6, 5, 4), generator=g),
    }
    for ignore in (False, True):
        kw = dict(softmax=True, to_onehot_y=True)
        if spec in ("ace", "ece", "mce", "soft_ace", "soft_ece", "soft_mce"):
            kw["ignore_empty_classes"] = ignore
        elif ignore:
            continue
        loss = loss_from_string(spec, **kw)
        for name, y in cases.items():
            assert _finite_loss_and_grad(loss, x, y), f"{spec} {name}"
        # saturated logits: every probability in the edge bins, most bins empty
        assert _finite_loss_and_grad(loss, 50 * x, cases["random"]), f"{spec} saturated"
    # multilabel, all-empty targets
    loss = loss_from_string(spec, sigmoid=True)
    assert _finite_loss_and_grad(loss, x, torch.zeros_like(x))


def test_ignore_empty_classes_zeroes_absent_classes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    y = torch.randint(0, 2, (2, 1, 8, 8), generator=g)  # class 2 absent
    full = HardL1ACELoss(softmax=True, to_onehot_y=True, reduction="none")(x, y)
    ign = HardL1ACELoss(softmax=True, to_onehot_y=True, reduction="none", ignore_empty_classes=True)(x, y)
    assert bool((ign[:, 2] == 0).all()) and bool((full[:, 2] > 0).all())
    torch.testing.assert_close(ign[:, :2], full[:, :2])


def test_reduction_weight_and_background():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    y = torch.randint(0, 4, (2, 1, 8, 8), generator=g)
    for cls in (HardL1ACELoss, SoftL1ACELoss, DSCPlusPlusLoss):
        none = cls(softmax=True, to_onehot_y=True, reduction="none")(x, y)
        assert none.shape == (2, 4)
        torch.testing.assert_close(cls(softmax=True, to_onehot_y=True)(x, y), none.mean())
        torch.testing.assert_close(cls(softmax=True, to_onehot_y=True, reduction="sum")(x, y), none.sum())
        w = torch.tensor([0.0, 1.0, 2.0, 3.0])
        torch.testing.assert_close(cls(softmax=True, to_onehot_y=True, weight=w)(x, y), (none * w).mean())
        nobg = cls(softmax=True, to_onehot_y=True, include_background=False, reduction="none")(x, y)
        torch.testing.assert_close(nobg, none[:, 1:])


def test_autocast_bfloat16_cpu():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g)
    conv = torch.nn.Conv3d(3, 3, 1)
    for spec in LOSS_NAMES:
        loss = loss_from_string(spec, softmax=True, to_onehot_y=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = conv(x)
            assert logits.dtype == torch.bfloat16
            v = loss(logits, y)
        v.backward()
        assert torch.isfinite(v), spec
        assert all(torch.isfinite(p.grad).all() for p in conv.parameters()), spec
        conv.zero_grad()


@pytest.mark.slow
def test_torch_compile_cpu():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 6, 6, generator=g)
    y = torch.randint(0, 3, (1, 1, 6, 6), generator=g)
    loss = HardL1ACELoss(softmax=True, to_onehot_y=True)
    compiled = torch.compile(loss, backend="inductor", dynamic=False)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ve, vc = loss(xe, y), compiled(xc, y)
    ve.backward()
    vc.backward()
    torch.testing.assert_close(vc, ve, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-3, atol=1e-5)


def test_parser_grammar():
    assert parse_loss_spec("dice+ace") == [(1.0, "dice", {}), (1.0, "ace", {})]
    assert parse_loss_spec("dice:1,ce:1,ace:0.3") == [(1.0, "dice", {}), (1.0, "ce", {}), (0.3, "ace", {})]
    assert parse_loss_spec("dscpp(gamma=2)+soft_ace") == [(1.0, "dscpp", {"gamma": 2}), (1.0, "soft_ace", {})]
    assert parse_loss_spec(" 0.5 * Focal + DSC++ ") == [(0.5, "focal", {}), (1.0, "dscpp", {})]
    assert parse_loss_spec("ace(num_bins=15, variant='mL1-ECE'):0.2")[0] == (
        0.2,
        "ace",
        {"num_bins": 15, "variant": "mL1-ECE"},
    )
    assert parse_loss_spec("tversky++,ft++(gamma=1.5)")[1] == (1.0, "focal_tverskypp", {"gamma": 1.5})


def test_parser_builds_modules_and_passes_common_kwargs():
    comp = loss_from_string("dice:1,ce:1,ace(num_bins=10):0.3", softmax=True, to_onehot_y=True)
    assert isinstance(comp, CompositeLoss)
    assert comp.weights == [1.0, 1.0, 0.3]
    dice, _ce, ace = comp.losses
    assert dice.softmax and dice.to_onehot_y and ace.num_bins == 10
    single = loss_from_string("dscpp(gamma=3)", sigmoid=True, include_background=False)
    assert isinstance(single, DSCPlusPlusLoss) and single.gamma == 3.0 and single.sigmoid
    assert not single.include_background
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, 6, generator=g)
    y = torch.randint(0, 3, (2, 1, 6, 6), generator=g)
    v = comp(x, y)
    parts = comp.last_components
    torch.testing.assert_close(v, parts["dice"] + parts["ce"] + 0.3 * parts["ace"])
    # Python composition
    py = CompositeLoss(
        [
            (1.0, DiceLoss(softmax=True, to_onehot_y=True)),
            (2.0, HardL1ACELoss(softmax=True, to_onehot_y=True)),
        ]
    )
    ref = DiceLoss(softmax=True, to_onehot_y=True)(x, y) + 2 * HardL1ACELoss(softmax=True, to_onehot_y=True)(
        x, y
    )
    torch.testing.assert_close(py(x, y), ref)


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ("dice+nope", "valid names"),
        ("", "non-empty"),
        ("dice++ace", "cannot parse"),
        ("dice(gamma=2)", "does not accept"),
        ("dice:abc", "cannot parse"),
        ("dice((", "unbalanced"),
        ("dice,,ce", "empty term"),
    ],
)
def test_parser_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        loss_from_string(spec)


def test_valid_names_listed_in_error():
    with pytest.raises(ValueError) as e:
        loss_from_string("bogus")
    for n in ("dice", "dscpp", "ace", "soft_ace", "unified_focal", "ce"):
        assert n in str(e.value) and n in valid_loss_names()


def test_argument_validation():
    with pytest.raises(ValueError, match="mutually exclusive"):
        DiceLoss(softmax=True, sigmoid=True)
    with pytest.raises(ValueError, match="reduction"):
        HardL1ACELoss(reduction="avg")
    with pytest.raises(ValueError, match="variant"):
        HardL1ACELoss(variant="foo")
    with pytest.raises(ValueError, match="weight"):
        DiceLoss(weight=[-1.0, 1.0])
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="label map"):
        HardL1ACELoss(to_onehot_y=True)(x, torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="to_onehot_y"):
        HardL1ACELoss()(x, torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="2 or 3 spatial"):
        DiceLoss()(torch.randn(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="floating"):
        DiceLoss()(torch.zeros(2, 3, 4, 4, dtype=torch.long), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="classes"):
        DiceLoss(softmax=True, to_onehot_y=True, weight=[1.0, 2.0])(x, torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        HardL1ACELoss(softmax=True, to_onehot_y=True)(x, torch.full((2, 1, 4, 4), 3))
