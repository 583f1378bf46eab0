"""Input conventions shared by every metric, loss and calibrator: shapes, class modes, validation.

Shapes
------
* predictions: ``(B, C, *spatial)`` with 2 or 3 spatial dims, probabilities or logits;
* targets: an integer label map ``(B, *spatial)`` or ``(B, 1, *spatial)``, or a one-hot / multi-hot / soft
  map ``(B, C, *spatial)``.

Class modes
-----------
* ``"exclusive"``: one label per voxel, channels are softmax probabilities that sum to one;
* ``"multilabel"``: independent sigmoid channels that may overlap (e.g. BraTS ET ⊂ TC ⊂ WT).

Every check raises one :class:`ValueError` or :class:`TypeError` whose message names the argument and the
problem; callers that know a file name (the I/O layer) prefix it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

Mode = Literal["exclusive", "multilabel"]
Activation = Literal["softmax", "sigmoid"] | None

#: absolute tolerance on "probabilities lie in [0, 1]" and "softmax channels sum to one".
PROB_ATOL = 1e-3

__all__ = [
    "PROB_ATOL",
    "Activation",
    "Mode",
    "as_label_map",
    "check_label_range",
    "check_mode",
    "check_prediction",
    "check_probabilities",
    "check_target",
    "region_probabilities",
    "region_targets",
    "select_channels",
    "target_to_onehot",
    "to_probabilities",
]


def as_tensor(x: object, device: torch.device | str | None = None) -> torch.Tensor:
    """``x`` as a tensor, on ``device`` when given. A tensor stays where it is (``torch.as_tensor`` would move it
    to the default device of ``torch.set_default_device``); arrays, lists and numbers are read on the host."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), device="cpu")
    return t if device is None else t.to(device)


def check_mode(mode: str) -> Mode:
    if mode not in ("exclusive", "multilabel"):
        raise ValueError(f"mode must be 'exclusive' or 'multilabel', got {mode!r}")
    return mode  # type: ignore[return-value]


def check_prediction(
    pred: torch.Tensor, name: str = "prediction", finite: bool = True
) -> tuple[float, float] | None:
    """Shape, dtype and (with ``finite``) finiteness of a ``(B, C, *spatial)`` prediction tensor.

    Returns its ``(min, max)`` when ``finite`` (one fused pass), else ``None`` (a caller that validates values
    itself, like the fused numba kernel, skips the pass).
    """
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(pred).__name__}")
    if not pred.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (probabilities or logits), got {pred.dtype}")
    if pred.ndim not in (4, 5):
        raise ValueError(
            f"{name} must have shape (B, C, *spatial) with 2 or 3 spatial dims, got shape {tuple(pred.shape)}"
        )
    if pred.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(pred.shape)})")
    if not finite:
        return None
    # one fused min/max pass: NaN propagates into it and Inf shows as an infinite bound
    lo_t, hi_t = torch.aminmax(pred.detach())
    lo, hi = float(lo_t), float(hi_t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        n_nan = int(torch.isnan(pred).sum())
        n_inf = int(torch.isinf(pred).sum())
        raise ValueError(f"{name} contains {n_nan + n_inf} NaN/Inf values ({n_nan} NaN, {n_inf} Inf)")
    return lo, hi


def check_probabilities(
    probs: torch.Tensor,
    mode: Mode,
    name: str = "prediction",
    atol: float = PROB_ATOL,
    value_range: tuple[float, float] | None = None,
) -> None:
    """Range (and, in exclusive mode, sum-to-one) check of a probability tensor ``(B, C, *spatial)``."""
    lo, hi = value_range if value_range is not None else check_prediction(probs, name)
    if lo < -atol or hi > 1 + atol:
        raise ValueError(
            f"{name} must hold probabilities in [0, 1] but spans [{lo:.4g}, {hi:.4g}]; "
            "pass activation='softmax' or 'sigmoid' if these are logits"
        )
    if mode == "exclusive" and probs.shape[1] > 1:
        s_lo, s_hi = torch.aminmax(probs.detach().sum(dim=1, dtype=torch.float32))
        err = max(abs(float(s_lo) - 1), abs(float(s_hi) - 1))
        if err > atol * max(1, probs.shape[1]):
            raise ValueError(
                f"{name}: exclusive mode needs class probabilities that sum to 1 over the channel axis, "
                f"max deviation is {err:.4g}; use mode='multilabel' for independent sigmoid channels"
            )


def to_probabilities(
    pred: torch.Tensor,
    activation: Activation = None,
    mode: Mode = "exclusive",
    *,
    check: bool = True,
    name: str = "prediction",
) -> torch.Tensor:
    """Return probabilities ``(B, C, *spatial)`` from probabilities or logits.

    ``activation="softmax"`` applies a softmax over the channel axis, ``"sigmoid"`` an element-wise sigmoid,
    ``None`` takes ``pred`` as probabilities (validated when ``check``). Values are clamped into [0, 1] only after
    validation.
    """
    mode = check_mode(mode)
    if activation not in (None, "softmax", "sigmoid"):
        raise ValueError(f"activation must be None, 'softmax' or 'sigmoid', got {activation!r}")
    value_range = check_prediction(pred, name) if check else None
    if activation == "softmax":
        if mode == "multilabel":
            raise ValueError(
                "activation='softmax' implies mode='exclusive'; use 'sigmoid' for multilabel outputs"
            )
        return torch.softmax(pred, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(pred)
    if check:
        check_probabilities(pred, mode, name, value_range=value_range)
        lo, hi = value_range  # type: ignore[misc]
        if lo >= 0.0 and hi <= 1.0:
            return pred  # already in range: no copy
    return pred.clamp(0.0, 1.0)


def as_label_map(
    target: torch.Tensor, spatial_shape: Sequence[int], name: str = "target"
) -> torch.Tensor | None:
    """Return ``target`` as an integer label map ``(B, *spatial)`` if it is one, else ``None``.

    Accepted label maps: integer tensors ``(B, *spatial)`` or ``(B, 1, *spatial)``, and floating tensors of shape
    ``(B, 1, *spatial)`` holding integral values (MONAI's usual layout).
    """
    spatial = tuple(spatial_shape)
    if target.ndim == len(spatial) + 1 and tuple(target.shape[1:]) == spatial:
        lab = target
    elif target.ndim == len(spatial) + 2 and target.shape[1] == 1 and tuple(target.shape[2:]) == spatial:
        lab = target[:, 0]
    else:
        return None
    if lab.dtype == torch.bool:
        return lab.to(torch.uint8)
    if lab.is_floating_point():
        if not bool(torch.isfinite(lab).all()):
            raise ValueError(f"{name} contains NaN/Inf values")
        if not bool((lab == lab.round()).all()):
            if target.ndim == len(spatial) + 2:
                return None  # a single soft/one-hot channel, not a label map
            raise ValueError(f"{name}: a label map must hold integer class indices")
        return lab.to(torch.int64)
    return lab


def check_label_range(labels: torch.Tensor, num_classes: int, name: str = "target") -> None:
    """Raise unless every label of the label map ``labels`` lies in ``[0, num_classes - 1]``."""
    lo, hi = (int(v) for v in torch.aminmax(labels))  # one pass, one host read
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes - 1}] for {num_classes} classes, found values in [{lo}, {hi}]"
        )


def check_target(
    target: torch.Tensor, pred_shape: Sequence[int], mode: Mode, name: str = "target", *, label_range: bool = True
) -> None:
    """Validate a target against a prediction shape ``(B, C, *spatial)``.

    ``label_range=False`` leaves out the range check of a label map in exclusive mode
    (:func:`check_label_range`, one pass over the labels), for a caller that makes it in a pass of its own.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    b, c, *spatial = pred_shape
    if target.shape[0] != b:
        raise ValueError(f"{name} has batch size {target.shape[0]} but the prediction has {b}")
    lab = as_label_map(target, spatial, name)
    if lab is not None and not (target.ndim == len(spatial) + 2 and c == 1 and mode == "multilabel"):
        if lab.numel() == 0:
            raise ValueError(f"{name} is empty")
        if label_range or mode != "exclusive":
            check_label_range(lab, c, name)
        if mode == "multilabel" and c > 1:
            raise ValueError(
                f"{name}: a label map cannot describe overlapping multilabel channels; "
                "pass a multi-hot target (B, C, *spatial) or build region channels with `regions=`"
            )
        return
    if tuple(target.shape) != tuple(pred_shape):
        raise ValueError(
            f"{name} shape {tuple(target.shape)} does not match prediction shape {tuple(pred_shape)}; expected a "
            f"label map {(b, *spatial)} or {(b, 1, *spatial)}, or a one-hot/multi-hot map {tuple(pred_shape)}"
        )
    if target.dtype == torch.bool:
        return
    t = target if target.is_floating_point() else target.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN/Inf values")
    lo, hi = float(t.min()), float(t.max())
    if lo < 0 or hi > 1 + 1e-6:
        raise ValueError(
            f"{name}: one-hot, multi-hot or soft targets must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]"
        )


def target_to_onehot(
    target: torch.Tensor,
    num_classes: int,
    dtype: torch.dtype = torch.float32,
    spatial_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Label map ``(B, *spatial)`` / ``(B, 1, *spatial)`` or one-hot ``(B, C, *spatial)`` → ``(B, C, *spatial)``.

    The target is assumed validated (:func:`check_target`). Non-label targets are only cast. Pass the
    prediction's ``spatial_shape`` whenever it is known: without it a 2D label map ``(B, H, W)`` with
    ``H == num_classes`` (or ``H == 1``) cannot be told apart from a one-hot map and is misread.
    """
    if spatial_shape is not None:
        lab = as_label_map(target, spatial_shape)
        if lab is None or (num_classes == 1 and target.ndim == len(spatial_shape) + 2):
            return target.to(dtype)
    else:
        # a (B, C, *spatial) target with C == num_classes > 1 is already one-hot
        if target.ndim >= 3 and target.shape[1] == num_classes and num_classes > 1:
            return target.to(dtype)
        spatial = target.shape[2:] if (target.ndim >= 3 and target.shape[1] == 1) else target.shape[1:]
        lab = as_label_map(target, spatial)
    if lab is None:
        return target.to(dtype)
    if num_classes == 1:
        return lab.unsqueeze(1).to(dtype)
    onehot = torch.zeros((lab.shape[0], num_classes, *lab.shape[1:]), dtype=dtype, device=lab.device)
    onehot.scatter_(1, lab.long().unsqueeze(1), 1)
    return onehot


def select_channels(x: torch.Tensor, include_background: bool, mode: Mode) -> torch.Tensor:
    """Drop channel 0 of ``(B, C, ...)`` when ``include_background`` is False in exclusive mode."""
    if include_background or mode != "exclusive":
        return x
    if x.shape[1] < 2:
        raise ValueError("include_background=False needs at least 2 channels")
    return x[:, 1:]


def region_probabilities(probs: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Region channels from a softmax output by summing class probabilities.

    ``regions`` lists, per output channel, the classes it is the union of; BraTS is
    ``[[3], [1, 3], [1, 2, 3]]`` → (ET, TC, WT). Output ``(B, len(regions), *spatial)``, multilabel.
    """
    c = probs.shape[1]
    _check_regions(regions, c)
    members = torch.zeros(len(regions), c, dtype=probs.dtype, device=probs.device)
    for r, cls in enumerate(regions):
        members[r, list(cls)] = 1
    out = torch.einsum("rc,bc...->br...", members, probs)
    return out.clamp_(0.0, 1.0)


def region_targets(
    target: torch.Tensor,
    regions: Sequence[Sequence[int]],
    num_classes: int,
    spatial_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Multi-hot region targets ``(B, R, *spatial)`` (float32) from a label map or one-hot target."""
    _check_regions(regions, num_classes)
    onehot = target_to_onehot(target, num_classes, spatial_shape=spatial_shape)
    members = torch.zeros(len(regions), num_classes, dtype=onehot.dtype, device=onehot.device)
    for r, cls in enumerate(regions):
        members[r, list(cls)] = 1
    return torch.einsum("rc,bc...->br...", members, onehot).clamp_(0.0, 1.0)


def _check_regions(regions: Sequence[Sequence[int]], num_classes: int) -> None:
    if len(regions) == 0:
        raise ValueError("regions must list at least one region")
    for cls in regions:
        if len(cls) == 0:
            raise ValueError("every region must contain at least one class")
        for k in cls:
            if not 0 <= int(k) < num_classes:
                raise ValueError(f"region class {k} is outside [0, {num_classes - 1}]")
