"""Training configuration: dataclasses that mirror the YAML file and reject unknown keys.

A config file looks like::

    loss: "dice+ace"          # any segcal.losses.loss_from_string spec
    epochs: 20
    seed: 0
    output_dir: runs/unet
    model: {spatial_dims: 2, in_channels: 1, out_channels: 4, channels: [8, 16, 32, 64], strides: [2, 2, 2]}
    data: {train_dir: data/train, val_dir: data/val, batch_size: 8, patch_size: null}
    optim: {lr: 0.001}

Every section is optional; missing keys take the defaults below. An unknown key anywhere raises a
``ValueError`` that names the key, its section and the valid keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "config_from_dict", "load_config"]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class ModelConfig:
    """MONAI ``UNet`` settings (ACE-MICCAI defaults: channels 8-16-32-64, strides 2)."""

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 2
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 2
    dropout: float = 0.0
    norm: str = "INSTANCE"

    def validate(self) -> None:
        """Rule: spatial_dims 2 or 3; channels and strides lists of positive integers (one stride fewer than
        channels); at least one input channel and two classes; dropout in [0, 1)."""
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"model.spatial_dims must be 2 or 3, got {self.spatial_dims}")
        for key in ("channels", "strides"):
            values = getattr(self, key)
            if not isinstance(values, list | tuple) or not all(_positive_int(v) for v in values):
                raise ValueError(f"model.{key} must be a list of positive integers, got {values!r}")
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"model.strides needs len(channels) - 1 = {len(self.channels) - 1} entries, "
                f"got {len(self.strides)}"
            )
        if self.in_channels < 1 or self.out_channels < 2:
            raise ValueError("model.in_channels must be >= 1 and model.out_channels >= 2 (softmax classes)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def size_factor(self) -> int:
        """Spatial sizes must be multiples of this (product of the strides) for the UNet skips to line up."""
        f = 1
        for s in self.strides:
            f *= s
        return f


@dataclass
class DataConfig:
    """Where the data come from and how batches are drawn.

    ``train_dir`` / ``val_dir``: folders of ``<case>.npz`` (keys ``image`` ``(C_in, *S)`` or ``(*S)`` and
    ``label`` ``(*S)``) or NIfTI pairs ``<case>_image.nii[.gz]`` + ``<case>_label.nii[.gz]``. Leave them empty
    when arrays are passed to :func:`segcal.training.train` directly. ``patch_size``: random patches of this
    size are drawn for training (and used as the sliding-window size for validation); ``null`` trains on whole
    images (2D slices), zero-padded to a multiple of the strides' product.
    """

    train_dir: str | None = None
    val_dir: str | None = None
    patch_size: list[int] | None = None
    batch_size: int = 4
    num_workers: int = 0
    sw_overlap: float = 0.25

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if self.patch_size is not None and any(p < 1 for p in self.patch_size):
            raise ValueError(f"data.patch_size entries must be >= 1, got {self.patch_size}")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ValueError(f"data.sw_overlap must be in [0, 1), got {self.sw_overlap}")


@dataclass
class OptimConfig:
    """Adam settings and the learning-rate schedule.

    ``schedule="constant"`` keeps ``lr``; ``"poly"`` is nnU-Net's polynomial decay (Isensee et al., Nature Methods
    2021): epoch ``e`` of ``E`` uses ``lr * (1 - e / E) ** poly_exponent``, so every run of ``E`` epochs ends with
    a small step size whatever its loss (a fixed budget of optimizer steps that converges).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "constant"
    poly_exponent: float = 0.9

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas needs 2 values, got {self.betas}")
        if self.schedule not in ("constant", "poly"):
            raise ValueError(f"optim.schedule must be 'constant' or 'poly', got {self.schedule!r}")
        if not self.poly_exponent > 0:
            raise ValueError(f"optim.poly_exponent must be > 0, got {self.poly_exponent}")

    def lr_at(self, epoch: int, epochs: int) -> float:
        """The learning rate of (0-based) ``epoch`` of ``epochs``."""
        if self.schedule == "constant":
            return self.lr
        return self.lr * (1 - epoch / max(epochs, 1)) ** self.poly_exponent


@dataclass
class TrainConfig:
    """Top-level training config (see the module docstring for a YAML example)."""

    loss: str = "dice"
    epochs: int = 10
    seed: int = 0
    output_dir: str = "runs/train"
    deterministic: bool = True
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = False
    include_background_in_val: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not isinstance(self.loss, str) or not self.loss.strip():
            raise ValueError("loss must be a non-empty loss string such as 'dice' or 'dice+ace'")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        if self.data.patch_size is not None:
            if len(self.data.patch_size) != self.model.spatial_dims:
                raise ValueError(
                    f"data.patch_size has {len(self.data.patch_size)} entries but model.spatial_dims is "
                    f"{self.model.spatial_dims}"
                )
            f = self.model.size_factor
            if any(p % f for p in self.data.patch_size):
                raise ValueError(
                    f"data.patch_size {self.data.patch_size} must be multiples of {f} (product of strides)"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON/checkpoint friendly)."""
        return dataclasses.asdict(self)


#: scalar field types: (accepts the YAML value, what the error message says it must be)
_SCALARS: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true/false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the field type ``tp`` (dataclass, optional, list or scalar); ``where`` names it."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    return _coerce_scalar(value, tp, where)


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    if tp not in _SCALARS:
        return value
    accepts, what = _SCALARS[tp]
    if not accepts(value):
        raise ValueError(f"{where} must be {what}, got {value!r}")
    return float(value) if tp is float else value


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in valid]
    if unknown:
        section = f"section '{where}'" if where else "the top level"
        raise ValueError(
            f"unknown config key(s) {', '.join(repr(k) for k in unknown)} in {section}; "
            f"valid keys: {', '.join(valid)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a nested dict; unknown keys raise ``ValueError``."""
    cfg = _from_dict(TrainConfig, dict(data or {}))
    cfg.validate()
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML config file (``yaml.safe_load``) and validate it; errors name the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping of keys, got {type(data).__name__}")
    try:
        return config_from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
