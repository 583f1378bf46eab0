"""Every segcal figure, drawn from bin statistics (:class:`segcal.functional.binning.BinStats`) or simple
per-case arrays; docs/report.md lists each figure with the paper figure it follows. Functions return a
:class:`matplotlib.figure.Figure`; :func:`save_figure` writes PNG and/or SVG. The Agg backend is used; no
``pyplot`` state is touched.
"""

from segcal.plots._common import figure_to_png_bytes, save_figure
from segcal.plots.overlay import probability_overlay
from segcal.plots.quality import (
    ensemble_size_curve,
    entropy_dice_scatter,
    pareto_front,
    quality_scatter,
    threshold_curves,
)
from segcal.plots.reliability import (
    dataset_histogram_counts,
    dataset_reliability_comparison,
    dataset_reliability_histogram,
    per_bin_observed,
    reliability_diagram,
    reliability_diagrams,
    subject_spread,
)

__all__ = [
    "dataset_histogram_counts",
    "dataset_reliability_comparison",
    "dataset_reliability_histogram",
    "ensemble_size_curve",
    "entropy_dice_scatter",
    "figure_to_png_bytes",
    "pareto_front",
    "per_bin_observed",
    "probability_overlay",
    "quality_scatter",
    "reliability_diagram",
    "reliability_diagrams",
    "save_figure",
    "subject_spread",
    "threshold_curves",
]
