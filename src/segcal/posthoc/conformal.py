"""Conformal risk control of the false-negative rate (:class:`ConformalRiskControl`), fitted on calibration
volumes streamed one at a time; the formulas are in :mod:`segcal.functional.conformal`.

Reference: Angelopoulos et al., "Conformal Risk Control", ICLR 2024 (docs/references.md), Theorem 1.

The calibrator keeps, per calibration case and channel, only the histogram of the grid bins ``⌊p K⌋`` of the
ground-truth voxels (at most ``K + 1`` pairs, whatever the volume size); the volumes themselves are dropped as
soon as they are read. ``save`` / ``load`` / :func:`segcal.posthoc.load_calibrator` work as for every other
calibrator (method ``"crc"``).

The folder readers at the end (:class:`ConformalVolumes`, :func:`read_probability_file`) read prediction folders
under the prediction-file contract (:mod:`segcal.io.predictions`): probabilities are used as stored, logits go
through softmax (exclusive) or sigmoid (multilabel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from segcal.functional.conformal import (
    DEFAULT_RESOLUTION,
    AbsentRule,
    FNRStatistics,
    binary_targets,
    check_alpha,
    crc_fdr_threshold,
    crc_threshold,
    false_discovery_rate,
    false_negative_rate,
    fdr_loss_curves,
    fdr_statistics,
    fnr_statistics,
    threshold_masks,
)
from segcal.functional.inputs import Activation, Mode, as_tensor, check_mode, check_target, to_probabilities
from segcal.io import CaseFiles, FolderFormat, KindOption, Prediction, read_prediction
from segcal.posthoc._base import Calibrator, TargetTally, Volume, _as_volume, iter_volumes
from segcal.posthoc.folders import _target, check_prediction_values

#: the loss a :class:`ConformalRiskControl` controls
Loss = Literal["fnr", "fdr"]

__all__ = [
    "ConformalReport",
    "ConformalRiskControl",
    "ConformalVolumes",
    "read_probability_file",
]


@dataclass(frozen=True)
class ConformalReport:
    """Empirical risk of the conformal masks on labelled cases (:meth:`ConformalRiskControl.report`).

    Attributes:
        channels: the calibrated channel indices of the prediction.
        loss: ``"fnr"`` or ``"fdr"``, the controlled loss.
        alpha, thresholds: the target risk and the mask threshold per channel (mask ``p ≥ threshold``).
        risk: ``(n, K)`` float64 per-case loss (NaN where the structure is absent and ``absent="skip"``).
        present: ``(n, K)`` bool, the structure is present in the case.
        mask_fraction: ``(n, K)`` float64, share of the case's voxels inside the mask.
        absent: the rule for cases without the structure.
    """

    channels: tuple[int, ...]
    loss: Loss
    alpha: float
    thresholds: torch.Tensor
    risk: torch.Tensor
    present: torch.Tensor
    mask_fraction: torch.Tensor
    absent: AbsentRule

    def mean_risk(self) -> torch.Tensor:
        """``(K,)`` the empirical risk: mean loss over the counted cases (all, or those with the structure)."""
        return torch.nanmean(self.risk, 0)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per channel: channel, loss, mask threshold, alpha, cases counted, cases with the structure,
        mean loss, mean loss over cases with the structure, mean mask fraction."""
        out = []
        mean = self.mean_risk()
        for j, ch in enumerate(self.channels):
            pres = self.present[:, j]
            out.append({
                "channel": ch,
                "loss": self.loss,
                "threshold": float(self.thresholds[j]),
                "alpha": self.alpha,
                "cases": int((~torch.isnan(self.risk[:, j])).sum()),
                "cases_with_structure": int(pres.sum()),
                "mean_risk": float(mean[j]),
                "mean_risk_with_structure": float(self.risk[pres, j].mean()) if bool(pres.any()) else float("nan"),
                "mean_mask_fraction": float(self.mask_fraction[:, j].mean()),
            })
        return out


def _volumes(data: Any, targets: Any) -> Iterator[Volume]:
    """:func:`segcal.posthoc._base.iter_volumes`, refusing the one ambiguous volume: a 4-D prediction with a
    target of the same shape reads as a 3-D volume ``(C, H, W, D)`` with a multi-hot target *or* as a 2-D batch
    ``(B, C, H, W)`` with one-hot targets; guessing would give a silently wrong threshold."""
    if isinstance(data, torch.Tensor) or targets is not None:
        yield from iter_volumes(data, targets)
        return
    source = data() if callable(data) else data
    for i, item in enumerate(source):
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            pred, target = as_tensor(item[0]), as_tensor(item[1])
            if pred.ndim == 4 and tuple(target.shape) == tuple(pred.shape):
                raise ValueError(
                    f"volume {i}: a 4-D prediction {tuple(pred.shape)} with a target of the same shape is ambiguous "
                    "(one 3-D volume (C, H, W, D) with a multi-hot target, or a 2-D batch (B, C, H, W) with one-hot "
                    "targets): give the batch axis, (1, C, H, W, D) or (B, C, H, W)"
                )
        yield _as_volume(item, i)


def _where(data: Any, i: int) -> str:
    """How a message names volume ``i``: its index, and its file when ``data`` knows it."""
    name = data.describe(i) if isinstance(data, ConformalVolumes) else None
    return f"volume {i}" + (f" ({name})" if name else "")


class ConformalRiskControl(Calibrator):
    """Per-channel masks ``p_c ≥ t̂_c`` whose expected false-negative rate (``loss="fnr"``, ``t̂ = 1 − λ̂``) or
    false-discovery rate (``loss="fdr"``) is at most ``alpha`` (CRC Theorem 1; :mod:`segcal.functional.conformal`).

    Args:
        alpha: target risk in (0, 1).
        mode: ``"exclusive"`` (softmax classes) or ``"multilabel"`` (sigmoid region channels, may overlap).
        activation: what ``fit`` / ``transform`` receive: ``None`` probabilities, ``"softmax"`` or
            ``"sigmoid"`` logits.
        include_background: exclusive mode: also calibrate channel 0 (default: foreground classes only);
            multilabel mode: every channel is calibrated.
        absent: ``"zero"`` (a case without the structure counts: FNR 0; FDR as it is, any voxel of its mask
            being a false discovery) or ``"skip"`` (left out).
        resolution: grid ``K`` of the parameter (a power of two).
        loss: ``"fnr"`` (streams per-case histograms) or ``"fdr"`` (streams the sum of the monotone FDR curves,
            :func:`segcal.functional.conformal.fdr_loss_curves`).

    Learned attributes: ``thresholds_`` ``(K,)`` float64 (the mask is ``p ≥ threshold``; FDR: ``1 + 1/K`` is the
    empty mask), ``lambdas_`` (the parameter the bound is taken over), ``channels_`` (calibrated channels),
    ``n_cases_``, ``n_`` (cases per channel that the bound counts), ``achievable_``, ``calibration_risk_``,
    ``num_classes_``.

    Example:
        >>> crc = ConformalRiskControl(alpha=0.1).fit(cal_probs, cal_labels)   # (B, C, *S), (B, *S)
        >>> masks = crc.predict_masks(test_probs)                              # (B, C - 1, *S) bool
    """

    method = "crc"
    fitted_what = "conformal threshold"

    def __init__(
        self,
        alpha: float = 0.1,
        *,
        mode: Mode = "exclusive",
        activation: Activation = None,
        include_background: bool = False,
        absent: AbsentRule = "zero",
        resolution: int = DEFAULT_RESOLUTION,
        loss: Loss = "fnr",
    ) -> None:
        super().__init__(mode=mode)
        self.alpha = alpha
        self.loss = loss
        self.activation = activation
        self.include_background = include_background
        self.absent = absent
        self.resolution = resolution

    # ------------------------------------------------------------------------------------------- helpers
    def _channels(self, num_classes: int) -> list[int]:
        if self.mode == "multilabel" or self.include_background:
            return list(range(num_classes))
        if num_classes < 2:
            raise ValueError("exclusive mode without background needs at least 2 classes (set include_background)")
        return list(range(1, num_classes))

    def _selected(self, pred: torch.Tensor, target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Probabilities of the calibrated channels ``(B, K, *S)`` and their binary targets (multi-hot)."""
        p = to_probabilities(pred, self.activation, self.mode, name="probabilities")
        channels = self._channels(p.shape[1])
        y = None
        if target is not None:
            check_target(target, p.shape, self.mode)
            y = binary_targets(target, p.shape[1], p.shape[2:], channels)
        return p[:, channels], y

    def _names(self) -> list[str]:
        return [f"channel {c}" for c in self.channels_]

    # ------------------------------------------------------------------------------------------- fitting
    def _stream(self, data: Any, targets: Any, step: Callable[[torch.Tensor, torch.Tensor], None]) -> int:
        """Call ``step(probabilities (B, K, *S), targets (B, K, *S) bool)`` for each calibration volume (tensor or
        iterable, as :meth:`fit`), read one at a time; returns the number of classes. Errors name the volume."""
        num_classes: int | None = None
        for i, (pred, target, mask) in enumerate(_volumes(data, targets)):
            if mask is not None:
                raise ValueError(f"volume {i}: ConformalRiskControl takes (probabilities, target) volumes, no mask")
            try:
                if num_classes is not None and pred.ndim >= 2 and pred.shape[1] != num_classes:
                    raise ValueError(f"has {pred.shape[1]} channels but the first volume has {num_classes}")
                p, y = self._selected(pred, target)
                num_classes = int(pred.shape[1])
                assert y is not None
                step(p, y)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{_where(data, i)}: {exc}") from None
        if num_classes is None:
            raise ValueError("fit received no volumes")
        return num_classes

    def statistics(self, data: Any, targets: Any = None) -> tuple[int, FNRStatistics]:
        """``(num_classes, FNRStatistics)`` of the calibrated channels of calibration volumes (tensor or iterable,
        as :meth:`fit`), read one at a time."""
        parts: list[FNRStatistics] = []
        k = self.resolution
        num_classes = self._stream(
            data, targets, lambda p, y: parts.append(fnr_statistics(p, y, mode="multilabel", resolution=k))
        )
        return num_classes, FNRStatistics.concat(parts)

    def fdr_sums(self, data: Any, targets: Any = None) -> tuple[int, torch.Tensor, torch.Tensor]:
        """``(num_classes, Σ_i monotone FDR curve (K, R + 2), n (K,))`` over calibration volumes read one at a
        time (:func:`segcal.functional.conformal.fdr_loss_curves`; only the running sum is kept). With
        ``absent="skip"`` cases without the structure are left out."""
        acc: dict[str, torch.Tensor] = {}

        def step(p: torch.Tensor, y: torch.Tensor) -> None:
            curves = fdr_loss_curves(fdr_statistics(p, y, mode="multilabel", resolution=self.resolution))
            keep = y.flatten(2).any(-1) if self.absent == "skip" else torch.ones(y.shape[:2], dtype=torch.bool)
            total = (curves * keep.unsqueeze(-1)).sum(0)
            acc["sum"] = total if "sum" not in acc else acc["sum"] + total
            acc["n"] = keep.sum(0) if "n" not in acc else acc["n"] + keep.sum(0)

        num_classes = self._stream(data, targets, step)
        return num_classes, acc["sum"], acc["n"]

    def _fit(self, data: Any, targets: Any, mask: Any) -> TargetTally:
        if mask is not None:
            raise ValueError("ConformalRiskControl.fit takes no mask")
        self.mode = check_mode(self.mode)
        alpha = check_alpha(self.alpha)
        if self.loss not in ("fnr", "fdr"):
            raise ValueError(f"loss must be 'fnr' or 'fdr', got {self.loss!r}")
        if self.absent not in ("zero", "skip"):
            raise ValueError(f"absent must be 'zero' or 'skip', got {self.absent!r}")
        if self.loss == "fnr":
            num_classes, stats = self.statistics(data, targets)
            self.channels_ = self._channels(num_classes)
            result = crc_threshold(stats, alpha, absent=self.absent, names=self._names())
            self.n_cases_ = stats.num_cases
        else:
            num_classes, total, n = self.fdr_sums(data, targets)
            self.channels_ = self._channels(num_classes)
            if bool((n == 0).any()):
                raise ValueError("no calibration case contains the structure of "
                                 f"{[self.channels_[j] for j in torch.nonzero(n == 0).flatten().tolist()]}")
            result = crc_fdr_threshold(total, n, alpha, names=self._names())
            self.n_cases_ = int(n.max())
        self.lambdas_ = result.lambdas
        self.thresholds_ = result.thresholds
        self.n_ = result.n
        self.achievable_ = result.achievable
        self.calibration_risk_ = result.calibration_risk
        self.num_classes_ = num_classes
        return TargetTally()  # absent structures are reported per channel by crc_threshold

    # ------------------------------------------------------------------------------------------- applying
    def transform(self, pred: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Conformal masks ``(B, K, *spatial)`` bool of the calibrated channels (``channels_``) from predictions
        ``(B, C, *spatial)`` (probabilities, or logits with ``activation``); channel masks may overlap."""
        self._check_fitted()
        if not isinstance(pred, torch.Tensor):
            raise TypeError(f"predictions must be a torch.Tensor, got {type(pred).__name__}")
        if pred.ndim >= 2 and pred.shape[1] != self.num_classes_:
            raise ValueError(
                f"predictions have {pred.shape[1]} channels but the calibrator was fitted on {self.num_classes_}"
            )
        p, _ = self._selected(pred, None)
        return threshold_masks(p, self.thresholds_, mode="multilabel")

    predict_masks = transform

    def report(self, data: Any, targets: Any = None) -> ConformalReport:
        """Per-case loss (FNR or FDR) and mask size of the conformal masks on labelled test volumes (tensor or
        iterable of ``(prediction, target)``, read one at a time): the empirical risk to compare with ``alpha``."""
        self._check_fitted()
        fnr, present, frac = [], [], []
        for i, (pred, target, _) in enumerate(_volumes(data, targets)):
            try:
                masks = self.transform(pred)
                _, y = self._selected(pred, target)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{_where(data, i)}: {exc}") from None
            assert y is not None
            pres = y.flatten(2).any(-1)
            if self.loss == "fnr":
                fnr.append(false_negative_rate(masks, y, mode="multilabel", absent=self.absent))
            else:
                risk = false_discovery_rate(masks, y, mode="multilabel")
                fnr.append(risk.masked_fill(~pres, float("nan")) if self.absent == "skip" else risk)
            present.append(pres)
            frac.append(masks.flatten(2).to(torch.float64).mean(-1))
        if not fnr:
            raise ValueError("report received no volumes")
        return ConformalReport(
            tuple(self.channels_), self.loss, float(self.alpha), self.thresholds_.clone(), torch.cat(fnr),
            torch.cat(present), torch.cat(frac), self.absent,
        )

    # ------------------------------------------------------------------------------------------- files
    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(), "alpha": float(self.alpha), "activation": self.activation,
            "include_background": bool(self.include_background), "absent": self.absent,
            "resolution": int(self.resolution), "loss": self.loss,
        }

    def _state(self) -> dict[str, torch.Tensor]:
        return {
            "lambdas": self.lambdas_, "thresholds": self.thresholds_,
            "channels": torch.tensor(self.channels_, dtype=torch.int64),
            "n": self.n_, "achievable": self.achievable_, "calibration_risk": self.calibration_risk_,
            "n_cases": torch.tensor(self.n_cases_, dtype=torch.int64),
        }

    def _set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.lambdas_ = state["lambdas"].to(torch.float64)
        self.thresholds_ = state["thresholds"].to(torch.float64)
        self.channels_ = [int(c) for c in state["channels"].tolist()]
        self.n_ = state["n"]
        self.achievable_ = state["achievable"].bool()
        self.calibration_risk_ = state["calibration_risk"].to(torch.float64)
        self.n_cases_ = int(state["n_cases"])
        in_range = bool(((self.thresholds_ >= 0) & (self.thresholds_ <= 2)).all())
        if len(self.channels_) != self.thresholds_.numel() or not in_range:
            raise ValueError("conformal calibrator file: thresholds must be one value in [0, 2] per channel")

    def __repr__(self) -> str:
        fitted = (f"thresholds={[round(float(v), 5) for v in self.thresholds_]}" if hasattr(self, "thresholds_")
                  else "not fitted")
        return f"ConformalRiskControl(alpha={self.alpha}, loss={self.loss!r}, mode={self.mode!r}, {fitted})"


# ----------------------------------------------------------------------------------------------- folders
def _to_probabilities(pred: Prediction, mode: Mode) -> np.ndarray:
    if pred.kind == "probabilities":
        return pred.values.astype(np.float32, copy=False)
    z = torch.from_numpy(np.ascontiguousarray(pred.values, dtype=np.float32))
    return (torch.softmax(z, 0) if mode == "exclusive" else torch.sigmoid(z)).numpy()


def read_probability_file(
    path: str | Path, fmt: FolderFormat, *, kind: KindOption = "auto", mode: Mode = "exclusive"
) -> tuple[np.ndarray, Prediction]:
    """``(probabilities (C, *S) float32, the file as read)`` of one prediction file: values checked against their
    declared kind (:func:`segcal.posthoc.folders.check_prediction_values`), logits turned into probabilities."""
    pred = read_prediction(path, fmt, kind=kind, prefer="probabilities")
    check_prediction_values(pred, path, mode)
    return _to_probabilities(pred, mode), pred


class ConformalVolumes:
    """Re-iterable ``(probabilities (1, C, *S), target (1, *S) or (1, C, *S))`` of matched cases, read lazily
    from disk (labels: label maps, or multi-hot ``(C, *S)`` in multilabel mode; shapes and geometry checked)."""

    def __init__(
        self, cases: Sequence[CaseFiles], fmt: FolderFormat, *, kind: KindOption = "auto", mode: Mode = "exclusive"
    ) -> None:
        self.cases, self.fmt, self.kind, self.mode = list(cases), fmt, kind, mode

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self[i] for i in range(len(self.cases)))

    def describe(self, i: int) -> str:
        """The prediction and label files of case ``i``, for messages."""
        return f"{self.cases[i].prediction[0]} with label {self.cases[i].label}"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        files = self.cases[i]
        probs, pred = read_probability_file(files.prediction[0], self.fmt, kind=self.kind, mode=self.mode)
        probs, y = _target(files, probs, pred, self.fmt)
        return torch.from_numpy(np.ascontiguousarray(probs))[None], torch.from_numpy(y)[None]
