"""segcal's trainers inside nnU-Net v2's own machinery, end to end on CPU with the real nnU-Net (no mocks).

A tiny nnU-Net raw dataset (5 volumes of 32^3 voxels, 3 classes) is generated in a temporary folder and
planned and preprocessed with nnU-Net's Python API (the functions behind ``nnUNetv2_plan_and_preprocess``).
segcal's trainers are made visible with ``install_trainers`` (``segcal nnunet install-trainers``), found by name
by nnU-Net's ``get_trainer_from_args`` (what ``nnUNetv2_train DATASET CONFIG FOLD -tr NAME`` calls), trained for
a few iterations by nnU-Net's ``run_training``, and the trained model is loaded by nnU-Net's predictor (which
finds the trainer class again by its name) to predict a case.
"""

from __future__ import annotations

import os

os.environ.setdefault("nnUNet_def_n_proc", "1")  # nnU-Net's worker count, read when nnU-Net is imported

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segcal.integrations.nnunet import install

pytestmark = pytest.mark.slow

DATASET_ID = 987
DATASET = f"Dataset{DATASET_ID:03d}_SegcalTiny"
SHAPE = (32, 32, 32)  # 4 stages in nnU-Net's plan (down to 4^3), so 3 outputs with deep supervision
N_CASES = 5  # nnU-Net's 5-fold split: fold 0 trains on 4 cases and validates on 1


def _write_raw_dataset(raw: Path) -> None:
    """Two spheres of different brightness (classes 1 and 2) in noise, at random places."""
    rng = np.random.default_rng(0)
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    grid = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    for i in range(N_CASES):
        lab = np.zeros(SHAPE, np.uint8)
        for cls, radius in ((1, 6), (2, 4)):
            centre = [rng.integers(radius + 1, s - radius - 1) for s in SHAPE]
            lab[sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2] = cls
        img = rng.normal(0.0, 1.0, SHAPE) + 3.0 * (lab == 1) + 6.0 * (lab == 2)
        nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), raw / "labelsTr" / f"case_{i:03d}.nii.gz")
    meta = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": N_CASES,
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """nnU-Net's three folders in a temporary folder, compilation off, one torch thread."""
    base = tmp_path_factory.mktemp("nnunet")
    mp = pytest.MonkeyPatch()
    for name in ("raw", "preprocessed", "results"):
        (base / name).mkdir()
        mp.setenv(f"nnUNet_{name}", str(base / name))
    mp.setenv("nnUNet_compile", "false")
    # nnU-Net's planner sets torch's thread count to this number (0 is refused there); training sets it to 0
    mp.setenv("nnUNet_n_proc_DA", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield base
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def preprocessed(nnunet_env: Path) -> Path:
    """The raw dataset, fingerprinted, planned and preprocessed (3d_fullres) by nnU-Net with one process."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    _write_raw_dataset(nnunet_env / "raw" / DATASET)
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=False)
    plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,))
    plans = json.loads((nnunet_env / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == 4
    return nnunet_env


@pytest.fixture(scope="module")
def trainers_visible() -> Iterator[None]:
    """segcal's trainers installed into nnU-Net's trainer package, removed again if this test installed them."""
    _, changed = install.install_trainers()
    yield
    if changed:
        install.uninstall_trainers()


def _train(trainer_name: str, epochs: int, iterations: int, monkeypatch: pytest.MonkeyPatch):
    """nnU-Net's trainer found by name (as ``nnUNetv2_train ... -tr NAME`` does), shortened, trained on CPU."""
    from nnunetv2.run.run_training import get_trainer_from_args

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # data augmentation in this process, no worker processes
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 (nnU-Net's data loader draws from the legacy global RNG)
    torch.manual_seed(0)
    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, trainer_name, device=torch.device("cpu"))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = 1
    trainer.run_training()
    return trainer


def _check_nnunet_wrapping(trainer) -> None:
    """The loss is nnU-Net's DeepSupervisionWrapper with nnU-Net's weights for 3 outputs."""
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    assert isinstance(trainer.loss, DeepSupervisionWrapper)
    assert trainer.loss.weight_factors == pytest.approx((2 / 3, 1 / 3, 0.0))


def test_segcal_trainers_train_in_nnunet_and_predict(preprocessed, trainers_visible, monkeypatch) -> None:
    """One test, so that one worker of pytest-xdist runs the whole sequence: the preprocessed dataset is made once
    and nnU-Net's trainer package is changed by one process only."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss

    from segcal.integrations.nnunet import trainers
    from segcal.integrations.nnunet.losses import CalibrationTerm, SegcalCompoundLoss

    trainer = _train("nnUNetTrainerSegcalHardACE", epochs=2, iterations=3, monkeypatch=monkeypatch)
    assert type(trainer) is trainers.nnUNetTrainerSegcalHardACE

    # nnU-Net's Dice + CE and segcal's hard ACE, per scale, inside nnU-Net's wrapper
    _check_nnunet_wrapping(trainer)
    compound = trainer.loss.loss
    assert isinstance(compound, SegcalCompoundLoss) and compound.weight == 1.0
    assert isinstance(compound.nnunet_loss, DC_and_CE_loss)
    assert isinstance(compound.term, CalibrationTerm) and compound.term.kind == "hard"

    # the loss is finite and falls; the ACE term took part in every epoch with a non-zero value
    losses = [float(v) for v in trainer.logger.get_value("train_losses", None)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert losses[1] < losses[0], losses
    assert len(trainer.segcal_term_history) == 2
    assert all(0.0 < v < 1.0 for v in trainer.segcal_term_history), trainer.segcal_term_history
    assert float(compound.last_components["segcal"]) > 0.0
    log = Path(trainer.log_file).read_text()
    assert log.count("segcal hard mL1-ACE term") == 2

    # nnU-Net's predictor loads the model, finding the trainer class by the name stored in the checkpoint
    model_dir = Path(trainer.output_folder_base)
    assert (model_dir / "fold_0" / "checkpoint_final.pth").is_file()
    predictor = nnUNetPredictor(
        use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False
    )
    predictor.initialize_from_trained_model_folder(
        str(model_dir), use_folds=(0,), checkpoint_name="checkpoint_final.pth"
    )
    assert predictor.trainer_name == "nnUNetTrainerSegcalHardACE"
    image = preprocessed / "raw" / DATASET / "imagesTr" / "case_000_0000.nii.gz"
    data, props = predictor.plans_manager.image_reader_writer_class().read_images([str(image)])
    seg, probs = predictor.predict_single_npy_array(data, props, None, None, True)
    assert seg.shape == SHAPE and set(np.unique(seg)) <= {0, 1, 2}
    assert probs.shape == (3, *SHAPE)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)

    # the other two trainers: a short run each on the same preprocessed data
    _check_short_run("nnUNetTrainerSegcalSoftACE", monkeypatch)
    _check_short_run("nnUNetTrainerSegcalDSCPlusPlus", monkeypatch)


def _check_short_run(trainer_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from segcal.integrations.nnunet.losses import DSCPlusPlusDice, SegcalCompoundLoss

    trainer = _train(trainer_name, epochs=1, iterations=2, monkeypatch=monkeypatch)
    assert type(trainer).__name__ == trainer_name
    _check_nnunet_wrapping(trainer)
    losses = [float(v) for v in trainer.logger.get_value("train_losses", None)]
    assert len(losses) == 1 and math.isfinite(losses[0])
    inner = trainer.loss.loss
    if trainer_name == "nnUNetTrainerSegcalSoftACE":
        assert isinstance(inner, SegcalCompoundLoss) and inner.term.kind == "soft"
        assert len(trainer.segcal_term_history) == 1 and trainer.segcal_term_history[0] > 0.0
    else:
        assert isinstance(inner.dc, DSCPlusPlusDice)
