"""Shared machinery of the post-hoc calibrators: input streaming, the voxel reservoir, validation, save/load.

Data accepted by ``fit``
------------------------
* a logits tensor ``(B, C, *spatial)`` together with ``targets`` (label map ``(B, *spatial)`` /
  ``(B, 1, *spatial)`` or one-hot / multi-hot ``(B, C, *spatial)``);
* an iterable of volumes ``(logits, target)`` or ``(logits, target, mask)``; each ``logits`` is
  ``(C, *spatial)`` or ``(1, C, *spatial)`` (a batch ``(B, C, *spatial)`` also works). Volumes are read one at
  a time and never concatenated. A list/tuple or a zero-argument callable returning a fresh iterable is
  *re-iterable* and can be streamed several times; a one-shot generator is read once.

Memory
------
Nothing a calibrator holds grows with the number of volumes: a re-iterable source is streamed again in each
pass, and a subsample is a :class:`VoxelReservoir` of a fixed number of voxels drawn uniformly over the whole
dataset.

Checks after ``fit``
-------------------
Targets that hold a single class (every voxel one class; multilabel: every channel all positive or all
negative) carry no information about calibration: the fit gives a ``UserWarning`` ("only one class present in
the fitting targets; the fitted temperature is not meaningful"). A fit whose parameters come out non-finite
(or a temperature that is not positive) diverged: ``ValueError``, and the calibrator stays unfitted.

Files
-----
``save(path)`` writes one ``torch.save`` file holding a plain dict of tensors and strings
(``{"format", "version", "method", "config" (JSON text), "state" (dict of tensors)}``); ``load`` reads it with
``torch.load(weights_only=True)`` (no arbitrary pickle) and refuses a file written by another method.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from segcal.functional.inputs import Mode, as_tensor, check_mode, check_prediction, check_target, target_to_onehot
from segcal.io.torchfile import read_torch_file, write_torch_file

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "DEGENERATE_TARGETS",
    "Calibrator",
    "NotFittedError",
    "TargetTally",
    "VoxelReservoir",
    "iter_volumes",
    "load_calibrator",
]

FORMAT = "segcal-calibrator"
#: the size of the voxel reservoir when a subsample is needed and ``max_voxels`` is not given
DEFAULT_MAX_VOXELS = 1 << 21
VERSION = 1
_REGISTRY: dict[str, type[Calibrator]] = {}

Volume = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]

#: the warning of a fit on targets holding a single class (``what``: the fitted parameters)
DEGENERATE_TARGETS = "only one class present in the fitting targets; the fitted {what} is not meaningful"


class NotFittedError(RuntimeError):
    """A calibrator was used before :meth:`Calibrator.fit`."""


def _as_volume(item: Any, index: int) -> Volume:
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise TypeError(
            f"volume {index}: expected a tuple (logits, target) or (logits, target, mask), "
            f"got {type(item).__name__}"
        )
    logits, target = item[0], item[1]
    mask = item[2] if len(item) == 3 else None
    logits = as_tensor(logits)
    target = as_tensor(target)
    # (C, H, W) and (C, H, W, D) with a label map (H, W, D) are single volumes -> (1, C, *spatial);
    # other 4-D inputs are read as a 2-D batch (B, C, H, W) (pass 3-D one-hot targets with a batch axis).
    unbatched = logits.ndim == 3 or (logits.ndim == 4 and tuple(target.shape) == tuple(logits.shape[1:]))
    if unbatched:
        logits = logits.unsqueeze(0)
        target = target.unsqueeze(0)
        if mask is not None:
            mask = as_tensor(mask).unsqueeze(0)
    if mask is not None:
        mask = as_tensor(mask)
    return logits, target, mask


def iter_volumes(data: Any, targets: Any = None, masks: Any = None) -> Iterator[Volume]:
    """Yield ``(logits (B, C, *S), target, mask | None)`` from a tensor or an iterable of volumes."""
    if isinstance(data, torch.Tensor):
        if targets is None:
            raise ValueError("fit(logits, targets): targets are required when logits are given as a tensor")
        yield data, as_tensor(targets), None if masks is None else as_tensor(masks)
        return
    if targets is not None:
        raise ValueError("targets must be None when data is an iterable of (logits, target[, mask]) volumes")
    source = data() if callable(data) else data
    if not isinstance(source, Iterable):
        raise TypeError(f"data must be a logits tensor or an iterable of volumes, got {type(data).__name__}")
    for i, item in enumerate(source):
        yield _as_volume(item, i)


def module_on(module: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` (a learned attribute, held on the host) as a function on ``device``: its parameters and
    buffers are copied there for the calls; the held module does not move."""
    state = {k: v.to(device) for k, v in module.state_dict().items()}
    return lambda x: torch.func.functional_call(module, state, (x,))


def is_reiterable(data: Any) -> bool:
    """True if ``data`` can be streamed more than once (tensor, sequence or factory callable)."""
    if isinstance(data, (torch.Tensor, Sequence)) or callable(data):
        return True
    try:
        return iter(data) is not data  # a container (e.g. a DataLoader), not a one-shot iterator
    except TypeError:
        return False


def validate_volume(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    mode: Mode,
    num_classes: int | None,
    index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check one volume and return ``(logits float32, one-hot target float32 (B, C, *S), mask bool (B,
    *S))``."""
    where = f"volume {index}: "
    try:
        check_prediction(logits, "logits")
    except (ValueError, TypeError) as exc:
        raise type(exc)(where + str(exc)) from None
    c = logits.shape[1]
    if num_classes is not None and c != num_classes:
        raise ValueError(f"{where}logits have {c} classes but the calibrator expects {num_classes}")
    try:
        check_target(target, logits.shape, mode)
    except (ValueError, TypeError) as exc:
        raise type(exc)(where + str(exc)) from None
    onehot = target_to_onehot(target.to(logits.device), c, dtype=torch.float32)  # targets may come from the host
    if mask is not None:
        m = mask[:, 0] if (mask.ndim == logits.ndim and mask.shape[1] == 1) else mask
        if tuple(m.shape) != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"{where}mask shape {tuple(mask.shape)} does not match the logits' batch and spatial shape "
                f"{(logits.shape[0], *logits.shape[2:])}"
            )
        mask = m.bool().to(logits.device)
    return logits.float(), onehot, mask


def flatten_voxels(
    logits: torch.Tensor,
    onehot: torch.Tensor,
    mask: torch.Tensor | None,
    max_voxels: int | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, *S)`` → ``(N, C)`` logits and targets, keeping masked voxels and at most ``max_voxels``."""
    c = logits.shape[1]
    z = logits.movedim(1, -1).reshape(-1, c)
    y = onehot.movedim(1, -1).reshape(-1, c)
    if mask is not None:
        keep = mask.reshape(-1)
        z, y = z[keep], y[keep]
    if max_voxels is not None and z.shape[0] > max_voxels:
        idx = torch.randperm(z.shape[0], generator=generator, device="cpu")[:max_voxels]
        z, y = z[idx], y[idx]
    if bool(((y == 0) | (y == 1)).all()):
        y = y.to(torch.uint8)  # hard one-hot / multi-hot targets are held as bytes
    return z.contiguous(), y.contiguous()


class VoxelReservoir:
    """A fixed-size, uniform random sample of voxel rows over a whole stream of volumes (bottom-k sampling, Cohen &
    Kaplan, PODC 2007; a reservoir sample in the sense of Vitter, ACM TOMS 1985).

    Every voxel row offered to :meth:`add` draws an independent key ``u ~ Uniform(0, 1)`` from a seeded
    generator; the reservoir holds the ``capacity`` rows with the smallest keys seen so far. The held rows are
    therefore a uniform random subset (without replacement) of all rows offered, of size ``min(capacity,
    rows offered)``, whatever the number and sizes of the volumes, and the same seed with the same volumes in
    the same order holds the same rows. Memory: the held rows (``z`` float32, ``y`` uint8 for hard targets:
    about ``5·C`` bytes per row, plus an 8-byte key) and the candidates of one volume; it never grows with the
    number of volumes. While fewer than ``capacity`` rows have been offered every row is held, in arrival order.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"max_voxels must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(int(seed))
        self.seen = 0  #: rows offered so far
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (keys, z, y) while filling
        self._held = 0

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Offer voxel rows ``z (N, C)`` and their targets ``y (N, C)`` (held on the host, whatever their device)."""
        z, y = z.detach().cpu(), y.detach().cpu()
        n = z.shape[0]
        self.seen += n
        keys = torch.rand(n, generator=self.generator, dtype=torch.float64, device="cpu")
        if self._held < self.capacity:  # filling: hold everything, merge once the capacity is reached
            self._parts.append((keys, z, y))
            self._held += n
            if self._held >= self.capacity:
                self._compact()
            return
        held_keys, hz, hy = self._parts[0]
        keep = keys < held_keys.max()  # only keys below the largest held key can enter
        if not bool(keep.any()):
            return
        keys, z, y = keys[keep], z[keep], y[keep]
        # the capacity smallest of (held, new) keys; the new rows that make it replace the held rows that do not
        chosen = torch.topk(torch.cat([held_keys, keys]), self.capacity, largest=False, sorted=False).indices
        incoming = chosen[chosen >= self.capacity] - self.capacity
        stays = torch.zeros(self.capacity, dtype=torch.bool, device="cpu")
        stays[chosen[chosen < self.capacity]] = True
        evicted = (~stays).nonzero().squeeze(1)
        if y.dtype != hy.dtype:
            hy = hy.to(torch.float32)
            self._parts[0] = (held_keys, hz, hy)
        held_keys[evicted] = keys[incoming]
        hz[evicted] = z[incoming]
        hy[evicted] = y[incoming].to(hy.dtype)

    def _compact(self) -> None:
        keys = torch.cat([k for k, _, _ in self._parts])
        z = torch.cat([v for _, v, _ in self._parts])
        ys = [t for _, _, t in self._parts]
        dtype = ys[0].dtype if all(t.dtype == ys[0].dtype for t in ys) else torch.float32
        y = torch.cat([t.to(dtype) for t in ys])
        self._parts = []
        if keys.numel() > self.capacity:
            idx = torch.topk(keys, self.capacity, largest=False, sorted=False).indices.sort().values
            keys, z, y = keys[idx], z[idx], y[idx]
        self._parts = [(keys, z.contiguous(), y.contiguous())]
        self._held = keys.numel()

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held ``(z (n, C), y (n, C))`` rows (empty ``(0, 0)`` tensors before any row was offered)."""
        if not self._parts:
            return torch.zeros(0, 0, device="cpu"), torch.zeros(0, 0, dtype=torch.uint8, device="cpu")
        if len(self._parts) > 1:
            self._compact()
        return self._parts[0][1], self._parts[0][2]

    def __len__(self) -> int:
        return self._held


class TargetTally:
    """Per-class target mass of the voxels a calibrator is fitted on (inside the masks), summed volume by
    volume: enough to tell whether the targets hold more than one class."""

    def __init__(self) -> None:
        self.positive: torch.Tensor | None = None  # (C,) float64: Σ y per class
        self.voxels = 0.0

    def add(self, onehot: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add targets ``(B, C, *S)`` (the voxels inside ``mask`` ``(B, *S)``) or voxel rows ``(N, C)``."""
        y = onehot.detach()
        if mask is not None:
            m = mask.unsqueeze(1)
            y = y * m.to(y.dtype)
            self.voxels += float(mask.sum())
        else:
            self.voxels += float(y.numel() // max(y.shape[1], 1))
        positive = y.sum([d for d in range(y.ndim) if d != 1], dtype=torch.float64).cpu()
        self.positive = positive if self.positive is None else self.positive + positive

    def single_class(self, mode: Mode) -> bool:
        """Exclusive: fewer than two classes have any target mass; multilabel: no channel has both positive and
        negative mass."""
        if self.positive is None:
            return False
        present = self.positive > 0
        if mode == "exclusive":
            return int(present.sum()) < 2
        return not bool((present & (self.positive < self.voxels)).any())


class Calibrator:
    """Base class: scikit-learn-like ``fit`` / ``transform``; learned attributes end with ``_``.

    Subclasses set ``method`` and implement ``_fit``, ``_transform``, ``_config`` and ``_state`` /
    ``_set_state``.
    """

    method: ClassVar[str] = ""
    #: what ``fit`` learns, in words (for the warnings of :meth:`_check_fit`)
    fitted_what: ClassVar[str] = "calibration map"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            _REGISTRY[cls.method] = cls

    def __init__(self, *, mode: Mode = "exclusive") -> None:
        self.mode = mode

    # ----------------------------------------------------------------------------------------- public API
    def fit(self, data: Any, targets: Any = None, mask: Any = None) -> Calibrator:
        """Learn the calibration map from validation logits; returns ``self``. A fit on single-class targets
        warns, a diverged fit raises ``ValueError`` (:meth:`_check_fit`)."""
        self.mode = check_mode(self.mode)
        tally = self._fit(data, targets, mask)
        self._check_fit(tally)
        return self

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities ``(B, C, *spatial)`` from logits ``(B, C, *spatial)``."""
        self._check_fitted()
        check_prediction(logits, "logits")
        if logits.shape[1] != self.num_classes_:
            raise ValueError(
                f"logits have {logits.shape[1]} classes but the calibrator was fitted on {self.num_classes_}"
            )
        with torch.no_grad():
            z = self._transform(logits.float())
        return torch.softmax(z, 1) if self.mode == "exclusive" else torch.sigmoid(z)

    def fit_transform(self, data: Any, targets: Any = None) -> torch.Tensor:
        if not isinstance(data, torch.Tensor):
            raise TypeError("fit_transform needs a logits tensor")
        return self.fit(data, targets).transform(data)

    def save(self, path: str | Path) -> None:
        """Write the fitted calibrator to ``path`` (torch file of tensors + JSON config, no pickled
        objects)."""
        self._check_fitted()
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "config": json.dumps(self._config()),
            "state": {k: v.detach().cpu().contiguous() for k, v in self._state().items()},
        }
        write_torch_file(path, payload)

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> Calibrator:
        """Read a calibrator written by :meth:`save`; raises ``ValueError`` for a file of another method."""
        payload = _read_payload(path)
        if cls.method and payload["method"] != cls.method:
            other = _REGISTRY.get(payload["method"])
            raise ValueError(
                f"{path}: file was saved by {other.__name__ if other else '?'} "
                f"(method {payload['method']!r}), "
                f"not {cls.__name__} (method {cls.method!r}); "
                "use segcal.posthoc.load_calibrator to load any method"
            )
        target_cls = cls if cls.method else _REGISTRY[payload["method"]]
        config = json.loads(payload["config"])
        config.update(kwargs)
        obj = target_cls._from_config(config)
        obj._set_state(payload["state"])
        return obj

    # ----------------------------------------------------------------------------------------- internals
    @classmethod
    def _from_config(cls, config: dict[str, Any]) -> Calibrator:
        """The calibrator of a saved configuration: its options, then the learned attributes (names ending in
        ``_``, e.g. ``num_classes_``, the ``spatial_dims_`` of the conv calibrators)."""
        learned = {k: config.pop(k) for k in [k for k in config if k.endswith("_")]}
        obj = cls(**config)
        for name, value in learned.items():
            setattr(obj, name, value)
        return obj

    def _check_fitted(self) -> None:
        if not hasattr(self, "num_classes_"):
            raise NotFittedError(
                f"{type(self).__name__} is not fitted yet: call fit(...) before transform/save"
            )

    def _fit(self, data: Any, targets: Any, mask: Any) -> TargetTally:  # pragma: no cover - abstract
        """Fit and return the tally of the fitting targets."""
        raise NotImplementedError

    def _diverged(self) -> list[str]:
        """Names of fitted parameters that show a diverged fit: here the non-finite state tensors."""
        return [k for k, v in self._state().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]

    def _check_fit(self, tally: TargetTally) -> None:
        """Rules after a fit: diverged parameters (:meth:`_diverged`) raise ``ValueError`` and leave the
        calibrator unfitted; targets holding a single class give a ``UserWarning`` (:data:`DEGENERATE_TARGETS`)."""
        bad = self._diverged()
        if bad:
            self.__dict__.pop("num_classes_", None)
            raise ValueError(
                f"{type(self).__name__}: the fit diverged (non-finite or out-of-range {', '.join(bad)}); check that "
                "the fitting logits are finite and the targets hold more than one class"
            )
        if tally.single_class(self.mode):
            name = type(self).__name__
            warnings.warn(f"{name}: {DEGENERATE_TARGETS.format(what=self.fitted_what)}", UserWarning, stacklevel=3)

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        return {"mode": self.mode, "num_classes_": self.num_classes_}

    def _state(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_state(self, state: dict[str, torch.Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        fitted = "fitted" if hasattr(self, "num_classes_") else "not fitted"
        return f"{type(self).__name__}(mode={self.mode!r}, {fitted})"


def _read_payload(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    payload = read_torch_file(path, "calibrator file")
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a segcal calibrator file (missing format tag {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported calibrator file version {payload.get('version')}")
    if payload.get("method") not in _REGISTRY:
        raise ValueError(f"{path}: unknown calibration method {payload.get('method')!r}")
    return payload


def load_calibrator(path: str | Path, **kwargs: Any) -> Calibrator:
    """Load any calibrator saved with :meth:`Calibrator.save` (the method is read from the file)."""
    payload = _read_payload(path)
    return _REGISTRY[payload["method"]].load(path, **kwargs)

