"""Voxel-wise scaling calibrators fitted by full-batch L-BFGS on the NLL.

References (docs/references.md): Rousseau et al., ISBI 2021, §2.2 (Platt / vector scaling for segmentation);
Guo et al., ICML 2017 (temperature and matrix scaling); Platt 1999; Kull et al., NeurIPS 2019 (Dirichlet
calibration, ODIR regularisation).

* :class:`TemperatureScaling` — ``q = softmax(z / T)`` (one scalar ``T > 0``, fitted as ``log T``);
* :class:`VectorScaling` — ``q = softmax(w ⊙ z + b)`` with per-class ``w, b`` (a diagonal 1×1 convolution);
  with one sigmoid channel (``mode="multilabel"``, ``C = 1``) this is Platt scaling with 2 parameters;
* :class:`MatrixScaling` — ``q = softmax(W z + b)`` with a full ``C × C`` matrix (exclusive mode only);
* :class:`DirichletScaling` — ``q = softmax(W log p + b)``, ``log p = log_softmax(z)`` (exclusive mode only).

Shapes: logits ``(B, C, *spatial)``; the maps act on the class axis of every voxel. Multilabel outputs use
``sigmoid`` and the mean binary cross-entropy.

Fitting streams: each L-BFGS closure loops over voxel chunks and accumulates the loss gradient with
``backward`` per chunk, so memory is bounded by one chunk plus the held voxels, never by the number of volumes.
Which voxels the closures loop over:

* ``max_voxels=None`` with a re-iterable source (a tensor, a list or a factory callable): every voxel, exactly;
  the source is re-read in every closure (a tensor one batch item at a time), nothing is held;
* ``max_voxels=n``: a :class:`~segcal.posthoc._base.VoxelReservoir` of ``n`` voxels, a seeded uniform sample
  over the whole dataset taken in one pass (bottom-k sampling, Cohen & Kaplan, PODC 2007);
* a one-shot generator without ``max_voxels``: the reservoir with ``DEFAULT_MAX_VOXELS`` (2²¹), so every voxel
  while the data hold fewer;
* ``max_voxels_per_volume=m``: ``m`` random voxels of each volume, then the reservoir (``max_voxels``, default
  ``DEFAULT_MAX_VOXELS``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from segcal.functional.inputs import as_tensor
from segcal.posthoc._base import (
    DEFAULT_MAX_VOXELS,
    Calibrator,
    TargetTally,
    VoxelReservoir,
    flatten_voxels,
    is_reiterable,
    iter_volumes,
    validate_volume,
)

__all__ = ["DirichletScaling", "MatrixScaling", "TemperatureScaling", "VectorScaling"]


class _VoxelScaling(Calibrator):
    def __init__(
        self,
        mode: str = "exclusive",
        max_voxels_per_volume: int | None = None,
        seed: int = 0,
        max_iter: int = 50,
        chunk_size: int = 1 << 18,
        max_voxels: int | None = None,
    ) -> None:
        super().__init__(mode=mode)  # type: ignore[arg-type]
        self.max_voxels_per_volume = max_voxels_per_volume
        self.seed = seed
        self.max_iter = max_iter
        self.chunk_size = chunk_size
        self.max_voxels = max_voxels

    # --- parameters, to be provided by subclasses
    def _init_params(self, num_classes: int) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self, z: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _store(self, params: list[torch.Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _penalty(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """Regularisation added to the mean NLL (none here)."""
        return None

    # --- fitting
    def _chunks(self, rows: tuple[torch.Tensor, torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        z, y = rows
        for s in range(0, z.shape[0], self.chunk_size):
            yield z[s : s + self.chunk_size], y[s : s + self.chunk_size]

    def _check_sizes(self) -> None:
        for name in ("max_voxels_per_volume", "max_voxels"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")

    def _exact(self, data: Any) -> bool:
        """Fit on every voxel, streamed in each closure (no subsample asked, and the data can be re-read)."""
        no_subsample = self.max_voxels is None and self.max_voxels_per_volume is None
        return no_subsample and (isinstance(data, torch.Tensor) or is_reiterable(data))

    def _voxel_source(
        self, data: Any, targets: Any, mask: Any, tally: TargetTally
    ) -> tuple[int, int, torch.device, Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]]:
        """One validating pass over the volumes: ``(num_classes, n_voxels, device, source)`` (``device``: the
        first volume's logits', where the parameters are fitted), where ``source()`` yields
        the ``(logits, target)`` voxel rows in chunks: a fresh pass over the input (exact fit, nothing held) or
        the rows of the voxel reservoir. The fitted target rows go into ``tally``."""
        exact = self._exact(data)
        gen = torch.Generator().manual_seed(int(self.seed))
        reservoir = None if exact else VoxelReservoir(self.max_voxels or DEFAULT_MAX_VOXELS, int(self.seed) + 1)
        num_classes: int | None = None
        device: torch.device | None = None
        n_total = 0
        for i, (lg, tg, mk) in enumerate(iter_volumes(data, targets, mask)):
            lg, y, mk = validate_volume(lg, tg, mk, self.mode, num_classes, i)
            device = device or lg.device
            num_classes = lg.shape[1]
            if reservoir is None:
                tally.add(y, mk)
                n_total += int(mk.sum()) if mk is not None else y.numel() // num_classes
            else:
                rows = flatten_voxels(lg, y, mk, self.max_voxels_per_volume, gen)
                tally.add(rows[1])
                reservoir.add(*rows)
        if num_classes is None or device is None:
            raise ValueError("fit received no volumes")
        if reservoir is not None:
            n_total = len(reservoir)
        if n_total == 0:
            raise ValueError("fit received no voxels (empty masks?)")
        c = num_classes

        def volumes() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
            if isinstance(data, torch.Tensor):  # one batch item at a time: no copy of the whole tensor
                t = as_tensor(targets)
                m = None if mask is None else as_tensor(mask)
                for b in range(data.shape[0]):
                    yield data[b : b + 1], t[b : b + 1], None if m is None else m[b : b + 1]
            else:
                yield from iter_volumes(data, targets, mask)

        def source() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            if reservoir is not None:
                yield from self._chunks(reservoir.rows())
                return
            for i, (lg, tg, mk) in enumerate(volumes()):
                lg, y, mk = validate_volume(lg, tg, mk, self.mode, c, i)
                yield from self._chunks(flatten_voxels(lg, y, mk, None, None))

        return num_classes, n_total, device, source

    def _fit(self, data: Any, targets: Any, mask: Any) -> TargetTally:
        self._check_sizes()
        tally = TargetTally()
        num_classes, n_total, dev, source = self._voxel_source(data, targets, mask, tally)
        params = [p.to(dev).requires_grad_(True) for p in self._init_params(num_classes)]
        opt = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=self.max_iter,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-7,
            tolerance_change=1e-10,
            history_size=20,
        )
        denom = float(n_total * (num_classes if self.mode == "multilabel" else 1))

        def closure() -> torch.Tensor:
            opt.zero_grad()
            total = torch.zeros((), dtype=torch.float64, device=dev)
            for z, y in source():
                zz = self._apply(z.to(dev, torch.float64), params)
                y = y.to(dev, torch.float64)
                if self.mode == "exclusive":
                    loss = -(y * torch.log_softmax(zz, 1)).sum()
                else:
                    loss = F.binary_cross_entropy_with_logits(zz, y, reduction="sum")
                loss = loss / denom
                loss.backward()
                total += loss.detach()
            penalty = self._penalty(params)
            if penalty is not None:
                penalty.backward()
                total += penalty.detach()
            return total

        opt.step(closure)
        self.num_classes_ = num_classes
        self.n_voxels_ = n_total
        self._store([p.detach().cpu() for p in params])  # learned attributes live on the host
        return tally

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "max_voxels_per_volume": self.max_voxels_per_volume,
            "seed": self.seed,
            "max_voxels": self.max_voxels,
        }


class TemperatureScaling(_VoxelScaling):
    """One temperature ``T``: ``q = softmax(z / T)`` (or ``sigmoid(z / T)``), fitted by minimising the NLL.

    Args:
        mode: ``"exclusive"`` (softmax, CE) or ``"multilabel"`` (sigmoid, BCE).
        max_voxels_per_volume: seeded random subsample of voxels per volume before the reservoir (``None`` =
            all).
        seed: seed of the subsampling.
        max_iter: L-BFGS iterations.
        chunk_size: voxels per chunk in each closure.
        max_voxels: size of the voxel reservoir, a uniform sample over all volumes (``None``: every voxel,
            streamed, for re-iterable sources; see the module docstring).

    Learned attributes: ``temperature_`` (float), ``num_classes_``, ``n_voxels_``.

    Example:
        >>> ts = TemperatureScaling().fit(val_logits, val_labels)   # (B, C, H, W), (B, H, W)
        >>> probs = ts.transform(test_logits)
    """

    method = "temperature"
    fitted_what = "temperature"

    def _init_params(self, num_classes: int) -> list[torch.Tensor]:
        return [torch.zeros((), dtype=torch.float64, device="cpu")]

    def _apply(self, z: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        return z * torch.exp(-params[0])

    def _store(self, params: list[torch.Tensor]) -> None:
        self.temperature_ = float(torch.exp(params[0]))

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature_

    def _diverged(self) -> list[str]:
        """The temperature must be finite and positive (``exp`` of the fitted ``log T`` can overflow or
        underflow)."""
        return [] if math.isfinite(self.temperature_) and self.temperature_ > 0 else ["temperature"]

    def _state(self) -> dict[str, torch.Tensor]:
        return {"temperature": torch.tensor(self.temperature_, dtype=torch.float64, device="cpu")}

    def _set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.temperature_ = float(state["temperature"])



class VectorScaling(_VoxelScaling):
    """Per-class scale and bias: ``q = softmax(w ⊙ z + b)`` — a diagonal 1×1 convolution on the logits.

    With ``mode="multilabel"`` and one channel this is binary Platt scaling (2 parameters).

    Learned attributes: ``scale_`` ``(C,)``, ``bias_`` ``(C,)`` (float64). In exclusive mode the bias is only
    defined up to a constant added to every class; ``bias_`` is returned centred (mean zero) without changing
    ``q``.
    """

    method = "vector"
    fitted_what = "vector scaling"

    def _init_params(self, num_classes: int) -> list[torch.Tensor]:
        return [
            torch.ones(num_classes, dtype=torch.float64, device="cpu"),
            torch.zeros(num_classes, dtype=torch.float64, device="cpu"),
        ]

    def _apply(self, z: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        return z * params[0] + params[1]

    def _store(self, params: list[torch.Tensor]) -> None:
        self.scale_ = params[0].clone()
        b = params[1].clone()
        self.bias_ = b - b.mean() if self.mode == "exclusive" else b

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (logits.ndim - 2)
        scale, bias = (t.to(logits.device, torch.float32).view(shape) for t in (self.scale_, self.bias_))
        return logits * scale + bias

    def _state(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale_, "bias": self.bias_}

    def _set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.scale_ = state["scale"].to(torch.float64)
        self.bias_ = state["bias"].to(torch.float64)



REGULARIZATIONS = ("odir", "l2")


class MatrixScaling(_VoxelScaling):
    """Full affine map of the logits: ``q = softmax(W z + b)`` with a ``C × C`` matrix ``W`` and a bias ``b``
    (a full 1×1 convolution; Guo et al., ICML 2017, matrix scaling), fitted by minimising the mean NLL plus a
    regulariser of Kull et al., NeurIPS 2019 (Dirichlet calibration):

    * ``regularization="odir"`` (off-diagonal and intercept regularisation, ODIR):
      ``λ · Σ_{i≠j} W_ij² / (C(C − 1)) + μ · Σ_j b_j² / C`` — the diagonal is free, class mixing and bias are
      pulled to zero;
    * ``regularization="l2"``: ``λ · Σ_ij W_ij² / C² + μ · Σ_j b_j² / C`` (every weight pulled to zero).

    With ``reg_lambda = reg_mu = 0`` (default) the fit is unregularised. The penalty is added to the mean NLL
    over the fitted voxels, so ``λ`` and ``μ`` do not depend on the number of voxels.

    Exclusive (softmax) mode only: with sigmoid channels (``mode="multilabel"``) the classes are not one
    distribution and the construction refuses with ``ValueError``; use :class:`VectorScaling` (Platt scaling per
    channel) there.

    Args:
        mode: ``"exclusive"``.
        max_voxels_per_volume, seed, max_iter, chunk_size, max_voxels: as for :class:`TemperatureScaling`.
        regularization: ``"odir"`` or ``"l2"``.
        reg_lambda: ``λ ≥ 0``, weight of the matrix penalty.
        reg_mu: ``μ ≥ 0``, weight of the bias penalty.

    Learned attributes: ``weight_`` ``(C, C)`` and ``bias_`` ``(C,)`` (float64), ``num_classes_``,
    ``n_voxels_``. ``W`` starts as the identity and ``b`` at zero (the identity map). ``W`` and ``b`` are only
    defined up to a constant added to every class (a row vector added to every row of ``W``, a constant added to
    ``b``); the fit moves only along the directions the NLL sees, and ``bias_`` is returned centred (mean zero)
    without changing ``q``.
    """

    method = "matrix"
    fitted_what = "matrix scaling"

    def __init__(
        self,
        mode: str = "exclusive",
        max_voxels_per_volume: int | None = None,
        seed: int = 0,
        max_iter: int = 100,
        chunk_size: int = 1 << 18,
        max_voxels: int | None = None,
        regularization: str = "odir",
        reg_lambda: float = 0.0,
        reg_mu: float = 0.0,
    ) -> None:
        if mode != "exclusive":
            raise ValueError(
                f"{type(self).__name__} supports mode='exclusive' (softmax) only, got mode={mode!r}; for sigmoid "
                "channels use VectorScaling(mode='multilabel') (Platt scaling per channel)"
            )
        if regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization must be one of {REGULARIZATIONS}, got {regularization!r}")
        for name, v in (("reg_lambda", reg_lambda), ("reg_mu", reg_mu)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        super().__init__(mode, max_voxels_per_volume, seed, max_iter, chunk_size, max_voxels)
        self.regularization = regularization
        self.reg_lambda = float(reg_lambda)
        self.reg_mu = float(reg_mu)

    def _features(self, z: torch.Tensor) -> torch.Tensor:
        """What ``W`` multiplies, ``(N, C)`` or ``(B, C, *S)``: the logits themselves."""
        return z

    def _init_params(self, num_classes: int) -> list[torch.Tensor]:
        return [
            torch.eye(num_classes, dtype=torch.float64, device="cpu"),
            torch.zeros(num_classes, dtype=torch.float64, device="cpu"),
        ]

    def _apply(self, z: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        return self._features(z) @ params[0].T + params[1]

    def _penalty(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        w, b = params
        c = w.shape[0]
        out = self.reg_mu * b.square().sum() / c
        if self.regularization == "odir":
            off = w.square().sum() - w.diagonal().square().sum()
            out = out + (self.reg_lambda * off / (c * (c - 1)) if c > 1 else 0.0)
        else:
            out = out + self.reg_lambda * w.square().sum() / c**2
        return out if (self.reg_lambda > 0 or self.reg_mu > 0) else None

    def _check_fit_mode(self) -> None:
        if self.mode != "exclusive":
            raise ValueError(f"{type(self).__name__} supports mode='exclusive' (softmax) only, got {self.mode!r}")

    def _fit(self, data: Any, targets: Any, mask: Any) -> TargetTally:
        self._check_fit_mode()
        return super()._fit(data, targets, mask)

    def _store(self, params: list[torch.Tensor]) -> None:
        self.weight_ = params[0].clone()
        self.bias_ = params[1] - params[1].mean()

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        f = self._features(logits).movedim(1, -1)
        out = f @ self.weight_.to(f.device, f.dtype).T + self.bias_.to(f.device, f.dtype)
        return out.movedim(-1, 1)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight_, "bias": self.bias_}

    def _set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.weight_ = state["weight"].to(torch.float64)
        self.bias_ = state["bias"].to(torch.float64)
        c = self.num_classes_
        if tuple(self.weight_.shape) != (c, c) or tuple(self.bias_.shape) != (c,):
            raise ValueError(
                f"{type(self).__name__}: stored weight {tuple(self.weight_.shape)} / bias "
                f"{tuple(self.bias_.shape)} do not match {c} classes"
            )

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "regularization": self.regularization,
            "reg_lambda": self.reg_lambda,
            "reg_mu": self.reg_mu,
        }


class DirichletScaling(MatrixScaling):
    """Dirichlet calibration (Kull et al., NeurIPS 2019): ``q = softmax(W log p + b)`` with ``p = softmax(z)``,
    i.e. matrix scaling of the log-probabilities (``log p = log_softmax(z)``, computed from the logits without
    clipping). Regularisation (``"odir"``, ``"l2"``, ``reg_lambda``, ``reg_mu``), exclusive-mode restriction,
    streaming and attributes as for :class:`MatrixScaling`.

    Matrix scaling and Dirichlet calibration differ unless the rows of ``W`` have equal sums: ``W log p =
    W z − logsumexp(z) · W 1``, so Dirichlet calibration is invariant to adding a constant to every logit (it sees
    only ``p``), matrix scaling is not.
    """

    method = "dirichlet"
    fitted_what = "Dirichlet calibration map"

    def _features(self, z: torch.Tensor) -> torch.Tensor:
        """``log p = log_softmax(z)`` over the class axis (axis 1 of ``(N, C)`` rows or ``(B, C, *S)`` maps)."""
        return torch.log_softmax(z, 1)
