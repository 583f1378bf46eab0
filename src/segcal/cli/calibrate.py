"""``segcal calibrate``: fit a post-hoc calibrator on validation predictions and write calibrated probabilities.

Input folders use the formats of ``segcal evaluate`` (:mod:`segcal.io`; ``--format auto`` detects each folder
with :func:`segcal.io.detect_format`): ``npy`` (``.npz`` / ``.npy`` arrays ``(C, *S)``), ``nifti``
(``(x, y, z, C)`` maps) and ``nnunet`` (``case.npz`` key ``"probabilities"`` ``(C, z, y, x)``). Labels are label
maps ``(*S)`` (also the ``.npz`` training cases of ``segcal train``, key ``"label"``), or multi-hot ``(C, *S)``
for ``--mode multilabel``.

Every prediction file says whether it holds probabilities or logits (the prediction-file contract,
:mod:`segcal.io.predictions`: npz key, NIfTI intent, ``segcal.json`` sidecar, or ``--pred-kind``); logits are
used as stored, probabilities are converted by :func:`segcal.posthoc.folders.probabilities_to_logits` (a warning
when saturated voxels make the fit unreliable); a file whose kind cannot be told is refused, and so is a file
already calibrated by this command.

Outputs keep the format of the ``--apply-to`` folder and are declared as calibrated probabilities: ``.npz`` key
``"probabilities"`` ``(C, *S)`` for ``npy`` (an ``.npy`` input is written as ``.npz``); NIfTI ``(x, y, z, C)``
float32 with the input's affine and header for ``nifti``; ``case.npz`` ``(C, z, y, x)`` for ``nnunet`` (nnU-Net's
``plans.json`` / ``dataset.json`` are copied; ``.pkl`` files are never read or written). Each file carries the
calibration mark and the folder a ``segcal.json`` sidecar with the method and fitted parameters. Reading lives
in :mod:`segcal.posthoc.folders` and :mod:`segcal.io`; this module only handles the command line.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from segcal.cli import app
from segcal.io import (
    CaseError,
    CaseFiles,
    FolderFormat,
    check_output_outside_inputs,
    copy_nnunet_side_files,
    detect_format,
    list_prediction_files,
    match_cases,
    write_prediction_file,
)

if TYPE_CHECKING:  # the computing layers are imported when a command runs, so `--help` stays instant
    import numpy as np

    from segcal.io import Prediction
    from segcal.posthoc import Calibrator

T = TypeVar("T")


class Method(str, Enum):
    ts = "ts"
    vector = "vector"
    aux = "aux"
    lts = "lts"


class PredKind(str, Enum):
    auto = "auto"
    probabilities = "probabilities"
    logits = "logits"


class InputFormat(str, Enum):
    auto = "auto"
    nifti = "nifti"
    npy = "npy"
    nnunet = "nnunet"


def resolve_format(folder: Path, fmt: InputFormat | str) -> FolderFormat:
    """The format of ``folder``: ``fmt`` itself, or detected by :func:`segcal.io.detect_format` for ``auto``."""
    fmt = InputFormat(fmt)
    if fmt != InputFormat.auto:
        return fmt.value  # type: ignore[return-value]
    if not folder.is_dir():
        raise typer.BadParameter(f"folder not found: {folder}")
    return detect_format(folder)


def list_apply_cases(folder: Path, fmt: FolderFormat) -> dict[str, Path]:
    """Case name → file of the ``--apply-to`` folder (:func:`segcal.io.list_prediction_files`); a missing or
    empty folder is a bad parameter."""
    try:
        return list_prediction_files(folder, fmt)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None


def match_validation(val_pred: Path, val_labels: Path, fmt: FolderFormat) -> list[CaseFiles]:
    """Validation cases paired with :func:`segcal.io.match_cases`; a prediction without label is an error."""
    try:
        cases, unmatched = match_cases(val_pred, val_labels, fmt)
    except CaseError as exc:
        raise typer.BadParameter(str(exc)) from None
    if unmatched.get("prediction"):
        names = [Path(p).name for p in unmatched["prediction"][:5]]
        raise typer.BadParameter(f"labels missing in {val_labels} for prediction files {names}")
    if not cases:
        raise typer.BadParameter(f"no validation cases found in {val_pred} (format {fmt})")
    return cases


def _make_calibrator(
    method: Method, mode: str, max_voxels: int, kernel_size: int, epochs: int, seed: int
) -> Calibrator:
    """The calibrator of ``--method`` with the command's options."""
    from segcal.posthoc import AuxiliaryConvCalibrator, LocalTemperatureScaling, TemperatureScaling, VectorScaling

    if method == Method.ts:
        return TemperatureScaling(mode=mode, max_voxels_per_volume=max_voxels or None, seed=seed)
    if method == Method.vector:
        return VectorScaling(mode=mode, max_voxels_per_volume=max_voxels or None, seed=seed)
    if method == Method.lts:
        return LocalTemperatureScaling(mode=mode, kernel_size=kernel_size, epochs=epochs, seed=seed)
    return AuxiliaryConvCalibrator(mode=mode, kernel_size=kernel_size, epochs=epochs, seed=seed)


def _calibrated(cal: Calibrator, path: Path, fmt: FolderFormat, kind: str, mode: str) -> tuple[np.ndarray, Prediction]:
    """``(calibrated probabilities (C, *S), the file as read)`` of one ``--apply-to`` file."""
    import torch

    from segcal.posthoc.folders import read_logits

    z, pred, _ = read_logits(path, fmt, kind=kind, mode=mode)  # type: ignore[arg-type]
    return cal.transform(torch.from_numpy(z)[None])[0].numpy(), pred


def _fitted(cal: Calibrator) -> dict[str, Any]:
    """The fitted parameters of ``cal`` as JSON numbers (temperature, or per-class scale and bias)."""
    out: dict[str, Any] = {}
    if hasattr(cal, "temperature_"):
        out["temperature"] = float(cal.temperature_)
    if hasattr(cal, "scale_"):
        out["scale"] = [float(v) for v in cal.scale_.tolist()]
        out["bias"] = [float(v) for v in cal.bias_.tolist()]
    return out


def calibration_record(cal: Calibrator, method: str, val_pred: Path, apply_to: Path) -> tuple[str, dict[str, Any]]:
    """``(per-file mark, sidecar record)`` of a calibration: the mark is a short text starting with
    ``"segcal calibrated:"`` (it fits a NIfTI ``descrip``); the record names the method, the fitted parameters
    and the source folders."""
    from segcal.io.predictions import CALIBRATION_MARK

    params = _fitted(cal)
    mark = f"{CALIBRATION_MARK} calibrate --method {method}"
    if "temperature" in params:
        mark += f" T={params['temperature']:.4f}"
    record = {"method": method, **params, "val_pred": str(val_pred.resolve()), "apply_to": str(apply_to.resolve())}
    return mark, record


def _run_or_exit(progress: Progress, console: Console, step: Callable[[], T], path: Path | None = None) -> T:
    """``step()``; a ``ValueError`` / ``TypeError`` stops the progress bar, prints the message (prefixed by
    ``path`` unless it is a :class:`segcal.io.CaseError`, which names its file) and exits with code 1."""
    try:
        return step()
    except (ValueError, TypeError) as exc:
        progress.stop()
        msg = f"{path}: {exc}" if path is not None and not isinstance(exc, CaseError) else str(exc)
        console.print(f"[red]error:[/red] {msg}", soft_wrap=True)
        raise typer.Exit(1) from None


def _summary_table(
    cal: Calibrator, val_fmt: str, apply_fmt: str, n_cases: int, n_targets: int, output: Path, saturation: float
) -> Table:
    """The fitted parameters and what was written."""
    table = Table(title="segcal calibrate")
    table.add_column("item")
    table.add_column("value")
    table.add_row("method", type(cal).__name__)
    table.add_row("formats", f"validation {val_fmt}, apply-to {apply_fmt}")
    table.add_row("validation cases", str(n_cases))
    params = _fitted(cal)
    if "temperature" in params:
        table.add_row("temperature", f"{params['temperature']:.4f}")
    for key in ("scale", "bias"):
        if key in params:
            table.add_row(key, ", ".join(f"{v:.3f}" for v in params[key]))
    table.add_row("saturated validation voxels", f"{saturation:.2%}")
    table.add_row("calibrated cases", str(n_targets))
    table.add_row("output", str(output))
    return table


def _warn_saturation(console: Console, saturation: float) -> None:
    """One warning when more than ``SATURATION_WARN`` of the validation voxels were saturated probabilities."""
    import math

    from segcal.posthoc.folders import PROB_EPS, SATURATION_WARN

    if saturation > SATURATION_WARN:
        console.print(
            f"[yellow]warning:[/yellow] {saturation:.1%} of the validation voxels are saturated (a class probability "
            f"below {PROB_EPS:g}): converted to logits, their margins are cut at {-math.log(PROB_EPS):.1f}, "
            "which biases the fit; fit on logits instead (segcal predict --save-logits writes them)",
            soft_wrap=True,
        )


def _write_outputs(
    progress: Progress, console: Console, cal: Calibrator, targets: dict[str, Path], opts: dict[str, Any]
) -> None:
    """Calibrate every ``--apply-to`` file into ``opts["output"]``, each marked, then the folder sidecar."""
    from segcal.io import read_folder_info, write_folder_info

    apply_fmt, output = opts["apply_fmt"], opts["output"]
    mark, record = calibration_record(cal, opts["method"], opts["val_pred"], opts["apply_to"])
    source = read_folder_info(opts["apply_to"])
    task = progress.add_task(f"calibrating ({apply_fmt})", total=len(targets))
    for path in targets.values():
        probs, pred = _run_or_exit(
            progress, console, lambda p=path: _calibrated(cal, p, apply_fmt, opts["kind"], opts["mode"]), path
        )
        sp = pred.spacing if apply_fmt == "npy" else None
        write_prediction_file(path, output, probs, apply_fmt, pred.meta, calibration=mark, spacing=sp)
        progress.advance(task)
    if apply_fmt == "nnunet":
        copy_nnunet_side_files(opts["apply_to"], output)
    write_folder_info(output, source.merged(kind="probabilities", calibration=record))


@app.command()
def calibrate(
    method: Method = typer.Option(
        Method.ts,
        "--method",
        help="ts (temperature), vector (per-class / Platt), aux (k×k(×k) conv on the logits) or lts (local "
        "temperature scaling: a per-voxel temperature from a small conv net).",
    ),
    val_pred: Path = typer.Option(
        ..., "--val-pred", help="Folder of validation predictions (logits or probabilities, see --pred-kind)."
    ),
    val_labels: Path = typer.Option(..., "--val-labels", help="Folder of validation label maps (*spatial)."),
    apply_to: Path = typer.Option(..., "--apply-to", help="Folder of predictions to calibrate."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder for calibrated probabilities."),
    fmt: InputFormat = typer.Option(
        InputFormat.auto, "--format", help="auto (detected per folder), nifti, npy or nnunet."
    ),
    pred_kind: PredKind = typer.Option(
        PredKind.auto,
        "--pred-kind",
        help="What undeclared prediction files hold: auto (declared by npz key / NIfTI intent / segcal.json, "
        "else must be probabilities), probabilities or logits. Never overrides a declared kind.",
    ),
    mode: str = typer.Option("exclusive", help="exclusive (softmax) or multilabel (sigmoid)."),
    max_voxels: int = typer.Option(200_000, help="Random voxels per validation volume for ts/vector (0 = all)."),
    kernel_size: int = typer.Option(5, help="Kernel size of the aux conv and of the lts network's convolutions."),
    epochs: int = typer.Option(20, help="Epochs for the aux conv and lts."),
    seed: int = typer.Option(0, help="Seed of voxel subsampling / training."),
    save_calibrator: Path | None = typer.Option(None, help="Also save the fitted calibrator to this file."),
) -> None:
    """Fit a calibrator on validation predictions + labels, then write calibrated probability maps for
    --apply-to in the same format as its input.

    Exit codes: 0 done; 1 a prediction file is unusable (unknown kind, already calibrated, unreadable; the
    message names it); 2 bad options or folders.
    """
    console = Console()
    try:
        inputs = {"--apply-to": apply_to, "--val-pred": val_pred, "--val-labels": val_labels}
        check_output_outside_inputs(output, inputs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if mode not in ("exclusive", "multilabel"):
        raise typer.BadParameter(f"--mode must be exclusive or multilabel, got {mode!r}")
    val_fmt = resolve_format(val_pred, fmt)
    apply_fmt = resolve_format(apply_to, fmt)
    cases = match_validation(val_pred, val_labels, val_fmt)
    targets = list_apply_cases(apply_to, apply_fmt)
    cal = _make_calibrator(method, mode, max_voxels, kernel_size, epochs, seed)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"fitting {method.value} on {len(cases)} {val_fmt} cases", total=None)
        from segcal.posthoc.folders import FolderVolumes

        volumes = FolderVolumes(cases, val_fmt, kind=pred_kind.value, mode=mode)  # type: ignore[arg-type]
        _run_or_exit(progress, console, lambda: cal.fit(volumes))
        progress.update(task, total=1, completed=1)
        _warn_saturation(console, volumes.saturation)
        output.mkdir(parents=True, exist_ok=True)
        opts = {"apply_fmt": apply_fmt, "output": output, "method": method.value, "val_pred": val_pred,
                "apply_to": apply_to, "kind": pred_kind.value, "mode": mode}
        _write_outputs(progress, console, cal, targets, opts)
    if save_calibrator is not None:
        cal.save(save_calibrator)
    console.print(_summary_table(cal, val_fmt, apply_fmt, len(cases), len(targets), output, volumes.saturation))
