"""CUDA check of segcal's device paths: equal to the CPU paths, finite under autocast, and how fast on the GPU.

Run on a machine with a CUDA device (the results are recorded in docs/core-validation.md)::

    PYTHONPATH=src python benchmarks/check_cuda.py [--repeats 20] [--out cuda.json] [--skip-timing]

1. **Equality.** ``bin_statistics``, ``top_label_statistics`` and ``case_statistics`` (then ``image_metrics``
   and ``pooled_metrics``) of a CUDA tensor against the same call on the CPU (the numba path), on random
   softmax maps and on adversarial ones (probabilities exactly on the bin edges ``k/M``, exact 0 and 1, an
   all-background image, a class present in one voxel). Every loss of the loss registry and three composites:
   value and input gradient in float64 on CUDA against the CPU.
2. **Synchronisation.** Every loss's forward + backward with ``validate_args=False`` under
   ``torch.cuda.set_sync_debug_mode("error")``: no device-to-host synchronisation at all (C++ ones included,
   which the CPU test of the Python-level reads cannot see).
3. **Autocast.** Every loss under ``torch.autocast("cuda", float16)`` and ``bfloat16`` on random, all-background
   and single-class batches: finite loss and finite gradients.
4. **Timing** (CUDA events, median of ``--repeats`` after a warm-up): a plain read of the probabilities
   (``p.sum()``) against ``bin_statistics`` (its Triton kernel, and the torch path beside it),
   ``top_label_statistics`` and ``case_statistics`` on one BraTS-sized
   case ``(1, 4, 240, 240, 155)``, with MONAI's ``CalibrationErrorMetric`` on the same device; every loss's
   forward + backward at ``(2, 4, 96, 96, 96)`` next to MONAI's ``DiceLoss``, in float32 and under float16 /
   bfloat16 autocast.

Exits with status 1 when an equality or finiteness check fails (the failures are listed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from collections.abc import Callable

import torch

from segcal.functional.binning import _bin_statistics_torch, bin_statistics
from segcal.functional.calibration import top_label_statistics
from segcal.functional.scoring import case_statistics, image_metrics, pooled_metrics
from segcal.losses import LOSS_REGISTRY, loss_from_string

NUM_BINS = 20
FAILURES: list[str] = []
#: composite losses checked and timed beside the registry's (their terms share one read of the inputs per call)
COMPOSITES = ["dice+hard_ace", "dice+soft_ace", "0.5*ce+dice+soft_ace"]
#: every loss the checks run: the registry's, then the composites
CHECKED_LOSSES = sorted(LOSS_REGISTRY) + COMPOSITES


def _close(name: str, a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> None:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    same_nan = torch.equal(torch.isnan(a), torch.isnan(b))
    ok = same_nan and torch.allclose(torch.nan_to_num(a), torch.nan_to_num(b), rtol=rtol, atol=atol)
    if not ok:
        diff = (torch.nan_to_num(a) - torch.nan_to_num(b)).abs().max().item()
        FAILURES.append(f"{name}: CUDA != CPU (max abs diff {diff:.3g}, nan pattern equal: {same_nan})")


def _inputs(seed: int = 0) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, probabilities (B, C, X, Y, Z) float32, label map (B, X, Y, Z)) pairs, random and adversarial."""
    g = torch.Generator().manual_seed(seed)
    b, c, s = 2, 4, (24, 20, 12)
    lab = torch.randint(0, c, (b, *s), generator=g)
    rand = torch.softmax(3 * torch.randn(b, c, *s, generator=g), 1)
    # every probability exactly on a bin edge k/M (exactly representable for M = 20 only up to rounding, which is
    # the point: both devices must put the same value in the same bin)
    k = torch.randint(0, NUM_BINS + 1, (b, c, *s), generator=g).float() / NUM_BINS
    edges = k / k.sum(1, keepdim=True).clamp_min(1e-12)
    edges[:, 0] += (k.sum(1) == 0).float()
    onehot = torch.nn.functional.one_hot(lab, c).movedim(-1, 1).float()  # exact 0 and 1
    background = torch.zeros_like(lab)
    single = torch.zeros_like(lab)
    single[0, 3, 4, 5] = 2
    return [
        ("random", rand, lab),
        ("bin edges", edges, lab),
        ("exact 0/1", onehot, lab),
        ("all background", rand, background),
        ("one-voxel class", rand, single),
    ]


def check_metrics(dev: torch.device) -> None:
    for name, p, lab in _inputs():
        pd, ld = p.to(dev), lab.to(dev)
        for inc in (True, False):
            a, b = (
                bin_statistics(p, lab, NUM_BINS, include_background=inc),
                bin_statistics(pd, ld, NUM_BINS, include_background=inc),
            )
            for f in ("count", "sum_p", "sum_y"):
                _close(f"bin_statistics[{name}, bg={inc}].{f}", getattr(b, f), getattr(a, f), 1e-6, 1e-6)
        a, b = top_label_statistics(p, lab, NUM_BINS), top_label_statistics(pd, ld, NUM_BINS)
        for f in ("count", "sum_p", "sum_y"):
            _close(f"top_label_statistics[{name}].{f}", getattr(b, f), getattr(a, f), 1e-6, 1e-6)
        sa, sb = case_statistics(p, lab, NUM_BINS, hd95=True), case_statistics(pd, ld, NUM_BINS, hd95=True)
        for key, va in {**image_metrics(sa), **{f"pooled {k}": v for k, v in pooled_metrics(sa).items()}}.items():
            vb = image_metrics(sb)[key] if not key.startswith("pooled ") else pooled_metrics(sb)[key[7:]]
            _close(f"case_statistics[{name}] {key}", vb, va, 1e-5, 1e-6)


def _loss(name: str) -> torch.nn.Module:
    return loss_from_string(name, softmax=True, to_onehot_y=True)


def check_losses(dev: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(2, 3, 10, 9, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 1, 10, 9, 8), generator=g)
    for name in CHECKED_LOSSES:
        vals, grads = [], []
        for d in (torch.device("cpu"), dev):
            xi = x.detach().to(d).requires_grad_(True)
            v = _loss(name).to(d)(xi, y.to(d))
            v.backward()
            vals.append(v)
            grads.append(xi.grad)
        _close(f"loss {name} value (float64)", vals[1], vals[0], 1e-9, 1e-12)
        _close(f"loss {name} gradient (float64)", grads[1], grads[0], 1e-7, 1e-10)


def check_no_sync(dev: torch.device) -> None:
    g = torch.Generator().manual_seed(4)
    x = (2 * torch.randn(2, 3, 10, 9, 8, generator=g)).to(dev)
    y = torch.randint(0, 3, (2, 1, 10, 9, 8), generator=g).to(dev)
    for name in CHECKED_LOSSES:
        loss = loss_from_string(name, softmax=True, to_onehot_y=True, validate_args=False).to(dev)
        loss(x.clone().requires_grad_(True), y)  # warm-up outside the check (lazy initialisation)
        xi = x.clone().requires_grad_(True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss(xi, y).backward()
        except RuntimeError as exc:
            FAILURES.append(f"loss {name} with validate_args=False synchronises: {exc}")
        finally:
            torch.cuda.set_sync_debug_mode("default")


def check_autocast(dev: torch.device) -> None:
    g = torch.Generator().manual_seed(2)
    shape = (2, 4, 16, 16, 8)
    batches = {
        "random": torch.randint(0, 4, (2, 1, *shape[2:]), generator=g),
        "all background": torch.zeros(2, 1, *shape[2:], dtype=torch.long),
        "single class": torch.full((2, 1, *shape[2:]), 2, dtype=torch.long),
    }
    for dtype in (torch.float16, torch.bfloat16):
        for name in CHECKED_LOSSES:
            for bname, y in batches.items():
                x = (4 * torch.randn(*shape, generator=g)).to(dev).requires_grad_(True)
                with torch.autocast("cuda", dtype=dtype):
                    v = _loss(name).to(dev)(x, y.to(dev))
                v.float().backward()
                if not (torch.isfinite(v).all() and torch.isfinite(x.grad).all()):
                    FAILURES.append(f"loss {name} under autocast {dtype} on {bname}: non-finite value or gradient")


def cuda_time(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn`` by CUDA events, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_binning(dev: torch.device, repeats: int) -> dict[str, float]:
    from monai.metrics import CalibrationErrorMetric

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_binning import make_case

    p, lab = make_case()
    pd, ld = p.to(dev), lab.to(dev)

    def torch_path(pd: torch.Tensor, ld: torch.Tensor) -> torch.Tensor:  # the path without the Triton kernel
        return _bin_statistics_torch(pd, ld.long(), None, torch.arange(4), None, NUM_BINS, "right")

    rows = {
        "plain read p.sum()": cuda_time(lambda: pd.sum(), repeats),
        "bin_statistics": cuda_time(lambda: bin_statistics(pd, ld, NUM_BINS), repeats),
        "bin_statistics check=False": cuda_time(lambda: bin_statistics(pd, ld, NUM_BINS, check=False), repeats),
        "bin_statistics check=False, torch path": cuda_time(lambda: torch_path(pd, ld), repeats),
        "top_label_statistics": cuda_time(lambda: top_label_statistics(pd, ld, NUM_BINS), repeats),
        "case_statistics (no HD95)": cuda_time(lambda: case_statistics(pd, ld, NUM_BINS), repeats),
    }
    onehot = torch.nn.functional.one_hot(ld.long(), 4).movedim(-1, 1).float()

    def monai_ace() -> torch.Tensor:
        m = CalibrationErrorMetric(num_bins=NUM_BINS, calibration_reduction="average")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m(pd, onehot)
            return m.aggregate()

    rows["MONAI CalibrationErrorMetric (ACE, one-hot given)"] = cuda_time(monai_ace, max(3, repeats // 4))
    return rows


def time_losses(dev: torch.device, repeats: int) -> dict[str, dict[str, float]]:
    from monai.losses import DiceLoss

    g = torch.Generator().manual_seed(3)
    shape = (2, 4, 96, 96, 96)
    logits = torch.randn(*shape, generator=g).to(dev)
    labels = torch.randint(0, 4, (2, 1, *shape[2:]), generator=g).to(dev)
    modules = {"MONAI DiceLoss": DiceLoss(softmax=True, to_onehot_y=True)}
    modules |= {name: _loss(name).to(dev) for name in CHECKED_LOSSES}
    out: dict[str, dict[str, float]] = {}
    precisions = (("float32", None), ("float16 autocast", torch.float16), ("bfloat16 autocast", torch.bfloat16))
    for precision, dtype in precisions:
        row = {}
        for name, loss in modules.items():

            def step(loss: torch.nn.Module = loss, dtype: torch.dtype | None = dtype) -> None:
                x = logits.detach().clone().requires_grad_(True)
                with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                    v = loss(x, labels)
                v.float().backward()

            row[name] = cuda_time(step, repeats)
        out[precision] = row
    return out


def profile(dev: torch.device) -> None:
    """torch.profiler tables (CUDA time per op) of binning, the case pass and the hard / soft mL1-ACE losses."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_binning import make_case

    p, lab = make_case()
    pd, ld = p.to(dev), lab.to(dev)
    logits = torch.randn(2, 4, 96, 96, 96, device=dev)
    labels = torch.randint(0, 4, (2, 1, 96, 96, 96), device=dev)

    def loss_step(name: str) -> Callable[[], None]:
        loss = _loss(name)

        def step() -> None:
            x = logits.detach().clone().requires_grad_(True)
            loss(x, labels).backward()

        return step

    jobs: dict[str, Callable[[], object]] = {
        "bin_statistics": lambda: bin_statistics(pd, ld, NUM_BINS),
        "top_label_statistics": lambda: top_label_statistics(pd, ld, NUM_BINS),
        "case_statistics": lambda: case_statistics(pd, ld, NUM_BINS),
        "hard mL1-ACE fwd+bwd": loss_step("ace"),
        "soft mL1-ACE fwd+bwd": loss_step("soft_ace"),
    }
    for name, fn in jobs.items():
        fn()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        print(f"\nprofile of {name} (3 calls):")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=48))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the CUDA kernel time of each op of the hot paths")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs on a GPU machine")
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    for part in (check_metrics, check_losses, check_no_sync, check_autocast):
        part(dev)
        print(f"{part.__name__}: {'ok' if not FAILURES else f'{len(FAILURES)} failures so far'}")
    if args.profile:
        profile(dev)
    result: dict[str, object] = {"device": torch.cuda.get_device_name(dev), "failures": FAILURES}
    if not args.skip_timing:
        binning = time_binning(dev, args.repeats)
        plain = binning["plain read p.sum()"]
        print("\nBraTS-sized case (1, 4, 240, 240, 155) float32 on the GPU:")
        for k, v in binning.items():
            print(f"  {k:<52s} {v:9.3f} ms  {v / plain:7.1f}x plain read")
        losses = time_losses(dev, args.repeats)
        print("\nloss forward + backward, (2, 4, 96, 96, 96), ms (x MONAI DiceLoss of the same precision):")
        names = list(next(iter(losses.values())))
        print(f"  {'loss':<22s}" + "".join(f"{p:>26s}" for p in losses))
        for n in names:
            cells = "".join(f"{r[n]:>15.2f} ({r[n] / r['MONAI DiceLoss']:5.2f}x)" for r in losses.values())
            print(f"  {n:<22s}{cells}")
        result |= {"binning_ms": binning, "losses_ms": losses}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if FAILURES:
        print("\nFAILURES:\n  " + "\n  ".join(FAILURES))
        sys.exit(1)
    print("\nall equality and autocast checks passed")


if __name__ == "__main__":
    main()
