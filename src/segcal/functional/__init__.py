"""Pure tensor functions: binning, calibration, overlap, losses, uncertainty, conformal risk control (no state,
no I/O).

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
from segcal.functional.conformal import (
    FDRStatistics,
    FNRStatistics,
    conformal_masks,
    crc_fdr_threshold,
    crc_threshold,
    false_discovery_rate,
    false_negative_rate,
    fdr_loss_curves,
    fdr_statistics,
    fnr_loss_curves,
    fnr_statistics,
    threshold_masks,
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
from segcal.functional.regions import dilated_bbox_mask, parse_region_spec
from segcal.functional.thresholding import pick_threshold, threshold_counts, threshold_curves, threshold_sweep
from segcal.functional.uncertainty import (
    auroc,
    binary_entropy,
    choose_threshold,
    entropy_map,
    flag_failures,
    mutual_information,
    ood_score,
    pearson_logit_dice,
    segment_mean_entropy,
)

__all__ = [
    "BinStats",
    "FDRStatistics",
    "FNRStatistics",
    "auroc",
    "bin_edges",
    "bin_index",
    "bin_statistics",
    "binary_entropy",
    "brier_score",
    "calibration_error",
    "calibration_errors",
    "choose_threshold",
    "conformal_masks",
    "confusion_counts",
    "crc_fdr_threshold",
    "crc_threshold",
    "dice_from_counts",
    "dilated_bbox_mask",
    "entropy_map",
    "false_discovery_rate",
    "false_negative_rate",
    "fdr_loss_curves",
    "fdr_statistics",
    "flag_failures",
    "fnr_loss_curves",
    "fnr_statistics",
    "hard_bin_sums",
    "hausdorff_distance_95",
    "iou_from_counts",
    "mean_absolute_error",
    "mutual_information",
    "negative_log_likelihood",
    "ood_score",
    "overlap_scores",
    "parse_region_spec",
    "pearson_logit_dice",
    "pick_threshold",
    "precision_from_counts",
    "recall_from_counts",
    "region_probabilities",
    "region_targets",
    "segment_mean_entropy",
    "soft_bin_sums",
    "target_to_onehot",
    "threshold_counts",
    "threshold_curves",
    "threshold_masks",
    "threshold_sweep",
    "to_probabilities",
    "top_label_statistics",
]
