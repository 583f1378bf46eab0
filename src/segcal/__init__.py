"""segcal: calibration metrics, calibration-aware losses and post-hoc calibration for segmentation."""

__version__ = "0.1.0"
