"""Stateful, mergeable segmentation calibration metric (torchmetrics-style, no torchmetrics dependency).

``update()`` only adds per-image records (bin sums, confusion counts, NLL/Brier sums) computed by the pure
functions of :mod:`segcal.functional`; ``compute()`` only calls those functions again on the stored sums. Every
state is a sum or a per-image record, so objects built on different batches, processes or machines combine
exactly with :meth:`SegmentationCalibrationMetric.merge` (or ``+``) and :meth:`sync` (``torch.distributed``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from segcal.functional.binning import BinStats, Closed, bin_statistics
from segcal.functional.calibration import (
    brier_score,
    calibration_errors,
    negative_log_likelihood,
    top_label_statistics,
)
from segcal.functional.inputs import (
    Activation,
    Mode,
    check_mode,
    check_target,
    region_probabilities,
    region_targets,
    to_probabilities,
)
from segcal.functional.overlap import confusion_counts, hausdorff_distance_95, overlap_scores

__all__ = ["MetricResult", "SegmentationCalibrationMetric"]


@dataclass
class MetricResult:
    """Output of :meth:`SegmentationCalibrationMetric.compute`.

    ``per_image[name]`` is ``(N, C)`` for class-wise metrics (``nll`` and ``top_label_*`` are ``(N, 1)``),
    ``pooled[name]`` is ``(C,)`` (resp. ``(1,)``) computed from the summed statistics of all images (micro),
    ``macro[name]`` is the per-class mean over images ignoring NaN, and ``*_mean`` keys average over classes.
    """

    case_ids: list[str]
    class_names: list[str]
    per_image: dict[str, torch.Tensor]
    pooled: dict[str, torch.Tensor]
    macro: dict[str, torch.Tensor] = field(default_factory=dict)
    bin_stats: BinStats | None = None

    def summary(self) -> dict[str, dict[str, float]]:
        """``{"macro": {metric: mean-over-classes}, "pooled": {...}}`` as plain floats."""
        return {
            "macro": {k: float(torch.nanmean(v.double())) for k, v in self.macro.items()},
            "pooled": {k: float(torch.nanmean(v.double())) for k, v in self.pooled.items()},
        }


class SegmentationCalibrationMetric:
    """Accumulates calibration and overlap statistics of segmentation predictions image by image.

    Args:
        num_bins: equal-width bins on [0, 1], bin ``k`` = ``(k/M, (k+1)/M]``, ``p = 0`` in bin 0.
        activation: ``"softmax"`` / ``"sigmoid"`` when updates receive logits, ``None`` for probabilities.
        mode: ``"exclusive"`` or ``"multilabel"``.
        include_background: keep channel 0 in exclusive mode (default False, as in the papers' metrics).
        regions: optional region channels summed from softmax classes, e.g. BraTS ``[[3], [1, 3], [1, 2, 3]]``.
        class_names: names of the kept channels (for reports).
        hd95: also compute the 95th-percentile Hausdorff distance (slower; needs ``spacing`` for mm).
        closed: bin-edge tie convention (``"right"`` default).

    Example:
        >>> metric = SegmentationCalibrationMetric(num_bins=20, activation="softmax")
        >>> for logits, labels in loader:                     # (B, C, H, W[, D]), (B, H, W[, D])
        ...     metric.update(logits, labels)
        >>> result = metric.compute()
        >>> result.pooled["ace"], result.macro["dice"]
    """

    def __init__(
        self,
        num_bins: int = 20,
        *,
        activation: Activation = None,
        mode: Mode = "exclusive",
        include_background: bool = False,
        regions: Sequence[Sequence[int]] | None = None,
        class_names: Sequence[str] | None = None,
        hd95: bool = False,
        closed: Closed = "right",
    ) -> None:
        self.num_bins = int(num_bins)
        self.activation = activation
        self.mode = check_mode(mode)
        self.include_background = include_background
        self.regions = [list(r) for r in regions] if regions is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.hd95 = hd95
        self.closed = closed
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every image."""
        self._case_ids: list[str] = []
        self._bins: list[torch.Tensor] = []  # (B, C, 3, M) float64 per update
        self._top: list[torch.Tensor] = []  # (B, T, 3, M)
        self._counts: list[torch.Tensor] = []  # (B, C, 3) tp, fp, fn
        self._nll_sum: list[torch.Tensor] = []  # (B,) Σ per-voxel NLL
        self._brier_sum: list[torch.Tensor] = []  # (B, C) Σ per-voxel squared error
        self._n_vox: list[torch.Tensor] = []  # (B,) voxels scored
        self._hd95: list[torch.Tensor] = []  # (B, C)

    def __len__(self) -> int:
        return len(self._case_ids)

    @torch.no_grad()
    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        case_ids: Sequence[str] | None = None,
        spacing: Sequence[float] | None = None,
    ) -> None:
        """Add a batch ``pred`` ``(B, C, *spatial)`` / ``target`` (label map or one-hot) of images.

        ``mask`` ``(B, *spatial)`` restricts every statistic to a region (e.g. a dilated bounding box).
        """
        eff_mode: Mode = "exclusive" if self.regions is not None else self.mode
        probs = to_probabilities(pred, self.activation, eff_mode)
        check_target(target, probs.shape, eff_mode)
        b = probs.shape[0]
        if case_ids is None:
            start = len(self._case_ids)
            case_ids = [f"case_{start + i:05d}" for i in range(b)]
        if len(case_ids) != b:
            raise ValueError(f"got {len(case_ids)} case ids for a batch of {b} images")
        kw: dict[str, Any] = {"mode": self.mode, "regions": self.regions, "check": False}
        stats = bin_statistics(
            probs, target, self.num_bins, include_background=self.include_background, mask=mask,
            closed=self.closed, **kw,
        )
        top_mode: Mode = "multilabel" if self.regions is not None else self.mode
        top_probs = probs
        top_target = target
        if self.regions is not None:
            top_probs = region_probabilities(probs, self.regions)
            top_target = region_targets(target, self.regions, probs.shape[1])
        top = top_label_statistics(
            top_probs, top_target, self.num_bins, mode=top_mode, mask=mask, closed=self.closed, check=False
        )
        counts = confusion_counts(probs, target, include_background=self.include_background, mask=mask, **kw)
        n_vox = stats.count[:, 0].sum(-1)
        nll = negative_log_likelihood(probs, target, mask=mask, **kw) * n_vox
        brier = brier_score(probs, target, include_background=self.include_background, mask=mask, **kw)
        self._case_ids.extend(str(c) for c in case_ids)
        self._bins.append(torch.stack([stats.count, stats.sum_p, stats.sum_y], 2).cpu())
        self._top.append(torch.stack([top.count, top.sum_p, top.sum_y], 2).cpu())
        self._counts.append(counts.cpu())
        self._nll_sum.append(nll.cpu())
        self._brier_sum.append((brier * n_vox[:, None]).cpu())
        self._n_vox.append(n_vox.cpu())
        if self.hd95:
            hd_kw = {k: v for k, v in kw.items() if k != "check"}
            self._hd95.append(
                hausdorff_distance_95(
                    probs, target, include_background=self.include_background, spacing=spacing, **hd_kw
                ).cpu()
            )

    # ------------------------------------------------------------------ merging
    def merge(self, other: SegmentationCalibrationMetric) -> SegmentationCalibrationMetric:
        """Add ``other``'s images to this object (in place) and return it. Settings must match."""
        if self._settings() != other._settings():
            raise ValueError(f"cannot merge metrics with different settings: {self._settings()} vs {other._settings()}")
        self._case_ids += other._case_ids
        self._bins += other._bins
        self._top += other._top
        self._counts += other._counts
        self._nll_sum += other._nll_sum
        self._brier_sum += other._brier_sum
        self._n_vox += other._n_vox
        self._hd95 += other._hd95
        return self

    def __add__(self, other: SegmentationCalibrationMetric) -> SegmentationCalibrationMetric:
        return copy.deepcopy(self).merge(other)

    def _settings(self) -> tuple[Any, ...]:
        return (self.num_bins, self.activation, self.mode, self.include_background, self.regions, self.hd95,
                self.closed)

    def _state(self) -> dict[str, Any]:
        return {
            "case_ids": self._case_ids, "bins": self._bins, "top": self._top, "counts": self._counts,
            "nll": self._nll_sum, "brier": self._brier_sum, "n_vox": self._n_vox, "hd95": self._hd95,
        }

    def sync(self, group: Any = None) -> None:
        """Gather every rank's images on every rank (``torch.distributed``; no-op when not initialised).

        After ``sync()`` each rank holds all images in rank order, so ``compute()`` gives identical per-image
        and pooled results everywhere. Works with the gloo (CPU) and nccl backends (states live on CPU).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (self._settings(), self._state()), group=group)
        self.reset()
        for settings, state in gathered:
            if settings != self._settings():
                raise ValueError("ranks hold metrics with different settings")
            self._case_ids += state["case_ids"]
            self._bins += state["bins"]
            self._top += state["top"]
            self._counts += state["counts"]
            self._nll_sum += state["nll"]
            self._brier_sum += state["brier"]
            self._n_vox += state["n_vox"]
            self._hd95 += state["hd95"]

    # ------------------------------------------------------------------ results
    def bin_stats(self) -> BinStats:
        """Per-image marginal bin sums ``(N, C, M)`` of every image seen so far."""
        if not self._bins:
            raise ValueError("no image has been added: call update() first")
        allb = torch.cat(self._bins)
        return BinStats(allb[:, :, 0], allb[:, :, 1], allb[:, :, 2])

    def compute(self) -> MetricResult:
        """Per-image (macro) and pooled (micro) results; see :class:`MetricResult`."""
        stats = self.bin_stats()
        topb = torch.cat(self._top)
        top = BinStats(topb[:, :, 0], topb[:, :, 1], topb[:, :, 2])
        counts = torch.cat(self._counts)
        nll_sum = torch.cat(self._nll_sum)
        brier_sum = torch.cat(self._brier_sum)
        n_vox = torch.cat(self._n_vox)

        per_image: dict[str, torch.Tensor] = {}
        pooled: dict[str, torch.Tensor] = {}
        for name, v in calibration_errors(stats).items():
            per_image[name] = v
        for name, v in calibration_errors(stats.pooled()).items():
            pooled[name] = v[0]
        for name, v in calibration_errors(top).items():
            per_image[f"top_label_{name}"] = v
        for name, v in calibration_errors(top.pooled()).items():
            pooled[f"top_label_{name}"] = v[0]
        for name, v in overlap_scores(counts).items():
            per_image[name] = v
        for name, v in overlap_scores(counts.sum(0)).items():
            pooled[name] = v
        safe_n = n_vox.clamp_min(1)
        per_image["nll"] = torch.where(n_vox > 0, nll_sum / safe_n, torch.nan)[:, None]
        pooled["nll"] = (nll_sum.sum() / n_vox.sum().clamp_min(1)).reshape(1)
        per_image["brier"] = torch.where(n_vox[:, None] > 0, brier_sum / safe_n[:, None], torch.nan)
        pooled["brier"] = brier_sum.sum(0) / n_vox.sum().clamp_min(1)
        if self._hd95:
            per_image["hd95"] = torch.cat(self._hd95)
        macro = {k: torch.nanmean(v.double(), dim=0) for k, v in per_image.items()}
        names = self.class_names
        if names is None:
            c = stats.num_channels
            first = 0 if (self.include_background or self.mode != "exclusive" or self.regions is not None) else 1
            names = [f"class_{first + i}" for i in range(c)]
        return MetricResult(list(self._case_ids), names, per_image, pooled, macro, stats)

