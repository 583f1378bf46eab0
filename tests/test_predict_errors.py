"""``segcal predict`` refuses an unusable checkpoint or output folder with one clear error naming it, exit code
1 and no traceback (docs/training.md)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from segcal.cli import app
from segcal.io import OutputError, prepare_output_dir
from segcal.training import build_model, config_from_dict, load_model
from segcal.training.trainer import CheckpointError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "out_channels": 3}


def _save(path: Path, config: dict, model: dict | None = None) -> Path:
    weights = build_model(config_from_dict({"model": model or MODEL}).model).state_dict()
    torch.save({"model": weights, "config": config}, path)
    return path


def _inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    np.savez(folder / "case0.npz", image=np.zeros((16, 16), np.float32))
    return folder


def _predict(tmp_path: Path, checkpoint: Path, out: Path) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["predict", str(_inputs(tmp_path)), "-o", str(out), "-c", str(checkpoint)])
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    output = " ".join(res.output.split())
    assert "Traceback" not in output
    return res.exit_code, output


def test_a_checkpoint_without_a_model_config_is_one_clear_error(tmp_path: Path) -> None:
    ckpt = _save(tmp_path / "nomodel.pt", {"loss": "dice", "epochs": 2})
    code, output = _predict(tmp_path, ckpt, tmp_path / "out")
    assert code == 1
    assert f"{ckpt}: the checkpoint's config has no 'model' section" in output
    with pytest.raises(CheckpointError, match=r"nomodel\.pt: the checkpoint's config has no 'model' section"):
        load_model(ckpt)
    assert not (tmp_path / "out").exists()


def test_absurd_channels_are_refused_before_the_network_is_built(tmp_path: Path) -> None:
    absurd = {**MODEL, "channels": [10**7, 2 * 10**7]}
    ckpt = _save(tmp_path / "absurd.pt", {"model": absurd})
    code, output = _predict(tmp_path, ckpt, tmp_path / "out")
    assert code == 1
    assert f"{ckpt}: the model config (channels [10000000, 20000000]) needs at least" in output
    assert "the config does not belong to these weights" in output
    bad = _save(tmp_path / "bools.pt", {"model": {**MODEL, "channels": [True, 8]}})
    with pytest.raises(CheckpointError, match=r"bools\.pt: invalid model config .*channels must be a list of posi"):
        load_model(bad)


def test_a_missing_checkpoint_exits_1_and_stays_a_file_not_found_error(tmp_path: Path) -> None:
    code, output = _predict(tmp_path, tmp_path / "missing.pt", tmp_path / "out")
    assert code == 1 and f"checkpoint not found: {tmp_path / 'missing.pt'}" in output
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(tmp_path / "missing.pt")


def test_an_output_folder_under_a_regular_file_is_one_clear_error(tmp_path: Path) -> None:
    """Fails for every user, root included (chmod does not stop root)."""
    ckpt = _save(tmp_path / "a.pt", {"model": MODEL})
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    out = blocker / "sub"
    code, output = _predict(tmp_path, ckpt, out)
    assert code == 1
    assert f"{out}: cannot write into the output folder: Not a directory" in output
    code, output = _predict(tmp_path, ckpt, blocker)
    assert code == 1 and f"{blocker}: cannot write into the output folder: it is a file, not a folder" in output


def test_a_full_disk_names_the_folder_and_the_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _save(tmp_path / "a.pt", {"model": MODEL})

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("segcal.training.predict.write_npz", full)
    out = tmp_path / "out"
    code, output = _predict(tmp_path, ckpt, out)
    assert code == 1
    assert f"{out}: cannot write the prediction of case0: {os.strerror(errno.ENOSPC)}" in output


def test_prepare_output_dir(tmp_path: Path) -> None:
    assert prepare_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())  # the probe is gone
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match=r"f/x: cannot write into the output folder") as info:
        prepare_output_dir(tmp_path / "f" / "x")
    assert isinstance(info.value, OSError) and info.value.path == tmp_path / "f" / "x"
