"""Shared MONAI-style argument handling for every segcal loss module.

A loss gets ``input`` ``(B, C, *spatial)`` (logits with ``softmax=True`` / ``sigmoid=True``, otherwise
probabilities, or what ``other_act`` maps to probabilities) and ``target``: a label map ``(B, 1, *spatial)`` /
``(B, *spatial)`` with ``to_onehot_y=True``, else a one-hot / multi-hot / soft map ``(B, C, *spatial)``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from segcal.functional.inputs import as_tensor

Reduction = Literal["none", "mean", "sum"]

__all__ = ["Reduction", "SegmentationLoss"]


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Autocast disabled on ``device`` (the filters of NACL / SVLS run in the compute dtype), or nothing to do
    on a device type without autocast (``meta``, used by the tests that look for host transfers)."""
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cuda", "cpu"))
    if not available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


class SegmentationLoss(nn.Module):
    """Base class: activation, one-hot encoding, background removal, class weights and reduction.

    Args:
        include_background: keep channel 0 (exclusive mode). Default True (losses keep it; metrics drop it by default).
        to_onehot_y: the target is a label map; one-hot encode it to ``C`` channels.
        sigmoid: apply a sigmoid to ``input`` (multilabel: independent, possibly overlapping channels).
        softmax: apply a softmax over channels to ``input`` (exclusive classes).
        other_act: any other callable mapping ``input`` to probabilities (e.g. ``torch.exp`` for log-probs).
        weight: class weights, a scalar or one value per kept class (after ``include_background``); multiplies
            the per-class term before the reduction, as in MONAI.
        reduction: ``"mean"`` (over images and classes), ``"sum"`` or ``"none"`` (the ``(B, C)`` terms).
        mode: ``"exclusive"`` or ``"multilabel"`` if no activation says which (default: ``"multilabel"`` with
            ``sigmoid=True``, else ``"exclusive"``).
        validate_args: check the values on every call (finite input, probabilities in [0, 1] without an
            activation, labels in ``[0, C - 1]``), as torchmetrics' argument of the same name. The checks cost one
            device-to-host transfer per call (on CUDA a synchronisation that stops the host from queueing the
            next kernels); ``False`` skips them once a pipeline is known to be sound. Type and shape checks
            always run (they need no transfer).
    """

    def __init__(
        self,
        *,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable[[torch.Tensor], torch.Tensor] | None = None,
        weight: Sequence[float] | float | torch.Tensor | None = None,
        reduction: Reduction | str = "mean",
        mode: Literal["exclusive", "multilabel"] | None = None,
        validate_args: bool = True,
    ) -> None:
        super().__init__()
        if sigmoid and softmax:
            raise ValueError("sigmoid=True and softmax=True are mutually exclusive")
        if other_act is not None and (sigmoid or softmax):
            raise ValueError("other_act cannot be combined with sigmoid=True or softmax=True")
        if other_act is not None and not callable(other_act):
            raise TypeError(f"other_act must be callable, got {type(other_act).__name__}")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        if mode is None:
            mode = "multilabel" if sigmoid else "exclusive"
        if mode not in ("exclusive", "multilabel"):
            raise ValueError(f"mode must be 'exclusive' or 'multilabel', got {mode!r}")
        if softmax and mode == "multilabel":
            raise ValueError("softmax=True implies mode='exclusive'")
        self.include_background = bool(include_background)
        self.to_onehot_y = bool(to_onehot_y)
        self.sigmoid = bool(sigmoid)
        self.softmax = bool(softmax)
        self.other_act = other_act
        self.reduction = reduction
        self.mode = mode
        self.validate_args = bool(validate_args)
        if weight is not None:
            w = as_tensor(weight, "cpu").to(torch.float32)
            if w.ndim > 1:
                raise ValueError(f"weight must be a scalar or a 1-D sequence, got shape {tuple(w.shape)}")
            if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
                raise ValueError("weight values must be finite and >= 0")
            self.register_buffer("class_weight", w, persistent=False)
        else:
            self.class_weight = None

    # -- helpers ---------------------------------------------------------------------------------------------
    @property
    def activation(self) -> Literal["softmax", "sigmoid"] | None:
        return "softmax" if self.softmax else ("sigmoid" if self.sigmoid else None)

    @staticmethod
    def _check_input(input: torch.Tensor) -> None:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if not input.is_floating_point():
            raise TypeError(
                f"input must be a floating-point tensor (logits or probabilities), got {input.dtype}"
            )
        if input.ndim not in (4, 5):
            raise ValueError(
                f"input must be (B, C, *spatial) with 2 or 3 spatial dims, got {tuple(input.shape)}"
            )

    #: set by :class:`~segcal.losses.composite.CompositeLoss` for the length of one call and shared by its terms:
    #: the value ranges read from the device and the label maps made, so that the terms read the device once
    _shared: dict[tuple[object, ...], object] | None = None

    @staticmethod
    def _tensor_key(t: torch.Tensor) -> tuple[object, ...] | None:
        """Identity of ``t``'s values: storage, version counter (bumped by every in-place change), layout and
        dtype; ``None`` for tensors without a version counter (inference mode): those are not shared."""
        try:
            version = t._version
        except RuntimeError:
            return None
        return (t.data_ptr(), version, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)

    def _value_ranges(self, tensors: list[torch.Tensor]) -> list[tuple[float, float]]:
        """``(min, max)`` of each tensor, all read in one device-to-host transfer; within a composite loss's call
        a range already read (same values: :meth:`_tensor_key`) is reused."""
        shared = self._shared
        keys = [self._tensor_key(t) if shared is not None else None for t in tensors]
        missing = [i for i, k in enumerate(keys) if k is None or k not in shared]  # type: ignore[operator]
        ranges: dict[int, tuple[float, float]] = {}
        if missing:
            dt = torch.float32 if tensors[0].device.type == "mps" else torch.float64  # MPS has no float64
            parts = [v.to(dt) for i in missing for v in torch.aminmax(tensors[i])]
            values = torch.stack(parts).tolist()  # the one transfer
            for j, i in enumerate(missing):
                ranges[i] = (values[2 * j], values[2 * j + 1])
                if keys[i] is not None:
                    shared[keys[i]] = ranges[i]  # type: ignore[index]
        return [ranges[i] if i in ranges else shared[k] for i, k in enumerate(keys)]  # type: ignore[index]

    def _check_values(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Rule: ``x`` is finite, and lies in [0, 1] unless an activation (``softmax``, ``sigmoid``,
        ``other_act``) maps it to probabilities; integer ``labels`` ``(B, *spatial)`` (if given) lie in
        ``[0, C - 1]``. One min/max reduction per tensor (NaN and ±Inf propagate into it), no copy, and one
        device-to-host transfer for both (none for ranges a composite loss's earlier term already read);
        ``ValueError`` naming the loss otherwise. Skipped with ``validate_args=False``."""
        if not self.validate_args:
            return
        tensors = [t for t in (x.detach(), labels) if t is not None and t.numel()]
        if not tensors:
            return
        ranges = self._value_ranges(tensors)
        name = type(self).__name__
        if x.numel():
            lo, hi = ranges[0]
            if not (math.isfinite(lo) and math.isfinite(hi)):
                n = int((~torch.isfinite(x.detach())).sum())
                raise ValueError(f"{name}: input contains {n} NaN/Inf values")
            if self.activation is None and self.other_act is None and (lo < 0 or hi > 1):
                raise ValueError(
                    f"{name}: input spans [{lo:.4g}, {hi:.4g}]; without an activation it must hold probabilities "
                    "and got values outside [0, 1]: pass softmax=True or sigmoid=True for logits"
                )
        if labels is not None and labels.numel():
            c = x.shape[1]
            llo, lhi = (int(v) for v in ranges[-1])
            if llo < 0 or lhi >= c:
                raise ValueError(f"target labels must lie in [0, {c - 1}] for {c} channels, found [{llo}, {lhi}]")

    def _device_constant(
        self, key: tuple[object, ...], device: torch.device, make: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """A small constant tensor (a filter kernel, a class mask) built on the host by ``make``, kept per ``key``
        (which names every parameter ``make`` reads, so a changed attribute makes a new one) and device: it is
        copied to ``device`` at the first call only. On a GPU a host-to-device copy of pageable
        memory first waits for the work already queued, so a copy at every call would stall training."""
        cache: dict[tuple[object, ...], torch.Tensor] = self.__dict__.setdefault("_constants", {})
        k = (*key, str(device))
        if k not in cache:
            cache[k] = make().to(device)
        return cache[k]

    def _as_compute(self, input: torch.Tensor) -> torch.Tensor:
        """The input in the compute dtype: half inputs (AMP) in float32 (made once per composite loss call, so
        its terms share the copy and its value range), float64 kept (gradcheck)."""
        if input.dtype not in (torch.float16, torch.bfloat16):
            return input
        return self._per_call(("float",), input, input.float)

    def _per_call(
        self, tag: tuple[object, ...], source: torch.Tensor, make: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """``make()``, a tensor derived from ``source``; within a composite loss's call made once per ``tag`` and
        values of ``source`` (:meth:`_tensor_key`) and shared by the terms, otherwise made at every call."""
        key = self._tensor_key(source) if self._shared is not None else None
        if key is None:
            return make()
        k = (*tag, key)
        if k not in self._shared:  # type: ignore[operator]
            self._shared[k] = make()  # type: ignore[index]
        return self._shared[k]  # type: ignore[index,return-value]

    def _onehot(self, target: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """Target as ``(B, C, *spatial)`` in ``input``'s dtype (before background removal), after the checks of
        its shape and of the values of ``input`` and of a label map (:meth:`_check_values`)."""
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
        b, c = input.shape[:2]
        if target.shape[0] != b:
            raise ValueError(f"target has batch size {target.shape[0]} but input has {b}")
        if self.to_onehot_y and c == 1:
            warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3)
        elif self.to_onehot_y:
            lab = self._labels(target, input)  # checked before the scatter, which an out-of-range label would break
            onehot = torch.zeros_like(input)
            return onehot.scatter_(1, lab.unsqueeze(1), 1.0)
        if target.ndim == input.ndim - 1 and c == 1:
            target = target.unsqueeze(1)
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}; "
                "pass to_onehot_y=True for a label map"
            )
        self._check_values(input)
        return target.to(input.dtype)

    def _labels(self, target: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """Integer label map ``(B, *spatial)`` from a ``(B, 1, *spatial)`` / ``(B, *spatial)`` target, its range and
        the values of ``input`` checked in one transfer (:meth:`_check_values`)."""
        b, _, *spatial = input.shape
        if tuple(target.shape) not in ((b, *spatial), (b, 1, *spatial)):
            raise ValueError(
                f"to_onehot_y=True needs a label map {(b, 1, *spatial)} or {(b, *spatial)}, "
                f"got target shape {tuple(target.shape)}"
            )

        def make() -> torch.Tensor:
            lab = target[:, 0] if target.ndim == input.ndim else target
            return (lab.round() if lab.is_floating_point() else lab).long()

        # made once per composite loss call: the same tensor, so its range is read once too
        lab = self._per_call(("labels", input.ndim), target, make)
        self._check_values(input, lab)
        return lab

    def _select(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.include_background:
            return xs
        if xs[0].shape[1] == 1:
            warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
            return xs
        return tuple(x[:, 1:] for x in xs)

    def prepare(self, input: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs, onehot)``, both ``(B, C', *spatial)`` after activation and channel selection; the input is
        checked first (type, shape, target, then values: :meth:`_check_values`)."""
        self._check_input(input)
        x = self._as_compute(input)
        y = self._onehot(target, x)  # also checks the values of x (and of a label map)
        p, y = self._select(self._activate(x), y)
        return p, y

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(B, C, *spatial)`` from the checked input: the activation, or ``x`` itself."""
        if self.sigmoid:
            return torch.sigmoid(x)
        if self.softmax:
            if x.shape[1] == 1:
                warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=4)
                return x
            return torch.softmax(x, 1)
        if self.other_act is not None:
            return self.other_act(x)
        return x

    def reduce(self, f: torch.Tensor) -> torch.Tensor:
        """Apply class weights to ``(B, C)`` terms and the reduction."""
        if self.class_weight is not None:
            w = self.class_weight.to(device=f.device, dtype=f.dtype)
            if w.ndim == 1 and w.numel() != f.shape[1]:
                raise ValueError(
                    f"weight has {w.numel()} values but the loss has {f.shape[1]} classes; with "
                    "include_background=False the weights must not include class 0"
                )
            f = f * w
        if self.reduction == "mean":
            return f.mean()
        if self.reduction == "sum":
            return f.sum()
        return f

    def extra_repr(self) -> str:
        return (
            f"include_background={self.include_background}, to_onehot_y={self.to_onehot_y}, "
            f"activation={self.activation}, reduction={self.reduction!r}"
        )
