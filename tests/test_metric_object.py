"""The stateful metric: exact merging across batches, pickling, DDP sync on 2 gloo processes."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import segcal.functional as F
from _helpers import SRC
from segcal.metrics import SegmentationCalibrationMetric


def _data(n: int = 6, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, 12, 10, 6, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, c, (n, 12, 10, 6), generator=g)
    return logits, labels


def _assert_same(a, b) -> None:
    assert a.case_ids == b.case_ids
    for k in a.per_image:
        torch.testing.assert_close(a.per_image[k], b.per_image[k], equal_nan=True, rtol=0, atol=1e-12)
    for k in a.pooled:
        torch.testing.assert_close(a.pooled[k], b.pooled[k], equal_nan=True, rtol=0, atol=1e-12)


def test_merge_equals_single_pass() -> None:
    logits, labels = _data()
    whole = SegmentationCalibrationMetric(activation="softmax")
    whole.update(logits, labels, case_ids=[str(i) for i in range(6)])
    a = SegmentationCalibrationMetric(activation="softmax")
    b = SegmentationCalibrationMetric(activation="softmax")
    a.update(logits[:2], labels[:2], case_ids=["0", "1"])
    b.update(logits[2:5], labels[2:5], case_ids=["2", "3", "4"])
    b.update(logits[5:], labels[5:], case_ids=["5"])
    _assert_same((a + b).compute(), whole.compute())
    _assert_same(a.merge(b).compute(), whole.compute())


def test_values_match_functional_core() -> None:
    logits, labels = _data()
    m = SegmentationCalibrationMetric(activation="softmax", include_background=False)
    m.update(logits, labels)
    r = m.compute()
    probs = torch.softmax(logits, 1)
    stats = F.bin_statistics(probs, labels, 20, include_background=False)
    torch.testing.assert_close(r.per_image["ace"], F.calibration_errors(stats)["ace"])
    torch.testing.assert_close(r.pooled["ece"], F.calibration_errors(stats.pooled())["ece"][0])
    torch.testing.assert_close(r.per_image["nll"][:, 0], F.negative_log_likelihood(probs, labels))
    torch.testing.assert_close(
        r.per_image["dice"], F.dice_from_counts(F.confusion_counts(probs, labels, include_background=False))
    )
    # pooled NLL is the voxel-weighted mean of the per-image NLL (all images have equal size here)
    torch.testing.assert_close(r.pooled["nll"][0], r.per_image["nll"].mean())
    assert r.class_names == ["class_1", "class_2", "class_3"]
    assert r.per_image["ace"].shape == (6, 3)


def test_pickle_roundtrip_keeps_results() -> None:
    logits, labels = _data(3)
    m = SegmentationCalibrationMetric(activation="softmax")
    m.update(logits, labels)
    m2 = pickle.loads(pickle.dumps(m))
    _assert_same(m.compute(), m2.compute())


def test_merge_refuses_different_settings() -> None:
    a = SegmentationCalibrationMetric(num_bins=10)
    b = SegmentationCalibrationMetric(num_bins=20)
    with pytest.raises(ValueError, match="different settings"):
        a.merge(b)


def test_compute_before_update_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="update"):
        SegmentationCalibrationMetric().compute()


def test_regions_multilabel_brats_style() -> None:
    logits, labels = _data(2)
    m = SegmentationCalibrationMetric(activation="softmax", regions=[[3], [1, 3], [1, 2, 3]],
                                      class_names=["ET", "TC", "WT"])
    m.update(logits, labels)
    r = m.compute()
    probs = torch.softmax(logits, 1)
    wt_p = probs[:, 1:].sum(1, keepdim=True)
    wt_y = (labels > 0).unsqueeze(1).double()
    stats = F.bin_statistics(wt_p, wt_y, 20, mode="multilabel")
    torch.testing.assert_close(r.per_image["ace"][:, 2], F.calibration_errors(stats)["ace"][:, 0])


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from segcal.metrics import SegmentationCalibrationMetric
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 10, 9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (4, 10, 9), generator=g)
    m = SegmentationCalibrationMetric(activation="softmax")
    sl = slice(0, 1) if rank == 0 else slice(1, 4)
    m.update(logits[sl], labels[sl], case_ids=[str(i) for i in range(4)][sl])
    m.sync()
    m.sync()  # idempotent: a second sync must not duplicate the images
    assert len(m) == 4, len(m)
    r = m.compute()
    ref = SegmentationCalibrationMetric(activation="softmax")
    ref.update(logits, labels, case_ids=[str(i) for i in range(4)])
    rr = ref.compute()
    assert r.case_ids == rr.case_ids, (r.case_ids, rr.case_ids)
    for k in rr.pooled:
        torch.testing.assert_close(r.pooled[k], rr.pooled[k], equal_nan=True, rtol=0, atol=1e-12)
    print(f"rank{rank} ok {float(r.pooled['ace'].mean()):.12f}")
    dist.destroy_process_group()
    """
)


def test_sync_over_two_gloo_processes(tmp_path: Path) -> None:
    script = tmp_path / "ddp_metric.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    with socket.socket() as sock:  # a free port, so parallel test workers do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "--master_addr=127.0.0.1", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = sorted(line for line in out.stdout.splitlines() if " ok " in line)
    assert len(lines) == 2 and lines[0].split()[-1] == lines[1].split()[-1]
