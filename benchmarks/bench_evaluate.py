"""Dataset evaluation throughput and memory: ``segcal`` runner vs a straightforward MONAI loop.

Generates synthetic BraTS-sized cases (float16 ``.npz`` probabilities ``(C, x, y, z)`` + NIfTI labels) in a
temporary folder and evaluates them with 1 and 2 workers:

* segcal: :func:`segcal.evaluation.run_evaluation` (bin sums, ECE/ACE/MCE, Dice, Brier, NLL, top-label ECE;
  HD95 off for both sides) into a fresh output folder;
* MONAI: per case ``np.load`` + ``nibabel`` load, one-hot, ``CalibrationErrorMetric`` + ``DiceMetric``, in a
  ``ProcessPoolExecutor`` with the same number of workers.

Reports cases/second and the peak RSS of a worker process; with ``--rss-scaling`` also the segcal peak RSS for
a quarter of the cases vs all of them (flat memory means the two are within ~10%).

Full size (slow)::

    PYTHONPATH=src python benchmarks/bench_evaluate.py --cases 200 --size 240,240,155

Scaled down::

    PYTHONPATH=src python benchmarks/bench_evaluate.py --cases 16 --size 96,96,64
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np


def generate(
    root: Path, n: int, size: tuple[int, int, int], num_classes: int = 4, seed: int = 0
) -> tuple[Path, Path]:
    pred, lab = root / "pred", root / "labels"
    pred.mkdir(parents=True, exist_ok=True)
    lab.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    aff = np.eye(4)
    for i in range(n):
        label = np.zeros(size, np.uint8)
        c = [rng.integers(s // 3, 2 * s // 3) for s in size]
        for k in (2, 1, 3):  # edema, core, enhancing: nested boxes
            r = [max(2, s // (3 + k)) for s in size]
            label[tuple(slice(ci - ri, ci + ri) for ci, ri in zip(c, r, strict=True))] = k
        logits = rng.normal(0, 1.0, (num_classes, *size)).astype(np.float32)
        np.put_along_axis(logits, label[None].astype(np.int64), 3.0, axis=0)
        logits -= logits.max(0, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(0, keepdims=True)
        np.savez(pred / f"case{i:04d}.npz", probabilities=logits.astype(np.float16))
        nib.save(nib.Nifti1Image(label, aff), lab / f"case{i:04d}.nii.gz")
    return pred, lab


def _monai_case(args: tuple[str, str, int]) -> tuple[float, float]:
    import torch
    from monai.metrics import CalibrationErrorMetric, DiceMetric

    torch.set_num_threads(1)
    pred_path, lab_path, bins = args
    probs = torch.from_numpy(np.load(pred_path)["probabilities"].astype(np.float32))[None]
    label = torch.from_numpy(np.asarray(nib.load(lab_path).dataobj).astype(np.int64))[None, None]
    onehot = torch.zeros_like(probs).scatter_(1, label, 1.0)
    cal = CalibrationErrorMetric(num_bins=bins, include_background=False, calibration_reduction="expected")
    cal(probs, onehot)
    hard = torch.zeros_like(probs).scatter_(1, probs.argmax(1, keepdim=True), 1.0)
    dice = DiceMetric(include_background=False)
    dice(hard, onehot)
    value = float(cal.aggregate().mean()) + float(dice.aggregate().mean())
    return value, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_monai(pred: Path, lab: Path, workers: int, bins: int) -> tuple[float, float]:
    jobs = [(str(p), str(lab / (p.name[:-4] + ".nii.gz")), bins) for p in sorted(pred.glob("*.npz"))]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
        ex.submit(_warm).result()  # exclude interpreter start-up like the segcal side (imports happen once)
        t0 = time.perf_counter()
        rss = [r for _, r in ex.map(_monai_case, jobs)]
    return len(jobs) / (time.perf_counter() - t0), max(rss)


def _warm() -> None:
    import monai.metrics  # noqa: F401
    import torch  # noqa: F401


def run_segcal(pred: Path, lab: Path, out: Path, workers: int, bins: int) -> tuple[float, float]:
    from segcal.evaluation import EvalConfig, run_evaluation

    shutil.rmtree(out, ignore_errors=True)
    rss: list[float] = []
    times: list[float] = []
    cfg = EvalConfig(fmt="npy", num_bins=bins, hd95=False)
    t0 = time.perf_counter()

    def on_result(res) -> None:  # the clock starts when the first case is done (workers are up)
        if not times:
            times.append(time.perf_counter())
        rss.append(res.peak_rss_mb)

    res = run_evaluation(pred, lab, out, cfg, workers=workers, progress=False, on_result=on_result)
    t1 = time.perf_counter()
    if res.n_failed:
        raise RuntimeError(f"{res.n_failed} cases failed: {res.summary['failed'][:2]}")
    n = res.n_ok - 1
    rate = n / (t1 - times[0]) if n > 0 else res.n_ok / (t1 - t0)
    return rate, max(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--size", type=str, default="240,240,155")
    ap.add_argument("--bins", type=int, default=20)
    ap.add_argument("--workers", type=str, default="1,2")
    ap.add_argument("--rss-scaling", action="store_true", help="also run segcal on a quarter of the cases")
    ap.add_argument("--no-monai", action="store_true")
    ap.add_argument("--keep", type=str, default=None, help="generate into / reuse this folder")
    args = ap.parse_args()
    size = tuple(int(s) for s in args.size.split(","))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="segcal_bench_"))
    t0 = time.perf_counter()
    if not (root / "pred").exists() or len(list((root / "pred").glob("*.npz"))) != args.cases:
        shutil.rmtree(root / "pred", ignore_errors=True)
        shutil.rmtree(root / "labels", ignore_errors=True)
        pred, lab = generate(root, args.cases, size)  # type: ignore[arg-type]
    else:
        pred, lab = root / "pred", root / "labels"
    print(
        f"data: {args.cases} cases of {size} x 4 classes (float16 npz + NIfTI), "
        f"{time.perf_counter() - t0:.1f}s"
    )
    print(f"cpu cores: {os.cpu_count()} (timings are noisy on a shared machine)")
    print(
        f"{'workers':>7} {'segcal cases/s':>15} {'segcal RSS MB':>14} "
        f"{'MONAI cases/s':>14} {'MONAI RSS MB':>13} "
        f"{'speed-up':>8}"
    )
    for w in [int(x) for x in args.workers.split(",")]:
        s_rate, s_rss = run_segcal(pred, lab, root / f"out_{w}", w, args.bins)
        if args.no_monai:
            m_rate, m_rss = float("nan"), float("nan")
        else:
            m_rate, m_rss = run_monai(pred, lab, w, args.bins)
        print(
            f"{w:>7} {s_rate:>15.2f} {s_rss:>14.0f} {m_rate:>14.2f} {m_rss:>13.0f} {s_rate / m_rate:>7.1f}x"
        )
    if args.rss_scaling:
        quarter = root / "quarter"
        (quarter / "pred").mkdir(parents=True, exist_ok=True)
        (quarter / "labels").mkdir(parents=True, exist_ok=True)
        for p in sorted(pred.glob("*.npz"))[: max(1, args.cases // 4)]:
            for src, dst in ((p, quarter / "pred" / p.name), (lab / (p.name[:-4] + ".nii.gz"), None)):
                d = dst or quarter / "labels" / src.name
                if not d.exists():
                    os.symlink(src, d)
        _, rss_q = run_segcal(quarter / "pred", quarter / "labels", root / "out_q", 1, args.bins)
        _, rss_all = run_segcal(pred, lab, root / "out_all", 1, args.bins)
        print(
            f"peak RSS per worker: {rss_q:.0f} MB for {max(1, args.cases // 4)} cases, "
            f"{rss_all:.0f} MB for {args.cases} cases ({(rss_all / rss_q - 1) * 100:+.1f}%)"
        )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
