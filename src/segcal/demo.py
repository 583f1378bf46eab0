"""The ``segcal demo`` pipeline on the embedded MNI152 brain-tissue task (DATA.md §A).

First version (foundation issue): evaluate, on the test pseudo-subjects, the calibration of probability
predictors derived from the soft reference tissue maps — the reference itself, an over-confident sharpened
version and an under-confident smoothed version — against the hard labels and against the soft reference.
Everything printed or plotted is computed in the run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from segcal.metrics import MetricResult, SegmentationCalibrationMetric

TISSUE_CLASSES = ("background", "CSF", "GM", "WM")

__all__ = ["DemoPredictor", "reference_predictors", "run_demo", "tempered"]


@dataclass
class DemoPredictor:
    name: str
    description: str
    probs: torch.Tensor  # (N, C, H, W)


def tempered(probs: torch.Tensor, temperature: float, eps: float = 1e-6) -> torch.Tensor:
    """``softmax(log p / T)``: ``T < 1`` sharpens (over-confident), ``T > 1`` smooths (under-confident)."""
    return torch.softmax(torch.log(probs.clamp_min(eps)) / temperature, dim=1)


def reference_predictors(soft: torch.Tensor) -> list[DemoPredictor]:
    """The three predictors of the first demo, derived from soft reference maps ``(N, C, H, W)``."""
    return [
        DemoPredictor("reference", "the soft reference tissue maps themselves", soft),
        DemoPredictor("sharpened", "reference tempered with T = 0.5 (over-confident)", tempered(soft, 0.5)),
        DemoPredictor("smoothed", "reference tempered with T = 2 (under-confident)", tempered(soft, 2.0)),
    ]


def _evaluate(pred: DemoPredictor, target: torch.Tensor, case_ids: list[str], num_bins: int) -> MetricResult:
    metric = SegmentationCalibrationMetric(num_bins, class_names=list(TISSUE_CLASSES[1:]))
    metric.update(pred.probs, target, case_ids=case_ids)
    return metric.compute()


def run_demo(output: Path, *, quick: bool = False, seed: int = 0, num_bins: int = 20) -> dict:
    """Build the embedded data, evaluate the reference predictors, print a table, write PNGs and a summary.

    Returns the summary dict that is also written to ``output/summary.json``.
    """
    from rich.console import Console
    from rich.table import Table

    from segcal.data.mni152 import load_tissue_dataset
    from segcal.plots import reliability_diagram, save_figure

    console = Console()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_subjects = 6 if quick else 20
    split = (2, 2, 2) if quick else (12, 4, 4)
    with console.status("building the embedded MNI152 tissue data (cached after the first run)"):
        ds = load_tissue_dataset(n_subjects=n_subjects, split=split, seed=seed)
    test = ds.test
    soft = torch.as_tensor(test.soft, dtype=torch.float64)
    labels = torch.as_tensor(test.labels)
    case_ids = [f"subject{int(s):02d}_z{int(z):03d}" for s, z in zip(test.subjects, test.slices, strict=True)]
    console.print(
        f"[bold]segcal demo[/bold]: {soft.shape[0]} test slices of {tuple(soft.shape[2:])} voxels "
        f"from {len(set(test.subjects.tolist()))} pseudo-subjects, classes {', '.join(TISSUE_CLASSES)}"
    )

    summary: dict = {"classes": list(TISSUE_CLASSES[1:]), "num_bins": num_bins, "predictors": {}}
    table = Table(title="Calibration on the test slices (foreground classes; macro mean over slices)")
    for col in ("predictor", "scored against", "class", "ECE", "ACE", "MCE", "NLL", "Brier", "Dice"):
        table.add_column(col, justify="right" if col not in ("predictor", "scored against", "class") else "left")
    for pred in reference_predictors(soft):
        entry: dict = {"description": pred.description}
        for against, target in (("hard labels", labels), ("soft reference", soft)):
            res = _evaluate(pred, target, case_ids, num_bins)
            entry[against] = {
                k: {name: float(v) for name, v in zip(res.class_names, res.macro[k].tolist(), strict=False)}
                for k in ("ece", "ace", "mce", "brier", "dice")
            }
            entry[against]["nll"] = float(res.macro["nll"][0])
            for ci, cname in enumerate(res.class_names):
                table.add_row(
                    pred.name, against, cname,
                    *(f"{float(res.macro[k][ci]):.4f}" for k in ("ece", "ace", "mce")),
                    f"{float(res.macro['nll'][0]):.4f}", f"{float(res.macro['brier'][ci]):.4f}",
                    f"{float(res.macro['dice'][ci]):.4f}",
                )
            if against == "hard labels":
                pooled = res.bin_stats.pooled() if res.bin_stats is not None else None
                if pooled is not None:
                    for ci, cname in enumerate(res.class_names):
                        fig = reliability_diagram(
                            pooled, channel=ci, class_name=cname, title=f"{pred.name}: {cname} (all test slices)"
                        )
                        save_figure(fig, output / f"reliability_{pred.name}_{cname}.png")
        summary["predictors"][pred.name] = entry
    console.print(table)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"wrote {output / 'summary.json'} and reliability diagrams to {output}/ ({summary['seconds']} s)")
    return summary
