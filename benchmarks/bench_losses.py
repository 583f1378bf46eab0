"""Forward+backward time and peak memory of segcal's losses next to MONAI's DiceLoss.

Run: ``PYTHONPATH=src python benchmarks/bench_losses.py [--shape 2 4 96 96 96] [--repeats 5] [--device cpu]``

Timing: all losses in one process (``torch.set_num_threads(2)``), one warm-up call each, then ``--repeats``
rounds in which every loss runs once, in turn: each loss's time is its median, and its ratio to MONAI's
``DiceLoss`` the median of the per-round ratios. Run side by side like this, every loss sees the same state of
the shared machine; separate processes minutes apart saw MONAI's ``DiceLoss`` alone vary 40-70 ms.
Memory: each loss in a fresh subprocess, the ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` increase of one
forward + backward over the state after the inputs were built (on CUDA: ``torch.cuda.max_memory_allocated``).

``hard_ace_loop`` is the same hard-binned mL1-ACE written the way the published reference code is structured
(Python loops over images, classes and bins with boolean masks), to show the speed-up of the vectorised loss.

The peers' calibration losses run in the same table: ``monai_nacl`` (MONAI's ``NACLLoss``, cross-entropy
included) next to segcal's equal ``ce_nacl`` (``"ce+nacl"``), ``ce_mbls`` (``"ce+mbls"``), ``svls``, ``ls``
(label-smoothed CE) and ``flsd`` (FLSD-53 focal loss).
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

LOSSES = ["monai_dice", "dice", "dscpp", "hard_ace", "soft_ace", "hard_ace_loop"]
#: the peers' calibration losses, timed in the same run: MONAI's whole NACL next to segcal's "ce+nacl"
PEER_LOSSES = ["monai_nacl", "ce_nacl", "ce_mbls", "svls", "ls", "flsd"]
LOSSES += PEER_LOSSES


def monai_nacl(logits, labels):
    """MONAI's ``NACLLoss`` (cross-entropy + neighbour-aware penalty) on ``(B, 1, *spatial)`` labels."""
    from monai.losses import NACLLoss

    return NACLLoss(classes=logits.shape[1], dim=logits.ndim - 2)(logits, labels[:, 0])


def _build_peer(name: str, kw: dict):
    from segcal.losses import loss_from_string

    if name == "monai_nacl":
        return monai_nacl
    spec = {"ce_nacl": "ce+nacl", "ce_mbls": "ce+mbls"}.get(name, name)
    return loss_from_string(spec, **kw)


def reference_loop_hard_ace(logits, labels, num_bins: int = 20):
    """mL1-ACE with Python loops over batch, class and bin (structure of the published reference code)."""
    import torch

    probs = torch.softmax(logits, 1)
    b, c = probs.shape[:2]
    onehot = torch.nn.functional.one_hot(labels[:, 0].long(), c).movedim(-1, 1).to(probs.dtype)
    edges = torch.linspace(0, 1, num_bins + 1, dtype=probs.dtype, device=probs.device)
    total = probs.new_zeros(())
    for i in range(b):
        for j in range(c):
            p, y = probs[i, j].reshape(-1), onehot[i, j].reshape(-1)
            gaps = []
            for k in range(num_bins):
                lo, hi = edges[k], edges[k + 1]
                m = (p > lo) & (p <= hi) if k > 0 else (p <= hi)
                if m.any():
                    gaps.append((p[m].mean() - y[m].mean()).abs())
            total = total + torch.stack(gaps).mean()
    return total / (b * c)


def _build(name: str):
    from segcal.losses import DiceLoss, DSCPlusPlusLoss, HardL1ACELoss, SoftL1ACELoss

    kw = dict(softmax=True, to_onehot_y=True)
    if name == "monai_dice":
        from monai.losses import DiceLoss as MonaiDice

        return MonaiDice(**kw)
    if name == "dice":
        return DiceLoss(**kw)
    if name == "dscpp":
        return DSCPlusPlusLoss(**kw)
    if name == "hard_ace":
        return HardL1ACELoss(**kw)
    if name == "soft_ace":
        return SoftL1ACELoss(**kw)
    if name == "hard_ace_loop":
        return reference_loop_hard_ace
    if name in PEER_LOSSES:
        return _build_peer(name, kw)
    raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}")


def _inputs(shape: list[int], device: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    try:
        from segcal.functional import _kernels

        _kernels.set_threads(threads)
    except Exception:  # pragma: no cover - numba missing
        pass
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g).to(device)
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g).to(device)
    return logits, labels


def _step(loss, logits, labels, device: str):
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> None:
        x = logits.detach().clone().requires_grad_(True)
        loss(x, labels).backward()
        sync()

    return step


def peak_memory(name: str, shape: list[int], device: str, threads: int) -> float:
    """MiB that one forward + backward of ``name`` adds to the peak (run in a fresh process)."""
    import torch

    logits, labels = _inputs(shape, device, threads)
    step = _step(_build(name), logits, labels, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB on Linux


def interleaved_times(names: list[str], shape: list[int], repeats: int, device: str, threads: int):
    """Per loss: the times of ``repeats`` rounds in which every loss runs once, in turn, after a warm-up each."""
    logits, labels = _inputs(shape, device, threads)
    steps = {name: _step(_build(name), logits, labels, device) for name in names}
    for step in steps.values():
        step()  # warm-up (numba cache load, allocator)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name, step in steps.items():
            if name == "hard_ace_loop" and r >= max(1, repeats // 2):
                continue  # the slow loop reference: half the rounds
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def _memory_in_subprocess(name: str, args: argparse.Namespace, env: dict[str, str]) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", name, "--shape", *map(str, args.shape),
           "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        print(f"{name}: memory run failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return float("nan")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[2, 4, 96, 96, 96])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--losses", nargs="+", default=LOSSES)
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        print(json.dumps({"peak_mb": peak_memory(args.memory_of, args.shape, args.device, args.threads)}))
        return
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [
            os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"),
            env.get("PYTHONPATH", ""),
        ]
    )
    for name in args.losses:
        if name not in LOSSES:
            raise SystemExit(f"unknown loss {name!r}; choose from {LOSSES}")
    # the memory runs first: a child's ru_maxrss starts from its parent's high-water mark at the fork, so the
    # parent must not have run the (large) timing yet
    peak = {name: _memory_in_subprocess(name, args, env) for name in args.losses}
    times = interleaved_times(args.losses, args.shape, args.repeats, args.device, args.threads)

    ref = times.get("monai_dice")

    def ratio(name: str) -> float:
        """Median over rounds of the time ratio to MONAI's DiceLoss in the same round."""
        if not ref:
            return float("nan")
        return statistics.median(t / m for t, m in zip(times[name], ref, strict=False))

    print(f"shape={tuple(args.shape)} device={args.device} threads={args.threads} repeats={args.repeats} (interleaved)")
    print(f"{'loss':<15}{'fwd+bwd [s]':>13}{'x MONAI Dice':>14}{'peak [MiB]':>12}{'x MONAI Dice':>14}")
    ref_mb = peak.get("monai_dice", float("nan"))
    for name in args.losses:
        mr = peak[name] / ref_mb if ref_mb and ref_mb > 0 else float("nan")
        print(f"{name:<15}{statistics.median(times[name]):>13.4f}{ratio(name):>14.2f}{peak[name]:>12.1f}{mr:>14.2f}")
    if ref:
        for name, target in (("hard_ace", 2.0), ("soft_ace", 4.0)):
            if name in times:
                print(f"{name} / MONAI Dice: {ratio(name):.2f}x (target <= {target:g}x)")
    if "hard_ace" in times and "hard_ace_loop" in times:
        speedup = statistics.median(times["hard_ace_loop"]) / statistics.median(times["hard_ace"])
        print(f"speed-up of vectorised hard ACE over the loop reference: {speedup:.1f}x")


if __name__ == "__main__":
    main()
