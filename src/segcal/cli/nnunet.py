"""``segcal nnunet install-trainers`` / ``uninstall-trainers`` / ``status``: make segcal's nnU-Net v2 trainers
visible to ``nnUNetv2_train -tr NAME`` (thin over :mod:`segcal.integrations.nnunet.install`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from segcal.cli import app

console = Console()

nnunet_app = typer.Typer(
    name="nnunet",
    help="nnU-Net v2: train with segcal's calibration losses (docs/integrations/nnunet.md).",
    no_args_is_help=True,
)
app.add_typer(nnunet_app, name="nnunet")

_TARGET_HELP = "nnU-Net's trainer folder (default: nnunetv2/training/nnUNetTrainer of this Python)."


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
    return typer.Exit(1)


@nnunet_app.command("install-trainers")
def install_trainers_command(
    target: Path | None = typer.Option(None, "--target", help=_TARGET_HELP),
) -> None:
    """Write segcal_trainers.py into nnU-Net's trainer package, so `nnUNetv2_train ... -tr
    nnUNetTrainerSegcalHardACE` (and nnUNetTrainerSegcalSoftACE, nnUNetTrainerSegcalDSCPlusPlus) find segcal's
    trainers. Idempotent; undo with `segcal nnunet uninstall-trainers`. Run it again after reinstalling nnU-Net."""
    from segcal.integrations.nnunet.install import TRAINER_NAMES, install_trainers

    try:
        status, changed = install_trainers(target)
    except (OSError, ModuleNotFoundError) as exc:
        raise _fail(exc) from exc
    verb = "installed" if changed else "already installed"
    console.print(f"segcal's nnU-Net trainers {verb}: {status.path}", soft_wrap=True)
    console.print("trainers: " + ", ".join(TRAINER_NAMES), soft_wrap=True)
    console.print(f"train with: nnUNetv2_train DATASET CONFIGURATION FOLD -tr {TRAINER_NAMES[0]}", soft_wrap=True)


@nnunet_app.command("uninstall-trainers")
def uninstall_trainers_command(
    target: Path | None = typer.Option(None, "--target", help=_TARGET_HELP),
) -> None:
    """Remove segcal_trainers.py from nnU-Net's trainer package (a file of that name that segcal did not write is
    left alone). Idempotent."""
    from segcal.integrations.nnunet.install import uninstall_trainers

    try:
        status, changed = uninstall_trainers(target)
    except (OSError, ModuleNotFoundError) as exc:
        raise _fail(exc) from exc
    what = "removed" if changed else "were not installed"
    console.print(f"segcal's nnU-Net trainers {what}: {status.path}", soft_wrap=True)


@nnunet_app.command("status")
def status_command(
    target: Path | None = typer.Option(None, "--target", help=_TARGET_HELP),
    verify: bool = typer.Option(
        False, "--verify", help="Also ask nnU-Net's own trainer search for each trainer (imports nnU-Net)."
    ),
) -> None:
    """Say whether segcal's trainers are installed in nnU-Net (exit code 0 if they are, 1 if not)."""
    from segcal.integrations.nnunet.install import TRAINER_NAMES, trainers_status

    try:
        status = trainers_status(target)
    except (OSError, ModuleNotFoundError) as exc:
        raise _fail(exc) from exc
    console.print(f"{status.path}: {status.state}", soft_wrap=True)
    if status.state != "installed":
        raise typer.Exit(1)
    if verify:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        for name in TRAINER_NAMES:
            cls = recursive_find_trainer_class_by_name(name)
            console.print(f"{name}: {cls.__module__}.{cls.__qualname__}", soft_wrap=True)
