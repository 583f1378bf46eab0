"""Memory and time of streaming TemperatureScaling fits on many 3D volumes.

Each setting runs in a fresh subprocess that generates ``n`` volumes of 96³ voxels × 4 classes lazily (a
generator: only one volume exists at a time), fits ``TemperatureScaling(max_voxels_per_volume=...)`` and
reports the peak resident set size (``resource.getrusage``) and the fit time. Peak RSS must stay below 2
GB and
must not grow with the number of volumes beyond the held subsample (``max_voxels × n × C × 5`` bytes:
float32 logits, uint8 targets).

Run: ``PYTHONPATH=src python benchmarks/bench_posthoc.py``
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
from segcal.posthoc import TemperatureScaling

torch.set_num_threads(1)
n, size, classes, max_vox, planted = int(sys.argv[1]), int(sys.argv[2]), 4, int(sys.argv[3]), 2.0

def volumes():
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        coarse = torch.randn(1, classes, 8, 8, 8, generator=g) * 3
        z = F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)[0]
        gumbel = -torch.log(-torch.log(torch.rand(z.shape, generator=g).clamp_min(1e-12)))
        y = (z + gumbel).argmax(0)  # exact sample from softmax(z)
        yield z * planted, y

rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
ts = TemperatureScaling(max_voxels_per_volume=max_vox, seed=0).fit(volumes())
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"volumes": n, "peak_rss_mb": peak / 1024, "rss_before_fit_mb": rss0 / 1024,
                  "fit_s": dt, "temperature": ts.temperature_, "held_voxels": ts.n_voxels_}))
"""


def run(n: int, size: int = 96, max_voxels: int = 50_000) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n), str(size), str(max_voxels)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = [run(n) for n in (10, 50)]
    print(
        f"{'volumes':>8} {'peak RSS MB':>12} {'RSS before MB':>14} {'fit s':>8} {'T':>7} {'held voxels':>12}"
    )
    for r in rows:
        print(
            f"{r['volumes']:>8} {r['peak_rss_mb']:>12.0f} {r['rss_before_fit_mb']:>14.0f} {r['fit_s']:>8.1f} "
            f"{r['temperature']:>7.3f} {r['held_voxels']:>12}"
        )
    growth = rows[1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    print(
        f"peak RSS growth 10 -> 50 volumes: {growth:.0f} MB (held subsample grows by "
        f"{40 * 50_000 * (4 * 4 + 4) / 2**20:.0f} MB: float32 logits + uint8 targets)"
    )
    assert all(r["peak_rss_mb"] < 2048 for r in rows), "peak RSS above 2 GB"


if __name__ == "__main__":
    main()
