"""Monte-Carlo dropout added to an already trained network (PostHoc §2.2 "MC-Decoder" / "MC-Center",
Ensembles §VI-C; Gal & Ghahramani, ICML 2016; docs/references.md).

* :func:`insert_dropout` wraps named submodules as ``Sequential(MCDropout(p), module)``;
* :func:`insert_dropout_unet` picks the names for a MONAI :class:`~monai.networks.nets.UNet`: every decoder
  (up-path) block (``"decoder"``) or the bottom block and the deepest decoder block (``"center"``);
* :func:`retrain_after_dropout` optionally retrains the layers that run after the first inserted dropout;
* :func:`mc_predict` runs ``T`` stochastic passes (default 20, optionally each through MONAI
  ``sliding_window_inference``) and keeps running sums only: mean probability, predictive entropy
  ``H(E[p])`` and mutual information ``H(E[p]) − E[H(p)]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from segcal.functional.inputs import Mode, check_mode
from segcal.functional.uncertainty import entropy_map

__all__ = ["MCDropout", "insert_dropout", "insert_dropout_unet", "mc_predict", "retrain_after_dropout"]


class MCDropout(nn.Module):
    """Element-wise dropout that is active in training mode and while ``sampling`` is set (MC inference)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p must lie in [0, 1), got {p}")
        self.p = p
        self.sampling = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=self.training or self.sampling)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def insert_dropout(model: nn.Module, module_names: Sequence[str], p: float = 0.5) -> nn.Module:
    """Replace each named submodule ``m`` by ``Sequential(MCDropout(p), m)`` in place; returns ``model``.

    Dropout acts on the *input* of the named block. Raises ``ValueError`` for an unknown name.
    """
    modules = dict(model.named_modules())
    for name in module_names:
        if name not in modules or name == "":
            raise ValueError(f"module {name!r} not found in the model (see model.named_modules())")
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        block = modules[name]
        setattr(parent, child, nn.Sequential(MCDropout(p), block))
    return model


def _unet_levels(model: nn.Module) -> tuple[list[str], str]:
    """Names of MONAI UNet decoder blocks (top → bottom) and the bottom block."""
    from monai.networks.layers import SkipConnection

    if not hasattr(model, "model") or not isinstance(model.model, nn.Sequential):
        raise TypeError("insert_dropout_unet expects a monai.networks.nets.UNet (with a .model Sequential)")
    ups: list[str] = []
    prefix, seq = "model", model.model
    while True:
        if len(seq) != 3 or not isinstance(seq[1], SkipConnection):
            raise TypeError("unexpected UNet layout: expected Sequential(down, SkipConnection, up)")
        ups.append(f"{prefix}.2")
        sub = seq[1].submodule
        prefix = f"{prefix}.1.submodule"
        if isinstance(sub, nn.Sequential) and len(sub) == 3 and isinstance(sub[1], SkipConnection):
            seq = sub
            continue
        return ups, prefix


def insert_dropout_unet(
    model: nn.Module, position: Literal["decoder", "center"] = "decoder", p: float = 0.5
) -> list[str]:
    """Insert :class:`MCDropout` into a trained MONAI ``UNet`` in place; returns the wrapped module names.

    ``"decoder"`` (MC-Decoder): before every up-path block, i.e. on the concatenated skip + upsampled
    features.
    ``"center"`` (MC-Center): before the bottom block and the deepest up-path block.
    """
    ups, bottom = _unet_levels(model)
    if position == "decoder":
        names = ups
    elif position == "center":
        names = [bottom, ups[-1]]
    else:
        raise ValueError(f"position must be 'decoder' or 'center', got {position!r}")
    insert_dropout(model, names, p)
    return names


@contextmanager
def _sampling(model: nn.Module, on: bool = True):
    drops = [m for m in model.modules() if isinstance(m, MCDropout)]
    old = [d.sampling for d in drops]
    for d in drops:
        d.sampling = on
    try:
        yield drops
    finally:
        for d, o in zip(drops, old, strict=True):
            d.sampling = o


def _peek(loader: Any, epochs: int) -> tuple[Any, Callable[[], Iterable[Any]]]:
    """The first batch of ``loader`` (to trace the model) and a function giving one epoch's batches."""
    one_shot = not callable(loader) and iter(loader) is loader
    if epochs > 1 and one_shot:
        raise TypeError("epochs > 1 needs a re-iterable loader (a DataLoader, a list or a factory callable)")
    try:
        first = next(iter(loader() if callable(loader) else loader))
    except StopIteration:
        raise ValueError("retrain_after_dropout: the loader is empty") from None

    def batches() -> Iterable[Any]:
        if one_shot:  # the traced first batch was taken from the generator: put it back
            return itertools.chain([first], loader)
        return loader() if callable(loader) else loader

    return first, batches


def _modules_after_dropout(model: nn.Module, inputs: torch.Tensor) -> list[nn.Module]:
    """Leaf modules that run after the first :class:`MCDropout` in one eval-mode forward pass of ``inputs``."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: order.append(mod))
        for m in model.modules()
        if len(list(m.children())) == 0
    ]
    with torch.no_grad():
        model.eval()
        model(inputs)
    for h in hooks:
        h.remove()
    idx = next((k for k, m in enumerate(order) if isinstance(m, MCDropout)), None)
    if idx is None:
        raise ValueError("the model has no MCDropout: call insert_dropout / insert_dropout_unet first")
    return order[idx + 1 :]


def retrain_after_dropout(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int = 1,
    lr: float = 1e-4,
) -> list[float]:
    """Retrain only the layers that execute after the first inserted :class:`MCDropout` (forward order,
    found with hooks on one batch), dropout active, other weights frozen. ``loader`` yields
    ``(image, target, ...)``; returns the mean loss per epoch."""
    first, batches = _peek(loader, epochs)
    trainable = {id(m): m for m in _modules_after_dropout(model, first[0])}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for prm in model.parameters():
        prm.requires_grad_(False)
    params = [prm for m in trainable.values() for prm in m.parameters(recurse=False)]
    for prm in params:
        prm.requires_grad_(True)
    if not params:
        raise ValueError("no trainable parameters after the inserted dropout")
    opt = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    with _sampling(model):
        for _ in range(epochs):
            total, n = 0.0, 0
            for batch in batches():
                opt.zero_grad()
                loss = loss_fn(model(batch[0]), batch[1])
                loss.backward()
                opt.step()
                total += float(loss)
                n += 1
            losses.append(total / max(n, 1))
    for n_, prm in model.named_parameters():
        prm.requires_grad_(saved[n_])
    model.eval()
    return losses


def mc_predict(
    model: nn.Module,
    inputs: torch.Tensor,
    n_samples: int = 20,
    mode: Mode = "exclusive",
    roi_size: Sequence[int] | None = None,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """``T`` stochastic forward passes with the inserted dropout active (everything else in eval mode).

    Args:
        inputs: network input ``(B, C_in, *spatial)``.
        n_samples: ``T`` (default 20).
        mode: ``"exclusive"`` (softmax) or ``"multilabel"`` (sigmoid).
        roi_size: if given, each pass is a MONAI ``sliding_window_inference`` with this window.

    Returns:
        ``{"mean": (B, C, *S), "entropy": H(E[p]), "mutual_information": H(E[p]) − E[H(p)],
        "expected_entropy": E[H(p)]}``;
        entropies are ``(B, 1, *S)`` (exclusive) or ``(B, C, *S)`` (multilabel).
        Only running sums are kept (memory of two outputs, not ``T``).
    """
    mode = check_mode(mode)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        if roi_size is None:
            return model(x)
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(x, roi_size, sw_batch_size, model, overlap=overlap)  # type: ignore[return-value]

    sum_p: torch.Tensor | None = None
    sum_h: torch.Tensor | None = None
    with torch.no_grad(), _sampling(model):
        for _ in range(n_samples):
            z = forward(inputs).float()
            p = torch.softmax(z, 1) if mode == "exclusive" else torch.sigmoid(z)
            h = entropy_map(p, mode)
            sum_p = p if sum_p is None else sum_p.add_(p)
            sum_h = h if sum_h is None else sum_h.add_(h)
    model.train(was_training)
    assert sum_p is not None and sum_h is not None
    mean = sum_p / n_samples
    exp_h = sum_h / n_samples
    ent = entropy_map(mean, mode)
    return {
        "mean": mean,
        "entropy": ent,
        "mutual_information": (ent - exp_h).clamp_min(0),
        "expected_entropy": exp_h,
    }
