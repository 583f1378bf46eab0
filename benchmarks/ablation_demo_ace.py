"""Why does Dice drop when mL1-ACE is added in the demo? An ablation over schedule length, ACE weight and
learning rate on the demo's own data (docs/demo.md, "Ablation: the Dice cost of mL1-ACE").

For each setting a Dice model and a Dice + hard mL1-ACE model are trained on the full demo's MNI152 slices (the
demo's UNet, batch, seeds and polynomial learning-rate decay; :func:`segcal.training.train_many`, one process per
core) and scored on its 10 test pseudo-subjects: foreground Dice and marginal ACE (class means), per subject
from the pooled bin sums of the subject's slices (:class:`segcal.metrics.SegmentationCalibrationMetric`), then
averaged over subjects. The Dice cost of ACE is ``Dice(dice+ace) - Dice(dice)`` with a 95 % bootstrap interval
over subjects (paired). Settings:

* schedule: 30 (the demo) and 60 epochs, weight 1, lr 3e-3;
* ACE weight 0.3 and 0.1 (``dice:1,ace:W``), 30 epochs, lr 3e-3;
* learning rate 1e-3 and 1e-2, weight 1, 30 epochs.

Run once (about 10 minutes on 2 idle cores)::

    PYTHONPATH=src python benchmarks/ablation_demo_ace.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from segcal.demo import FULL, _logits, _train_config, load_demo_data
from segcal.evaluation.statistics import bootstrap_ci
from segcal.metrics import SegmentationCalibrationMetric
from segcal.training import TrainJob, train_many

#: (setting name, epochs, lr, ACE weight); each is trained with "dice" and with "dice:1,ace:W"
SETTINGS = (
    ("demo (30 epochs)", 30, 3e-3, 1.0),
    ("60 epochs", 60, 3e-3, 1.0),
    ("ACE weight 0.3", 30, 3e-3, 0.3),
    ("ACE weight 0.1", 30, 3e-3, 0.1),
    ("lr 1e-3", 30, 1e-3, 1.0),
    ("lr 1e-2", 30, 1e-2, 1.0),
)


def _jobs(root: Path) -> list[TrainJob]:
    """One Dice job per distinct (epochs, lr) and one Dice + ACE job per setting."""
    jobs: dict[str, TrainJob] = {}
    for name, epochs, lr, weight in SETTINGS:
        size = FULL.__class__(**{**FULL.__dict__, "lr": lr})
        base = f"dice e{epochs} lr{lr:g}"
        if base not in jobs:
            jobs[base] = TrainJob(base, _train_config(root, size, epochs, base.replace(" ", "_"), "dice", 0))
        jobs[name] = TrainJob(name, _train_config(root, size, epochs, f"ace_{len(jobs)}", f"dice:1,ace:{weight:g}", 0))
    return list(jobs.values())


def _per_subject(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, subjects: np.ndarray) -> dict:
    """Foreground Dice and marginal ACE (class means) per subject, from each subject's pooled bin sums."""
    out: dict[str, list[float]] = {"dice": [], "ace": []}
    probs = torch.softmax(_logits(model, torch.as_tensor(images)), 1)
    for s in np.unique(subjects):
        keep = subjects == s
        metric = SegmentationCalibrationMetric(num_bins=20)
        metric.update(probs[keep], torch.as_tensor(labels[keep]))
        res = metric.compute()
        out["ace"].append(float(res.pooled["ace"].mean()))
        out["dice"].append(float(res.pooled["dice"].mean()))
    return {k: np.array(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    console = Console()
    data = load_demo_data(console, FULL, 0, ("noise", 3))
    ds = data.dataset
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = _jobs(Path(tmp))
        console.print(f"training {len(jobs)} models ...")
        outcomes = train_many(jobs, (ds.train.images, ds.train.labels), (ds.val.images, ds.val.labels),
                              workers=args.workers)
    scores = {n: _per_subject(o.model, ds.test.images, ds.test.labels, ds.test.subjects) for n, o in outcomes.items()}
    rows = []
    for name, epochs, lr, weight in SETTINGS:
        base = scores[f"dice e{epochs} lr{lr:g}"]
        ace = scores[name]
        diff = ace["dice"] - base["dice"]
        lo, hi = bootstrap_ci(diff, seed=0)
        rows.append({"setting": name, "epochs": epochs, "lr": lr, "ace_weight": weight,
                     "dice_dice": float(base["dice"].mean()), "dice_ace": float(ace["dice"].mean()),
                     "dice_change": float(diff.mean()), "dice_change_ci": [float(lo), float(hi)],
                     "ace_dice": float(base["ace"].mean()), "ace_ace": float(ace["ace"].mean()),
                     "best_epoch_ace": outcomes[name].best_epoch})
    console.print(f"{len(jobs)} models in {time.perf_counter() - t0:.0f} s; n = {len(np.unique(ds.test.subjects))} "
                  "test subjects")
    console.print("| setting | Dice (dice) | Dice (dice+ACE) | Dice change [95 % CI] | ACE (dice) | ACE (dice+ACE) |")
    console.print("|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["dice_change_ci"]
        console.print(f"| {r['setting']} | {r['dice_dice']:.3f} | {r['dice_ace']:.3f} | "
                      f"{100 * r['dice_change']:+.1f} pt [{100 * lo:+.1f}, {100 * hi:+.1f}] | {r['ace_dice']:.3f} | "
                      f"{r['ace_ace']:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
