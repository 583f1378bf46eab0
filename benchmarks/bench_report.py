"""Time the figure functions and the evaluation report on a synthetic run of N cases (bins only, no voxels).

PYTHONPATH=src python benchmarks/bench_report.py --cases 200 --classes 3 --bins 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from segcal.functional.binning import BinStats
from segcal.functional.calibration import calibration_errors
from segcal.io.runs import write_bins_npz, write_cases_csv
from segcal.plots import dataset_reliability_histogram, reliability_diagram, subject_spread
from segcal.report import build_evaluation_report


def synthetic_stats(n: int, c: int, m: int, seed: int = 0) -> BinStats:
    rng = np.random.default_rng(seed)
    count = rng.integers(0, 5000, size=(n, c, m)).astype(np.float64)
    centres = (np.arange(m) + 0.5) / m
    o = np.clip(centres + 0.15 * rng.standard_normal((n, c, m)), 0, 1)
    return BinStats(
        torch.from_numpy(count), torch.from_numpy(count * centres), torch.from_numpy(np.round(count * o))
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--bins", type=int, default=20)
    a = ap.parse_args()
    stats = synthetic_stats(a.cases, a.classes, a.bins)
    for name, fn in [
        ("reliability_diagram", lambda: reliability_diagram(stats, 0)),
        ("dataset_reliability_histogram", lambda: dataset_reliability_histogram(stats)),
        ("subject_spread", lambda: subject_spread(stats, 0)),
    ]:
        t = time.perf_counter()
        fig = fn()
        fig.savefig(Path(tempfile.gettempdir()) / "segcal_bench.png")
        print(f"{name:32s} {time.perf_counter() - t:6.2f} s (draw + PNG)")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        errs = calibration_errors(stats)
        ids = [f"case_{i:04d}" for i in range(a.cases)]
        names = [f"class_{j}" for j in range(a.classes)]
        rows = [
            {
                "case_id": cid,
                "class": cn,
                "status": "ok",
                "dice": 0.8,
                **{k: float(errs[k][i, j]) for k in ("ace", "ece", "mce")},
            }
            for i, cid in enumerate(ids)
            for j, cn in enumerate(names)
        ]
        write_cases_csv(run / "cases.csv", rows, ["case_id", "class", "status", "dice", "ace", "ece", "mce"])
        write_bins_npz(run / "bins.npz", ids, stats.numpy(), names)
        t = time.perf_counter()
        out = build_evaluation_report(run)
        print(
            f"{'build_evaluation_report':32s} {time.perf_counter() - t:6.2f} s "
            f"({a.cases} cases x {a.classes} classes, M={a.bins}; {out.stat().st_size / 1e6:.1f} MB HTML)"
        )


if __name__ == "__main__":
    main()
