"""Stateful metric objects that accumulate mergeable sums (DDP / Dask friendly)."""

from segcal.metrics.calibration import MetricResult, SegmentationCalibrationMetric

__all__ = ["MetricResult", "SegmentationCalibrationMetric"]
