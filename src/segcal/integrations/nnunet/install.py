"""Make segcal's nnU-Net trainers visible to nnU-Net: a small module in nnU-Net's trainer package.

nnU-Net v2 finds a trainer by its class name (``nnUNetv2_train ... -tr NAME``, and again when it predicts from a
trained model) by importing the modules of ``nnunetv2.training.nnUNetTrainer`` one by one
(``recursive_find_python_class``). :func:`install_trainers` writes ``segcal_trainers.py`` there, a module that
imports segcal's trainer classes; :func:`uninstall_trainers` removes it. Both are idempotent. The module sits at
the top of the package, so nnU-Net's search reaches it before it descends into any sub-package.

This module uses only the standard library and :mod:`segcal.io` (it never imports nnU-Net or torch), so the
command line can run it quickly.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "SHIM_NAME",
    "TRAINER_NAMES",
    "NnUNetNotFoundError",
    "ShimStatus",
    "install_trainers",
    "shim_text",
    "trainer_package_dir",
    "trainers_status",
    "uninstall_trainers",
]

#: the file written into nnU-Net's trainer package
SHIM_NAME = "segcal_trainers.py"
#: the trainer classes of :mod:`segcal.integrations.nnunet.trainers` that the module exposes
TRAINER_NAMES = ("nnUNetTrainerSegcalHardACE", "nnUNetTrainerSegcalSoftACE", "nnUNetTrainerSegcalDSCPlusPlus")
#: the first line of every module segcal writes there (a file without it is never overwritten or removed)
_MARKER = "# segcal nnU-Net trainers (written by `segcal nnunet install-trainers`)"

ShimState = Literal["installed", "absent", "outdated", "foreign"]


class NnUNetNotFoundError(ModuleNotFoundError):
    """nnU-Net v2 is not installed in this Python."""


@dataclass(frozen=True)
class ShimStatus:
    """Where the module is (``path``) and its ``state``: ``"installed"`` (this segcal's module), ``"absent"``,
    ``"outdated"`` (written by another segcal version; installing rewrites it) or ``"foreign"`` (a file of the
    same name that segcal did not write; never touched)."""

    path: Path
    state: ShimState


def trainer_package_dir() -> Path:
    """The folder of ``nnunetv2.training.nnUNetTrainer`` in this Python (found without importing nnU-Net)."""
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        raise NnUNetNotFoundError(
            "nnU-Net v2 (the package nnunetv2) is not installed in this Python: pip install 'segcal[nnunet]'",
            name="nnunetv2",
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "training" / "nnUNetTrainer"
    if not (folder / "__init__.py").is_file():
        raise NnUNetNotFoundError(f"nnU-Net's trainer package is not at {folder}", name="nnunetv2")
    return folder


def shim_text() -> str:
    """The text of the module (the same for every installation of this segcal version)."""
    names = "".join(f"        {n},\n" for n in TRAINER_NAMES)
    return (
        f"{_MARKER}\n"
        "# It makes segcal's trainers visible to nnU-Net, which looks for trainers only inside this package.\n"
        "# Remove it with `segcal nnunet uninstall-trainers` (or delete this file).\n"
        "try:\n"
        "    from segcal.integrations.nnunet.trainers import (  # noqa: F401\n"
        f"{names}"
        "    )\n"
        "except ModuleNotFoundError as _exc:\n"
        "    # segcal is gone (or too old): keep nnU-Net's own trainers usable\n"
        "    if not (_exc.name or '').startswith('segcal'):\n"
        "        raise\n"
        "    import warnings\n"
        "\n"
        "    warnings.warn(\n"
        "        f'segcal is not importable ({_exc}); its nnU-Net trainers are unavailable. '\n"
        "        f'Delete {__file__} to silence this warning.',\n"
        "        stacklevel=1,\n"
        "    )\n"
    )


def _resolve(target: str | Path | None) -> Path:
    folder = trainer_package_dir() if target is None else Path(target)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    return folder / SHIM_NAME


def trainers_status(target: str | Path | None = None) -> ShimStatus:
    """The state of the module in ``target`` (default: :func:`trainer_package_dir`)."""
    path = _resolve(target)
    if not path.exists():
        return ShimStatus(path, "absent")
    text = path.read_text(encoding="utf-8", errors="replace")
    if text == shim_text():
        return ShimStatus(path, "installed")
    return ShimStatus(path, "outdated" if text.startswith(_MARKER) else "foreign")


def install_trainers(target: str | Path | None = None) -> tuple[ShimStatus, bool]:
    """Write the module into ``target`` (default: nnU-Net's trainer package); returns the new status and whether
    anything changed. Idempotent; a file of the same name that segcal did not write raises ``FileExistsError``."""
    from segcal.io import write_text

    status = trainers_status(target)
    if status.state == "installed":
        return status, False
    if status.state == "foreign":
        raise FileExistsError(f"{status.path} exists and was not written by segcal; not overwriting it")
    write_text(status.path, shim_text())
    _remove_bytecode(status.path)
    return ShimStatus(status.path, "installed"), True


def uninstall_trainers(target: str | Path | None = None) -> tuple[ShimStatus, bool]:
    """Remove the module (and its bytecode) from ``target``; returns the new status and whether anything was
    removed. Idempotent; a file of the same name that segcal did not write raises ``FileExistsError``."""
    status = trainers_status(target)
    if status.state == "absent":
        _remove_bytecode(status.path)
        return status, False
    if status.state == "foreign":
        raise FileExistsError(f"{status.path} was not written by segcal; not removing it")
    status.path.unlink()
    _remove_bytecode(status.path)
    return ShimStatus(status.path, "absent"), True


def _remove_bytecode(path: Path) -> None:
    cache = path.parent / "__pycache__"
    for pyc in cache.glob(f"{path.stem}.*.pyc") if cache.is_dir() else ():
        pyc.unlink(missing_ok=True)
