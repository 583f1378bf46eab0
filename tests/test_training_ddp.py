"""DDP: two CPU processes on gloo via ``torch.distributed.run`` end with identical weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _helpers import SRC

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from _training_utils import synthetic_squares
    from monai.losses import DiceLoss
    from segcal.training import train

    out = {out!r}
    x, y = synthetic_squares(12, 16, seed=0)
    xv, yv = synthetic_squares(5, 16, seed=1)
    cfg = {{"epochs": 2, "output_dir": out + "/run", "progress": False,
            "model": {{"channels": [4, 8], "strides": [2], "num_res_units": 1}},
            "data": {{"batch_size": 3}}, "optim": {{"lr": 0.01}}}}
    res = train(cfg, (x, y), (xv, yv), resume=False, loss_fn=DiceLoss(softmax=True, to_onehot_y=True))
    rank = int(os.environ["RANK"])
    assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
    torch.save(res.model.state_dict(), f"{{out}}/rank{{rank}}.pt")
    with open(f"{{out}}/rank{{rank}}.json", "w") as f:
        json.dump(res.history, f)
    torch.distributed.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes_gloo(tmp_path):
    tests = str(Path(__file__).parent)
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT.format(tests=tests, out=str(tmp_path)))
    env = {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    h0 = json.loads((tmp_path / "rank0.json").read_text())
    h1 = json.loads((tmp_path / "rank1.json").read_text())
    # losses and validation Dice are all-reduced: every rank reports the same numbers
    assert [r["val_dice"] for r in h0] == [r["val_dice"] for r in h1]
    assert [r["train_loss"] for r in h0] == [r["train_loss"] for r in h1]
    # only rank 0 wrote the checkpoint, with the same weights
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2
    for k in w0:
        assert torch.equal(ckpt["model"][k], w0[k]), k
    assert not list((tmp_path / "run").glob("*.tmp"))
