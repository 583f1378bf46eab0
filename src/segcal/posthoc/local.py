"""Local temperature scaling: a small convolutional network predicts one positive temperature per voxel.

Ding et al., ICCV 2021 (docs/references.md, [Ding2021-ICCV]), local temperature scaling (LTS): instead of one
temperature for the whole dataset, a temperature map ``T(x) > 0`` is predicted from the logits around ``x``
(optionally also the image) and the calibrated probabilities are

    ``q(x) = softmax(z(x) / T(x))``,   ``T(x) = softplus(f_θ(z, image)(x)) + T_min``

(multilabel mode: ``q_c(x) = sigmoid(z_c(x) / T(x))``, one temperature per voxel shared by the channels). A
single positive scalar divides every class logit of a voxel, so the argmax (multilabel: the sign of every
channel, ``q_c ≥ 0.5``) is unchanged by construction.

``f_θ`` is ``depth`` unpadded ("valid") ``k×k`` (2D) / ``k×k×k`` (3D) convolutions with ``hidden`` channels and
leaky ReLUs, then a ``1×1`` convolution to one channel. Its receptive field reaches ``halo = depth · (k // 2)``
voxels on each side; the input is zero outside the volume (the logits are centred per voxel in exclusive mode,
``z − mean_c z``, which leaves ``softmax`` unchanged and makes ``T`` independent of a constant added to every
class). Because the network never pads internally, ``T(x)`` depends only on the input values inside the
``halo`` around ``x``: a patch cut with its halo, a chunk of the volume cut with its halo and the whole volume
give the same ``T(x)``.

Fitting (``fit``) minimises the NLL (exclusive: cross-entropy of ``softmax(z / T)``; multilabel: mean binary
cross-entropy) with Adam on **patches**:

1. one pass over the volumes draws ``max_patches`` candidate patches per volume (``patch_size`` per axis, centred
   on a uniformly drawn voxel inside the mask, moved inside the volume where it fits; each volume of a batch
   counts as one volume) and keeps a seeded uniform reservoir sample (Vitter 1985, algorithm R;
   docs/references.md) of ``max_patches`` of all candidates, cut with their halo. Every volume weighs the same,
   whatever its size. Memory is the reservoir plus one volume, whatever the number of volumes; a one-shot
   generator works;
2. a seeded ``holdout`` share of the patches (default 1/8) is held out; the global temperature of the other
   patches' voxels (:class:`~segcal.posthoc.TemperatureScaling` on a seeded subsample of at most 2¹⁷ of them)
   starts the map: ``f_θ``'s last layer starts at weight 0 and the bias giving ``T(x) = T_global``, so training
   only learns the spatial deviation from global temperature scaling;
3. ``epochs`` passes over the training patches in shuffled minibatches of ``batch_size`` patches; the weights
   kept are those of the epoch with the lowest held-out NLL, the start (global temperature scaling, epoch 0)
   included, so fitting the label noise of the patches cannot drift the map away from global TS unnoticed.

Everything random (patch draws, reservoir, weights, shuffles) comes from ``seed``: a fit is deterministic.

``transform`` computes ``T`` chunk by chunk along the last axis (each chunk cut with its halo, at most about
``chunk_voxels`` voxels per chunk): memory is bounded by the chunk, and the result equals the whole-volume one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcal.functional.inputs import as_tensor, check_mode, check_prediction
from segcal.posthoc._base import Calibrator, TargetTally, iter_volumes, module_on, validate_volume
from segcal.posthoc.conv import voxel_loss
from segcal.posthoc.scaling import TemperatureScaling

__all__ = ["LocalTemperatureScaling", "TemperatureNet"]

#: voxels per chunk of the mask scan that picks patch centres (bounded memory on large volumes)
_SCAN_CHUNK = 1 << 22
#: voxels of the reservoir that the starting global temperature is fitted on (a seeded random subsample)
_INIT_VOXELS = 1 << 17
#: default ``patch_size`` per spatial dimensionality
_DEFAULT_PATCH = {2: 48, 3: 16}


class TemperatureNet(nn.Module):
    """``f_θ`` of local temperature scaling: inputs ``(B, C_in, *S)`` → temperatures ``(B, 1, *(S − 2·halo))``.

    ``depth`` valid ``k×k(×k)`` convolutions (``hidden`` channels, leaky ReLU), then a ``1×1(×1)`` convolution;
    ``T = softplus(·) + floor``. The last layer starts at weight 0 and the bias of ``T = init_temperature``.
    """

    def __init__(
        self,
        in_channels: int,
        spatial_dims: int,
        kernel_size: int,
        hidden: int,
        depth: int,
        floor: float,
        init_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(depth):
            layers += [conv(c, hidden, kernel_size), nn.LeakyReLU(0.1)]
            c = hidden
        self.features = nn.Sequential(*layers)
        self.head = conv(c, 1, 1)
        self.floor = float(floor)
        self.halo = depth * (kernel_size // 2)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.fill_(_inverse_softplus(max(init_temperature - self.floor, 1e-3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.head(self.features(x))) + self.floor


def _inverse_softplus(v: float) -> float:
    """``softplus⁻¹(v) = log(exp(v) − 1)`` for ``v > 0``, written to stay finite for large ``v``."""
    return v + math.log(-math.expm1(-v))


def _window(x: torch.Tensor, starts: list[int], sizes: list[int]) -> torch.Tensor:
    """The box ``[start, start + size)`` of the last ``len(starts)`` axes of ``x``, zero outside ``x``."""
    nd = len(starts)
    out = x.new_zeros(*x.shape[: x.ndim - nd], *sizes)
    src, dst = [], []
    for st, sz, n in zip(starts, sizes, x.shape[x.ndim - nd :], strict=True):
        a, b = max(st, 0), min(st + sz, n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - st, b - st))
    out[(..., *dst)] = x[(..., *src)]
    return out


def _nth_valid(valid: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Flat indices of the ``ranks``-th ``True`` voxels of ``valid`` (any shape), scanning it in chunks."""
    flat = valid.reshape(-1)
    order = torch.argsort(ranks)
    out = torch.empty_like(ranks)
    sorted_ranks = ranks[order]
    offset, pos, k = 0, 0, 0
    while k < sorted_ranks.numel():
        chunk = flat[pos : pos + _SCAN_CHUNK]
        count = int(chunk.sum())
        hi = int(torch.searchsorted(sorted_ranks, offset + count))
        if hi > k:
            where = torch.nonzero(chunk).reshape(-1)
            out[order[k:hi]] = where[sorted_ranks[k:hi] - offset] + pos
            k = hi
        offset += count
        pos += _SCAN_CHUNK
    return out


class _Reservoir:
    """A uniform sample of at most ``size`` candidate patches over a stream (Vitter 1985, algorithm R), seeded."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size = size
        self.gen = generator
        self.seen = 0
        self.items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []

    def slots(self, n: int) -> list[int]:
        """Offer ``n`` candidates (independent draws); the slots that receive one (a slot hit twice keeps the
        later candidate, which is as random as the earlier one: the caller cuts one patch per slot)."""
        t = torch.arange(self.seen, self.seen + n, dtype=torch.float64, device="cpu")
        draw = torch.rand(n, generator=self.gen, dtype=torch.float64, device="cpu")
        draw = torch.floor(draw * (t + 1)).long().tolist()
        kept = {i if i < self.size else j for i, j in zip(range(self.seen, self.seen + n), draw, strict=True)}
        self.seen += n
        slots = sorted(j for j in kept if j < self.size)
        self.items.extend([None] * max((slots[-1] + 1 if slots else 0) - len(self.items), 0))
        return slots


class LocalTemperatureScaling(Calibrator):
    """Local temperature scaling (Ding et al., ICCV 2021): ``q(x) = softmax(z(x) / T(x))`` with
    ``T(x) = softplus(f_θ(z[, image])(x)) + floor`` from a small valid-convolution network (see the module
    docstring for the network, the patch training and the chunked inference).

    Shapes: logits ``(B, C, *spatial)`` with 2 or 3 spatial dims; targets as for every calibrator; images
    ``(B, image_channels, *spatial)``. Multilabel mode: ``sigmoid(z_c / T(x))`` per channel.

    Args:
        mode: ``"exclusive"`` (softmax, CE) or ``"multilabel"`` (sigmoid, BCE).
        kernel_size: odd ``k`` of the network's convolutions (default 3).
        depth: number of ``k×k(×k)`` convolutions (receptive-field halo ``depth · (k // 2)``).
        hidden: channels of the hidden layers.
        image_channels: channels of the image given as extra input (0: logits only; then ``fit`` and
            ``transform`` take ``images=``).
        patch_size: edge of the cubic / square training patches (default 48 in 2D, 16 in 3D).
        max_patches: patches in the training reservoir (and candidates drawn per volume).
        batch_size: patches per Adam step.
        epochs: passes over the reservoir.
        lr: Adam learning rate.
        floor: the smallest temperature ``T_min > 0``.
        holdout: share of the patches held out to pick the epoch (0: keep the last epoch).
        chunk_voxels: voxels per chunk of ``transform`` (memory bound of inference).
        seed: seed of the patch draws, the initial weights and the shuffles.

    Learned attributes: ``net_`` (:class:`TemperatureNet`), ``spatial_dims_``, ``num_classes_``,
    ``initial_temperature_`` (the global temperature of the sampled patches); not saved: ``n_patches_`` (patches
    sampled), ``losses_`` (mean training loss per epoch), ``held_out_losses_`` (held-out loss at the start and
    after each epoch), ``best_epoch_`` (the epoch kept; 0 = global temperature scaling).

    Example:
        >>> lts = LocalTemperatureScaling(epochs=10).fit(val_logits, val_labels)   # (B, C, H, W), (B, H, W)
        >>> probs = lts.transform(test_logits)
        >>> t_map = lts.temperature_map(test_logits)                                # (B, 1, H, W)
    """

    method = "lts"
    fitted_what = "temperature map"

    def __init__(
        self,
        mode: str = "exclusive",
        kernel_size: int = 3,
        depth: int = 2,
        hidden: int = 8,
        image_channels: int = 0,
        patch_size: int | None = None,
        max_patches: int = 256,
        batch_size: int = 16,
        epochs: int = 20,
        lr: float = 1e-2,
        floor: float = 0.05,
        holdout: float = 0.125,
        chunk_voxels: int = 1 << 20,
        seed: int = 0,
    ) -> None:
        super().__init__(mode=mode)  # type: ignore[arg-type]
        self.kernel_size = kernel_size
        self.depth = depth
        self.hidden = hidden
        self.image_channels = image_channels
        self.patch_size = patch_size
        self.max_patches = max_patches
        self.batch_size = batch_size
        self.epochs = epochs
        self.lr = lr
        self.floor = floor
        self.holdout = holdout
        self.chunk_voxels = chunk_voxels
        self.seed = seed

    # ----------------------------------------------------------------------------------------- options
    def _check_options(self) -> None:
        k = self.kernel_size
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {k!r}")
        positive = {
            "depth": self.depth,
            "hidden": self.hidden,
            "max_patches": self.max_patches,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "chunk_voxels": self.chunk_voxels,
        }
        if self.patch_size is not None:
            positive["patch_size"] = self.patch_size
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.image_channels, int) or self.image_channels < 0:
            raise ValueError(f"image_channels must be a non-negative integer, got {self.image_channels!r}")
        for name, value in (("lr", self.lr), ("floor", self.floor)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not (isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1):
            raise ValueError(f"holdout must be a share in [0, 1), got {self.holdout!r}")

    def _make_net(self, num_classes: int, spatial_dims: int, init_temperature: float = 1.0) -> TemperatureNet:
        with torch.device("cpu"):  # made on the host, whatever torch's default device
            return TemperatureNet(
                num_classes + self.image_channels,
                spatial_dims,
                self.kernel_size,
                self.hidden,
                self.depth,
                self.floor,
                init_temperature,
            )

    # ----------------------------------------------------------------------------------------- inputs
    def _inputs(self, logits: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """Network input ``(…, C + image_channels, *S)``: the logits (centred per voxel in exclusive mode) and
        the image."""
        axis = -self.spatial_dims_ - 1
        x = logits - logits.mean(axis, keepdim=True) if self.mode == "exclusive" else logits
        return x if image is None else torch.cat([x, image.to(x.device, x.dtype)], axis)

    def _check_image(self, image: Any, logits: torch.Tensor, where: str) -> torch.Tensor | None:
        """The image of ``logits`` ``(B, C, *S)`` as ``(B, image_channels, *S)`` float32, or ``None``."""
        if self.image_channels == 0:
            if image is not None:
                raise ValueError(f"{where}images were given but image_channels=0; pass image_channels=N to use them")
            return None
        if image is None:
            raise ValueError(f"{where}image_channels={self.image_channels} needs images (pass images=...)")
        image = as_tensor(image)
        if image.ndim == logits.ndim - 1:
            image = image.unsqueeze(0)
        expected = (logits.shape[0], self.image_channels, *logits.shape[2:])
        if tuple(image.shape) != expected:
            raise ValueError(
                f"{where}image shape {tuple(image.shape)} does not match {expected} (batch, image_channels, "
                "spatial shape of the logits)"
            )
        if not image.is_floating_point():
            image = image.float()
        if not bool(torch.isfinite(image).all()):
            raise ValueError(f"{where}image contains NaN/Inf values")
        return image.float()

    def _volumes(self, data: Any, targets: Any, mask: Any, images: Any) -> Iterator[tuple[int, tuple, Any]]:
        """``(index, (logits, target, mask), image or None)`` for every volume of ``fit``'s data."""
        volumes = iter_volumes(data, targets, mask)
        if images is None or isinstance(data, torch.Tensor):
            for i, vol in enumerate(volumes):
                yield i, vol, images
            return
        image_iter = iter(images() if callable(images) else images)
        for i, vol in enumerate(volumes):
            image = next(image_iter, None)
            if image is None:
                raise ValueError(f"images: fewer images than volumes (none for volume {i})")
            yield i, vol, image
        if next(image_iter, None) is not None:
            raise ValueError("images: more images than volumes")

    # ----------------------------------------------------------------------------------------- fitting
    def fit(  # type: ignore[override]
        self, data: Any, targets: Any = None, mask: Any = None, images: Any = None
    ) -> LocalTemperatureScaling:
        """Learn the temperature map from validation logits (tensor + targets, or an iterable of volumes as for
        every calibrator); ``images``: a tensor ``(B, image_channels, *S)`` for tensor data, or an iterable /
        factory of per-volume images ``(image_channels, *S)`` parallel to the volumes. Returns ``self``."""
        self.mode = check_mode(self.mode)
        tally = self._fit_patches(data, targets, mask, images)
        self._check_fit(tally)
        return self

    def _fit(self, data: Any, targets: Any, mask: Any) -> TargetTally:
        return self._fit_patches(data, targets, mask, None)

    def _fit_patches(self, data: Any, targets: Any, mask: Any, images: Any) -> TargetTally:
        self._check_options()
        gen = torch.Generator().manual_seed(int(self.seed))
        tally = TargetTally()
        num_classes: int | None = None
        reservoir: _Reservoir | None = None
        for i, (lg, tg, mk), image in self._volumes(data, targets, mask, images):
            lg, y, mk = validate_volume(lg, tg, mk, self.mode, num_classes, i)
            if num_classes is None:
                num_classes = lg.shape[1]
                if lg.ndim - 2 not in (2, 3):
                    raise ValueError(f"volume {i}: logits must have 2 or 3 spatial dims, got {lg.ndim - 2}")
                self.spatial_dims_ = lg.ndim - 2
                reservoir = _Reservoir(self.max_patches, gen)
            elif lg.ndim - 2 != self.spatial_dims_:
                raise ValueError(f"volume {i}: expected {self.spatial_dims_}D logits, got {lg.ndim - 2}D")
            img = self._check_image(image, lg, f"volume {i}: ")
            tally.add(y, mk)
            assert reservoir is not None
            self._offer_patches(reservoir, lg, y, mk, img)
        if num_classes is None or reservoir is None:
            raise ValueError("fit received no volumes")
        if not reservoir.items:
            raise ValueError("fit received no voxels (empty masks?)")
        self.num_classes_ = num_classes
        self._train(reservoir, num_classes)
        return tally

    def _edge(self) -> int:
        return int(self.patch_size or _DEFAULT_PATCH[self.spatial_dims_])

    def _offer_patches(
        self,
        reservoir: _Reservoir,
        logits: torch.Tensor,
        onehot: torch.Tensor,
        mask: torch.Tensor | None,
        image: torch.Tensor | None,
    ) -> None:
        """Offer ``max_patches`` candidate patches of each volume of the batch to the reservoir; cut the kept ones
        (inputs with their halo, one-hot targets as bytes, the valid voxels), held on the host: the small
        temperature network is trained there, whatever the device of the volumes."""
        p, h = self._edge(), self.depth * (self.kernel_size // 2)
        shape = list(logits.shape[2:])
        for b in range(logits.shape[0]):
            valid = mask[b].cpu() if mask is not None else torch.ones(shape, dtype=torch.bool, device="cpu")
            n_valid = int(valid.sum())
            if n_valid == 0:
                continue
            kept = reservoir.slots(self.max_patches)
            if not kept:
                continue
            ranks = torch.randint(n_valid, (len(kept),), generator=reservoir.gen, device="cpu")
            centres = _nth_valid(valid, ranks)
            x = self._inputs(logits[b], None if image is None else image[b]).cpu()
            y = onehot[b].to(torch.uint8).cpu()
            for slot, flat in zip(kept, centres.tolist(), strict=True):
                starts = []
                for n in reversed(shape):
                    c = flat % n
                    flat //= n
                    starts.append(min(max(c - p // 2, 0), n - p) if n >= p else 0)
                starts.reverse()
                reservoir.items[slot] = (
                    _window(x, [s - h for s in starts], [p + 2 * h] * len(shape)),
                    _window(y, starts, [p] * len(shape)),
                    _window(valid, starts, [p] * len(shape)),
                )

    def _global_temperature(self, z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
        """Temperature scaling fitted on (a subsample of) the reservoir's voxels (the start of the map); 1 if that
        fit fails."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a single-class fit is reported once, by this calibrator
            try:
                ts = TemperatureScaling(mode=self.mode, max_voxels_per_volume=_INIT_VOXELS, seed=self.seed)
                return ts.fit(z, y, w).temperature_
            except ValueError:
                return 1.0

    def _train(self, reservoir: _Reservoir, num_classes: int) -> None:
        items = [it for it in reservoir.items if it is not None]
        reservoir.items = []
        x, y, w = (torch.stack([it[k] for it in items]) for k in range(3))
        del items  # the stacked copies replace the patches
        h = self.depth * (self.kernel_size // 2)
        centre = (slice(None), slice(0, num_classes)) + (slice(h, x.shape[-1] - h),) * self.spatial_dims_
        z = x[centre]  # the logits (centred in exclusive mode: same softmax) of the loss voxels
        gen = torch.Generator().manual_seed(int(self.seed) + 1)
        fit_idx, held_idx = self._split(x.shape[0], gen)
        t0 = self._global_temperature(z[fit_idx], y[fit_idx].float(), w[fit_idx])
        self.initial_temperature_ = float(t0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            net = self._make_net(num_classes, self.spatial_dims_, t0)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        self.losses_: list[float] = []
        self.held_out_losses_: list[float] = []
        best: tuple[float, dict[str, torch.Tensor]] | None = None
        for epoch in range(self.epochs + 1):
            if epoch > 0:
                self.losses_.append(self._epoch(net, opt, (x, z, y, w), fit_idx, gen))
            if held_idx.numel():
                loss = self._held_out_loss(net, (x, z, y, w), held_idx)
                self.held_out_losses_.append(loss)
                if best is None or loss < best[0]:
                    best = (loss, {k: v.clone() for k, v in net.state_dict().items()})
                    self.best_epoch_ = epoch
        if best is None:
            self.best_epoch_ = self.epochs
        else:
            net.load_state_dict(best[1])
        net.eval().requires_grad_(False)
        self.net_ = net
        self.n_patches_ = x.shape[0]

    def _split(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(training patches, held-out patches)``: a seeded ``holdout`` share (at least one patch when
        ``holdout > 0``; none with fewer than two patches)."""
        perm = torch.randperm(n, generator=gen, device="cpu")
        n_held = 0 if self.holdout == 0 or n < 2 else min(max(int(n * self.holdout), 1), n - 1)
        return perm[n_held:], perm[:n_held]

    def _epoch(
        self,
        net: TemperatureNet,
        opt: torch.optim.Optimizer,
        patches: tuple[torch.Tensor, ...],
        fit_idx: torch.Tensor,
        gen: torch.Generator,
    ) -> float:
        """One pass over the training patches in shuffled minibatches; the mean training loss."""
        x, z, y, w = patches
        order = fit_idx[torch.randperm(fit_idx.numel(), generator=gen, device="cpu")]
        total = 0.0
        for s in range(0, order.numel(), self.batch_size):
            idx = order[s : s + self.batch_size]
            opt.zero_grad()
            loss = voxel_loss(z[idx] / net(x[idx]), y[idx].float(), w[idx], self.mode)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        return total / order.numel()

    def _held_out_loss(self, net: TemperatureNet, patches: tuple[torch.Tensor, ...], idx: torch.Tensor) -> float:
        """Mean loss over the valid voxels of the held-out patches."""
        x, z, y, w = patches
        total, count = 0.0, 0.0
        with torch.no_grad():
            for s in range(0, idx.numel(), self.batch_size):
                b = idx[s : s + self.batch_size]
                m = float(w[b].sum())
                total += float(voxel_loss(z[b] / net(x[b]), y[b].float(), w[b], self.mode)) * m
                count += m
        return total / max(count, 1.0)

    # ----------------------------------------------------------------------------------------- inference
    def temperature_map(self, logits: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """The temperatures ``T(x)`` ``(B, 1, *spatial)`` of logits ``(B, C, *spatial)`` (float32), computed in
        chunks along the last axis, each cut with the network's halo (equal to the whole-volume result)."""
        self._check_input(logits)
        image = self._check_image(images, logits, "")
        with torch.no_grad():
            return self._temperatures(logits.float(), image)

    def _check_input(self, logits: torch.Tensor) -> None:
        self._check_fitted()
        check_prediction(logits, "logits")
        if logits.shape[1] != self.num_classes_:
            raise ValueError(
                f"logits have {logits.shape[1]} classes but the calibrator was fitted on {self.num_classes_}"
            )
        if logits.ndim - 2 != self.spatial_dims_:
            raise ValueError(f"logits must be {self.spatial_dims_}D like the fitting data, got {logits.ndim - 2}D")

    def _temperatures(self, logits: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        h = self.net_.halo
        shape = list(logits.shape[2:])
        plane = math.prod(n + 2 * h for n in shape[:-1])
        width = max(1, self.chunk_voxels // plane - 2 * h)
        out = logits.new_empty(logits.shape[0], 1, *shape)
        net = module_on(self.net_, logits.device)
        for b in range(logits.shape[0]):
            for a in range(0, shape[-1], width):
                e = min(a + width, shape[-1])
                starts = [-h] * (len(shape) - 1) + [a - h]
                sizes = [n + 2 * h for n in shape[:-1]] + [e - a + 2 * h]
                zw = _window(logits[b], starts, sizes)
                iw = None if image is None else _window(image[b], starts, sizes)
                out[b, ..., a:e] = net(self._inputs(zw, iw)[None])[0]
        return out

    def transform(self, logits: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Calibrated probabilities ``(B, C, *spatial)``: ``softmax(z / T(x))`` (``sigmoid`` in multilabel
        mode) of logits ``(B, C, *spatial)`` (and images ``(B, image_channels, *spatial)``); like every
        calibrator's, an inference result that carries no autograd graph."""
        t = self.temperature_map(logits, images)
        with torch.no_grad():
            z = logits.float() / t
            return torch.softmax(z, 1) if self.mode == "exclusive" else torch.sigmoid(z)

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self._temperatures(logits, None)

    # ----------------------------------------------------------------------------------------- files
    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "kernel_size": self.kernel_size,
            "depth": self.depth,
            "hidden": self.hidden,
            "image_channels": self.image_channels,
            "patch_size": self.patch_size,
            "max_patches": self.max_patches,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "lr": self.lr,
            "floor": self.floor,
            "holdout": self.holdout,
            "chunk_voxels": self.chunk_voxels,
            "seed": self.seed,
            "spatial_dims_": self.spatial_dims_,
        }

    def _state(self) -> dict[str, torch.Tensor]:
        state = {f"net.{k}": v for k, v in self.net_.state_dict().items()}
        state["initial_temperature"] = torch.tensor(self.initial_temperature_, dtype=torch.float64, device="cpu")
        return state

    def _set_state(self, state: dict[str, torch.Tensor]) -> None:
        self._check_options()
        net = self._make_net(self.num_classes_, self.spatial_dims_)
        net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        net.eval().requires_grad_(False)
        self.net_ = net
        self.initial_temperature_ = float(state["initial_temperature"])
