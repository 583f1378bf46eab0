"""The peers' calibration losses: NACL's penalty, SVLS, MbLS's margin penalty, label smoothing and FLSD-53.

Parity with MONAI's ``NACLLoss`` (values and gradients, 2D and 3D, random and adversarial logits), with
``torch.nn.functional.cross_entropy(label_smoothing=ε)`` and with MONAI's ``FocalLoss`` at ``γ = 5`` / ``γ = 3``;
hand-computed SVLS kernels and MbLS values; gradcheck in float64; finite values and gradients under bfloat16
autocast; the loss-string names and their argument checks.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.losses import FocalLoss as MonaiFocalLoss
from monai.losses import NACLLoss

from segcal.functional.losses import logit_margin_terms, smooth_target, svls_kernel
from segcal.losses import (
    CrossEntropyLoss,
    LabelSmoothingCrossEntropyLoss,
    LogitMarginPenaltyLoss,
    NACLPenaltyLoss,
    SampleDependentFocalLoss,
    SVLSLoss,
    loss_from_string,
    valid_loss_names,
)

NEW = ["nacl", "mbls", "svls", "ls", "flsd"]


def _data(shape: tuple[int, ...], seed: int = 0, scale: float = 3.0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    return x, y


def _value_and_grad(loss, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    v = loss(x, y)
    v.backward()
    return v.detach(), x.grad


# -- NACL: parity with MONAI ---------------------------------------------------------------------------------


def _nacl_pair(c: int, dim: int, **kw):
    """MONAI's whole NACL objective and segcal's CE + penalty, for the same settings."""
    monai = NACLLoss(classes=c, dim=dim, **kw)
    args = ",".join(f"{k}={v!r}" for k, v in kw.items())
    ours = loss_from_string(f"ce+nacl({args})", softmax=True, to_onehot_y=True)
    return monai, ours


@pytest.mark.parametrize("shape", [(2, 4, 11, 9), (2, 3, 7, 6, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"distance_type": "l2"},
        {"kernel_size": 5},
        {"kernel_ops": "gaussian"},
        {"kernel_ops": "gaussian", "sigma": 0.6, "distance_type": "l2", "alpha": 0.5},
    ],
    ids=["mean-l1", "mean-l2", "mean5", "gauss", "gauss-l2"],
)
def test_nacl_equals_monai_values_and_gradients(shape, kw):
    monai, ours = _nacl_pair(shape[1], len(shape) - 2, **kw)
    x, y = _data(shape, seed=len(shape))
    cases = {
        "random": (x, y),
        "huge logits": (x * 1e4, y),
        "all background": (x, torch.zeros_like(y)),
        "single class": (x, torch.full_like(y, shape[1] - 1)),
        "saturated on background": (torch.cat([x[:, :1] * 0 + 80.0, x[:, 1:] * 0 - 80.0], 1), torch.zeros_like(y)),
    }
    for name, (xi, yi) in cases.items():
        va, ga = _value_and_grad(monai, xi, yi)
        vb, gb = _value_and_grad(ours, xi, yi.unsqueeze(1))  # segcal takes (B, 1, *spatial) like MONAI's DiceLoss
        scale = max(1.0, float(va.abs()))
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6 * scale, msg=name)
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-7 * scale, msg=name)


def test_nacl_penalty_alone_is_monai_minus_its_cross_entropy():
    x, y = _data((2, 3, 8, 8), seed=5)
    for kw in ({}, {"kernel_ops": "gaussian", "distance_type": "l2"}):
        monai = NACLLoss(classes=3, dim=2, **kw)(x, y)
        penalty = NACLPenaltyLoss(softmax=True, to_onehot_y=True, **kw)(x, y)
        torch.testing.assert_close(penalty, monai - F.cross_entropy(x, y))


@settings(max_examples=15, deadline=None)
@given(
    dim=st.sampled_from([2, 3]),
    c=st.integers(2, 4),
    size=st.integers(1, 6),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e5]),
    seed=st.integers(0, 2**16),
)
def test_nacl_equals_monai_property(dim, c, size, scale, seed):
    """Any small 2D/3D shape (single voxels included, where the whole kernel lies in the zero padding)."""
    shape = (2, c) + (size,) * dim
    x, y = _data(shape, seed=seed, scale=scale)
    monai, ours = _nacl_pair(c, dim)
    va, ga = _value_and_grad(monai, x, y)
    vb, gb = _value_and_grad(ours, x, y)
    torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6 * max(1.0, float(va.abs())))
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-7 * max(1.0, float(va.abs())))


def test_nacl_reduction_weight_and_background():
    x, y = _data((2, 3, 6, 7), seed=2)
    none = NACLPenaltyLoss(softmax=True, to_onehot_y=True, reduction="none")(x, y)
    assert none.shape == (2, 3)
    torch.testing.assert_close(NACLPenaltyLoss(softmax=True, to_onehot_y=True)(x, y), none.mean())
    w = torch.tensor([0.0, 1.0, 2.0])
    torch.testing.assert_close(NACLPenaltyLoss(softmax=True, to_onehot_y=True, weight=w)(x, y), (none * w).mean())
    nobg = NACLPenaltyLoss(softmax=True, to_onehot_y=True, include_background=False, reduction="none")(x, y)
    torch.testing.assert_close(nobg, none[:, 1:])
    # a one-hot target gives the same penalty as the label map
    onehot = F.one_hot(y, 3).movedim(-1, 1).float()
    torch.testing.assert_close(NACLPenaltyLoss(softmax=True, reduction="none")(x, onehot), none)


def test_nacl_penalty_is_zero_at_the_smoothed_target():
    _, y = _data((1, 3, 6, 6), seed=3)
    onehot = F.one_hot(y, 3).movedim(-1, 1).double()
    k = torch.full((3, 3), 1 / 9, dtype=torch.float64)
    tau = smooth_target(onehot, k)
    assert float(NACLPenaltyLoss(softmax=True)(tau, onehot)) == 0.0
    assert float(NACLPenaltyLoss(softmax=True)(tau + 0.5, onehot)) == pytest.approx(0.1 * 0.5)


# -- SVLS: the kernel and the loss by hand -------------------------------------------------------------------


def test_svls_kernel_2d_by_hand():
    """Gaussian on the 3x3 grid; the centre weight is replaced by the sum of its neighbours, then normalised."""
    for sigma in (1.0, 0.5, 2.0):
        edge, corner = math.exp(-1 / (2 * sigma**2)), math.exp(-2 / (2 * sigma**2))
        s = 4 * edge + 4 * corner  # the neighbours' sum, which becomes the centre weight
        expected = torch.tensor(
            [[corner, edge, corner], [edge, s, edge], [corner, edge, corner]], dtype=torch.float64
        ) / (2 * s)
        torch.testing.assert_close(svls_kernel(3, sigma, 2, dtype=torch.float64), expected)


def test_svls_kernel_3d_by_hand():
    sigma = 1.0
    face, edge, corner = math.exp(-0.5), math.exp(-1.0), math.exp(-1.5)
    s = 6 * face + 12 * edge + 8 * corner
    k = svls_kernel(3, sigma, 3, dtype=torch.float64)
    assert k.shape == (3, 3, 3)
    assert float(k[1, 1, 1]) == pytest.approx(0.5)
    assert float(k[0, 1, 1]) == pytest.approx(face / (2 * s))
    assert float(k[0, 0, 1]) == pytest.approx(edge / (2 * s))
    assert float(k[2, 2, 0]) == pytest.approx(corner / (2 * s))
    assert float(k.sum()) == pytest.approx(1.0)
    # a 5x5 kernel follows the same rule: the centre is half of the whole
    k5 = svls_kernel(5, 1.3, 2, dtype=torch.float64)
    assert float(k5[2, 2]) == pytest.approx(0.5) and float(k5.sum()) == pytest.approx(1.0)


def test_svls_loss_by_hand():
    """3x3 image, two classes, one foreground voxel in the middle; replicate padding at the border."""
    sigma = 1.0
    edge, corner = math.exp(-0.5), math.exp(-1.0)
    s = 4 * edge + 4 * corner
    fg = [[corner / (2 * s), edge / (2 * s), corner / (2 * s)], [edge / (2 * s), 0.5, edge / (2 * s)]]
    fg.append(fg[0])
    labels = torch.zeros(1, 1, 3, 3, dtype=torch.long)
    labels[0, 0, 1, 1] = 1
    t = [[0.3, -1.2, 2.0], [0.7, 1.5, -0.4], [0.0, 2.5, -2.0]]  # logit of class 1; class 0 has logit 0
    logits = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    logits[0, 1] = torch.tensor(t, dtype=torch.float64)
    total = 0.0
    for i in range(3):
        for j in range(3):
            log_p1 = t[i][j] - math.log(1 + math.exp(t[i][j]))
            log_p0 = -math.log(1 + math.exp(t[i][j]))
            total += -(fg[i][j] * log_p1 + (1 - fg[i][j]) * log_p0)
    value = SVLSLoss(softmax=True, to_onehot_y=True, sigma=sigma)(logits, labels)
    assert float(value) == pytest.approx(total / 9, rel=1e-12)


def test_svls_is_cross_entropy_on_uniform_maps_and_smooths_boundaries():
    x, _ = _data((2, 3, 6, 5, 4), seed=4)
    for cls in (0, 2):
        y = torch.full((2, 1, 6, 5, 4), cls)
        torch.testing.assert_close(
            SVLSLoss(softmax=True, to_onehot_y=True)(x, y), CrossEntropyLoss(softmax=True, to_onehot_y=True)(x, y)
        )
    # sigmoid: the binary cross-entropy against each channel's smoothed map
    g = torch.Generator().manual_seed(9)
    y = (torch.rand(2, 3, 6, 5, 4, generator=g) > 0.5).double()
    xs = x.double()
    ys = smooth_target(y, svls_kernel(3, 1.0, 3, dtype=torch.float64), padding="replicate")
    expected = F.binary_cross_entropy_with_logits(xs, ys)
    torch.testing.assert_close(SVLSLoss(sigmoid=True)(xs, y), expected)


# -- MbLS: by hand -------------------------------------------------------------------------------------------


def test_mbls_by_hand():
    # voxel 1: logits (0, 12, 25), distances (25, 13, 0) -> excess over m = 10: (15, 3, 0); voxel 2: all within
    x = torch.tensor([[0.0, 1.0], [12.0, 2.0], [25.0, 3.0]]).view(1, 3, 1, 2)
    y = torch.zeros(1, 1, 1, 2, dtype=torch.long)
    torch.testing.assert_close(logit_margin_terms(x, 10.0), torch.tensor([[7.5, 1.5, 0.0]]))
    loss = LogitMarginPenaltyLoss(softmax=True, to_onehot_y=True)
    assert float(loss(x, y)) == pytest.approx(0.1 * (7.5 + 1.5 + 0.0) / 3)
    assert float(LogitMarginPenaltyLoss(softmax=True, to_onehot_y=True, margin=0.0, lambda_=1.0)(x, y)) == (
        pytest.approx((25 + 13 + 0 + 2 + 1 + 0) / 6)
    )
    nobg = LogitMarginPenaltyLoss(softmax=True, to_onehot_y=True, include_background=False, reduction="none")
    torch.testing.assert_close(nobg(x, y), 0.1 * torch.tensor([[1.5, 0.0]]))
    # the whole MbLS objective: CE + λ · penalty
    whole = loss_from_string("ce+mbls", softmax=True, to_onehot_y=True)
    torch.testing.assert_close(whole(x, y), F.cross_entropy(x, y[:, 0]) + loss(x, y))


# -- label smoothing and FLSD-53 against their peers ---------------------------------------------------------


def test_label_smoothing_equals_torch_cross_entropy():
    x, y = _data((2, 4, 7, 6), seed=6)
    w = torch.tensor([0.5, 1.0, 2.0, 3.0])
    for eps in (0.05, 0.1, 0.3):
        for weight in (None, w):
            ours = LabelSmoothingCrossEntropyLoss(epsilon=eps, softmax=True, to_onehot_y=True, weight=weight)(x, y)
            torch.testing.assert_close(ours, F.cross_entropy(x, y, weight=weight, label_smoothing=eps))
    onehot = F.one_hot(y, 4).movedim(-1, 1).float()
    torch.testing.assert_close(
        LabelSmoothingCrossEntropyLoss(softmax=True)(x, onehot), F.cross_entropy(x, y, label_smoothing=0.1)
    )
    # sigmoid: each channel a two-class problem, target (1 - ε) y + ε / 2
    torch.testing.assert_close(
        LabelSmoothingCrossEntropyLoss(epsilon=0.2, sigmoid=True)(x, onehot),
        F.binary_cross_entropy_with_logits(x, onehot * 0.8 + 0.1),
    )


@pytest.mark.parametrize("shape", [(2, 3, 9, 8), (2, 4, 5, 4, 6)], ids=["2d", "3d"])
def test_flsd_equals_monai_focal_per_voxel(shape):
    """γ = 5 where p_true < 0.2, else 3: MONAI's FocalLoss at each γ, chosen per voxel."""
    x, y = _data(shape, seed=7)
    onehot = F.one_hot(y, shape[1]).movedim(-1, 1).float()
    f5 = MonaiFocalLoss(gamma=5.0, use_softmax=True, reduction="none")(x, onehot)
    f3 = MonaiFocalLoss(gamma=3.0, use_softmax=True, reduction="none")(x, onehot)
    p_true = (torch.softmax(x, 1) * onehot).sum(1, keepdim=True)
    assert 0.1 < float((p_true < 0.2).float().mean()) < 0.9  # both branches are exercised
    expected = torch.where(p_true < 0.2, f5, f3).mean()
    torch.testing.assert_close(SampleDependentFocalLoss(softmax=True, to_onehot_y=True)(x, y.unsqueeze(1)), expected)
    # sigmoid: per voxel and channel, p_true = p_t
    g5 = MonaiFocalLoss(gamma=5.0, reduction="none")(x, onehot)
    g3 = MonaiFocalLoss(gamma=3.0, reduction="none")(x, onehot)
    p = torch.sigmoid(x)
    pt = onehot * p + (1 - onehot) * (1 - p)
    torch.testing.assert_close(
        SampleDependentFocalLoss(sigmoid=True)(x, onehot), torch.where(pt < 0.2, g5, g3).mean()
    )


# -- gradients ------------------------------------------------------------------------------------------------

GRADCHECK = [
    ("nacl", {"softmax": True}),
    ("nacl(distance_type='l2', kernel_ops='gaussian')", {"softmax": True}),
    ("nacl", {"sigmoid": True}),
    ("mbls(margin=1.0)", {"softmax": True}),
    ("svls", {"softmax": True}),
    ("svls(sigma=0.7)", {"sigmoid": True}),
    ("ls", {"softmax": True}),
    ("ls", {"sigmoid": True}),
    ("flsd", {"softmax": True}),
    ("flsd", {"sigmoid": True}),
]


@pytest.mark.parametrize(("spec", "kw"), GRADCHECK, ids=[f"{s}-{next(iter(k))}" for s, k in GRADCHECK])
@pytest.mark.parametrize("spatial", [(4, 3), (3, 3, 2)], ids=["2d", "3d"])
def test_gradcheck_float64(spec, kw, spatial):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(2, 3, *spatial, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    if "sigmoid" in kw:
        y = (torch.rand(2, 3, *spatial, generator=g) > 0.5).double()
    else:
        kw = {**kw, "to_onehot_y": True}
        y = torch.randint(0, 3, (2, 1, *spatial), generator=g)
    loss = loss_from_string(spec, **kw)
    if spec.startswith("mbls"):  # some distances above the margin, none within 1e-3 of it (the kink)
        d = x.detach().amax(1, keepdim=True) - x.detach()
        assert bool((d > 1.0).any()) and bool(((d - 1.0).abs() > 1e-3).all())
    if spec.startswith("flsd"):  # p_true away from the threshold, where γ jumps
        assert float((x.detach().softmax(1) - 0.2).abs().min()) > 1e-4
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x,), eps=1e-6, atol=1e-5)


# -- AMP -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(8, 8), (6, 5, 4)], ids=["2d", "3d"])
def test_autocast_bfloat16_all_background_and_single_class(spatial):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, *spatial, generator=g, requires_grad=True)
    d = len(spatial)
    conv = (torch.nn.Conv2d if d == 2 else torch.nn.Conv3d)(3, 3, 1)
    targets = {
        "all background": torch.zeros(2, 1, *spatial, dtype=torch.long),
        "single class": torch.full((2, 1, *spatial), 2, dtype=torch.long),
    }
    for spec in [*NEW, "ce+nacl", "ce+mbls", "dice+svls"]:
        loss = loss_from_string(spec, softmax=True, to_onehot_y=True)
        for name, y in targets.items():
            for scale in (1.0, 1e3):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = conv(x * scale)
                    assert logits.dtype == torch.bfloat16
                    v = loss(logits, y)
                v.backward()
                assert v.dtype == torch.float32 and bool(torch.isfinite(v)), (spec, name, scale)
                assert all(bool(torch.isfinite(p.grad).all()) for p in conv.parameters()), (spec, name, scale)
                conv.zero_grad()


# -- loss strings and argument checks ------------------------------------------------------------------------


def test_loss_strings_parse():
    names = valid_loss_names()
    for n in [*NEW, "nacl_penalty", "logit_margin", "svls_ce", "label_smoothing", "flsd53", "flsd-53", "flsd_53"]:
        assert n in names
    kw = {"softmax": True, "to_onehot_y": True}
    assert isinstance(loss_from_string("nacl", **kw), NACLPenaltyLoss)
    assert isinstance(loss_from_string("MbLS", **kw), LogitMarginPenaltyLoss)
    assert isinstance(loss_from_string("flsd-53", **kw), SampleDependentFocalLoss)
    assert loss_from_string("ls(epsilon=0.05)", **kw).label_smoothing == 0.05
    svls = loss_from_string("svls(sigma=2, kernel_size=5)", **kw)
    assert isinstance(svls, SVLSLoss) and (svls.sigma, svls.kernel_size) == (2.0, 5)
    nacl = loss_from_string("nacl(kernel_ops=gaussian, sigma=0.5, distance_type='l2', alpha=1)", **kw)
    assert (nacl.kernel_ops, nacl.kernel_size, nacl.distance_type, nacl.alpha) == ("gaussian", 5, "l2", 1.0)
    mbls = loss_from_string("mbls(margin=6, lambda_=0.2)", **kw)
    assert (mbls.margin, mbls.lambda_) == (6.0, 0.2)
    comp = loss_from_string("ce:1,nacl:1,mbls:0.5,svls,ls,flsd", **kw)
    assert comp.names == ["ce", "nacl", "mbls", "svls", "ls", "flsd"]
    x, y = _data((1, 3, 5, 5), seed=8)
    comp(x, y.unsqueeze(1))
    assert set(comp.last_components) == set(comp.names)
    # the training entry point (segcal train's `loss:` key) builds them with softmax=True, to_onehot_y=True
    from segcal.training.trainer import build_loss

    train_loss = build_loss("dice+ce+nacl+mbls")
    assert train_loss.names == ["dice", "ce", "nacl", "mbls"] and torch.isfinite(train_loss(x, y.unsqueeze(1)))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nacl(kernel_ops='box')", "kernel_ops"),
        ("nacl(distance_type='l3')", "distance_type"),
        ("nacl(kernel_size=4)", "odd"),
        ("nacl(kernel_ops=gaussian, kernel_size=3)", "set by sigma"),
        ("nacl(sigma=0)", "sigma"),
        ("mbls(margin=-1)", "margin"),
        ("svls(kernel_size=2)", "odd"),
        ("svls(sigma=-1)", "sigma"),
        ("svls(label_smoothing=0.1)", "label_smoothing"),
        ("flsd(gamma=2)", "gamma_below"),
        ("flsd(threshold=1.5)", "threshold"),
        ("ls(label_smoothing=0.1)", "epsilon"),
        ("ls(epsilon=2)", "label_smoothing"),
        ("nacl(kernel_size=True)", "bool"),
    ],
)
def test_bad_arguments_raise_one_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        loss_from_string(spec, softmax=True, to_onehot_y=True)


def test_logit_penalties_refuse_probabilities():
    x, y = _data((1, 3, 4, 4), seed=1)
    p = x.softmax(1)
    for spec in ("nacl", "mbls"):
        with pytest.raises(ValueError, match="penalises logits"):
            loss_from_string(spec, to_onehot_y=True)(p, y)
    with pytest.raises(ValueError, match="softmax=True"):
        LogitMarginPenaltyLoss(sigmoid=True)(x, (x > 0).float())
    with pytest.raises(ValueError, match="NaN/Inf"):
        NACLPenaltyLoss(softmax=True, to_onehot_y=True)(x.index_fill(2, torch.tensor([0]), float("nan")), y)
    with pytest.raises(ValueError, match="labels must lie"):
        SVLSLoss(softmax=True, to_onehot_y=True)(x, y + 3)


@pytest.mark.parametrize("spec", ["svls", "ls", "flsd"])
def test_whole_losses_follow_the_shared_input_rules(spec):
    """Logits without an activation are refused with the shared message; probabilities and other_act work;
    multilabel batches with empty targets stay finite (the rules of every other segcal loss)."""
    x, y = _data((2, 3, 6, 5), seed=12)
    loss = loss_from_string(spec, to_onehot_y=True)
    with pytest.raises(ValueError, match=r"got values outside \[0, 1\]: pass softmax=True or sigmoid=True"):
        loss(x, y)
    assert torch.isfinite(loss(torch.softmax(x, 1), y))
    assert torch.isfinite(loss_from_string(spec, to_onehot_y=True, other_act=lambda t: torch.softmax(t, 1))(x, y))
    v, grad = _value_and_grad(loss_from_string(spec, sigmoid=True), x * 50, torch.zeros_like(x))
    assert bool(torch.isfinite(v)) and bool(torch.isfinite(grad).all())


def test_single_channel_to_onehot_warns_as_the_other_losses():
    x = torch.randn(1, 1, 4, 4)
    y = (torch.rand(1, 1, 4, 4) > 0.5).float()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        v = NACLPenaltyLoss(sigmoid=True, to_onehot_y=True)(x, y)
    assert torch.isfinite(v) and any("to_onehot_y=True" in str(r.message) for r in rec)


# -- the documented example ----------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "losses.md"
MARKER = "<!-- tested example -->"


def test_documented_example_runs():
    text = DOC.read_text()
    blocks = re.findall(re.escape(MARKER) + r"\s*\n```python\n(.*?)\n```", text, re.S)
    assert len(blocks) == text.count(MARKER) >= 1
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC}[example {i}]", "exec"), {"__name__": "__main__"})
