"""The ``segcal`` command line: one Typer app, one module per command group, thin over the Python API."""

from __future__ import annotations

import importlib

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
_COMMAND_MODULES = ("demo", "evaluate", "calibrate", "train")


def _register() -> None:
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"segcal.cli.{name}")
        except ModuleNotFoundError as exc:  # a command module not written yet
            if exc.name != f"segcal.cli.{name}":
                raise


_register()


def main() -> None:
    app()
