"""``segcal demo``: the whole pipeline on the embedded data (no downloads)."""

from __future__ import annotations

from pathlib import Path

import typer

from segcal.cli import app


@app.command()
def demo(
    output: Path = typer.Option(Path("segcal-demo-output"), "--output", "-o", help="Folder for tables and figures."),
    quick: bool = typer.Option(False, "--quick", help="Smaller task and fewer epochs (CI, ~2-3 min on 2 cores)."),
    seed: int = typer.Option(0, help="Seed of the pseudo-subjects, the networks and every resampling."),
    bins: int = typer.Option(20, help="Number of equal-width probability bins."),
    epochs: int | None = typer.Option(None, help="Training epochs per model (default: 20 full, 20 quick)."),
    calibrators: str = typer.Option(
        "", "--calibrators", help="Also calibrate the Dice model with these post-hoc methods, comma-separated: "
        "vector, matrix, dirichlet, aux, lts (each a run dice+<method> in the comparison; docs/demo.md)."
    ),
) -> None:
    """Train small 2D UNets (CE, Dice, Dice+CE, Dice+hard/soft mL1-ACE, DSC++) on the embedded MNI152 tissue
    task, fit temperature scaling, build a Dice ensemble and MC dropout, evaluate on test and a shifted set.

    Writes OUTPUT/report.html (findings measured by this run, papers-style tables, figures),
    OUTPUT/compare/report.html (segcal compare of every model vs Dice), the evaluation runs and summary.json.
    """
    from segcal.demo import check_demo_calibrators, run_demo

    if epochs is not None and epochs < 1:
        raise typer.BadParameter(f"--epochs must be >= 1, got {epochs}")
    try:
        methods = check_demo_calibrators([m.strip() for m in calibrators.split(",") if m.strip()])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--calibrators") from None
    run_demo(output, quick=quick, seed=seed, num_bins=bins, epochs=epochs, calibrators=methods)
