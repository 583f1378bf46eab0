"""The per-rank function of the two-process gloo test of the torchmetrics integration, in a module of its own so
that the spawned processes import only what they need (not pytest, nor the test module)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def softmax_data(b: int, c: int, shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32):
    """Softmax probabilities and label maps drawn from a flatter distribution (miscalibrated on purpose)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(b, c, *shape, generator=g) * 2.5, 1).to(dtype)
    flat = torch.softmax(p.double().log() / 2, 1).movedim(1, -1).reshape(-1, c)
    y = torch.multinomial(flat, 1, generator=g)[:, 0].reshape(b, *shape)
    return p, y


def all_data():
    """The images the two ranks share out (rank 0: images 0-2, rank 1: image 3)."""
    return softmax_data(4, 3, (10, 9), 20, torch.float64)


def torchmetrics_rank(rank: int, port: int, out_dir: str) -> None:
    """Rank ``rank`` of 2: update on its share, compute with and without sync, save both."""
    from segcal.integrations.torchmetrics import SegmentationCalibrationError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        p, y = all_data()
        mine = slice(0, 3) if rank == 0 else slice(3, 4)  # uneven shares: 3 images and 1
        synced = SegmentationCalibrationError(3, 10)
        local = SegmentationCalibrationError(3, 10, sync_on_compute=False)
        for metric in (synced, local):
            metric.update(p[mine], y[mine])
        result = {"synced": synced.compute(), "local": local.compute()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def monai_rank(rank: int, port: int, out_dir: str) -> None:
    """Rank ``rank`` of 2 of the MONAI metric: its share of the images, then the per-image values, the
    aggregate and the pooled values, which MONAI's buffers gather over the ranks."""
    from segcal.integrations.monai import SegcalMetric

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        p, y = all_data()
        mine = slice(0, 3) if rank == 0 else slice(3, 4)  # uneven shares: 3 images and 1
        metric = SegcalMetric("ace", num_bins=10)
        metric(p[mine], y[mine])
        result = {"per_image": metric.get_buffer(), "aggregate": metric.aggregate(), "pooled": metric.pooled()}
        torch.save(result, os.path.join(out_dir, f"monai_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
