"""MONAI integration: segcal metrics as MONAI metrics, Ignite handlers and calibration post-transforms.

* :class:`SegcalMetric`, :class:`CalibrationMetric`, :class:`HausdorffDistance95Metric` are
  :class:`monai.metrics.CumulativeIterationMetric` subclasses: ``metric(y_pred=..., y=...)`` on a batch-first
  tensor or a list of channel-first tensors, ``aggregate()`` with MONAI's ``metric_reduction``, ``reset()``,
  ``get_buffer()`` (the per-image values ``(N, C)``), DDP sync through MONAI's buffers. Each call computes
  :func:`segcal.functional.scoring.case_statistics` per image and buffers those sums; every value is derived
  from them by :func:`~segcal.functional.scoring.image_metrics` / :func:`~segcal.functional.scoring.pooled_metrics`
  (one formula, one implementation).
* Spacing (mm) for HD95 comes from the ``spacing`` argument, else from the MetaTensor metadata of ``y_pred``
  (or ``y``): the per-image affine (``MetaTensor.pixdim``).
* :class:`CalibrationHandler`, :class:`HausdorffDistance95Handler`: Ignite handlers in the style of
  ``monai.handlers`` (subclasses of :class:`monai.handlers.IgniteMetricHandler`, they need ``pytorch-ignite``),
  for ``monai.engines.SupervisedEvaluator`` / ``SupervisedTrainer``.
* :class:`CalibrateLogits` / :class:`CalibrateLogitsd`: post-transforms applying a fitted
  :class:`segcal.posthoc.Calibrator` to channel-first logits ``(C, *spatial)``.

Argument names follow MONAI's ``CalibrationErrorMetric`` (``num_bins``, ``include_background``,
``calibration_reduction``, ``metric_reduction``, ``get_not_nans``). Differences, stated once: segcal's
``include_background`` defaults to False (MONAI: True); bins are ``(k/M, (k+1)/M]`` with ``closed="right"``
(MONAI's default ``right=False`` bins the same way, ``closed="left"`` is MONAI's ``right=True``); ``y`` may be a
label map or one-hot; sums are float64. Guide: docs/integrations/monai.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from numbers import Number
from pathlib import Path
from typing import Any, ClassVar

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.transforms import MapTransform, Transform
from monai.utils import MetricReduction, TransformBackends, convert_to_dst_type

from segcal.functional.binning import BinStats, Closed, check_num_bins
from segcal.functional.inputs import Activation, Mode, as_tensor, check_mode, to_probabilities
from segcal.functional.scoring import (
    CASE_METRICS,
    CLASS_METRICS,
    SURFACE_FIELDS,
    CaseStatistics,
    case_statistics,
    image_metrics,
    pooled_metrics,
)
from segcal.posthoc import Calibrator, LastLayerFineTuner, NotFittedError, load_calibrator

__all__ = [
    "CalibrateLogits",
    "CalibrateLogitsd",
    "CalibrationHandler",
    "CalibrationMetric",
    "HausdorffDistance95Handler",
    "HausdorffDistance95Metric",
    "SegcalMetric",
    "metadata_spacing",
]

#: MONAI's ``calibration_reduction`` -> segcal metric name (L1 / L2 norm)
_REDUCTIONS = {
    ("expected", "l1"): "ece",
    ("average", "l1"): "ace",
    ("maximum", "l1"): "mce",
    ("expected", "l2"): "ece_l2",
    ("average", "l2"): "ace_l2",
}
#: the statistics every call computes (the optional peers-group fields, None here, stay out of MONAI's buffers)
_FIELDS = tuple(f.name for f in dataclasses.fields(CaseStatistics) if f.default is dataclasses.MISSING)
#: metrics a MONAI metric object can return (MAE needs a soft reference, which MONAI's call has no slot for)
_NAMES = tuple(n for n in (*CLASS_METRICS, *CASE_METRICS) if n != "mae")

Spacing = float | Sequence[float] | Sequence[Sequence[float]] | torch.Tensor


def _plain(x: torch.Tensor) -> torch.Tensor:
    """The tensor without MONAI metadata (segcal's kernels read plain tensors)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def metadata_spacing(x: Any, batch: int, spatial_dims: int) -> list[tuple[float, ...]] | None:
    """Per-image spacing from a :class:`monai.data.MetaTensor`'s affine (``pixdim``), or None for a plain tensor.

    A collated batch (``is_batch``) holds one affine per image; a single MetaTensor's affine applies to every
    image of ``x``. The first ``spatial_dims`` column norms of the affine are the spacing (MONAI's
    ``affine_to_spacing``).
    """
    if not isinstance(x, MetaTensor):
        return None
    affine = x.affine
    affines = list(affine) if affine.ndim == 3 else [affine] * batch
    if len(affines) != batch:
        return None
    out = []
    for a in affines:
        if a.shape[-1] < spatial_dims + 1:
            return None
        out.append(tuple(float(v) for v in affine_to_spacing(a, r=spatial_dims)))
    return out


def _explicit_spacing(spacing: Spacing, batch: int, spatial_dims: int) -> list[tuple[float, ...]]:
    """MONAI's spacing forms: a number (isotropic), one sequence for all images, or one sequence per image."""
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.tolist()
    if isinstance(spacing, Number):
        return [(float(spacing),) * spatial_dims] * batch
    items = list(spacing)  # type: ignore[arg-type]
    if items and all(isinstance(v, Number) for v in items):
        return [tuple(float(v) for v in items)] * batch
    if len(items) != batch:
        raise ValueError(f"spacing: got {len(items)} per-image spacings for a batch of {batch} images")
    return [tuple(float(v) for v in (s.tolist() if isinstance(s, torch.Tensor) else s)) for s in items]


class SegcalMetric(CumulativeIterationMetric):
    """Any per-class or per-case metric of :data:`segcal.functional.scoring.METRICS`, as a MONAI metric.

    Args:
        metric_name: the value ``aggregate()`` / ``get_buffer()`` return: ``"ace"``, ``"ece"``, ``"mce"``,
            ``"ece_l2"``, ``"ace_l2"``, ``"dice"``, ``"iou"``, ``"precision"``, ``"recall"``, ``"hd95"``,
            ``"hd"``, ``"assd"``, ``"nsd"``, ``"brier"`` (per class, ``(N, C)``) or ``"nll"``,
            ``"top_label_ece"``, ... (per case, ``(N, 1)``).
        num_bins: ``M`` equal-width bins, bin ``k`` = ``(k/M, (k+1)/M]`` (``closed="right"``).
        include_background: keep channel 0 in exclusive mode (default False, segcal's convention).
        metric_reduction: MONAI reduction over images / channels (``"mean"``, ``"sum"``, ``"mean_batch"``,
            ``"mean_channel"``, ``"none"``, ...), NaN-ignoring, as MONAI's metrics.
        get_not_nans: ``aggregate()`` returns ``(value, not_nans)``.
        activation: ``"softmax"`` / ``"sigmoid"`` when ``y_pred`` holds logits, ``None`` for probabilities.
        mode: ``"exclusive"`` (softmax classes) or ``"multilabel"``.
        regions: region channels summed from softmax classes (e.g. BraTS ``[[3], [1, 3], [1, 2, 3]]``).
        spacing: mm per spatial axis for the surface metrics (``"hd95"``, ``"hd"``, ``"assd"``, ``"nsd"``; a
            number, one sequence, or one per image); when None it is read from the MetaTensor metadata of
            ``y_pred`` (else ``y``) at each call, else 1 (voxels).
        closed: bin-edge tie convention (``"left"``: ``[k/M, (k+1)/M)``, torchmetrics' bins).
        nsd_tolerance_mm: the tolerance of ``"nsd"`` in mm (one for every kept channel, or one per channel).

    ``y`` is a label map ``(B, *S)`` / ``(B, 1, *S)`` or one-hot ``(B, C, *S)`` (MONAI's ``AsDiscrete(
    to_onehot=C)`` output). The buffer holds each image's :class:`~segcal.functional.scoring.CaseStatistics`
    (:meth:`statistics`), so :meth:`results` (every metric per image) and :meth:`pooled` (dataset-level values
    from the summed sums) come from the same call.
    """

    def __init__(
        self,
        metric_name: str = "ace",
        num_bins: int = 20,
        include_background: bool = False,
        metric_reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        *,
        activation: Activation = None,
        mode: Mode = "exclusive",
        regions: Sequence[Sequence[int]] | None = None,
        spacing: Spacing | None = None,
        closed: Closed = "right",
        nsd_tolerance_mm: float | Sequence[float] = 1.0,
    ) -> None:
        super().__init__()
        if metric_name not in _NAMES:
            raise ValueError(f"metric_name must be one of {_NAMES}, got {metric_name!r}")
        check_num_bins(num_bins)
        if closed not in ("right", "left"):
            raise ValueError(f"closed must be 'right' or 'left', got {closed!r}")
        self.metric_name = metric_name
        self.num_bins = int(num_bins)
        self.include_background = include_background
        self.metric_reduction = metric_reduction
        self.get_not_nans = get_not_nans
        self.activation = activation
        self.mode = check_mode(mode)
        self.regions = [list(r) for r in regions] if regions is not None else None
        self.spacing = spacing
        self.closed = closed
        self.nsd_tolerance_mm = nsd_tolerance_mm

    # ------------------------------------------------------------------ per call
    def __call__(self, y_pred: Any, y: Any = None, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """Add a batch (or list of channel-first images); returns this batch's per-image values ``(B, C)``."""
        ret = super().__call__(y_pred=y_pred, y=y, **kwargs)
        return self._values(CaseStatistics(*ret))  # type: ignore[misc]

    def _compute_tensor(  # type: ignore[override]
        self,
        y_pred: torch.Tensor,
        y: torch.Tensor | None = None,
        spacing: Spacing | None = None,
        mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        if y is None:
            raise ValueError(f"{type(self).__name__} needs the ground truth y")
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        b, n_sp = y_pred.shape[0], y_pred.ndim - 2
        spacings = self._spacings(y_pred, y, spacing, b, n_sp)
        eff: Mode = "exclusive" if self.regions is not None else self.mode
        probs = to_probabilities(_plain(y_pred), self.activation, eff)
        target, mask = _plain(y), None if mask is None else _plain(mask)
        if spacings is None or len(set(spacings)) == 1:
            sp = spacings[0] if spacings else None
            stats = self._case(probs, target, mask, sp)
        else:  # images of different voxel sizes: one call per image
            stats = CaseStatistics.cat([
                self._case(probs[i : i + 1], target[i : i + 1], None if mask is None else mask[i : i + 1], s)
                for i, s in enumerate(spacings)
            ])
        return [getattr(stats, f) for f in _FIELDS]

    def _spacings(
        self, y_pred: Any, y: Any, spacing: Spacing | None, batch: int, n_sp: int
    ) -> list[tuple[float, ...]] | None:
        given = spacing if spacing is not None else self.spacing
        if given is not None:
            out = _explicit_spacing(given, batch, n_sp)
        else:
            out = metadata_spacing(y_pred, batch, n_sp) or metadata_spacing(y, batch, n_sp)
        if out is not None and any(len(s) != n_sp for s in out):
            raise ValueError(f"spacing must have {n_sp} values per image, got {out}")
        return out

    def _case(
        self, probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, spacing: Sequence[float] | None
    ) -> CaseStatistics:
        return case_statistics(
            probs,
            target,
            self.num_bins,
            mode=self.mode,
            include_background=self.include_background,
            regions=self.regions,
            mask=mask,
            surface=(self.metric_name,) if self.metric_name in SURFACE_FIELDS else (),
            nsd_tolerance_mm=self.nsd_tolerance_mm,
            spacing=spacing,
            closed=self.closed,
        )

    def _values(self, stats: CaseStatistics) -> torch.Tensor:
        return image_metrics(stats)[self.metric_name]

    # ------------------------------------------------------------------ results
    def statistics(self) -> CaseStatistics:
        """The per-image statistics of every image buffered so far (synced over ranks, as MONAI's buffers)."""
        raw = super().get_buffer()
        if raw is None:
            raise ValueError(f"{type(self).__name__}: no image has been added; call the metric first")
        return CaseStatistics(*raw)

    def get_buffer(self) -> torch.Tensor | None:  # type: ignore[override]
        """Per-image values of ``metric_name``: ``(N, C)`` per class, ``(N, 1)`` per case (None when empty),
        as MONAI's metrics; ``monai.handlers`` store it in ``engine.state.metric_details``."""
        if super().get_buffer() is None:
            return None
        return self._values(self.statistics())

    def bin_stats(self) -> BinStats:
        """Per-image marginal bin sums ``(N, C, M)`` (e.g. for :mod:`segcal.plots`)."""
        return self.statistics().bin_stats

    def results(self) -> dict[str, torch.Tensor]:
        """Every metric per image (:func:`~segcal.functional.scoring.image_metrics`)."""
        return image_metrics(self.statistics())

    def pooled(self) -> dict[str, torch.Tensor]:
        """Dataset-level (micro) values from the sums of all images
        (:func:`~segcal.functional.scoring.pooled_metrics`)."""
        return pooled_metrics(self.statistics())

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """MONAI's reduction of the per-image values (NaN ignored); ``(value, not_nans)`` with
        ``get_not_nans``."""
        data = self.get_buffer()
        if data is None:
            raise ValueError(f"{type(self).__name__}: no image has been added; call the metric first")
        f, not_nans = do_metric_reduction(data, reduction or self.metric_reduction)
        return (f, not_nans) if self.get_not_nans else f


class CalibrationMetric(SegcalMetric):
    """Marginal (class-wise) calibration error per image and class, with MONAI ``CalibrationErrorMetric``'s
    arguments.

    ``calibration_reduction``: ``"expected"`` (ECE), ``"average"`` (ACE) or ``"maximum"`` (MCE); ``norm``
    ``"l2"`` gives the root-mean-square forms (not for MCE). With one-hot ``y``, probabilities and the same
    ``include_background``, the values equal MONAI's (which computes in float32). Keyword arguments of
    :class:`SegcalMetric` (``activation``, ``mode``, ``regions``, ``closed``) pass through. The buffered
    statistics also give every other error (:meth:`~SegcalMetric.results`, :meth:`~SegcalMetric.pooled`).

    Example:
        >>> metric = CalibrationMetric(num_bins=20, calibration_reduction="average")
        >>> for batch in loader:
        ...     metric(y_pred=softmax(model(batch["image"])), y=batch["label"])
        >>> mean_ace = metric.aggregate().item()
        >>> metric.reset()
    """

    def __init__(
        self,
        num_bins: int = 20,
        include_background: bool = False,
        calibration_reduction: str = "expected",
        metric_reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        *,
        norm: str = "l1",
        **kwargs: Any,
    ) -> None:
        red = str(getattr(calibration_reduction, "value", calibration_reduction))
        if (red, norm) not in _REDUCTIONS:
            raise ValueError(
                "calibration_reduction must be 'expected', 'average' or 'maximum' and norm 'l1' or 'l2' "
                f"(no L2 maximum), got {calibration_reduction!r} / {norm!r}"
            )
        super().__init__(
            _REDUCTIONS[(red, norm)], num_bins, include_background, metric_reduction, get_not_nans, **kwargs
        )
        self.calibration_reduction = red
        self.norm = norm


class HausdorffDistance95Metric(SegcalMetric):
    """95th-percentile Hausdorff distance per image and class, in mm: ``spacing`` if given, else the voxel size
    of the MetaTensor ``y_pred`` / ``y`` (so NIfTI-loaded data are scored in mm with no extra argument).

    Both masks empty gives 0, exactly one empty NaN (ignored by the reduction, counted by ``not_nans``).
    """

    def __init__(
        self,
        include_background: bool = False,
        metric_reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        *,
        spacing: Spacing | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__("hd95", 20, include_background, metric_reduction, get_not_nans, spacing=spacing, **kwargs)


class CalibrationHandler(IgniteMetricHandler):
    """Ignite handler computing :class:`CalibrationMetric` over an engine run (``monai.handlers`` style).

    Attach it to a ``monai.engines.SupervisedEvaluator`` (``val_handlers`` / ``key_val_metric`` /
    ``additional_metrics``) or any Ignite engine; ``output_transform`` extracts ``(y_pred, y)`` from
    ``engine.state.output`` (e.g. ``monai.handlers.from_engine(["pred", "label"])``). With ``save_details``, the
    per-image values go to ``engine.state.metric_details[name]``. Needs ``pytorch-ignite``.
    """

    def __init__(
        self,
        num_bins: int = 20,
        include_background: bool = False,
        calibration_reduction: str = "expected",
        metric_reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        **kwargs: Any,
    ) -> None:
        metric_fn = CalibrationMetric(
            num_bins=num_bins,
            include_background=include_background,
            calibration_reduction=calibration_reduction,
            metric_reduction=metric_reduction,
            **kwargs,
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class HausdorffDistance95Handler(IgniteMetricHandler):
    """Ignite handler computing :class:`HausdorffDistance95Metric` (mm from the MetaTensor metadata)."""

    def __init__(
        self,
        include_background: bool = False,
        metric_reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        **kwargs: Any,
    ) -> None:
        metric_fn = HausdorffDistance95Metric(
            include_background=include_background, metric_reduction=metric_reduction, **kwargs
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


# ---------------------------------------------------------------------------------------------- transforms


def _fitted(calibrator: Calibrator | str | Path) -> Calibrator:
    if isinstance(calibrator, str | Path):
        calibrator = load_calibrator(calibrator)
    if not isinstance(calibrator, Calibrator):
        raise TypeError(f"calibrator must be a segcal Calibrator or a saved calibrator file, got {type(calibrator)}")
    if isinstance(calibrator, LastLayerFineTuner):
        raise TypeError("LastLayerFineTuner maps images, not logits: use its model in the inferer instead")
    if not hasattr(calibrator, "num_classes_"):
        raise NotFittedError(f"{type(calibrator).__name__} is not fitted yet: call fit(...) first")
    return calibrator


class CalibrateLogits(Transform):
    """Post-transform: calibrated probabilities ``(C, *spatial)`` from channel-first logits ``(C, *spatial)``.

    ``calibrator`` is a fitted :class:`segcal.posthoc.Calibrator` (e.g. ``TemperatureScaling``) or the path of a
    saved one. Replaces ``Activations(softmax=True)`` in a post-processing chain; a MetaTensor keeps its
    metadata. The result equals ``calibrator.transform(logits[None])[0]``.
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH]

    def __init__(self, calibrator: Calibrator | str | Path) -> None:
        self.calibrator = _fitted(calibrator)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if not isinstance(img, torch.Tensor):
            img = as_tensor(img)
        probs = self.calibrator.transform(_plain(img).unsqueeze(0))[0]
        out, *_ = convert_to_dst_type(probs, img, dtype=probs.dtype)
        return out


class CalibrateLogitsd(MapTransform):
    """Dictionary form of :class:`CalibrateLogits`: calibrates ``data[key]`` for each of ``keys``."""

    backend = CalibrateLogits.backend

    def __init__(
        self, keys: KeysCollection, calibrator: Calibrator | str | Path, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.calibrate = CalibrateLogits(calibrator)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.calibrate(d[key])
        return d
