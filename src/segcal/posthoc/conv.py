"""Learned convolutional calibrators (Rousseau et al., ISBI 2021, §2.2): an auxiliary k×k(×k) conv on the
logits, and fine-tuning of the last layer of a trained network with all other weights frozen.

Memory. Whole-volume training (the default) holds one volume and its gradient at a time, whatever the number
of volumes. With ``patch_size`` the calibrators train on a fixed-size sample of patches instead
(:class:`PatchReservoir` for the auxiliary conv: ``max_patches`` patches drawn uniformly over all voxels of the
dataset, held for every epoch; a random crop of each batch for last-layer fine-tuning), so memory is bounded by
the patch size as well, not by the size of the volumes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcal.functional.inputs import check_mode, check_prediction, check_target, target_to_onehot
from segcal.posthoc._base import (
    Calibrator,
    TargetTally,
    is_reiterable,
    iter_volumes,
    module_on,
    validate_volume,
)

__all__ = ["AuxiliaryConvCalibrator", "LastLayerFineTuner", "PatchReservoir", "voxel_loss"]


def voxel_loss(z: torch.Tensor, onehot: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Mean CE (exclusive) or BCE (multilabel) of logits ``(B, C, *S)`` over the voxels inside ``mask``."""
    if mode == "exclusive":
        per = -(onehot * torch.log_softmax(z, 1)).sum(1)
    else:
        per = F.binary_cross_entropy_with_logits(z, onehot, reduction="none").mean(1)
    if mask is None:
        return per.mean()
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1)


class PatchReservoir:
    """A fixed-size, uniform random sample of patches over a whole stream of volumes.

    Patch centres are a bottom-k sample of all voxels offered (inside the masks): every voxel draws a key
    ``u ~ Uniform(0, 1)`` from a seeded generator and the ``capacity`` voxels with the smallest keys seen so far
    are the centres held, so the centres are a uniform random subset of all voxels of the dataset, whatever the
    number and sizes of the volumes (the same seed and volumes in the same order give the same patches). Each
    held patch is the ``patch_size^d`` block around its centre plus a halo of ``halo`` voxels on every side
    (logits outside the volume are zero, as the convolution's zero padding sees them); its ``valid`` map is
    true on the voxels of the block that lie inside the volume and its mask, false on the halo. Memory: the
    held patches (``capacity × (C + C + 1) × (patch_size + 2·halo)^d`` values) and one padded volume.
    """

    def __init__(self, capacity: int, patch_size: int, halo: int, seed: int = 0) -> None:
        for name, v, low in (("max_patches", capacity, 1), ("patch_size", patch_size, 1), ("halo", halo, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        self.capacity, self.patch_size, self.halo = capacity, patch_size, halo
        self.generator = torch.Generator().manual_seed(int(seed))
        self.keys = torch.zeros(0, dtype=torch.float64, device="cpu")
        self.patches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (z, y, valid) per patch

    def add(self, logits: torch.Tensor, onehot: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Offer the voxels of ``logits (B, C, *S)`` / ``onehot (B, C, *S)`` inside ``mask (B, *S)`` as centres
        (the patches are held on the host, whatever the device of the volume)."""
        logits, onehot = logits.detach().cpu(), onehot.cpu()
        mask = None if mask is None else mask.cpu()
        d = logits.ndim - 2
        p, h = self.patch_size, self.halo
        pad = p + h  # enough on both sides for any centre
        for b in range(logits.shape[0]):
            valid = torch.ones(logits.shape[2:], dtype=torch.bool, device="cpu") if mask is None else mask[b]
            where = valid.reshape(-1).nonzero().squeeze(1)
            keys = torch.rand(where.numel(), generator=self.generator, dtype=torch.float64, device="cpu")
            if self.keys.numel() >= self.capacity:
                below = keys < self.keys.max()
                where, keys = where[below], keys[below]
            if keys.numel() > self.capacity:  # only this volume's `capacity` smallest keys can be held
                keys, top = torch.topk(keys, self.capacity, largest=False)
                where = where[top]
            if keys.numel() == 0:
                continue
            z_pad = F.pad(logits[b], (pad, pad) * d)
            y_pad = F.pad(onehot[b], (pad, pad) * d)
            v_pad = F.pad(valid, (pad, pad) * d)
            centres = torch.stack(torch.unravel_index(where, valid.shape), 1)
            for centre in centres.tolist():
                lo = [c - p // 2 - h + pad for c in centre]
                box = tuple(slice(s, s + p + 2 * h) for s in lo)
                v = v_pad[box].clone()
                if h:
                    inner = torch.zeros_like(v)
                    inner[(slice(h, h + p),) * d] = True
                    v &= inner
                self.patches.append((z_pad[(slice(None), *box)].clone(), y_pad[(slice(None), *box)].clone(), v))
            self.keys = torch.cat([self.keys, keys])
            if self.keys.numel() > self.capacity:
                keep = torch.topk(self.keys, self.capacity, largest=False).indices.sort().values
                self.keys = self.keys[keep]
                self.patches = [self.patches[i] for i in keep.tolist()]

    def __len__(self) -> int:
        return len(self.patches)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The held patches as ``(z (n, C, *Q), y (n, C, *Q), valid (n, *Q))``, ``Q = patch_size + 2·halo``."""
        z, y, v = zip(*self.patches, strict=True)
        return torch.stack(z), torch.stack(y), torch.stack(v)


class AuxiliaryConvCalibrator(Calibrator):
    """One ``C → C`` convolution with a ``k×k`` (2D) or ``k×k×k`` (3D) kernel applied to the logits.

    The kernel starts as the identity (centre tap 1 on the channel diagonal), so an unfitted map leaves the
    logits unchanged; it is trained with cross-entropy (BCE in multilabel mode) and Adam. Spatial
    dimensionality is taken from the first volume.

    * ``patch_size=None`` (default): whole volumes, one optimiser step per volume per epoch; memory is one
      volume, and more than one epoch needs a re-iterable source (tensor, list or factory).
    * ``patch_size=P``: one pass over the data fills a :class:`PatchReservoir` of ``max_patches`` patches of
      ``P^d`` voxels (plus a halo of ``k // 2``, so the convolution of a patch equals that of the whole volume on
      its block) centred on voxels drawn uniformly over the whole dataset; then ``epochs`` passes over the held
      patches in shuffled mini-batches of ``batch_size`` (one Adam step each). Memory is bounded by
      ``max_patches`` and ``P`` only; any source works, also a one-shot generator.

    Args:
        kernel_size: odd ``k`` (default 5, Rousseau et al.).
        epochs: passes over the data (whole volumes) or over the held patches.
        lr: Adam learning rate.
        seed: seed of the initialisation order, the patch sample and the mini-batch order.
        patch_size: ``None`` (whole volumes) or the side ``P`` of the sampled patches.
        max_patches: patches held with ``patch_size``.
        batch_size: patches per optimiser step with ``patch_size``.

    Learned attributes: ``conv_`` (an ``nn.Conv2d``/``nn.Conv3d``), ``spatial_dims_``, ``num_classes_``.
    """

    method = "auxconv"
    fitted_what = "convolution"

    def __init__(
        self,
        mode: str = "exclusive",
        kernel_size: int = 5,
        epochs: int = 20,
        lr: float = 1e-2,
        seed: int = 0,
        patch_size: int | None = None,
        max_patches: int = 256,
        batch_size: int = 16,
    ) -> None:
        super().__init__(mode=mode)  # type: ignore[arg-type]
        self.kernel_size = kernel_size
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.patch_size = patch_size
        self.max_patches = max_patches
        self.batch_size = batch_size

    def _make_conv(self, num_classes: int, spatial_dims: int) -> nn.Module:
        k = int(self.kernel_size)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {self.kernel_size}")
        cls = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        with torch.device("cpu"), torch.no_grad():  # made on the host, whatever torch's default device
            conv = cls(num_classes, num_classes, k, padding=k // 2)
            conv.weight.zero_()
            conv.bias.zero_()
            centre = (slice(None), slice(None)) + (k // 2,) * spatial_dims
            conv.weight[centre] = torch.eye(num_classes)
        return conv

    def _fit(self, data: Any, targets: Any, mask: Any) -> TargetTally:
        if self.patch_size is not None:
            return self._fit_patches(data, targets, mask)
        if self.epochs > 1 and not is_reiterable(data):
            raise TypeError(
                "AuxiliaryConvCalibrator with epochs > 1 needs re-iterable data "
                "(a tensor, a list of volumes or a "
                "callable returning a fresh iterable), not a one-shot generator"
            )
        torch.manual_seed(self.seed)
        conv: nn.Module | None = None
        opt: torch.optim.Optimizer | None = None
        num_classes: int | None = None
        tally = TargetTally()
        for epoch in range(self.epochs):
            for i, (lg, tg, mk) in enumerate(iter_volumes(data, targets, mask)):
                lg, y, mk = validate_volume(lg, tg, mk, self.mode, num_classes, i)
                if epoch == 0:
                    tally.add(y, mk)
                if conv is None:  # trained where the logits are
                    num_classes = lg.shape[1]
                    self.spatial_dims_ = lg.ndim - 2
                    conv = self._make_conv(num_classes, self.spatial_dims_).to(lg.device)
                    opt = torch.optim.Adam(conv.parameters(), lr=self.lr)
                if lg.ndim - 2 != self.spatial_dims_:
                    raise ValueError(f"volume {i}: expected {self.spatial_dims_}D logits, got {lg.ndim - 2}D")
                assert opt is not None
                opt.zero_grad()
                loss = voxel_loss(conv(lg), y, mk, self.mode)
                loss.backward()
                opt.step()
        if conv is None or num_classes is None:
            raise ValueError("fit received no volumes")
        conv.eval()
        for p in conv.parameters():
            p.requires_grad_(False)
        self.conv_ = conv.cpu()  # learned attributes live on the host
        self.num_classes_ = num_classes
        return tally

    def _fit_patches(self, data: Any, targets: Any, mask: Any) -> TargetTally:
        """One pass filling a :class:`PatchReservoir`, then ``epochs`` shuffled mini-batch passes over it."""
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        k = int(self.kernel_size)
        reservoir = PatchReservoir(self.max_patches, self.patch_size, k // 2, self.seed)  # type: ignore[arg-type]
        tally = TargetTally()
        num_classes: int | None = None
        device = torch.device("cpu")
        for i, (lg, tg, mk) in enumerate(iter_volumes(data, targets, mask)):
            lg, y, mk = validate_volume(lg, tg, mk, self.mode, num_classes, i)
            if num_classes is None:  # the patches are held on the host and trained on where the logits are
                num_classes, self.spatial_dims_, device = lg.shape[1], lg.ndim - 2, lg.device
            if lg.ndim - 2 != self.spatial_dims_:
                raise ValueError(f"volume {i}: expected {self.spatial_dims_}D logits, got {lg.ndim - 2}D")
            tally.add(y, mk)
            reservoir.add(lg, y, mk)
        if num_classes is None:
            raise ValueError("fit received no volumes")
        if len(reservoir) == 0:
            raise ValueError("fit received no voxels (empty masks?)")
        torch.manual_seed(self.seed)
        conv = self._make_conv(num_classes, self.spatial_dims_).to(device)
        opt = torch.optim.Adam(conv.parameters(), lr=self.lr)
        z, y, valid = (t.to(device) for t in reservoir.stacked())
        gen = torch.Generator().manual_seed(int(self.seed))
        for _ in range(self.epochs):
            order = torch.randperm(len(reservoir), generator=gen, device="cpu")
            for s in range(0, len(reservoir), self.batch_size):
                idx = order[s : s + self.batch_size]
                opt.zero_grad()
                loss = voxel_loss(conv(z[idx]), y[idx], valid[idx], self.mode)
                loss.backward()
                opt.step()
        conv.eval().requires_grad_(False)
        self.conv_ = conv.cpu()
        self.num_classes_ = num_classes
        self.n_patches_ = len(reservoir)
        return tally

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.ndim - 2 != self.spatial_dims_:
            raise ValueError(
                f"logits must be {self.spatial_dims_}D like the fitting data, got {logits.ndim - 2}D"
            )
        return module_on(self.conv_, logits.device)(logits)

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "kernel_size": self.kernel_size,
            "epochs": self.epochs,
            "lr": self.lr,
            "seed": self.seed,
            "patch_size": self.patch_size,
            "max_patches": self.max_patches,
            "batch_size": self.batch_size,
            "spatial_dims_": self.spatial_dims_,
        }

    def _state(self) -> dict[str, torch.Tensor]:
        return dict(self.conv_.state_dict())

    def _set_state(self, state: dict[str, torch.Tensor]) -> None:
        conv = self._make_conv(self.num_classes_, self.spatial_dims_)
        conv.load_state_dict(state)
        conv.eval().requires_grad_(False)
        self.conv_ = conv


def _final_layer_name(network: nn.Module) -> str:
    name = None
    for n, m in network.named_modules():
        if isinstance(
            m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
        ):
            name = n
    if name is None:
        raise ValueError("network has no convolution or linear layer to fine-tune")
    return name


class LastLayerFineTuner(Calibrator):
    """Fine-tune only the final convolution of a trained network with CE (BCE for multilabel) and Adam.

    ``fit`` takes an iterable of ``(image, target[, mask])`` batches (network inputs, not logits);
    ``transform(images)`` runs the network and returns probabilities. ``layer_name`` picks the layer to train
    (default: the last Conv/Linear module in ``named_modules`` order). ``save`` stores that layer's weights
    only; ``load(path, network=net)`` puts them back into ``net``.

    Memory is one batch of the loader (the loader holds the data). With ``patch_size=P`` each batch is cropped
    to a random ``P^d`` block (the same block for image, target and mask; seeded by ``seed``; an axis shorter
    than ``P`` is kept whole) before the forward pass, bounding the activations of a fully convolutional network
    by ``P`` rather than by the image size, as patch-based training does.

    Learned attributes: ``layer_name_``, ``num_classes_``, ``losses_`` (mean loss per epoch).
    """

    method = "lastlayer"
    fitted_what = "last layer"

    def __init__(
        self,
        network: nn.Module | None = None,
        mode: str = "exclusive",
        layer_name: str | None = None,
        epochs: int = 5,
        lr: float = 1e-3,
        patch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(mode=mode)  # type: ignore[arg-type]
        self.network = network
        self.layer_name = layer_name
        self.epochs = epochs
        self.lr = lr
        self.patch_size = patch_size
        self.seed = seed

    def _crop(self, batch: Any, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(image, target, mask | None)`` of a batch, cropped to a random ``patch_size`` block."""
        image, target = batch[0], batch[1]
        mk = batch[2] if len(batch) > 2 else None
        if self.patch_size is None:
            return image, target, mk
        p = self.patch_size
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"patch_size must be a positive integer or None, got {p!r}")
        starts = [int(torch.randint(0, max(n - p, 0) + 1, (1,), generator=gen, device="cpu")) for n in image.shape[2:]]
        box = (..., *(slice(s, s + p) for s in starts))  # the spatial axes are the last ones of every tensor
        return image[box], target[box], None if mk is None else mk[box]

    def _layer(self) -> nn.Module:
        if self.network is None:
            raise ValueError("LastLayerFineTuner needs a network (pass network=...)")
        name = self.layer_name or _final_layer_name(self.network)
        modules = dict(self.network.named_modules())
        if name not in modules:
            raise ValueError(f"layer_name {name!r} is not a module of the network")
        self.layer_name_ = name
        return modules[name]

    def fit(self, data: Iterable[Any], targets: Any = None, mask: Any = None) -> LastLayerFineTuner:  # type: ignore[override]
        self.mode = check_mode(self.mode)
        if self.epochs > 1 and not is_reiterable(data):
            raise TypeError("epochs > 1 needs a re-iterable loader (a DataLoader or a list), not a generator")
        layer = self._layer()
        net = self.network
        assert net is not None
        saved = {n: p.requires_grad for n, p in net.named_parameters()}
        for p in net.parameters():
            p.requires_grad_(False)
        for p in layer.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam(layer.parameters(), lr=self.lr)
        device = next(layer.parameters()).device
        net.eval()  # frozen normalisation statistics; only the last layer moves
        self.losses_ = []
        num_classes = None
        tally = TargetTally()
        gen = torch.Generator().manual_seed(int(self.seed))
        for epoch in range(self.epochs):
            total, n = 0.0, 0
            for i, batch in enumerate(data() if callable(data) else data):
                image, target, mk = self._crop(batch, gen)
                z = net(image.to(device))  # the batches go where the network is
                target = target.to(z.device)
                mk = None if mk is None else mk.to(z.device)
                check_prediction(z.detach(), "network output")
                check_target(target, z.shape, self.mode, name=f"batch {i} target")
                num_classes = z.shape[1]
                y = target_to_onehot(target, num_classes, dtype=z.dtype)
                if mk is not None and mk.ndim == z.ndim:
                    mk = mk[:, 0]
                if epoch == 0:
                    tally.add(y, None if mk is None else mk.bool())
                opt.zero_grad()
                loss = voxel_loss(z, y, mk, self.mode)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                n += 1
            self.losses_.append(total / max(n, 1))
        for name, p in net.named_parameters():
            p.requires_grad_(saved[name])
        if num_classes is None:
            raise ValueError("fit received no batches")
        self.num_classes_ = num_classes
        self._check_fit(tally)
        return self

    def transform(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Probabilities ``(B, C, *spatial)`` of the fine-tuned network for network inputs ``images``."""
        self._check_fitted()
        assert self.network is not None
        self.network.eval()
        with torch.no_grad():
            z = self.network(images)
        return torch.softmax(z, 1) if self.mode == "exclusive" else torch.sigmoid(z)

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "layer_name": self.layer_name_,
            "epochs": self.epochs,
            "lr": self.lr,
            "patch_size": self.patch_size,
            "seed": self.seed,
        }

    @classmethod
    def _from_config(cls, config: dict[str, Any]) -> Calibrator:
        if config.get("network") is None:
            raise ValueError(
                "LastLayerFineTuner.load(path, network=net) needs the network to put the layer into"
            )
        return super()._from_config(config)

    def _state(self) -> dict[str, torch.Tensor]:
        return dict(self._layer().state_dict())

    def _set_state(self, state: dict[str, torch.Tensor]) -> None:
        self._layer().load_state_dict(state)
