"""MONAI-based training and prediction: config-driven UNet training with resume and DDP, and
sliding-window prediction with MC dropout, ensembles and post-hoc temperature / calibrators."""

from segcal.training.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    config_from_dict,
    load_config,
)
from segcal.training.data import SegmentationDataset, read_case, read_folder, read_image
from segcal.training.parallel import TrainJob, TrainOutcome, train_many
from segcal.training.predict import (
    enable_mc_dropout,
    load_model,
    mc_dropout_probabilities,
    predict_files,
    predict_probabilities,
    sliding_window_logits,
)
from segcal.training.trainer import (
    TrainResult,
    build_loss,
    build_model,
    get_rng_state,
    load_checkpoint,
    seed_everything,
    set_rng_state,
    train,
    validation_dice,
)

__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "SegmentationDataset",
    "TrainConfig",
    "TrainJob",
    "TrainOutcome",
    "TrainResult",
    "build_loss",
    "build_model",
    "config_from_dict",
    "enable_mc_dropout",
    "get_rng_state",
    "load_checkpoint",
    "load_config",
    "load_model",
    "mc_dropout_probabilities",
    "predict_files",
    "predict_probabilities",
    "read_case",
    "read_folder",
    "read_image",
    "seed_everything",
    "set_rng_state",
    "sliding_window_logits",
    "train",
    "train_many",
    "validation_dice",
]
