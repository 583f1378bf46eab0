"""Stateful, mergeable segmentation calibration metric (torchmetrics-style, no torchmetrics dependency).

``update()`` only appends the per-image statistics computed by
:func:`segcal.functional.scoring.case_statistics`; ``compute()`` only calls
:func:`~segcal.functional.scoring.image_metrics` and :func:`~segcal.functional.scoring.pooled_metrics` on them.
The state is declared once (:data:`SegmentationCalibrationMetric.STATE`: case ids and per-image statistics,
merged by concatenation), so objects built on different batches, processes or machines combine exactly with
:meth:`SegmentationCalibrationMetric.merge` (or ``+``) and :meth:`sync` (``torch.distributed``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from segcal.functional.binning import BinStats, Closed
from segcal.functional.inputs import Activation, Mode, check_mode, to_probabilities
from segcal.functional.scoring import SURFACE_FIELDS, CaseStatistics, case_statistics, image_metrics, pooled_metrics
from segcal.functional.surface import check_surface_metrics, check_tolerances

__all__ = ["MetricResult", "SegmentationCalibrationMetric"]


@dataclass
class MetricResult:
    """Output of :meth:`SegmentationCalibrationMetric.compute`; keys follow :data:`segcal.functional.scoring.METRICS`.

    ``per_image[name]`` is ``(N, C)`` for class-wise metrics and ``(N, 1)`` for per-case ones (``nll``,
    ``top_label_*``), ``pooled[name]`` is ``(C,)`` (resp. ``(1,)``) computed from the summed statistics of all
    images (micro; metrics that do not pool, HD95, are absent), ``macro[name]`` is the per-class mean over
    images ignoring NaN. Metrics not computed (MAE without a soft reference) are NaN; surface metrics not asked
    for (``hd95`` / ``surface``) are absent. The metrics of the peers (the schema's ``"peers"`` group) are present
    only with ``fine_bins``.
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
        surface: surface metrics to compute (``"hd95"``, ``"hd"``, ``"assd"``, ``"nsd"``; mm with ``spacing``;
            :mod:`segcal.functional.surface`).
        nsd_tolerance_mm: NSD tolerance in mm, one for every kept channel or one per kept channel.
        closed: bin-edge tie convention (``"right"`` default).
        fine_bins: also compute the metrics of the peers (the schema's ``"peers"`` group: class-wise ECE, root
            Brier score, equal-mass ECE with ``num_bins`` equal-mass bins formed from ``fine_bins`` fine bins and
            its error bound, mean entropy and confidence); ``None`` (default) leaves them out.

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
        fine_bins: int | None = None,
        surface: Sequence[str] = (),
        nsd_tolerance_mm: float | Sequence[float] = 1.0,
    ) -> None:
        self.num_bins = int(num_bins)
        self.fine_bins = None if fine_bins is None else int(fine_bins)
        self.activation = activation
        self.mode = check_mode(mode)
        self.include_background = include_background
        self.regions = [list(r) for r in regions] if regions is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.hd95 = hd95
        self.closed = closed
        self.surface = check_surface_metrics(surface)
        if isinstance(nsd_tolerance_mm, int | float):
            self.nsd_tolerance_mm: float | tuple[float, ...] = check_tolerances(nsd_tolerance_mm, 1)[0]
        else:
            self.nsd_tolerance_mm = check_tolerances(nsd_tolerance_mm, len(nsd_tolerance_mm))
        self.reset()

    #: the state, declared once: name -> how per-rank / per-object values merge ("cat": concatenate images)
    STATE: ClassVar[dict[str, str]] = {"case_ids": "cat", "stats": "cat"}

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every image."""
        # this object's own images: case ids, and one CaseStatistics per update() (images on axis 0)
        self._local: dict[str, list[Any]] = {name: [] for name in self.STATE}
        self._gathered: dict[str, list[Any]] | None = None  # every rank's images after sync()

    def __len__(self) -> int:
        return len(self._view()["case_ids"])

    def _view(self) -> dict[str, list[Any]]:
        return self._gathered if self._gathered is not None else self._local

    @torch.no_grad()
    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
        case_ids: Sequence[str] | None = None,
        spacing: Sequence[float] | None = None,
    ) -> None:
        """Add a batch ``pred`` ``(B, C, *spatial)`` / ``target`` (label map or one-hot) of images.

        ``mask`` ``(B, *spatial)`` restricts every statistic but HD95 to a region (e.g. a dilated bounding box);
        ``reference`` ``(B, C, *spatial)``: a soft reference the calibration statistics are computed against
        (and the MAE). After :meth:`sync`, an update makes this object hold its own images again until the next
        ``sync()``.
        """
        eff_mode: Mode = "exclusive" if self.regions is not None else self.mode
        probs = to_probabilities(pred, self.activation, eff_mode)
        b = probs.shape[0]
        if case_ids is None:
            start = len(self._local["case_ids"])
            case_ids = [f"case_{start + i:05d}" for i in range(b)]
        if len(case_ids) != b:
            raise ValueError(f"got {len(case_ids)} case ids for a batch of {b} images")
        stats = case_statistics(
            probs,
            target,
            self.num_bins,
            mode=self.mode,
            include_background=self.include_background,
            regions=self.regions,
            mask=mask,
            reference=reference,
            hd95=self.hd95,
            spacing=spacing,
            closed=self.closed,
            fine_bins=self.fine_bins,
            surface=self.surface,
            nsd_tolerance_mm=self.nsd_tolerance_mm,
        )
        self._local["case_ids"].extend(str(c) for c in case_ids)
        self._local["stats"].append(stats)
        self._gathered = None

    # ------------------------------------------------------------------ merging
    def merge(self, other: SegmentationCalibrationMetric) -> SegmentationCalibrationMetric:
        """Add ``other``'s images to this object (in place) and return it. Settings must match."""
        if self._settings() != other._settings():
            raise ValueError(f"cannot merge metrics with different settings: {self._settings()} vs {other._settings()}")
        _extend(self._local, other._view())
        self._gathered = None
        return self

    def __add__(self, other: SegmentationCalibrationMetric) -> SegmentationCalibrationMetric:
        return copy.deepcopy(self).merge(other)

    def _settings(self) -> tuple[Any, ...]:
        return (self.num_bins, self.activation, self.mode, self.include_background, self.regions, self.hd95,
                self.closed, self.surface, self.nsd_tolerance_mm, self.fine_bins)

    def sync(self, group: Any = None) -> None:
        """Gather every rank's images on every rank (``torch.distributed``; no-op when not initialised).

        After ``sync()`` each rank's :meth:`compute` covers all images in rank order, identical everywhere.
        Idempotent: each rank contributes only its own images, so a second ``sync()`` changes nothing. Works
        with the gloo (CPU) and nccl backends (states live on CPU).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (self._settings(), self._local), group=group)
        merged: dict[str, list[Any]] = {k: [] for k in self.STATE}
        for settings, state in gathered:
            if settings != self._settings():
                raise ValueError("ranks hold metrics with different settings")
            _extend(merged, state)
        self._gathered = merged

    # ------------------------------------------------------------------ results
    def statistics(self) -> CaseStatistics:
        """The per-image statistics of every image seen so far (after :meth:`sync`: of every rank)."""
        parts = self._view()["stats"]
        if not parts:
            raise ValueError("no image has been added: call update() first")
        return CaseStatistics.cat(parts)

    def bin_stats(self) -> BinStats:
        """Per-image marginal bin sums ``(N, C, M)`` of every image seen so far."""
        return self.statistics().bin_stats

    def compute(self) -> MetricResult:
        """Per-image (macro) and pooled (micro) results; see :class:`MetricResult`."""
        stats = self.statistics()
        per_image = image_metrics(stats)
        computed = check_surface_metrics([*(["hd95"] if self.hd95 else []), *self.surface])
        for name in SURFACE_FIELDS:
            if name not in computed:
                del per_image[name]
        macro = {k: torch.nanmean(v.double(), dim=0) for k, v in per_image.items()}
        names = self.class_names
        if names is None:
            c = stats.bins.shape[1]
            first = 0 if (self.include_background or self.mode != "exclusive" or self.regions is not None) else 1
            names = [f"class_{first + i}" for i in range(c)]
        ids = list(self._view()["case_ids"])
        return MetricResult(ids, names, per_image, pooled_metrics(stats), macro, stats.bin_stats)


def _extend(dst: dict[str, list[Any]], src: dict[str, list[Any]]) -> None:
    """Merge the state ``src`` into ``dst`` following :data:`SegmentationCalibrationMetric.STATE`."""
    for name, how in SegmentationCalibrationMetric.STATE.items():
        if how != "cat":  # pragma: no cover - the only reduction the state declares
            raise NotImplementedError(how)
        dst[name].extend(src[name])
