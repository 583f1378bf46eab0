"""``segcal demo``: the whole pipeline on the embedded data (no downloads)."""

from __future__ import annotations

from pathlib import Path

import typer

from segcal.cli import app


@app.command()
def demo(
    output: Path = typer.Option(Path("segcal-demo-output"), "--output", "-o", help="Folder for tables and figures."),
    quick: bool = typer.Option(False, "--quick", help="Fewer pseudo-subjects, for CI and a first look."),
    seed: int = typer.Option(0, help="Seed of the pseudo-subject generator."),
    bins: int = typer.Option(20, help="Number of equal-width probability bins."),
) -> None:
    """Evaluate reference, over-confident and under-confident predictors on the embedded MNI152 tissue task.

    Builds (and caches) pseudo-subjects from the ICBM152 template shipped with nilearn, scores each predictor
    against the hard labels and the soft reference maps, prints a table and writes reliability diagrams and
    summary.json into OUTPUT.
    """
    from segcal.demo import run_demo

    run_demo(output, quick=quick, seed=seed, num_bins=bins)
