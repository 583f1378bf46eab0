"""Dataset evaluation throughput and memory: ``segcal`` runner vs a straightforward MONAI loop.

Generates synthetic BraTS-sized cases (float16 ``.npz`` probabilities ``(C, x, y, z)`` + NIfTI labels with a
1.0 x 1.2 x 2.5 mm affine) in a temporary folder and evaluates them with 1 and 2 workers, once without surface
metrics and once with the ``--surface`` ones (default all four: HD95, HD, ASSD, NSD at ``--nsd-tolerance-mm``):

* segcal: :func:`segcal.evaluation.run_evaluation` (bin sums, ECE/ACE/MCE, Dice, Brier, NLL, top-label ECE,
  and the surface metrics when on) into a fresh output folder;
* MONAI: per case ``np.load`` + ``nibabel`` load, one-hot, ``CalibrationErrorMetric`` + ``DiceMetric``, and
  when on ``HausdorffDistanceMetric(percentile=95)``, ``HausdorffDistanceMetric()``,
  ``SurfaceDistanceMetric(symmetric=True)``, ``SurfaceDiceMetric`` (in mm, the same spacing), in a
  ``ProcessPoolExecutor`` with the same number of workers.

Reports cases/second and the peak RSS of a worker process; with ``--rss-scaling`` also the segcal peak RSS for
a quarter of the cases vs all of them (flat memory means the two are within ~10%).

``--big-case`` instead builds one large case (default ``4 x 512 x 512 x 300``, ``--big-size``), evaluates it
with one segcal worker (surface metrics on) and reports the worker's peak RSS against the size of the case's
probability array (float32 in memory, and float16 as stored); ``--big-monai`` also runs the MONAI loop on it.
It needs several GB of memory and minutes: do not run it on a shared machine.

Full size (slow)::

    PYTHONPATH=src python benchmarks/bench_evaluate.py --cases 200 --size 240,240,155

Scaled down::

    PYTHONPATH=src python benchmarks/bench_evaluate.py --cases 16 --size 96,96,64

One large case (memory of a worker)::

    PYTHONPATH=src python benchmarks/bench_evaluate.py --big-case
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

#: voxel size of the generated cases (mm), anisotropic like most clinical volumes
SPACING = (1.0, 1.2, 2.5)
SURFACE = ("hd95", "hd", "assd", "nsd")


def generate(
    root: Path, n: int, size: tuple[int, int, int], num_classes: int = 4, seed: int = 0
) -> tuple[Path, Path]:
    pred, lab = root / "pred", root / "labels"
    pred.mkdir(parents=True, exist_ok=True)
    lab.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    aff = np.diag([*SPACING, 1.0])
    for i in range(n):
        label = np.zeros(size, np.uint8)
        c = [rng.integers(s // 3, 2 * s // 3) for s in size]
        for k in (2, 1, 3):  # edema, core, enhancing: nested boxes
            r = [max(2, s // (3 + k)) for s in size]
            label[tuple(slice(ci - ri, ci + ri) for ci, ri in zip(c, r, strict=True))] = k
        logits = rng.standard_normal((num_classes, *size), dtype=np.float32)
        np.put_along_axis(logits, label[None].astype(np.int64), 3.0, axis=0)
        logits -= logits.max(0, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(0, keepdims=True)
        np.savez(pred / f"case{i:04d}.npz", probabilities=logits.astype(np.float16))
        nib.save(nib.Nifti1Image(label, aff), lab / f"case{i:04d}.nii.gz")
    return pred, lab


def _monai_case(args: tuple[str, str, int, tuple[str, ...], float]) -> tuple[float, float]:
    import torch
    from monai.metrics import CalibrationErrorMetric, DiceMetric

    torch.set_num_threads(1)
    pred_path, lab_path, bins, surface, tol = args
    probs = torch.from_numpy(np.load(pred_path)["probabilities"].astype(np.float32))[None]
    label = torch.from_numpy(np.asarray(nib.load(lab_path).dataobj).astype(np.int64))[None, None]
    onehot = torch.zeros_like(probs).scatter_(1, label, 1.0)
    cal = CalibrationErrorMetric(num_bins=bins, include_background=False, calibration_reduction="expected")
    cal(probs, onehot)
    hard = torch.zeros_like(probs).scatter_(1, probs.argmax(1, keepdim=True), 1.0)
    dice = DiceMetric(include_background=False)
    dice(hard, onehot)
    value = float(cal.aggregate().mean()) + float(dice.aggregate().mean())
    value += _monai_surface(hard, onehot, surface, tol)
    return value, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _monai_surface(hard, onehot, surface: tuple[str, ...], tol: float) -> float:
    """MONAI's surface metrics of the case (mm with :data:`SPACING`), summed into one number."""
    import warnings

    from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric, SurfaceDistanceMetric

    metrics = {
        "hd95": lambda: HausdorffDistanceMetric(include_background=False, percentile=95),
        "hd": lambda: HausdorffDistanceMetric(include_background=False),
        "assd": lambda: SurfaceDistanceMetric(include_background=False, symmetric=True),
        "nsd": lambda: SurfaceDiceMetric([tol] * (hard.shape[1] - 1), include_background=False),
    }
    value = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in surface:
            m = metrics[name]()
            m(hard, onehot, spacing=list(SPACING))
            value += float(m.aggregate().nanmean())
    return value


def run_monai(
    pred: Path, lab: Path, workers: int, bins: int, surface: tuple[str, ...] = (), tol: float = 1.0
) -> tuple[float, float]:
    jobs = [
        (str(p), str(lab / (p.name[:-4] + ".nii.gz")), bins, surface, tol) for p in sorted(pred.glob("*.npz"))
    ]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
        ex.submit(_warm).result()  # exclude interpreter start-up like the segcal side (imports happen once)
        t0 = time.perf_counter()
        rss = [r for _, r in ex.map(_monai_case, jobs)]
    return len(jobs) / (time.perf_counter() - t0), max(rss)


def _warm() -> None:
    import monai.metrics  # noqa: F401
    import torch  # noqa: F401


def run_segcal(
    pred: Path, lab: Path, out: Path, workers: int, bins: int, surface: tuple[str, ...] = (), tol: float = 1.0
) -> tuple[float, float]:
    from segcal.evaluation import EvalConfig, run_evaluation

    shutil.rmtree(out, ignore_errors=True)
    rss: list[float] = []
    times: list[float] = []
    cfg = EvalConfig(
        fmt="npy", num_bins=bins, hd95="hd95" in surface, surface=surface, nsd_tolerance_mm=(tol,),
        spacing=SPACING,
    )
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


def big_case(root: Path, size: tuple[int, ...], surface: tuple[str, ...], tol: float, monai: bool) -> None:
    """One large case, one segcal worker with the surface metrics on: the worker's peak RSS against the size of
    the case's probability array."""
    num_classes = 4
    pred, lab = generate(root, 1, size, num_classes)  # type: ignore[arg-type]
    n_vox = int(np.prod(size))
    f32, f16 = num_classes * n_vox * 4 / 2**20, num_classes * n_vox * 2 / 2**20
    t0 = time.perf_counter()
    _, rss = run_segcal(pred, lab, root / "out_big", 1, 20, surface, tol)
    seconds = time.perf_counter() - t0
    print(f"big case {num_classes} x {size}: probabilities {f32:.0f} MB as float32 ({f16:.0f} MB float16 on disk)")
    print(f"segcal, surface {','.join(surface) or 'off'}: {seconds:.1f} s (incl. worker start-up), peak worker RSS "
          f"{rss:.0f} MB = {rss / f32:.2f} x the float32 probabilities (target <= 2)")
    if monai:
        t0 = time.perf_counter()
        _, m_rss = run_monai(pred, lab, 1, 20, surface, tol)
        print(f"MONAI loop: {time.perf_counter() - t0:.1f} s, peak worker RSS {m_rss:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--size", type=str, default="240,240,155")
    ap.add_argument("--bins", type=int, default=20)
    ap.add_argument("--workers", type=str, default="1,2")
    ap.add_argument("--surface", type=str, default=",".join(SURFACE),
                    help="surface metrics of the 'on' rows (comma-separated; 'none': only the rows without)")
    ap.add_argument("--nsd-tolerance-mm", type=float, default=1.0)
    ap.add_argument("--rss-scaling", action="store_true", help="also run segcal on a quarter of the cases")
    ap.add_argument("--no-monai", action="store_true")
    ap.add_argument("--big-case", action="store_true", help="only the memory of one large case (see above)")
    ap.add_argument("--big-size", type=str, default="512,512,300")
    ap.add_argument("--big-monai", action="store_true", help="with --big-case: also the MONAI loop")
    ap.add_argument("--keep", type=str, default=None, help="generate into / reuse this folder")
    args = ap.parse_args()
    size = tuple(int(s) for s in args.size.split(","))
    surface = () if args.surface == "none" else tuple(x for x in args.surface.split(",") if x)
    tol = args.nsd_tolerance_mm
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="segcal_bench_"))
    if args.big_case:
        try:
            big_case(root / "big", tuple(int(s) for s in args.big_size.split(",")), surface, tol, args.big_monai)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        return
    t0 = time.perf_counter()
    if not (root / "pred").exists() or len(list((root / "pred").glob("*.npz"))) != args.cases:
        shutil.rmtree(root / "pred", ignore_errors=True)
        shutil.rmtree(root / "labels", ignore_errors=True)
        pred, lab = generate(root, args.cases, size)  # type: ignore[arg-type]
    else:
        pred, lab = root / "pred", root / "labels"
    print(
        f"data: {args.cases} cases of {size} x 4 classes (float16 npz + NIfTI, {SPACING} mm), "
        f"{time.perf_counter() - t0:.1f}s"
    )
    print(f"cpu cores: {os.cpu_count()} (timings are noisy on a shared machine)")
    print(
        f"{'workers':>7} {'surface':>18} {'segcal cases/s':>15} {'segcal RSS MB':>14} "
        f"{'MONAI cases/s':>14} {'MONAI RSS MB':>13} "
        f"{'speed-up':>8}"
    )
    for w in [int(x) for x in args.workers.split(",")]:
        for surf in ((), surface) if surface else ((),):
            s_rate, s_rss = run_segcal(pred, lab, root / f"out_{w}", w, args.bins, surf, tol)
            if args.no_monai:
                m_rate, m_rss = float("nan"), float("nan")
            else:
                m_rate, m_rss = run_monai(pred, lab, w, args.bins, surf, tol)
            print(
                f"{w:>7} {','.join(surf) or 'off':>18} {s_rate:>15.2f} {s_rss:>14.0f} {m_rate:>14.2f} "
                f"{m_rss:>13.0f} {s_rate / m_rate:>7.1f}x"
            )
    if args.rss_scaling:
        rss_scaling(root, pred, lab, args.cases, args.bins)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def rss_scaling(root: Path, pred: Path, lab: Path, cases: int, bins: int) -> None:
    """segcal's peak worker RSS for a quarter of the cases vs all of them."""
    quarter = root / "quarter"
    (quarter / "pred").mkdir(parents=True, exist_ok=True)
    (quarter / "labels").mkdir(parents=True, exist_ok=True)
    for p in sorted(pred.glob("*.npz"))[: max(1, cases // 4)]:
        for src, dst in ((p, quarter / "pred" / p.name), (lab / (p.name[:-4] + ".nii.gz"), None)):
            d = dst or quarter / "labels" / src.name
            if not d.exists():
                os.symlink(src, d)
    _, rss_q = run_segcal(quarter / "pred", quarter / "labels", root / "out_q", 1, bins)
    _, rss_all = run_segcal(pred, lab, root / "out_all", 1, bins)
    print(
        f"peak RSS per worker: {rss_q:.0f} MB for {max(1, cases // 4)} cases, "
        f"{rss_all:.0f} MB for {cases} cases ({(rss_all / rss_q - 1) * 100:+.1f}%)"
    )


if __name__ == "__main__":
    main()
