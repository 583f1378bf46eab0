"""Synthetic 2D/3D segmentation phantoms with a *known* posterior (docs/data.md).

Each phantom is a smooth probability map built from blurred shapes (ellipses / ellipsoids, small blobs,
classes of very different size) plus a smooth random field that makes some interiors ambiguous. Labels are
**sampled** from that map with a seeded :class:`torch.Generator`, so ``Phantom.probs`` is exactly the
Bayes-optimal predictor of ``Phantom.labels``: a perfectly calibrated model. :func:`temper` turns it into an
over-confident (``T < 1``) or under-confident (``T > 1``) predictor, which lets tests check that metrics,
losses and calibrators detect or remove miscalibration.

Construction (``D`` = 2 or 3 spatial dims, coordinates in voxels):

* shape ``j`` of class ``c`` has centre ``m``, semi-axes ``r`` and membership logit
  ``z_j(x) = r̄ (1 − ‖(x − m) / r‖) / blur`` (≈ signed distance to the boundary over ``blur``);
* a class's logit is the smooth union ``z_c = logsumexp_j z_j`` plus ``ambiguity · g_c(x)`` where ``g_c`` is a
  random low-frequency cosine field with unit RMS;
* **exclusive** mode: classes are painted in order, later (smaller) classes on top, i.e. stick-breaking
  ``p_c = σ(z_c) Π_{c' > c} σ(−z_{c'})`` and background ``p_0 = Π_{c ≥ 1} σ(−z_c)``; the channels sum to one
  and are computed in log space, so ``Phantom.logits`` (log-probabilities) is exact and finite;
* **multilabel** mode: nested regions like BraTS WT ⊃ TC ⊃ ET: ``p_0 = σ(z_0)`` and
  ``p_c = p_{c−1} σ(z_c)``; one uniform draw ``u`` per voxel gives ``y_c = [u < p_c]``, so the labels are
  nested and each channel's marginal is exactly ``p_c``.

Annotator noise (``label_noise = ε``): exclusive labels are replaced by a uniformly random class with
probability ε; multilabel channels are flipped independently with probability ε (this may break nesting).
``Phantom.probs`` is then the posterior of the *observed* (noisy) labels, ``(1 − ε) p + ε / C`` or
``(1 − ε) p + ε (1 − p)``, and ``Phantom.clean_probs`` the noise-free map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

PhantomMode = Literal["exclusive", "multilabel"]

__all__ = ["Phantom", "make_phantom", "temper"]


@dataclass(frozen=True, eq=False)
class Phantom:
    """A batch of phantoms with a known posterior.

    Attributes:
        probs: ``(B, C, *S)`` float32, Bayes-optimal probabilities of ``labels`` (channels summing
            to one in exclusive mode, independent nested channels in multilabel mode).
        labels: exclusive: ``(B, *S)`` int64 class indices; multilabel: ``(B, C, *S)`` int64 multi-hot.
        logits: ``(B, C, *S)`` float32; exclusive: log-probabilities (``softmax(logits) == probs``);
            multilabel: sigmoid logits (``sigmoid(logits) == probs``).
        clean_probs: ``(B, C, *S)`` the map before annotator noise (``probs`` when ``label_noise=0``).
        image: ``(B, 1, *S)`` float32 input intensities for training smoke tests, ``Σ_c μ_c p_c + N(0, 0.1²)``
            with ``μ_c = c / (C − 1)`` (exclusive) or ``1 / C`` per nested region (multilabel). The posterior
            of the labels *given this image* is not exactly ``probs``; use ``probs`` as the reference.
        mode: ``"exclusive"`` or ``"multilabel"``.
        label_noise: annotator-noise rate ε used to draw the labels.
        seed: the seed the phantom was drawn with.
    """

    probs: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    clean_probs: torch.Tensor
    image: torch.Tensor
    mode: PhantomMode
    label_noise: float
    seed: int

    @property
    def num_classes(self) -> int:
        return int(self.probs.shape[1])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.probs.shape[2:])

    @property
    def activation(self) -> Literal["softmax", "sigmoid"]:
        """Activation that maps ``logits`` to ``probs``."""
        return "softmax" if self.mode == "exclusive" else "sigmoid"

    def onehot(self) -> torch.Tensor:
        """Labels as a one-hot / multi-hot float32 map ``(B, C, *S)``."""
        if self.mode == "multilabel":
            return self.labels.to(torch.float32)
        return F.one_hot(self.labels, self.num_classes).movedim(-1, 1).to(torch.float32)

    def to(self, device: torch.device | str) -> Phantom:
        return Phantom(
            self.probs.to(device),
            self.labels.to(device),
            self.logits.to(device),
            self.clean_probs.to(device),
            self.image.to(device),
            self.mode,
            self.label_noise,
            self.seed,
        )


def _check_args(
    shape: Sequence[int], num_classes: int, batch: int, blur: float, mode: str, noise: float
) -> None:
    if mode not in ("exclusive", "multilabel"):
        raise ValueError(f"mode must be 'exclusive' or 'multilabel', got {mode!r}")
    if len(shape) not in (2, 3) or any(int(s) < 4 for s in shape):
        raise ValueError(f"shape must have 2 or 3 spatial sizes, each >= 4, got {tuple(shape)}")
    min_c = 2 if mode == "exclusive" else 1
    if num_classes < min_c:
        raise ValueError(f"num_classes must be >= {min_c} in {mode} mode, got {num_classes}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not blur > 0:
        raise ValueError(f"blur must be > 0 (boundary width in voxels), got {blur}")
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {noise}")


def _rand(gen: torch.Generator, *size: int) -> torch.Tensor:
    return torch.rand(size, generator=gen, dtype=torch.float32, device="cpu")


def _shape_logits(
    grid: torch.Tensor,
    centres: torch.Tensor,
    radii: torch.Tensor,
    blur: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Smooth union of ellipsoids.

    grid ``(D, *S)``; centres, radii ``(B, K, J, D)``; valid ``(K, J)`` bool (unused shapes are dropped)
    → logits ``(B, K, *S)`` (K groups of J shapes each).
    """
    d = grid.shape[0]
    sq = None
    for ax in range(d):  # separable: Σ_d ((x_d − m_d) / r_d)², broadcasting 1D axes (no D× grid copy)
        line = grid[(ax, *[slice(None) if a == ax else 0 for a in range(d)])]
        shp = [1] * d
        shp[ax] = -1
        term = (
            (line.view(*shp) - centres[..., ax].view(*centres.shape[:3], *([1] * d)))
            / radii[..., ax].view(*radii.shape[:3], *([1] * d))
        ).square()
        sq = term if sq is None else sq + term
    dist = sq.sqrt()  # (B, K, J, *S) normalised distance, 1 on the boundary
    rbar = radii.mean(-1).view(*radii.shape[:3], *([1] * d))
    z = rbar * (1.0 - dist) / blur
    if valid is not None:
        z = z.masked_fill(~valid.view(1, *valid.shape, *([1] * d)), -torch.inf)
    return torch.logsumexp(z, dim=2)


def _smooth_field(
    gen: torch.Generator, grid: torch.Tensor, b: int, k: int, shape: Sequence[int]
) -> torch.Tensor:
    """Random low-frequency cosine field with unit RMS, ``(B, K, *S)``."""
    d = len(shape)
    n_modes = 4
    freq = torch.randint(0, 3, (b, k, n_modes, d), generator=gen, device="cpu").to(torch.float32)
    freq[..., 0] += 1.0  # no constant mode
    phase = _rand(gen, b, k, n_modes) * (2 * math.pi)
    amp = torch.randn((b, k, n_modes), generator=gen, device="cpu")
    amp = amp / amp.square().sum(-1, keepdim=True).div(2).sqrt().clamp_min(1e-6)  # Σa²/2 = 1 → unit RMS
    size = torch.tensor([float(s) for s in shape])
    # angle = 2π Σ_d f_d x_d / S_d + φ
    angle = torch.einsum("bkmd,d...->bkm...", freq * (2 * math.pi) / size, grid)
    angle = angle + phase.view(b, k, n_modes, *([1] * d))
    return (amp.view(b, k, n_modes, *([1] * d)) * torch.cos(angle)).sum(2)


@torch.no_grad()
def make_phantom(
    shape: Sequence[int] = (64, 64),
    num_classes: int = 3,
    batch: int = 2,
    seed: int = 0,
    *,
    blur: float = 2.0,
    ambiguity: float = 1.0,
    mode: PhantomMode = "exclusive",
    shapes_per_class: int = 2,
    small_structures: int = 3,
    label_noise: float = 0.0,
    device: torch.device | str = "cpu",
) -> Phantom:
    """Draw a batch of phantoms whose Bayes-optimal probabilities are known exactly.

    Args:
        shape: spatial size ``S`` (2 or 3 dims), e.g. ``(64, 64)`` or ``(64, 64, 32)``.
        num_classes: ``C``; exclusive mode counts the background (channel 0), multilabel mode counts nested
            regions (e.g. 3 for WT, TC, ET).
        batch: ``B`` independent phantoms.
        seed: seeds a CPU :class:`torch.Generator`; the same seed gives the same phantom on every device.
        blur: boundary width in voxels (logit slope ``1 / blur`` across the boundary); larger = softer maps.
        ambiguity: RMS (in logits) of a smooth random field added to every class; 0 gives pure shapes.
        mode: ``"exclusive"`` (one label per voxel) or ``"multilabel"`` (nested regions).
        shapes_per_class: ellipses/ellipsoids per foreground class (exclusive mode). Classes get smaller with
            the class index (class imbalance).
        small_structures: extra small blobs (radius 1.5-3 voxels) added to the last class (exclusive mode).
        label_noise: annotator-noise rate ε (see module docstring); ``probs`` accounts for it.
        device: where the returned tensors live (the draw itself is on CPU for reproducibility).

    Returns:
        :class:`Phantom` with ``probs``/``logits``/``clean_probs`` ``(B, C, *S)`` float32 and ``labels``
        ``(B, *S)`` int64 (exclusive) or ``(B, C, *S)`` int64 (multilabel).

    Example:
        >>> ph = make_phantom((32, 32), num_classes=3, batch=1, seed=1)
        >>> ph.probs.shape, ph.labels.shape
        (torch.Size([1, 3, 32, 32]), torch.Size([1, 32, 32]))
    """
    _check_args(shape, num_classes, batch, blur, mode, label_noise)
    g = _Grid.of(shape)
    gen = torch.Generator().manual_seed(int(seed))
    # the draws happen in this order (shapes and field, labels, image), so a seed keeps giving the same phantom
    if mode == "exclusive":
        clean, log_clean = _exclusive_maps(
            gen, g, batch, num_classes, blur, ambiguity, shapes_per_class, small_structures
        )
        probs, labels, logits = _exclusive_labels(gen, g, clean, log_clean, label_noise)
    else:
        clean, log_clean = _nested_maps(gen, g, batch, num_classes, blur, ambiguity)
        probs, labels, logits = _nested_labels(gen, g, clean, log_clean, label_noise)
    image = _image(gen, g, clean, mode)
    return Phantom(
        probs.contiguous().to(device),
        labels.contiguous().to(device),
        logits.contiguous().to(device),
        clean.contiguous().to(device),
        image.contiguous().to(device),
        mode,  # type: ignore[arg-type]
        float(label_noise),
        int(seed),
    )


@dataclass(frozen=True)
class _Grid:
    """The voxel grid of a phantom: ``shape`` ``S``, coordinates ``(D, *S)``, sizes and the smallest size."""

    shape: tuple[int, ...]
    coords: torch.Tensor
    size: torch.Tensor
    smin: float

    @classmethod
    def of(cls, shape: Sequence[int]) -> _Grid:
        shape = tuple(int(s) for s in shape)
        axes = [torch.arange(s, dtype=torch.float32) for s in shape]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (D, *S)
        return cls(shape, coords, torch.tensor(shape, dtype=torch.float32), float(min(shape)))

    @property
    def d(self) -> int:
        return len(self.shape)


def _exclusive_maps(
    gen: torch.Generator,
    g: _Grid,
    batch: int,
    num_classes: int,
    blur: float,
    ambiguity: float,
    shapes_per_class: int,
    small_structures: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean probabilities and their logs ``(B, C, *S)`` of exclusive classes (ellipses stacked by class)."""
    d, size = g.d, g.size
    k = num_classes - 1
    j = shapes_per_class + small_structures
    # class size shrinks with the class index: class imbalance
    scale = torch.linspace(0.22, 0.10, k) if k > 1 else torch.tensor([0.2])
    radii = (0.6 + 0.8 * _rand(gen, batch, k, j, d)) * scale.view(1, k, 1, 1) * g.smin
    centres = (0.2 + 0.6 * _rand(gen, batch, k, j, d)) * size
    valid = torch.ones(k, j, dtype=torch.bool)
    if small_structures > 0:
        valid[:-1, shapes_per_class:] = False  # only the last class gets small blobs
        radii[:, -1, shapes_per_class:] = 1.5 + 1.5 * _rand(gen, batch, small_structures, d)
        centres[:, -1, shapes_per_class:] = (0.1 + 0.8 * _rand(gen, batch, small_structures, d)) * size
    z = _shape_logits(g.coords, centres, radii, blur, valid)
    if ambiguity > 0:
        z = z + ambiguity * _smooth_field(gen, g.coords, batch, k, g.shape)
    # stick-breaking, later classes on top: log p_c = logσ(z_c) + Σ_{c'>c} logσ(−z_c')
    ls_pos, ls_neg = F.logsigmoid(z), F.logsigmoid(-z)
    above = torch.flip(torch.cumsum(torch.flip(ls_neg, [1]), 1), [1]) - ls_neg  # Σ_{c'>c}
    log_bg = ls_neg.sum(1, keepdim=True)
    logp = torch.cat([log_bg, ls_pos + above], dim=1)
    return logp.exp(), logp


def _nested_maps(
    gen: torch.Generator, g: _Grid, batch: int, num_classes: int, blur: float, ambiguity: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean probabilities and their logs ``(B, C, *S)`` of nested regions (multilabel)."""
    d, size = g.d, g.size
    k = num_classes
    # nested chain: region c sits inside region c-1 (WT ⊃ TC ⊃ ET)
    centre0 = (0.35 + 0.3 * _rand(gen, batch, 1, d)) * size
    frac = (
        torch.linspace(0.3, 0.3 * 0.55 ** (k - 1), k).view(1, k, 1) if k > 1 else torch.tensor([[[0.3]]])
    )
    radii = (0.8 + 0.4 * _rand(gen, batch, k, d)) * frac * g.smin
    offsets = (_rand(gen, batch, k, d) - 0.5) * 0.5 * radii
    offsets[:, 0] = 0.0
    centres = centre0 + torch.cumsum(offsets, 1)
    z = _shape_logits(g.coords, centres.unsqueeze(2), radii.unsqueeze(2), blur)
    if ambiguity > 0:
        z = z + ambiguity * _smooth_field(gen, g.coords, batch, k, g.shape)
    log_p = torch.cumsum(F.logsigmoid(z), 1)  # log p_c = Σ_{c' ≤ c} log σ(z_c')
    return log_p.exp(), log_p


def _exclusive_labels(
    gen: torch.Generator, g: _Grid, clean: torch.Tensor, logp: torch.Tensor, label_noise: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs, labels, logits)``: one categorical label per voxel, annotator noise folded into ``probs``."""
    batch, num_classes = clean.shape[:2]
    probs = (1 - label_noise) * clean + label_noise / num_classes if label_noise > 0 else clean
    u = _rand(gen, batch, *g.shape).unsqueeze(1)
    cdf = torch.cumsum(probs, 1)
    labels = (u > cdf[:, :-1]).sum(1, dtype=torch.int64)  # inverse-CDF categorical draw
    logits = probs.clamp_min(1e-30).log() if label_noise > 0 else logp
    return probs, labels, logits


def _nested_labels(
    gen: torch.Generator, g: _Grid, clean: torch.Tensor, log_p: torch.Tensor, label_noise: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs, labels, logits)``: nested multi-hot labels, each flipped with probability ``label_noise``."""
    batch, k = clean.shape[:2]
    u = _rand(gen, batch, *g.shape).unsqueeze(1)
    labels = (u < clean).to(torch.int64)  # shared u → nested labels, marginal P(y_c = 1) = p_c
    if label_noise > 0:
        flip = _rand(gen, batch, k, *g.shape) < label_noise
        labels = torch.where(flip, 1 - labels, labels)
        probs = (1 - label_noise) * clean + label_noise * (1 - clean)
        logits = torch.logit(probs.double(), eps=1e-12).float()
    else:
        probs = clean
        # exact sigmoid logits of the product p_c: log p − log(1 − p), stable via log1p(−p)
        logits = log_p - torch.log1p(-log_p.exp().clamp_max(1 - 1e-7))
    return probs, labels, logits


def _image(gen: torch.Generator, g: _Grid, clean: torch.Tensor, mode: PhantomMode) -> torch.Tensor:
    """The input image ``(B, 1, *S)``, drawn after the labels so that adding it changed no label."""
    num_classes = clean.shape[1]
    if mode == "exclusive":
        mu = torch.arange(num_classes, dtype=torch.float32) / (num_classes - 1)
    else:
        mu = torch.full((num_classes,), 1.0 / num_classes)
    image = (clean * mu.view(1, -1, *([1] * g.d))).sum(1, keepdim=True)
    return image + 0.1 * torch.randn(image.shape, generator=gen, device="cpu")


def temper(
    x: torch.Tensor,
    temperature: float,
    *,
    mode: PhantomMode = "exclusive",
    logits: bool = False,
) -> torch.Tensor:
    """Temperature-scale a prediction and return probabilities ``(B, C, *S)``.

    ``T < 1`` sharpens (over-confident), ``T > 1`` softens (under-confident); ``T = 1`` returns the same
    probabilities. Exclusive: ``softmax(log p / T)``; multilabel: ``σ(logit(p) / T)`` per channel.

    Args:
        x: probabilities (``logits=False``) or logits (exclusive: log-probabilities or any softmax logits;
            multilabel: sigmoid logits) ``(B, C, *S)``.
        temperature: ``T > 0``.
        mode: ``"exclusive"`` or ``"multilabel"``.
        logits: whether ``x`` holds logits.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mode not in ("exclusive", "multilabel"):
        raise ValueError(f"mode must be 'exclusive' or 'multilabel', got {mode!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor (B, C, *spatial)")
    if mode == "exclusive":
        z = x if logits else x.clamp_min(1e-30).log()
        return torch.softmax(z / temperature, dim=1)
    z = x if logits else torch.logit(x, eps=1e-7)
    return torch.sigmoid(z / temperature)
