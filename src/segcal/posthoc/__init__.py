"""Post-hoc calibration: calibrators with ``fit``/``transform``, MC dropout and deep ensembles (docs/posthoc.md),
conformal risk control of the false-negative rate (docs/conformal.md)."""

from segcal.posthoc._base import Calibrator, NotFittedError, load_calibrator
from segcal.posthoc.conformal import ConformalReport, ConformalRiskControl
from segcal.posthoc.conv import AuxiliaryConvCalibrator, LastLayerFineTuner
from segcal.posthoc.ensemble import (
    average_models,
    average_prediction_folders,
    ensemble_probabilities,
    ensemble_size_study,
)
from segcal.posthoc.local import LocalTemperatureScaling
from segcal.posthoc.mc_dropout import (
    MCDropout,
    insert_dropout,
    insert_dropout_unet,
    mc_predict,
    retrain_after_dropout,
)
from segcal.posthoc.scaling import DirichletScaling, MatrixScaling, TemperatureScaling, VectorScaling

__all__ = [
    "AuxiliaryConvCalibrator",
    "Calibrator",
    "ConformalReport",
    "ConformalRiskControl",
    "DirichletScaling",
    "LastLayerFineTuner",
    "LocalTemperatureScaling",
    "MCDropout",
    "MatrixScaling",
    "NotFittedError",
    "TemperatureScaling",
    "VectorScaling",
    "average_models",
    "average_prediction_folders",
    "ensemble_probabilities",
    "ensemble_size_study",
    "insert_dropout",
    "insert_dropout_unet",
    "load_calibrator",
    "mc_predict",
    "retrain_after_dropout",
]
