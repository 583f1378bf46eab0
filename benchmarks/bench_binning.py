"""Benchmark of the binning core on one BraTS-sized case (results: docs/core-validation.md).

Case: softmax probabilities ``(1, 4, 240, 240, 155)`` float32 (136 MiB) and a uint8 label map, M = 20 bins,
2 torch threads and 2 numba threads. Prints the median wall time (>= 5 repeats after a warm-up; numba
compilation excluded) of

* a plain read of the probabilities (``p.sum()``), the floor for any one-pass algorithm;
* segcal ``bin_statistics`` (with and without input validation) and ``+ calibration_errors``;
* segcal's pure-torch path (the one used on CUDA) on CPU;
* segcal top-label ECE (``top_label_statistics`` + ``calibration_error``);
* MONAI ``CalibrationErrorMetric`` (ACE) on one-hot targets prepared outside the timing (the one-hot
  conversion is timed separately);
* torchmetrics ``MulticlassCalibrationError`` (top-label, l1);

with the ratios MONAI / segcal and segcal / plain read, and the extra peak memory of ``bin_statistics``
measured in a fresh subprocess (``ru_maxrss`` after loading the input vs after running).

The headline ratio segcal / plain read is also measured *paired*: the plain read and ``bin_statistics`` are
called alternately (``--pairs`` pairs, which goes first drawn at random), each pair gives one ratio, and the
median of those ratios is printed. On a shared machine whose speed drifts over seconds, the two medians of
separate runs can come from different machine states; a pair's two calls are milliseconds apart.

Usage::

    PYTHONPATH=src python benchmarks/bench_binning.py [--repeats 5] [--pairs 21] [--threads 2] [--device cuda] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

# Like the `segcal` command: idle OpenMP threads sleep rather than spin (torch's pool and numba's are separate
# and steal each other's cores otherwise). Same setting for every peer in this run; override by exporting it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

SHAPE = (1, 4, 240, 240, 155)
NUM_BINS = 20


def make_case(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocky label map (85 % background) and confident-but-noisy softmax probabilities, built slab by slab
    along the last axis so the temporary memory stays small (the input itself is the only large tensor)."""
    g = torch.Generator().manual_seed(seed)
    b, c, *spatial = shape
    coarse = [max(1, s // 8) for s in spatial]
    u = torch.rand(b, *coarse, generator=g)
    lab_c = torch.where(u < 0.85, 0, 1 + (u * 1000).long() % (c - 1))
    idx = [torch.arange(s) * cs // s for s, cs in zip(spatial, coarse, strict=True)]
    lab = lab_c[:, idx[0]][:, :, idx[1]][..., idx[2]].to(torch.uint8).contiguous()
    probs = torch.empty(shape, dtype=torch.float32)
    step = 8
    for z0 in range(0, spatial[-1], step):
        sl = slice(z0, min(spatial[-1], z0 + step))
        onehot = torch.nn.functional.one_hot(lab[..., sl].long(), c).movedim(-1, 1).float()
        logits = 5.0 * onehot + 1.5 * torch.randn(onehot.shape, generator=g)
        probs[..., sl] = torch.softmax(logits, 1)
    return probs, lab


CPU_TIMES: dict[int, float] = {}


def timeit(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time after one warm-up call; the median process CPU time (all threads) is kept in
    ``CPU_TIMES`` under the same key order, as a contention-robust companion figure on a shared machine."""
    fn()  # warm-up (numba compile / cache load, allocator)
    sync()
    times, cpu = [], []
    for _ in range(repeats):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    CPU_TIMES[len(CPU_TIMES)] = statistics.median(cpu)
    return statistics.median(times)


def _memory_child(threads: int, folder: str) -> None:
    """Runs in a fresh process: prints JSON with the RSS high-water mark before/after bin_statistics.

    The input is read from ``.npy`` files (no temporaries while loading), after the kernels are loaded, so
    ``after - before`` is the extra peak memory of ``bin_statistics`` itself.
    """
    import numpy as np

    torch.set_num_threads(threads)
    from segcal.functional import _kernels
    from segcal.functional.binning import bin_statistics

    _kernels.set_threads(threads)
    tiny_p, tiny_l = make_case((1, 4, 8, 8, 8))
    bin_statistics(tiny_p, tiny_l, NUM_BINS)  # load the compiled kernels before measuring
    p = torch.from_numpy(np.load(os.path.join(folder, "p.npy"), allow_pickle=False))
    lab = torch.from_numpy(np.load(os.path.join(folder, "lab.npy"), allow_pickle=False))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bin_statistics(p, lab, NUM_BINS)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"input_bytes": p.numel() * p.element_size() + lab.numel() * lab.element_size(),
                      "before_kb": before, "after_kb": after}))


def memory_report(p: torch.Tensor, lab: torch.Tensor, threads: int) -> dict[str, float]:
    import tempfile

    import numpy as np

    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as folder:
        np.save(os.path.join(folder, "p.npy"), p.numpy())
        np.save(os.path.join(folder, "lab.npy"), lab.numpy())
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", folder, "--threads", str(threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=21, help="alternated pairs of the paired ratio (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--small", action="store_true", help="a (1, 4, 96, 96, 60) case for a quick check")
    ap.add_argument("--skip-reference", action="store_true", help="skip MONAI and torchmetrics")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def bench_cuda(p: torch.Tensor, lab: torch.Tensor, r: int) -> None:
    """segcal on the GPU against a plain read of the same tensor."""
    from segcal.functional.binning import bin_statistics

    if not torch.cuda.is_available():
        print("CUDA requested but not available; nothing to do on GPU")
        return
    dev = torch.device("cuda")
    pd, ld = p.to(dev), lab.to(dev)
    sync = torch.cuda.synchronize
    rows = {
        "plain read p.sum() [cuda]": timeit(lambda: pd.sum(), r, sync),
        "segcal bin_statistics [cuda]": timeit(lambda: bin_statistics(pd, ld, NUM_BINS), r, sync),
        "segcal bin_statistics check=False [cuda]": timeit(
            lambda: bin_statistics(pd, ld, NUM_BINS, check=False), r, sync
        ),
    }
    for k, v in rows.items():
        print(f"{k:<48s} {v * 1e3:10.1f} ms")
    plain = rows["plain read p.sum() [cuda]"]
    print(f"ratio segcal/plain read [cuda]: {rows['segcal bin_statistics [cuda]'] / plain:.1f}x "
          f"(check=False: {rows['segcal bin_statistics check=False [cuda]'] / plain:.1f}x)")


def bench_segcal(p: torch.Tensor, lab: torch.Tensor, r: int) -> dict[str, float]:
    """segcal's CPU paths against a plain read of the same tensor."""
    from segcal.functional.binning import _bin_statistics_torch, bin_statistics
    from segcal.functional.calibration import calibration_error, calibration_errors, top_label_statistics

    ids = torch.arange(4)
    lab64 = lab.long()
    return {
        "plain read p.sum()": timeit(lambda: p.sum(), r),
        "segcal bin_statistics": timeit(lambda: bin_statistics(p, lab, NUM_BINS), r),
        "segcal bin_statistics check=False": timeit(lambda: bin_statistics(p, lab, NUM_BINS, check=False), r),
        "segcal bin_statistics + calibration_errors": timeit(
            lambda: calibration_errors(bin_statistics(p, lab, NUM_BINS)), r
        ),
        "segcal torch path (CUDA code) on CPU": timeit(
            lambda: _bin_statistics_torch(p, lab64, None, ids, None, NUM_BINS, "right"), max(1, r // 2)
        ),
        "segcal top-label ECE": timeit(
            lambda: calibration_error(top_label_statistics(p, lab, NUM_BINS), "expected"), r
        ),
    }


def bench_peers(p: torch.Tensor, lab: torch.Tensor, r: int) -> dict[str, float]:
    """MONAI's CalibrationErrorMetric and torchmetrics' MulticlassCalibrationError on the same case."""
    from monai.metrics import CalibrationErrorMetric
    from torchmetrics.classification import MulticlassCalibrationError

    lab64 = lab.long()

    def onehot() -> torch.Tensor:
        return torch.nn.functional.one_hot(lab64, 4).movedim(-1, 1).float()

    rows = {"one-hot conversion (for MONAI)": timeit(onehot, max(1, r // 2))}
    y_oh = onehot()

    def monai_ace() -> torch.Tensor:
        m = CalibrationErrorMetric(num_bins=NUM_BINS, calibration_reduction="average")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m(p, y_oh)
            return m.aggregate()

    rows["MONAI CalibrationErrorMetric (ACE)"] = timeit(monai_ace, max(1, r // 2))
    y_oh = torch.empty(0)  # free the one-hot copy before timing torchmetrics
    tm = MulticlassCalibrationError(num_classes=4, n_bins=NUM_BINS, norm="l1", validate_args=False)

    def tm_ece() -> torch.Tensor:
        tm.reset()
        return tm(p, lab64)

    rows["torchmetrics MulticlassCalibrationError (top-label)"] = timeit(tm_ece, max(1, r // 2))
    return rows


def paired_ratios(p: torch.Tensor, lab: torch.Tensor, pairs: int, seed: int = 0) -> dict[str, float]:
    """Median over ``pairs`` alternated calls of (segcal time / plain read time), validated and ``check=False``."""
    import random

    from segcal.functional.binning import bin_statistics

    calls = {
        "plain": lambda: p.sum(),
        "validated": lambda: bin_statistics(p, lab, NUM_BINS),
        "check=False": lambda: bin_statistics(p, lab, NUM_BINS, check=False),
    }
    for fn in calls.values():
        fn()  # warm-up
    rng = random.Random(seed)
    ratios: dict[str, list[float]] = {"validated": [], "check=False": []}
    for _ in range(pairs):
        for key in ratios:
            order = ["plain", key]
            rng.shuffle(order)
            took = {}
            for name in order:
                t0 = time.perf_counter()
                calls[name]()
                took[name] = time.perf_counter() - t0
            ratios[key].append(took[key] / took["plain"])
    return {key: statistics.median(v) for key, v in ratios.items()}


def print_ratios(rows: dict[str, float]) -> None:
    print(f"{'':<52s} {'wall':>10s}    {'CPU (all threads)':>18s}")
    for (k, v), cpu in zip(rows.items(), CPU_TIMES.values(), strict=True):
        print(f"{k:<52s} {v * 1e3:10.1f} ms {cpu * 1e3:12.1f} ms")
    plain = rows["plain read p.sum()"]
    seg = rows["segcal bin_statistics"]
    seg_nc = rows["segcal bin_statistics check=False"]
    print(f"ratio segcal/plain read of the medians above: {seg / plain:.2f}x (validated), "
          f"{seg_nc / plain:.2f}x (check=False)")
    if "MONAI CalibrationErrorMetric (ACE)" in rows:
        mon = rows["MONAI CalibrationErrorMetric (ACE)"]
        seg_all = rows["segcal bin_statistics + calibration_errors"]
        print(f"ratio MONAI/segcal: {mon / seg_all:.1f}x "
              f"(MONAI excluding its one-hot input vs segcal bin_statistics + all five errors)")
        tmv = rows["torchmetrics MulticlassCalibrationError (top-label)"]
        print(f"ratio torchmetrics/segcal top-label: {tmv / rows['segcal top-label ECE']:.1f}x")


def main() -> None:
    args = _args()
    if args.memory_child:
        _memory_child(args.threads, args.memory_child)
        return
    torch.set_num_threads(args.threads)
    from segcal.functional import _kernels

    _kernels.set_threads(args.threads)
    shape = (1, 4, 96, 96, 60) if args.small else SHAPE
    p, lab = make_case(shape)
    mb = p.numel() * p.element_size() / 2**20
    print(f"case {tuple(p.shape)} float32 ({mb:.0f} MiB) + uint8 labels, M={NUM_BINS}, "
          f"torch threads {torch.get_num_threads()}, numba threads {args.threads}, repeats {args.repeats}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    if args.device == "cuda":
        bench_cuda(p, lab, args.repeats)
        return
    import numpy as np

    from segcal.functional import _simd

    flat = p.reshape(p.shape[0], p.shape[1], -1).numpy()
    avx2 = _simd.applies(flat, lab.reshape(lab.shape[0], -1).numpy(), np.zeros((1, 1), np.uint8))
    print("CPU kernel: " + ("AVX2 (segcal.functional._simd)" if avx2 else "portable (no AVX2 target)"))
    rows = bench_segcal(p, lab, args.repeats)
    if not args.skip_reference:
        rows.update(bench_peers(p, lab, args.repeats))
    print_ratios(rows)
    if args.pairs > 0:
        paired = paired_ratios(p, lab, args.pairs)
        print(f"paired ratio segcal/plain read (median of {args.pairs} alternated pairs): "
              f"{paired['validated']:.2f}x (validated), {paired['check=False']:.2f}x (check=False); target <= 3x")
    if not args.skip_memory:
        mem = memory_report(p, lab, args.threads)
        extra = (mem["after_kb"] - mem["before_kb"]) * 1024
        print(f"extra peak memory of bin_statistics (fresh process, ru_maxrss): {extra / 2**10:.0f} KiB "
              f"= {extra / mem['input_bytes']:.3f} x input size ({mem['input_bytes'] / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
