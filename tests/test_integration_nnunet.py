"""segcal's nnU-Net v2 trainers, fast checks with the real nnU-Net (no training here; see
``test_integration_nnunet_train.py``).

* the loss a segcal trainer builds equals, on given logits and targets, nnU-Net's own loss (built by the plain
  ``nnUNetTrainer``) plus segcal's loss computed by hand, summed over the deep-supervision scales with nnU-Net's
  weights computed by hand; for label training, region training (sigmoid) and an ignore label;
* ``segcal nnunet install-trainers`` is idempotent and reversible, and nnU-Net's own trainer search finds the
  trainers through the module it writes;
* nothing in segcal's core imports nnU-Net.
"""

from __future__ import annotations

import os

os.environ.setdefault("nnUNet_def_n_proc", "1")  # read by nnU-Net when it is imported

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import invoke_cli, subprocess_env
from segcal.integrations.nnunet import install
from segcal.losses import DSCPlusPlusLoss, HardL1ACELoss, SoftL1ACELoss

LABELS = {"background": 0, "a": 1, "b": 2}
LABELS_IGNORE = {"background": 0, "a": 1, "b": 2, "ignore": 3}
# BraTS-like regions: whole = {1, 2}, core = {2}
REGIONS = {"background": 0, "whole": [1, 2], "core": 2}


def _plans(batch_dice: bool = False) -> dict:
    """A plans file as nnU-Net's planner writes it for 32^3 images: 4 stages, so 3 outputs with deep
    supervision."""
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 4,
            "features_per_stage": [8, 16, 32, 64],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * 4,
            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
            "n_conv_per_stage": [2, 2, 2, 2],
            "n_conv_per_stage_decoder": [2, 2, 2],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [32, 32, 32],
        "median_image_size_in_voxels": [32.0, 32.0, 32.0],
        "spacing": [1.0, 1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": arch,
        "batch_dice": batch_dice,
    }
    return {
        "dataset_name": "Dataset991_SegcalUnit",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [32, 32, 32],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 9.0, "mean": 4.0, "median": 3.5, "min": -1.0, "percentile_00_5": 0.5,
                  "percentile_99_5": 8.0, "std": 1.7}
        },
        "configurations": {"3d_fullres": config},
        "continue_training": False,
    }


def _trainer(cls_name: str, labels: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_dice: bool = False):
    """A real nnU-Net trainer of class ``cls_name`` (segcal's, or nnU-Net's own ``nnUNetTrainer``) on CPU."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from segcal.integrations.nnunet import trainers

    cls = nnUNetTrainer if cls_name == "nnUNetTrainer" else getattr(trainers, cls_name)
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": 4, "file_ending": ".nii.gz"}
    if any(isinstance(v, list) for v in labels.values()):
        dataset_json["regions_class_order"] = [1, 2]
    return cls(_plans(batch_dice), "3d_fullres", 0, dataset_json, device=torch.device("cpu"))


def _nnunet_ds_weights(n_outputs: int) -> list[float]:
    """nnU-Net's deep-supervision weights, by hand: 1/2^i, the lowest resolution set to 0, normalised."""
    w = np.array([1 / 2**i for i in range(n_outputs)])
    w[-1] = 0
    return list(w / w.sum())


def _label_batch(seed: int, ignore: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits and label maps at the 3 output sizes of the 4-stage plan (32, 16, 8), nnU-Net's shapes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (2, 1, 32, 32, 32), generator=g).float()
    labels[:, :, :8] = 0  # a large background block
    labels[1][labels[1] == 2] = 1  # image 1 lacks class 2
    if ignore is not None:
        labels[0, :, 20:] = ignore
        labels[1] = ignore  # image 1: only a small corner is known
        labels[1, :, :4, :4, :4] = 1
    outs = [torch.randn(2, 3, s, s, s, generator=g) * 3 for s in (32, 16, 8)]
    targets = [labels[..., :: 32 // s, :: 32 // s, :: 32 // s] for s in (32, 16, 8)]
    return outs, targets


def _region_batch(seed: int, ignore: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Region logits ``(B, 2, *S)`` and multi-hot targets (plus the ignore channel last, as nnU-Net makes it)."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, 3, (2, 1, 32, 32, 32), generator=g)
    chans = [(lab >= 1), (lab == 2)]
    if ignore:
        known = torch.ones_like(lab, dtype=torch.bool)
        known[:, :, :10] = False
        chans.append(~known)
    y = torch.cat(chans, 1)
    outs = [torch.randn(2, 2, s, s, s, generator=g) * 3 for s in (32, 16, 8)]
    targets = [y[..., :: 32 // s, :: 32 // s, :: 32 // s] for s in (32, 16, 8)]
    return outs, targets


@pytest.mark.parametrize(
    ("trainer", "ace"),
    [
        ("nnUNetTrainerSegcalHardACE", HardL1ACELoss),
        ("nnUNetTrainerSegcalSoftACE", SoftL1ACELoss),
    ],
)
def test_ace_trainer_loss_is_nnunet_loss_plus_ace_per_scale(trainer, ace, tmp_path, monkeypatch) -> None:
    seg = _trainer(trainer, LABELS, tmp_path, monkeypatch)
    ref = _trainer("nnUNetTrainer", LABELS, tmp_path, monkeypatch)
    loss, nnunet_loss = seg._build_loss(), ref._build_loss()
    w = _nnunet_ds_weights(3)
    assert list(loss.weight_factors) == pytest.approx(w)  # nnU-Net's wrapper, nnU-Net's weights
    assert type(loss) is type(nnunet_loss)
    outs, targets = _label_batch(0)
    by_hand_ace = ace(softmax=True, to_onehot_y=True, include_background=True, ignore_empty_classes=True, num_bins=20)
    expected = sum(
        wi * (nnunet_loss.loss(x, y) + by_hand_ace(x, y)) for wi, x, y in zip(w, outs, targets, strict=True) if wi
    )
    got = loss(outs, targets)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert float(got - nnunet_loss(outs, targets)) > 0.05  # the ACE term takes part


def test_dscpp_trainer_loss_is_dscpp_plus_nnunet_ce_per_scale(tmp_path, monkeypatch) -> None:
    from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss

    loss = _trainer("nnUNetTrainerSegcalDSCPlusPlus", LABELS, tmp_path, monkeypatch)._build_loss()
    w = _nnunet_ds_weights(3)
    assert list(loss.weight_factors) == pytest.approx(w)
    outs, targets = _label_batch(1)
    dscpp = DSCPlusPlusLoss(gamma=2, softmax=True, to_onehot_y=True, include_background=False)
    ce = RobustCrossEntropyLoss()
    expected = sum(wi * (dscpp(x, y) + ce(x, y)) for wi, x, y in zip(w, outs, targets, strict=True) if wi)
    torch.testing.assert_close(loss(outs, targets), expected, rtol=1e-5, atol=1e-6)


def test_dscpp_trainer_follows_batch_dice_of_the_plans(tmp_path, monkeypatch) -> None:
    loss = _trainer("nnUNetTrainerSegcalDSCPlusPlus", LABELS, tmp_path, monkeypatch, batch_dice=True)._build_loss()
    outs, targets = _label_batch(2)
    dscpp = DSCPlusPlusLoss(gamma=2, softmax=True, to_onehot_y=True, include_background=False, batch=True)
    torch.testing.assert_close(loss.loss.dc(outs[0], targets[0]), dscpp(outs[0], targets[0]))


def _masked_ace_by_hand(x: torch.Tensor, y: torch.Tensor, ignore: int) -> torch.Tensor:
    """mL1-ACE over the known voxels of each image, from the metric side of segcal (bin statistics with a mask),
    absent classes zeroed, mean over the images that have known voxels and over classes."""
    import segcal.functional as F

    known = y[:, 0] != ignore
    lab = torch.where(known, y[:, 0], 0).long()
    stats = F.bin_statistics(x, lab, num_bins=20, activation="softmax", include_background=True, mask=known)
    ace = F.calibration_errors(stats)["ace"]
    present = torch.stack([torch.stack([(lab[b][known[b]] == c).any() for c in range(3)]) for b in range(2)])
    ace = torch.where(present, ace, torch.zeros_like(ace))
    has_known = known.flatten(1).any(1)
    return ace[has_known].mean()


def test_hard_ace_trainer_leaves_ignored_voxels_out(tmp_path, monkeypatch) -> None:
    seg = _trainer("nnUNetTrainerSegcalHardACE", LABELS_IGNORE, tmp_path, monkeypatch)
    ref = _trainer("nnUNetTrainer", LABELS_IGNORE, tmp_path, monkeypatch)
    assert seg.label_manager.ignore_label == 3
    loss, nnunet_loss = seg._build_loss(), ref._build_loss()
    outs, targets = _label_batch(3, ignore=3)
    w = _nnunet_ds_weights(3)
    expected = sum(
        wi * (nnunet_loss.loss(x, y) + _masked_ace_by_hand(x, y, 3))
        for wi, x, y in zip(w, outs, targets, strict=True)
        if wi
    )
    torch.testing.assert_close(loss(outs, targets), expected.float(), rtol=1e-5, atol=1e-6)
    # changing the logits of ignored voxels changes nothing
    outs2 = [x.clone() for x in outs]
    for x, y in zip(outs2, targets, strict=True):
        x[(y == 3).expand_as(x)] = 10.0
    torch.testing.assert_close(loss.loss.term(outs2[0], targets[0]), loss.loss.term(outs[0], targets[0]))
    # an image without any known voxel adds nothing; a batch of them gives 0 with a gradient of 0
    x = outs[0].clone().requires_grad_(True)
    all_ignored = torch.full_like(targets[0], 3.0)
    mixed = torch.cat([targets[0][:1], all_ignored[1:]])
    torch.testing.assert_close(loss.loss.term(x, mixed), loss.loss.term(x[:1], targets[0][:1]))
    value = loss.loss.term(x, all_ignored)
    value.backward()
    assert float(value.detach()) == 0.0 and float(x.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("ignore", [False, True])
def test_region_training_uses_sigmoid_ace(ignore, tmp_path, monkeypatch) -> None:
    labels = {**REGIONS, "ignore": 3} if ignore else REGIONS
    seg = _trainer("nnUNetTrainerSegcalHardACE", labels, tmp_path, monkeypatch)
    ref = _trainer("nnUNetTrainer", labels, tmp_path, monkeypatch)
    assert seg.label_manager.has_regions
    loss, nnunet_loss = seg._build_loss(), ref._build_loss()
    outs, targets = _region_batch(4, ignore)
    ace = HardL1ACELoss(sigmoid=True, include_background=True, ignore_empty_classes=True)
    w = _nnunet_ds_weights(3)
    expected = 0.0
    for wi, x, y in zip(w, outs, targets, strict=True):
        if not wi:
            continue
        if ignore:  # the known voxels are the slabs [10:] of the first axis (scaled)
            k = (~y[:, -1:]).flatten(1).any(0).reshape(y.shape[2:]).nonzero()[:, 0].min()
            a = ace(x[:, :, k:], y[:, :2, k:].float())
        else:
            a = ace(x, y.float())
        expected = expected + wi * (nnunet_loss.loss(x, y) + a)
    torch.testing.assert_close(loss(outs, targets), expected, rtol=1e-5, atol=1e-6)


def test_region_training_dscpp(tmp_path, monkeypatch) -> None:
    loss = _trainer("nnUNetTrainerSegcalDSCPlusPlus", REGIONS, tmp_path, monkeypatch)._build_loss()
    outs, targets = _region_batch(5, ignore=False)
    dscpp = DSCPlusPlusLoss(gamma=2, sigmoid=True, include_background=True)
    bce = torch.nn.BCEWithLogitsLoss()
    x, y = outs[0], targets[0].float()
    torch.testing.assert_close(loss.loss(outs[0], targets[0]), dscpp(x, y) + bce(x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("regions", [False, True])
def test_half_precision_logits_are_computed_in_float32(regions) -> None:
    from segcal.integrations.nnunet.losses import CalibrationTerm, DSCPlusPlusDice

    outs, targets = _region_batch(6, ignore=False) if regions else _label_batch(6)
    x = outs[0].bfloat16()
    for loss in (CalibrationTerm("hard", regions=regions), DSCPlusPlusDice(regions=regions)):
        got = loss(x, targets[0])
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, loss(x.float(), targets[0]))


# -- making the trainers visible to nnU-Net -------------------------------------------------------------------


def test_install_is_idempotent_and_reversible(tmp_path) -> None:
    shim = tmp_path / install.SHIM_NAME
    assert install.trainers_status(tmp_path).state == "absent"
    status, changed = install.install_trainers(tmp_path)
    assert (status.state, changed) == ("installed", True)
    text = shim.read_text()
    assert install.install_trainers(tmp_path) == (status, False)
    assert shim.read_text() == text
    shim.write_text(text.replace("nnUNetTrainerSegcalSoftACE,\n", ""))  # an older segcal's module
    assert install.trainers_status(tmp_path).state == "outdated"
    assert install.install_trainers(tmp_path)[1] is True
    assert shim.read_text() == text
    assert install.uninstall_trainers(tmp_path)[1] is True
    assert not shim.exists()
    assert install.uninstall_trainers(tmp_path)[1] is False


def test_a_file_segcal_did_not_write_is_never_touched(tmp_path) -> None:
    shim = tmp_path / install.SHIM_NAME
    shim.write_text("class Mine: pass\n")
    assert install.trainers_status(tmp_path).state == "foreign"
    with pytest.raises(FileExistsError, match="not written by segcal"):
        install.install_trainers(tmp_path)
    with pytest.raises(FileExistsError, match="not written by segcal"):
        install.uninstall_trainers(tmp_path)
    assert shim.read_text() == "class Mine: pass\n"


def test_the_module_names_every_trainer() -> None:
    from segcal.integrations.nnunet import trainers

    assert sorted(install.TRAINER_NAMES) == sorted(trainers.__all__)


def test_nnunet_trainer_search_finds_the_trainers_through_the_module(tmp_path) -> None:
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from segcal.integrations.nnunet import trainers

    install.install_trainers(tmp_path)
    for name in install.TRAINER_NAMES:
        found = recursive_find_python_class(
            str(tmp_path), name, None, base_folder=str(tmp_path), cleanup_imports_from_base_folder=True
        )
        assert found is getattr(trainers, name)


def test_the_default_target_is_nnunets_trainer_package() -> None:
    import nnunetv2

    assert install.trainer_package_dir() == Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"


def test_cli_install_status_uninstall(tmp_path) -> None:
    target = str(tmp_path)
    res = invoke_cli(["nnunet", "status", "--target", target])
    assert res.exit_code == 1 and "absent" in res.output
    res = invoke_cli(["nnunet", "install-trainers", "--target", target])
    assert res.exit_code == 0 and "installed" in res.output and "nnUNetTrainerSegcalHardACE" in res.output
    res = invoke_cli(["nnunet", "install-trainers", "--target", target])
    assert res.exit_code == 0 and "already installed" in res.output
    assert invoke_cli(["nnunet", "status", "--target", target]).exit_code == 0
    res = invoke_cli(["nnunet", "uninstall-trainers", "--target", target])
    assert res.exit_code == 0 and "removed" in res.output
    res = invoke_cli(["nnunet", "install-trainers", "--target", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "not a folder" in res.output


def test_core_modules_and_the_cli_do_not_import_nnunet() -> None:
    code = (
        "import sys\n"
        "import segcal, segcal.functional, segcal.metrics, segcal.losses, segcal.posthoc, segcal.io\n"
        "import segcal.evaluation, segcal.plots, segcal.report, segcal.training, segcal.cli\n"
        "import segcal.integrations.nnunet, segcal.integrations.nnunet.losses, segcal.integrations.nnunet.install\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('nnunetv2', 'batchgenerators',"
        " 'dynamic_network_architectures')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, check=False, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
