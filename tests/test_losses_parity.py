"""Parity of segcal losses with MONAI and between plain and ++ variants."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from monai import losses as ml

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
    TverskyLoss,
    TverskyPlusPlusLoss,
    loss_from_string,
)


def _data(seed: int = 0, c: int = 3, shape: tuple[int, ...] = (2, 7, 6)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape[0], c, *shape[1:], generator=g, dtype=torch.float64)
    lab = torch.randint(0, c, (shape[0], 1, *shape[1:]), generator=g)
    multi = (torch.rand(shape[0], c, *shape[1:], generator=g) > 0.6).double()
    return x, lab, multi


def _onehot(lab: torch.Tensor, c: int) -> torch.Tensor:
    return torch.zeros(lab.shape[0], c, *lab.shape[2:], dtype=torch.float64).scatter_(1, lab, 1.0)


ACT = [dict(softmax=True), dict(sigmoid=True)]
SETTINGS = list(itertools.product(ACT, [True, False], [True, False], ["mean", "sum", "none"]))


@pytest.mark.parametrize(("act", "include_background", "to_onehot_y", "reduction"), SETTINGS)
def test_dice_and_tversky_match_monai(act, include_background, to_onehot_y, reduction):
    x, lab, multi = _data(1)
    if "sigmoid" in act and not to_onehot_y:
        y_seg, y_monai = multi, multi
    else:
        y_seg = lab if to_onehot_y else _onehot(lab, 3)
        y_monai = y_seg
    kw = dict(include_background=include_background, to_onehot_y=to_onehot_y, reduction=reduction, **act)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = [
            (DiceLoss(**kw), ml.DiceLoss(**kw)),
            (DiceLoss(squared_pred=True, **kw), ml.DiceLoss(squared_pred=True, **kw)),
            (DiceLoss(jaccard=True, batch=True, **kw), ml.DiceLoss(jaccard=True, batch=True, **kw)),
            (TverskyLoss(alpha=0.3, beta=0.7, **kw), ml.TverskyLoss(alpha=0.3, beta=0.7, **kw)),
            (TverskyLoss(alpha=0.5, beta=0.5, batch=True, **kw), ml.TverskyLoss(batch=True, **kw)),
        ]
        for ours, ref in pairs:
            a, b = ours(x, y_seg), ref(x, y_monai)
            torch.testing.assert_close(a.reshape(-1), b.reshape(-1), rtol=1e-6, atol=1e-8)


def test_dice_class_weight_matches_monai():
    x, lab, _ = _data(2)
    w = [0.2, 1.0, 3.0]
    a = DiceLoss(softmax=True, to_onehot_y=True, weight=w)(x, lab)
    b = ml.DiceLoss(softmax=True, to_onehot_y=True, weight=w)(x, lab)
    torch.testing.assert_close(a, b)
    a = DiceLoss(softmax=True, to_onehot_y=True, weight=w[1:], include_background=False)(x, lab)
    b = ml.DiceLoss(softmax=True, to_onehot_y=True, weight=w[1:], include_background=False)(x, lab)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("reduction", "alpha", "gamma"), [("mean", None, 2.0), ("sum", 0.25, 2.0), ("none", None, 1.5)]
)
@pytest.mark.parametrize("use_softmax", [True, False])
def test_focal_matches_monai(reduction, alpha, gamma, use_softmax):
    x, lab, multi = _data(3)
    y = _onehot(lab, 3) if use_softmax else multi
    ours = FocalLoss(
        gamma=gamma, alpha=alpha, reduction=reduction, softmax=use_softmax, sigmoid=not use_softmax
    )
    ref = ml.FocalLoss(gamma=gamma, alpha=alpha, reduction=reduction, use_softmax=use_softmax)
    a, b = ours(x, y), ref(x, y)
    if reduction == "none":
        b = b.flatten(2).mean(-1)
    # MONAI computes the focal loss in float32
    torch.testing.assert_close(a, b.double(), rtol=1e-5, atol=1e-6)
    # sigmoid focal with include_background=False and class weights (same channel convention as MONAI)
    if not use_softmax and reduction != "none":
        ours = FocalLoss(
            gamma=gamma, sigmoid=True, include_background=False, weight=[1.0, 2.0], reduction=reduction
        )
        ref = ml.FocalLoss(
            gamma=gamma, use_softmax=False, include_background=False, weight=[1.0, 2.0], reduction=reduction
        )
        torch.testing.assert_close(ours(x, y), ref(x, y).double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("to_onehot_y", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_dice_ce_matches_monai(to_onehot_y, weighted):
    x, lab, _ = _data(4)
    y = lab if to_onehot_y else _onehot(lab, 3)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64) if weighted else None
    ref = ml.DiceCELoss(softmax=True, to_onehot_y=to_onehot_y, weight=w, lambda_dice=1.0, lambda_ce=0.7)
    if weighted:
        # MONAI weights both terms; compose the same two terms by hand
        ours = loss_from_string("dice:1,ce:0.7", softmax=True, to_onehot_y=to_onehot_y, weight=w.tolist())
    else:
        ours = loss_from_string("dice:1,ce:0.7", softmax=True, to_onehot_y=to_onehot_y)
    torch.testing.assert_close(ours(x, y), ref(x, y))


def test_dice_ce_sigmoid_matches_monai():
    # MONAI uses BCE only for a single channel (with C > 1 it applies softmax-CE even with sigmoid=True)
    x, _, multi = _data(5)
    x, multi = x[:, :1], multi[:, :1]
    ref = ml.DiceCELoss(sigmoid=True)
    ours = loss_from_string("dice+ce", sigmoid=True)
    torch.testing.assert_close(ours(x, multi), ref(x, multi))


def test_cross_entropy_matches_torch():
    x, lab, _ = _data(6)
    w = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64)
    ref = torch.nn.functional.cross_entropy(x, lab[:, 0], weight=w)
    torch.testing.assert_close(CrossEntropyLoss(softmax=True, to_onehot_y=True, weight=w)(x, lab), ref)
    # probabilities in, label-map target: same value
    p = torch.softmax(x, 1)
    torch.testing.assert_close(CrossEntropyLoss(to_onehot_y=True, weight=w)(p, lab), ref)
    # per image
    per = CrossEntropyLoss(softmax=True, to_onehot_y=True, reduction="none")(x, lab)
    ref_per = torch.nn.functional.cross_entropy(x, lab[:, 0], reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(per, ref_per)


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("act", ACT)
def test_dscpp_gamma1_equals_dice(include_background, act):
    x, lab, multi = _data(7)
    y = multi if "sigmoid" in act else _onehot(lab, 3)
    kw = dict(include_background=include_background, reduction="none", **act)
    torch.testing.assert_close(DSCPlusPlusLoss(gamma=1.0, **kw)(x, y), DiceLoss(**kw)(x, y))
    # gamma=2 differs and is smaller (FP/FN terms < 1 are shrunk by squaring)
    assert bool((DSCPlusPlusLoss(**kw)(x, y) < DiceLoss(**kw)(x, y)).all())


@pytest.mark.parametrize(
    ("plain", "pp", "extra"),
    [
        (TverskyLoss, TverskyPlusPlusLoss, {}),
        (FocalTverskyLoss, FocalTverskyPlusPlusLoss, {}),
        (ComboLoss, ComboPlusPlusLoss, {}),
        (AsymmetricUnifiedFocalLoss, AsymmetricUnifiedFocalPlusPlusLoss, {}),
    ],
)
def test_plusplus_differs_only_in_fpfn_exponent(plain, pp, extra):
    x, lab, _ = _data(8)
    kw = dict(softmax=True, to_onehot_y=True, reduction="none", **extra)
    a, b = plain(**kw)(x, lab), pp(**kw)(x, lab)
    assert not torch.allclose(a, b)
    # the ++ loss equals the plain loss built with the same FP/FN exponent
    torch.testing.assert_close(plain(fpfn_gamma=2.0, **kw)(x, lab), b)
    assert pp(fpfn_gamma=1.0, **kw)(x, lab).allclose(a)


def test_table2_defaults():
    t = TverskyLoss()
    assert (t.alpha, t.beta) == (0.3, 0.7)
    ft = FocalTverskyLoss()
    assert (ft.alpha, ft.beta) == (0.3, 0.7) and abs(ft.gamma - 4 / 3) < 1e-12
    c = ComboLoss()
    assert (c.alpha, c.beta) == (0.5, 0.5)
    u = AsymmetricUnifiedFocalLoss()
    assert (u.gamma, u.delta, u.lambda_) == (0.5, 0.6, 0.5)
    assert DSCPlusPlusLoss().gamma == 2.0 and FocalLoss().gamma == 2.0


def test_unified_focal_binary_matches_reference_formula():
    """Two-class softmax AUF equals eq. 18-21 written out by hand (Yeung et al. reference structure)."""
    x, _, _ = _data(9, c=2)
    g = torch.Generator().manual_seed(1)
    lab = torch.randint(0, 2, (2, 1, 7, 6), generator=g)
    y = _onehot(lab, 2)
    p = torch.softmax(x, 1)
    gamma, delta, lam = 0.5, 0.6, 0.5
    ce = -y * p.log()
    back = (1 - delta) * (1 - p[:, 0]) ** gamma * ce[:, 0]
    fore = delta * ce[:, 1]
    af = (back + fore).flatten(1).mean(1)
    tp = (p * y).flatten(2).sum(-1)
    fn = ((1 - p) * y).flatten(2).sum(-1)
    fp = (p * (1 - y)).flatten(2).sum(-1)
    ti = (tp + 1e-5) / (tp + delta * fn + (1 - delta) * fp + 1e-5)
    aft = ((1 - ti[:, 0]) + (1 - ti[:, 1]) ** (1 - gamma)) / 2
    ref = lam * af + (1 - lam) * aft
    ours = AsymmetricUnifiedFocalLoss(softmax=True, to_onehot_y=True, reduction="none")(x, lab)
    torch.testing.assert_close(ours, ref)


def test_unified_focal_multiclass_and_multilabel_run():
    x, lab, multi = _data(10, c=4)
    lab = lab.clamp(max=3)
    for kw, y in [(dict(softmax=True, to_onehot_y=True), lab), (dict(sigmoid=True), multi[:, :4])]:
        v = AsymmetricUnifiedFocalLoss(**kw)(x, y)
        assert torch.isfinite(v) and v > 0
