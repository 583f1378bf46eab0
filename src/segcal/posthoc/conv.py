"""Learned convolutional calibrators (PostHoc §2.2): an auxiliary k×k(×k) conv on the logits, and
fine-tuning of the last layer of a trained network with all other weights frozen.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcal.functional.inputs import check_mode, check_prediction, check_target, target_to_onehot
from segcal.posthoc._base import Calibrator, TargetTally, is_reiterable, iter_volumes, validate_volume

__all__ = ["AuxiliaryConvCalibrator", "LastLayerFineTuner", "voxel_loss"]


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


class AuxiliaryConvCalibrator(Calibrator):
    """One ``C → C`` convolution with a ``k×k`` (2D) or ``k×k×k`` (3D) kernel applied to the logits.

    The kernel starts as the identity (centre tap 1 on the channel diagonal), so an unfitted map leaves the
    logits unchanged; it is trained with cross-entropy (BCE in multilabel mode) and Adam on whole volumes,
    one optimiser step per volume. Spatial dimensionality is taken from the first volume.

    Args:
        kernel_size: odd ``k`` (default 5, PostHoc).
        epochs: passes over the data; more than one needs a re-iterable source (tensor, list or factory).
        lr: Adam learning rate.

    Learned attributes: ``conv_`` (an ``nn.Conv2d``/``nn.Conv3d``), ``spatial_dims_``, ``num_classes_``.
    """

    method = "auxconv"
    fitted_what = "convolution"

    def __init__(
        self, mode: str = "exclusive", kernel_size: int = 5, epochs: int = 20, lr: float = 1e-2, seed: int = 0
    ) -> None:
        super().__init__(mode=mode)  # type: ignore[arg-type]
        self.kernel_size = kernel_size
        self.epochs = epochs
        self.lr = lr
        self.seed = seed

    def _make_conv(self, num_classes: int, spatial_dims: int) -> nn.Module:
        k = int(self.kernel_size)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {self.kernel_size}")
        cls = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        conv = cls(num_classes, num_classes, k, padding=k // 2)
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.zero_()
            centre = (slice(None), slice(None)) + (k // 2,) * spatial_dims
            conv.weight[centre] = torch.eye(num_classes)
        return conv

    def _fit(self, data: Any, targets: Any, mask: Any) -> TargetTally:
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
                if conv is None:
                    num_classes = lg.shape[1]
                    self.spatial_dims_ = lg.ndim - 2
                    conv = self._make_conv(num_classes, self.spatial_dims_)
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
        self.conv_ = conv
        self.num_classes_ = num_classes
        return tally

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.ndim - 2 != self.spatial_dims_:
            raise ValueError(
                f"logits must be {self.spatial_dims_}D like the fitting data, got {logits.ndim - 2}D"
            )
        return self.conv_(logits)

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "kernel_size": self.kernel_size,
            "epochs": self.epochs,
            "lr": self.lr,
            "seed": self.seed,
            "spatial_dims_": self.spatial_dims_,
        }

    @classmethod
    def _from_config(cls, config: dict[str, Any]) -> Calibrator:
        dims = config.pop("spatial_dims_")
        obj = super()._from_config(config)
        obj.spatial_dims_ = dims  # type: ignore[attr-defined]
        return obj

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
    ) -> None:
        super().__init__(mode=mode)  # type: ignore[arg-type]
        self.network = network
        self.layer_name = layer_name
        self.epochs = epochs
        self.lr = lr

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
        net.eval()  # frozen normalisation statistics; only the last layer moves
        self.losses_ = []
        num_classes = None
        tally = TargetTally()
        for epoch in range(self.epochs):
            total, n = 0.0, 0
            for i, batch in enumerate(data() if callable(data) else data):
                image, target = batch[0], batch[1]
                mk = batch[2] if len(batch) > 2 else None
                z = net(image)
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
        return {**super()._config(), "layer_name": self.layer_name_, "epochs": self.epochs, "lr": self.lr}

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
