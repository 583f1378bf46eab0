"""Training pipeline: learning, best checkpoint, resume, config schema, folder data, CLI."""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch
import yaml

from _helpers import SRC
from _training_utils import install_loss_fallback, synthetic_squares
from segcal.training import (
    TrainConfig,
    config_from_dict,
    get_rng_state,
    load_checkpoint,
    load_config,
    read_folder,
    set_rng_state,
    train,
)

TINY = {"channels": [4, 8], "strides": [2], "num_res_units": 1}


@pytest.fixture(autouse=True)
def _threads_and_loss(monkeypatch, one_torch_thread):
    install_loss_fallback(monkeypatch)
    yield
    torch.use_deterministic_algorithms(False)


def _cfg(tmp_path, **kw):
    cfg = {
        "epochs": 3,
        "output_dir": str(tmp_path / "run"),
        "progress": False,
        "model": dict(TINY),
        "data": {"batch_size": 8},
        "optim": {"lr": 0.01},
        "loss": "dice",
    }
    for k, v in kw.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg.get(k, {}), **v}
        else:
            cfg[k] = v
    return cfg


def test_training_improves_validation_dice_and_saves_best(tmp_path):
    x, y = synthetic_squares(32, 16, seed=0)
    xv, yv = synthetic_squares(8, 16, seed=1)
    res = train(_cfg(tmp_path, epochs=4), (x, y), (xv, yv), resume=False)
    dice = [h["val_dice"] for h in res.history]
    assert len(dice) == 4 and res.epochs_run == 4
    assert max(dice[1:]) > dice[0] + 0.1, dice
    assert res.best_dice == pytest.approx(max(dice))
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == res.best_epoch and best["val_dice"] == pytest.approx(res.best_dice)
    with (tmp_path / "run" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["val_dice"]) == pytest.approx(dice[-1])


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            _assert_same_state(a[k], b[k])
        elif isinstance(a[k], list):
            assert len(a[k]) == len(b[k])
            for u, v in zip(a[k], b[k], strict=True):
                _assert_same_state(u, v) if isinstance(u, dict) else None
                if not isinstance(u, dict):
                    assert u == v
        else:
            assert a[k] == b[k], k


def test_resume_matches_uninterrupted_run(tmp_path):
    # patches + dropout: exercises the seeded patch sampler and the restored torch RNG (dropout masks)
    x, y = synthetic_squares(16, 32, seed=2)
    xv, yv = synthetic_squares(4, 32, seed=3)
    kw = {"model": {"dropout": 0.2}, "data": {"patch_size": [16, 16], "batch_size": 4}}

    snapshots = {}

    def keep(epoch, model, opt):
        snapshots[epoch] = (_state(model), copy.deepcopy(opt.state_dict()))

    full = train(_cfg(tmp_path / "a", **kw), (x, y), (xv, yv), resume=False, on_epoch_end=keep)

    cfg_b = _cfg(tmp_path / "b", **kw)
    part = train(cfg_b, (x, y), (xv, yv), resume=False, stop_after_epoch=1)  # "killed" after epoch 1
    assert part.epochs_run == 1
    ckpt = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert ckpt["epoch"] == 1
    _assert_same_state(ckpt["optimizer"], snapshots[1][1])
    _assert_same_state(ckpt["model"], snapshots[1][0])

    resumed = train(cfg_b, (x, y), (xv, yv), resume=True)
    assert [h["epoch"] for h in resumed.history] == [2, 3]
    _assert_same_state(_state(resumed.model), _state(full.model))
    assert resumed.history[-1]["val_dice"] == pytest.approx(full.history[-1]["val_dice"])
    with (tmp_path / "b" / "run" / "metrics.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_rng_state_roundtrip_through_weights_only_checkpoint(tmp_path):
    import random

    torch.manual_seed(5)
    np.random.seed(5)  # noqa: NPY002
    random.seed(5)
    torch.save({"rng": get_rng_state()}, tmp_path / "r.pt")
    a = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_config_schema_rejects_unknown_keys_with_valid_list(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown config key\(s\) 'epochz' in the top level; valid keys: .*epochs"
    ):
        config_from_dict({"epochz": 3})
    with pytest.raises(
        ValueError, match=r"'chanels' in section 'model'; valid keys: spatial_dims, .*channels"
    ):
        config_from_dict({"model": {"chanels": [4, 8]}})
    with pytest.raises(ValueError, match=r"model\.strides needs"):
        config_from_dict({"model": {"channels": [4, 8, 16], "strides": [2]}})
    with pytest.raises(ValueError, match=r"data\.batch_size must be an integer"):
        config_from_dict({"data": {"batch_size": "8"}})
    with pytest.raises(ValueError, match="multiples of 4"):
        config_from_dict(
            {"model": {"channels": [4, 8, 16], "strides": [2, 2]}, "data": {"patch_size": [18, 16]}}
        )
    p = tmp_path / "c.yaml"
    p.write_text("loss: dice+ce\nepochs: 2\nmodel: {channels: [4, 8], strides: [2], dropout: 0.1}\n")
    cfg = load_config(p)
    assert isinstance(cfg, TrainConfig) and cfg.loss == "dice+ce" and cfg.model.dropout == 0.1
    assert cfg.data.batch_size == 4  # default kept
    p.write_text("optim: {lr: 0.1, momentum: 0.9}\n")
    with pytest.raises(ValueError, match=r"c\.yaml: unknown config key\(s\) 'momentum' in section 'optim'"):
        load_config(p)


def test_folder_data_npz_and_nifti_and_cli_train(tmp_path):
    import nibabel as nib
    from typer.testing import CliRunner

    from segcal.cli import app

    x, y = synthetic_squares(6, 16, seed=4)
    tr, va = tmp_path / "tr", tmp_path / "va"
    tr.mkdir()
    va.mkdir()
    for i in range(4):
        np.savez(tr / f"c{i}.npz", image=x[i], label=y[i])
    for i in range(4, 6):  # validation as NIfTI pairs, 2D slices stored (X, Y, 1)
        nib.save(nib.Nifti1Image(x[i, 0, :, :, None], np.eye(4)), str(va / f"c{i}_image.nii.gz"))
        nib.save(
            nib.Nifti1Image(y[i, :, :, None].astype(np.int16), np.eye(4)), str(va / f"c{i}_label.nii.gz")
        )
    names, imgs, labs = read_folder(va, 2)
    assert names == ["c4", "c5"] and imgs[0].shape == (1, 16, 16) and labs[1].dtype == np.int64
    np.testing.assert_array_equal(labs[0], y[4])
    cfg = _cfg(tmp_path, epochs=1, data={"train_dir": str(tr), "val_dir": str(va), "batch_size": 2})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["train", str(cfg_path)])
    assert result.exit_code == 0, result.output
    assert "best validation Dice" in result.output
    assert (tmp_path / "run" / "best.pt").is_file()
    cfg_path.write_text("epochs: 1\nmodle: {}\n")
    bad = CliRunner().invoke(app, ["train", str(cfg_path)])
    assert bad.exit_code == 2 and "'modle'" in " ".join(bad.output.split())


def test_bad_labels_and_channels_are_rejected(tmp_path):
    x, y = synthetic_squares(4, 16)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\]"):
        train(_cfg(tmp_path, epochs=1), (x, y * 2), None, resume=False)
    with pytest.raises(ValueError, match="in_channels"):
        train(_cfg(tmp_path, epochs=1), (np.concatenate([x, x], 1), y), None, resume=False)


def test_3d_patches_train_and_validate(tmp_path):
    rng = np.random.default_rng(0)
    y = np.zeros((3, 12, 12, 10), np.int64)
    y[:, 3:8, 4:9, 2:7] = 1
    x = (y[:, None] + 0.3 * rng.standard_normal(y[:, None].shape)).astype(np.float32)
    cfg = _cfg(tmp_path, epochs=1, model={"spatial_dims": 3}, data={"patch_size": [8, 8, 8], "batch_size": 3})
    res = train(cfg, (x, y), (x[:1], y[:1]), resume=False)
    assert res.epochs_run == 1 and 0.0 <= res.history[0]["val_dice"] <= 1.0


KILL_SCRIPT = """
import os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from _training_utils import synthetic_squares
from monai.losses import DiceLoss
from segcal.training import train

x, y = synthetic_squares(8, 16, seed=6)
def die(epoch, model, opt):
    if epoch == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # hard kill right after the epoch-2 checkpoint
train({cfg!r}, (x, y), (x[:2], y[:2]), resume=False, loss_fn=DiceLoss(softmax=True, to_onehot_y=True),
      on_epoch_end=die)
"""


@pytest.mark.slow
def test_resume_after_sigkill_in_subprocess(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from monai.losses import DiceLoss

    x, y = synthetic_squares(8, 16, seed=6)
    cfg = _cfg(tmp_path / "k", epochs=3, model={"dropout": 0.1})
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), cfg=cfg))
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(tmp_path / "k" / "run" / "last.pt")["epoch"] == 2
    loss = DiceLoss(softmax=True, to_onehot_y=True)
    resumed = train(cfg, (x, y), (x[:2], y[:2]), resume=True, loss_fn=loss)
    assert [h["epoch"] for h in resumed.history] == [3]
    full = train(
        _cfg(tmp_path / "f", epochs=3, model={"dropout": 0.1}),
        (x, y),
        (x[:2], y[:2]),
        resume=False,
        loss_fn=loss,
    )
    _assert_same_state(_state(resumed.model), _state(full.model))


def test_resume_with_mismatched_config_is_rejected(tmp_path):
    x, y = synthetic_squares(4, 16)
    train(_cfg(tmp_path, epochs=1), (x, y), None, resume=False)
    with pytest.raises(ValueError, match=r"last\.pt: cannot resume, the checkpoint does not match"):
        train(_cfg(tmp_path, epochs=2, model={"channels": [4, 16]}), (x, y), None, resume=True)


def test_poly_schedule_sets_each_epochs_rate_and_resumes(tmp_path):
    """nnU-Net's polynomial decay: epoch e of E runs at lr * (1 - e / E) ** 0.9, also after a resume."""
    x, y = synthetic_squares(8, 16, seed=4)
    kw = {"epochs": 4, "optim": {"lr": 0.02, "schedule": "poly"}}
    full = train(_cfg(tmp_path / "a", **kw), (x, y), None, resume=False)
    expected = [0.02 * (1 - e / 4) ** 0.9 for e in range(4)]
    assert [h["lr"] for h in full.history] == pytest.approx(expected, rel=1e-12)
    cfg_b = _cfg(tmp_path / "b", **kw)
    train(cfg_b, (x, y), None, resume=False, stop_after_epoch=2)
    resumed = train(cfg_b, (x, y), None, resume=True)
    assert [h["lr"] for h in resumed.history] == pytest.approx(expected[2:], rel=1e-12)
    _assert_same_state(_state(resumed.model), _state(full.model))
    with pytest.raises(ValueError, match=r"optim\.schedule must be 'constant' or 'poly'"):
        config_from_dict(_cfg(tmp_path / "c", optim={"schedule": "cosine"})).validate()


def test_train_many_in_two_processes_equals_one_after_another(tmp_path):
    """Two spawned workers, one torch thread each: the same weights, Dice and history as sequential training."""
    from segcal.training import TrainJob, train_many

    x, y = synthetic_squares(8, 16, seed=5)
    xv, yv = synthetic_squares(2, 16, seed=6)

    def jobs(root):
        return [TrainJob(f"m{k}", _cfg(root / f"m{k}", seed=k, loss="dice+ce" if k else "dice")) for k in range(3)]

    seen: list[tuple[str, int]] = []
    par = train_many(jobs(tmp_path / "p"), (x, y), (xv, yv), workers=2, on_epoch=lambda n, e: seen.append((n, e)))
    seq = train_many(jobs(tmp_path / "s"), (x, y), (xv, yv), workers=1)
    assert list(par) == ["m0", "m1", "m2"] and sorted(seen) == [(f"m{k}", e) for k in range(3) for e in (1, 2, 3)]
    for name in par:
        _assert_same_state(_state(par[name].model), _state(seq[name].model))
        assert par[name].best_dice == seq[name].best_dice and par[name].best_epoch == seq[name].best_epoch
    assert not torch.equal(next(iter(_state(par["m0"].model).values())), next(iter(_state(par["m1"].model).values())))
