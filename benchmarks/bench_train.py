"""One training epoch with loss "dice" vs "dice+ace" (hard-binned mL1-ACE) vs "dice+soft_ace".

Same synthetic data for every loss (default 64 2D slices of 112x128, 4 classes), MONAI UNet 16-32-64-128
(strides 2, 2 residual units), Adam, batch 8, through :func:`segcal.training.train`. The first epoch warms up
(allocator, MONAI imports); the reported time is the median of the following epochs. Prints the overhead of
the
calibration terms relative to Dice alone.

Needs ``segcal.losses.loss_from_string`` (the losses helper's module). Run::

    PYTHONPATH=src python benchmarks/bench_train.py [--n 64] [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import numpy as np
import torch

from segcal.training import train


def synthetic_slices(n: int, h: int, w: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Nested smooth ellipses (classes 1..C-1) plus noise: images ``(n, 1, h, w)``, labels ``(n, h, w)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    labels = np.zeros((n, h, w), np.int64)
    for i in range(n):
        cy, cx = h / 2 + rng.normal(0, h / 16), w / 2 + rng.normal(0, w / 16)
        for c in range(1, classes):
            ry, rx = (
                h * (0.45 - 0.1 * c) * rng.uniform(0.8, 1.1),
                w * (0.45 - 0.1 * c) * rng.uniform(0.8, 1.1),
            )
            labels[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = c
    images = labels[:, None].astype(np.float32) / (classes - 1) + 0.25 * rng.standard_normal((n, 1, h, w))
    return images.astype(np.float32), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--height", type=int, default=112)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per loss; the first is warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--losses", default="dice,dice+ace,dice+soft_ace")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = synthetic_slices(args.n, args.height, args.width, args.classes)
    results: dict[str, float] = {}
    for spec in args.losses.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = {
                "loss": spec,
                "epochs": args.epochs,
                "output_dir": tmp,
                "progress": False,
                "model": {"out_channels": args.classes, "channels": [16, 32, 64, 128], "strides": [2, 2, 2]},
                "data": {"batch_size": 8},
            }
            res = train(cfg, (x, y), None, resume=False)
        secs = [h["seconds"] for h in res.history]
        results[spec] = statistics.median(secs[1:]) if len(secs) > 1 else secs[0]
        print(
            f"{spec:>16s}: {results[spec]:7.2f} s/epoch (epochs: {', '.join(f'{s:.2f}' for s in secs)}; "
            f"final train loss {res.history[-1]['train_loss']:.4f})",
            flush=True,
        )
    base = results.get("dice")
    if base:
        for spec, t in results.items():
            print(f"{spec:>16s}: {t / base:5.2f}x the Dice-only epoch time")


if __name__ == "__main__":
    main()
