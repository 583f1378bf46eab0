"""Peak memory of every calibrator's fit on 10 vs 100 validation volumes: flat, whatever the number of volumes.

Each (calibrator, number of volumes) runs in a fresh subprocess that generates ``n`` volumes of ``size³`` voxels
× 4 classes lazily (a one-shot generator: only one volume exists at a time; the fine-tuner gets a factory of
fresh generators for its two epochs), fits the calibrator and reports the peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), the RSS before the fit and the fit time. The logits are
over-confident (``2 z`` for labels sampled from ``softmax(z)``) and mixed between classes, so every fit has
something to learn.

Settings (flat memory by construction):

* ``temperature``, ``vector``, ``matrix``, ``dirichlet``: ``max_voxels`` voxels held in the reservoir (a uniform
  sample over all volumes);
* ``auxconv``: ``patch_size=16``, ``max_patches=64`` held patches;
* ``auxconv-volumes``: whole-volume Adam steps, one epoch (one volume in memory at a time);
* ``lts``: local temperature scaling, ``patch_size=16``, ``max_patches=64`` held patches (with their halo);
* ``lastlayer``: a small 3D conv net fine-tuned on 24³ crops (``patch_size=24``), two epochs.

The peak RSS with 100 volumes must be within 10% of that with 10 volumes for every calibrator.

Run: ``PYTHONPATH=src python benchmarks/bench_posthoc.py`` (``--size 24 --volumes 4 20`` for a quick check).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CALIBRATORS = ["temperature", "vector", "matrix", "dirichlet", "auxconv", "auxconv-volumes", "lts", "lastlayer"]

CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
from segcal.posthoc import (AuxiliaryConvCalibrator, DirichletScaling, LastLayerFineTuner,
                            LocalTemperatureScaling, MatrixScaling, TemperatureScaling, VectorScaling)

torch.set_num_threads(1)
name, n, size, max_vox = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
classes = 4
mix = torch.eye(classes) * 1.5 + 0.3 * torch.roll(torch.eye(classes), 1, 0)

def volume(i):
    g = torch.Generator().manual_seed(i)
    coarse = torch.randn(1, classes, 6, 6, 6, generator=g) * 3
    z = F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)[0]
    gumbel = -torch.log(-torch.log(torch.rand(z.shape, generator=g).clamp_min(1e-12)))
    y = (z + gumbel).argmax(0)  # an exact sample from softmax(z)
    observed = torch.einsum("ij,j...->i...", torch.linalg.inv(mix), z) * 2.0
    return observed, y

def volumes():
    for i in range(n):
        yield volume(i)

def batches():  # network inputs for the fine-tuner: the observed logits are the "image"
    for i in range(n):
        z, y = volume(i)
        yield z[None], y[None]

rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if name in ("temperature", "vector", "matrix", "dirichlet"):
    cls = {"temperature": TemperatureScaling, "vector": VectorScaling, "matrix": MatrixScaling,
           "dirichlet": DirichletScaling}[name]
    cal = cls(max_voxels=max_vox, seed=0).fit(volumes())
    held = cal.n_voxels_
elif name == "auxconv":
    cal = AuxiliaryConvCalibrator(kernel_size=3, epochs=5, patch_size=16, max_patches=64, batch_size=8)
    cal.fit(volumes())
    held = cal.n_patches_
elif name == "lts":
    cal = LocalTemperatureScaling(epochs=5, patch_size=16, max_patches=64, seed=0).fit(volumes())
    held = cal.max_patches
elif name == "auxconv-volumes":
    cal = AuxiliaryConvCalibrator(kernel_size=3, epochs=1).fit(volumes())
    held = 1
else:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(classes, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(8, classes, 1))
    cal = LastLayerFineTuner(net, epochs=2, lr=1e-2, patch_size=24).fit(batches)
    held = 1
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"calibrator": name, "volumes": n, "peak_rss_mb": peak / 1024, "rss_before_fit_mb": rss0 / 1024,
                  "fit_s": dt, "held": held}))
"""


def run(name: str, n: int, size: int, max_voxels: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(n), str(size), str(max_voxels)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=48, help="side of the cubic volumes (default 48)")
    parser.add_argument("--volumes", type=int, nargs=2, default=[10, 100], help="the two dataset sizes")
    parser.add_argument("--max-voxels", type=int, default=200_000, help="reservoir size of the scaling fits")
    parser.add_argument("--only", nargs="*", choices=CALIBRATORS, help="a subset of the calibrators")
    args = parser.parse_args()
    few, many = args.volumes
    print(f"{'calibrator':>16} {'volumes':>8} {'peak RSS MB':>12} {'RSS before MB':>14} {'fit s':>8} {'held':>8}")
    failed = []
    for name in args.only or CALIBRATORS:
        rows = [run(name, n, args.size, args.max_voxels) for n in (few, many)]
        for r in rows:
            print(
                f"{r['calibrator']:>16} {r['volumes']:>8} {r['peak_rss_mb']:>12.0f} {r['rss_before_fit_mb']:>14.0f} "
                f"{r['fit_s']:>8.1f} {r['held']:>8}"
            )
        growth = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1
        print(f"{name:>16} peak RSS {few} -> {many} volumes: {growth:+.1%}")
        if growth > 0.10:
            failed.append(f"{name}: {growth:+.1%}")
    assert not failed, f"peak RSS grows by more than 10% with the number of volumes: {failed}"


if __name__ == "__main__":
    main()
