"""The ``segcal`` command line: one Typer app, one module per command group, thin over the Python API.

Command modules import only typer, rich and the standard library at module level and import the heavy API
(torch, MONAI, numba) inside the command functions, so ``segcal --help`` and ``segcal <command> --help``
answer without loading them (``benchmarks/bench_cli.py`` times it).
"""

from __future__ import annotations

import importlib
import os

import typer

app = typer.Typer(
    name="segcal",
    help="Measure, train and fix the calibration of medical image segmentation models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """segcal: calibration metrics, losses, post-hoc calibration and reports for segmentation models."""


# Each module registers its commands on `app` when imported (``@app.command()``).
_COMMAND_MODULES = ("demo", "evaluate", "calibrate", "conformal", "train", "nnunet")


def _register() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(f"segcal.cli.{name}")


_register()


def main() -> None:
    """The ``segcal`` console script."""
    # Before torch is imported (the commands import it when they run): idle OpenMP threads sleep instead of
    # spin-waiting. torch's and numba's thread pools are separate, and spinning threads of one steal the cores
    # from the other (measured on 2 cores: the binning kernel 84 -> 60 ms, small-model training several times
    # faster under load). Set the variable to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()
