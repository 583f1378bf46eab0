"""Pure tensor functions: binning, calibration, overlap, losses, uncertainty (no state, no I/O).

Shapes follow MONAI: predictions ``(B, C, *spatial)``; targets label maps ``(B, *spatial)`` /
``(B, 1, *spatial)`` or one-hot ``(B, C, *spatial)``.
"""

from segcal.functional.binning import (
    BinStats,
    bin_edges,
    bin_index,
    bin_statistics,
    hard_bin_sums,
    soft_bin_sums,
)
from segcal.functional.calibration import (
    brier_score,
    calibration_error,
    calibration_errors,
    mean_absolute_error,
    negative_log_likelihood,
    top_label_statistics,
)
from segcal.functional.inputs import region_probabilities, region_targets, target_to_onehot, to_probabilities
from segcal.functional.overlap import (
    confusion_counts,
    dice_from_counts,
    hausdorff_distance_95,
    iou_from_counts,
    overlap_scores,
    precision_from_counts,
    recall_from_counts,
)

__all__ = [
    "BinStats",
    "bin_edges",
    "bin_index",
    "bin_statistics",
    "brier_score",
    "calibration_error",
    "calibration_errors",
    "confusion_counts",
    "dice_from_counts",
    "hard_bin_sums",
    "hausdorff_distance_95",
    "iou_from_counts",
    "mean_absolute_error",
    "negative_log_likelihood",
    "overlap_scores",
    "precision_from_counts",
    "recall_from_counts",
    "region_probabilities",
    "region_targets",
    "soft_bin_sums",
    "target_to_onehot",
    "to_probabilities",
    "top_label_statistics",
]
