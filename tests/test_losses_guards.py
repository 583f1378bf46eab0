"""Loss input guards (NaN/Inf, logits without an activation) and loss-spec guards (weights, argument types),
each one clear ``ValueError`` naming the loss or the term (docs/losses.md)."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import LOSS_NAMES
from segcal.losses import (
    LOSS_REGISTRY,
    AsymmetricUnifiedFocalLoss,
    CompositeLoss,
    DiceLoss,
    HardL1ACELoss,
    NACLPenaltyLoss,
    SVLSLoss,
    loss_from_string,
)
from segcal.losses.base import SegmentationLoss

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


# what turns a tensor into a host value: on CUDA each is a device-to-host transfer that synchronises
_HOST_READS = ("tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts every tensor-to-host read made from Python (the ones a loss could make on purpose), with the
    hard / soft ACE sums on the torch path that CUDA runs (not the CPU-only numba kernels)."""
    import segcal.functional.binning as binning

    calls: list[str] = []
    monkeypatch.setattr(binning, "_numba_rows", lambda p: False)
    for name in _HOST_READS:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):  # type: ignore[no-untyped-def]
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


COMPOSITES = ["dice+hard_ace", "0.5*ce+dice+soft_ace", "dscpp+focal+ece"]


@pytest.mark.parametrize("spec", LOSS_NAMES + COMPOSITES)
@pytest.mark.parametrize("labels", [True, False], ids=["label_map", "one_hot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_value_checks_cost_one_host_read_and_none_without_validate_args(
    spec: str, labels: bool, dtype: torch.dtype, host_reads: list[str]
) -> None:
    """On a GPU a host read stops the CPU from queueing work ahead: a loss call reads the device once (the
    input's and the labels' min / max together) with ``validate_args=True`` and never with ``False``, in the
    forward and the backward pass. A composite loss reads once for all its terms (half inputs too, whose
    float32 copy the terms share)."""
    x, y = _data()
    x = x.to(dtype)
    target = y if labels else torch.nn.functional.one_hot(y[:, 0], 3).movedim(-1, 1).float()
    for validate in (True, False):
        loss = loss_from_string(spec, softmax=True, to_onehot_y=labels, validate_args=validate)
        xr = x.clone().requires_grad_(True)
        host_reads.clear()
        value = loss(xr, target)
        value.backward()
        assert host_reads == (["tolist"] if validate else []), spec
        assert xr.grad is not None and not torch.isnan(xr.grad).any()
        if isinstance(loss, CompositeLoss):
            assert all(m._shared is None for m in loss.losses)  # nothing kept after the call


@pytest.mark.parametrize("spec", COMPOSITES)
def test_composite_terms_share_reads_but_apply_their_own_rules(spec: str) -> None:
    """The shared ranges do not loosen any check: a label out of range, a NaN and (for a term without an
    activation) logits are each still refused by name, and a composite equals the weighted sum of its terms."""
    x, y = _data()
    loss = loss_from_string(spec, softmax=True, to_onehot_y=True)
    want = sum(w * m(x, y) for w, m in zip(loss.weights, loss.losses, strict=True))
    torch.testing.assert_close(loss(x, y), want)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        loss(x, y + 1)
    xn = x.clone()
    xn[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        loss(xn, y)
    mixed = CompositeLoss([(1.0, DiceLoss(softmax=True, to_onehot_y=True)), (1.0, DiceLoss(to_onehot_y=True))])
    with pytest.raises(ValueError, match="DiceLoss: input spans"):
        mixed(x, y)  # the second term has no activation: it still refuses logits
    assert torch.isfinite(mixed(torch.softmax(x, 1), y))


def test_shared_ranges_are_keyed_by_the_values_and_skip_inference_tensors() -> None:
    """A range is reused only for the same values: an in-place change (version counter), another view or dtype
    gets another key; inference-mode tensors have no version counter, so nothing is shared and every term reads
    (the composite still computes under ``torch.inference_mode``)."""
    x, y = _data()
    key = SegmentationLoss._tensor_key
    k0 = key(x)
    assert key(x) == k0 and key(x.detach()) == k0
    x.add_(0.0)
    assert key(x) != k0
    assert key(x[1:]) != key(x) and key(x.double()) != key(x)
    loss = loss_from_string("dice+hard_ace", softmax=True, to_onehot_y=True)
    want = loss(x, y)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        assert key(xi) is None
        torch.testing.assert_close(loss(xi, yi), want)


class _HostTransfers(TorchDispatchMode):
    """Records every op that moves data between the host and the ``meta`` device, or reads a value back."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        ins = {a.device.type for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)}
        outs = {o.device.type for o in (out if isinstance(out, tuple | list) else [out]) if isinstance(o, torch.Tensor)}
        if "_local_scalar_dense" in str(func) or (ins | outs) >= {"cpu", "meta"}:
            self.seen.append(str(func))
        return out


@pytest.mark.parametrize("spec", sorted(LOSS_REGISTRY) + COMPOSITES)
@pytest.mark.parametrize("labels", [True, False], ids=["label_map", "one_hot"])
def test_no_host_transfer_with_validate_args_off(spec: str, labels: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU a host-to-device copy of pageable memory waits for the queued work like a read does. Every loss
    runs here on ``meta`` tensors (the device-independent torch path): after a first call (constants are then
    cached on the device) neither the forward nor the backward pass copies host data to the device, builds a
    tensor from Python data there, or reads a value back."""
    made: list[str] = []
    for name in ("tensor", "as_tensor"):
        orig = getattr(torch, name)

        def watched(data, *a, _orig=orig, _name=name, **k):  # type: ignore[no-untyped-def]
            out = _orig(data, *a, **k)
            if out.device.type == "meta" and not isinstance(data, torch.Tensor):
                made.append(_name)
            return out

        monkeypatch.setattr(torch, name, watched)
    x, y = (t.to("meta") for t in _data())
    target = y if labels else torch.nn.functional.one_hot(y[:, 0], 3).movedim(-1, 1).float().to("meta")
    loss = loss_from_string(spec, softmax=True, to_onehot_y=labels, validate_args=False).to("meta")
    loss(x.clone().requires_grad_(True), target)
    made.clear()
    with _HostTransfers() as mode:
        loss(x.clone().requires_grad_(True), target).backward()
    assert mode.seen == [] and made == [], spec


@pytest.mark.parametrize("spec", ["dice", "ce", "hard_ace", "dice+soft_ace"])
def test_the_one_read_checks_labels_and_values_together(spec: str) -> None:
    """The merged check still names each problem: labels out of range, NaN input, logits without an activation."""
    x, y = _data()
    loss = loss_from_string(spec, softmax=True, to_onehot_y=True)
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\] for 3 channels, found \[0, 3\]"):
        loss(x, torch.where(y == 2, 3, y))
    with pytest.raises(ValueError, match=r"found \[-1, 2\]"):
        loss(x, torch.where(y == 1, -1, y))
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="input contains 1 NaN/Inf values"):
        loss(x, y)
    unchecked = loss_from_string(spec, softmax=True, to_onehot_y=True, validate_args=False)
    assert torch.isfinite(unchecked(x.nan_to_num(), y))


@pytest.mark.parametrize("spec", LOSS_NAMES)
@pytest.mark.parametrize("to_onehot_y", [True, False])
def test_every_loss_names_a_wrong_input_type_first(spec: str, to_onehot_y: bool) -> None:
    """A non-tensor or integer input is one clear ``TypeError``, whatever path the target would take."""
    _, y = _data()
    target = y if to_onehot_y else torch.nn.functional.one_hot(y[:, 0], 3).movedim(-1, 1).float()
    loss = loss_from_string(spec, softmax=True, to_onehot_y=to_onehot_y)
    with pytest.raises(TypeError, match=r"input must be a torch\.Tensor, got list"):
        loss([[0.5]], target)
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        loss(torch.zeros(2, 3, 6, 5, dtype=torch.long), target)


@pytest.mark.parametrize(
    ("make", "attr", "value"),
    [
        (lambda: AsymmetricUnifiedFocalLoss(softmax=True, to_onehot_y=True, rare_classes=[1]), "rare_classes", [2]),
        (lambda: NACLPenaltyLoss(softmax=True, to_onehot_y=True, sigma=1.0, kernel_ops="gaussian"), "sigma", 2.0),
        (lambda: SVLSLoss(softmax=True, to_onehot_y=True, sigma=1.0), "sigma", 2.0),
    ],
    ids=["unified_focal rare_classes", "nacl sigma", "svls sigma"],
)
def test_constants_cached_on_the_device_follow_their_parameters(make, attr: str, value: object) -> None:  # type: ignore[no-untyped-def]
    """The class masks and filter kernels kept per device are keyed by the parameters they are made from: a loss
    whose parameter is changed after a first call computes what a loss built with that value computes."""
    x, y = _data()
    loss = make()
    first = loss(x, y)
    setattr(loss, attr, value)
    fresh = make()
    setattr(fresh, attr, value)
    fresh_value = fresh(x, y)
    assert not torch.equal(first, fresh_value)  # the parameter matters for this input
    torch.testing.assert_close(loss(x, y), fresh_value, rtol=0, atol=0)
