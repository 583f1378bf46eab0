"""Helpers shared by several test files: the source tree for subprocesses, the CLI runner, PNG bytes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from typer.testing import CliRunner, Result

#: the ``src`` folder of this checkout, for the ``PYTHONPATH`` of subprocesses
SRC = str(Path(__file__).resolve().parents[1] / "src")
#: the first 8 bytes of every PNG file
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment with ``PYTHONPATH`` set to :data:`SRC`, plus ``extra`` variables."""
    return {**os.environ, "PYTHONPATH": SRC, **extra}


def invoke_cli(args: Sequence[str]) -> Result:
    """Run ``segcal *args`` in-process (Typer's ``CliRunner``)."""
    from segcal.cli import app  # imported here: only the CLI tests pay for registering the commands

    args = list(args)
    # Typer runs a lone command without its name; with several commands the name is needed
    if len(app.registered_commands) + len(app.registered_groups) == 1:
        args = args[1:]
    return CliRunner().invoke(app, args)


#: every loss name of the loss-string parser (one entry per loss module), for tests that run on all losses
LOSS_NAMES = [
    "dice",
    "dscpp",
    "tversky",
    "tverskypp",
    "focal_tversky",
    "focal_tverskypp",
    "combo",
    "combopp",
    "unified_focal",
    "unified_focalpp",
    "focal",
    "ce",
    "ace",
    "ece",
    "mce",
    "soft_ace",
    "soft_ece",
    "soft_mce",
]
