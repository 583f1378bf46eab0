"""One training epoch with loss "dice" vs "dice+ace" (hard-binned mL1-ACE) vs "dice+soft_ace".

Same synthetic data for every loss (default 64 2D slices of 112x128, 4 classes), MONAI UNet 16-32-64-128
(strides 2, 2 residual units), Adam, batch 8, built with the :mod:`segcal.training` pieces (``build_model``,
``build_loss``, ``SegmentationDataset``). Losses are run in interleaved rounds (one epoch per loss per round,
after a warm-up epoch each) so that load drifting on a shared machine hits all of them alike; the minimum and
median epoch time over rounds are printed with the overhead relative to Dice alone.

Needs ``segcal.losses.loss_from_string`` (the losses helper's module). Run::

    PYTHONPATH=src python benchmarks/bench_train.py [--n 64] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from segcal.training import ModelConfig, SegmentationDataset, build_loss, build_model, seed_everything


def synthetic_slices(n: int, h: int, w: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Nested smooth ellipses (classes 1..C-1) plus noise: images ``(n, 1, h, w)``, labels ``(n, h, w)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    labels = np.zeros((n, h, w), np.int64)
    for i in range(n):
        cy, cx = h / 2 + rng.normal(0, h / 16), w / 2 + rng.normal(0, w / 16)
        for c in range(1, classes):
            ry = h * (0.45 - 0.1 * c) * rng.uniform(0.8, 1.1)
            rx = w * (0.45 - 0.1 * c) * rng.uniform(0.8, 1.1)
            labels[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = c
    images = labels[:, None].astype(np.float32) / (classes - 1) + 0.25 * rng.standard_normal((n, 1, h, w))
    return images.astype(np.float32), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--height", type=int, default=112)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="timed epochs per loss (after one warm-up)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--losses", default="dice,dice+ace,dice+soft_ace")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(0)
    x, y = synthetic_slices(args.n, args.height, args.width, args.classes)
    ds = SegmentationDataset(x, y, None, size_factor=8)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False)
    mcfg = ModelConfig(out_channels=args.classes, channels=[16, 32, 64, 128], strides=[2, 2, 2])
    specs = args.losses.split(",")
    runs = {}
    for spec in specs:
        torch.manual_seed(0)
        model = build_model(mcfg)
        runs[spec] = (model, build_loss(spec), torch.optim.Adam(model.parameters(), lr=1e-3))

    def epoch(spec: str) -> float:
        model, loss_fn, opt = runs[spec]
        model.train()
        t0 = time.perf_counter()
        for img, lab in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(img), lab[:, None]).backward()
            opt.step()
        return time.perf_counter() - t0

    for spec in specs:  # warm-up
        epoch(spec)
    times: dict[str, list[float]] = {s: [] for s in specs}
    for _ in range(args.rounds):
        for spec in specs:
            times[spec].append(epoch(spec))
    print(
        f"{args.n} slices {args.height}x{args.width}, {args.classes} classes, batch {args.batch_size}, "
        f"UNet 16-32-64-128, {args.threads} threads, {args.rounds} rounds"
    )
    base = min(times[specs[0]])
    for spec in specs:
        t = times[spec]
        print(
            f"{spec:>16s}: min {min(t):7.2f} s/epoch, median {statistics.median(t):7.2f} s "
            f"({min(t) / base:4.2f}x {specs[0]} by min)",
            flush=True,
        )


if __name__ == "__main__":
    main()
