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
float32 with the input's affine and header for ``nifti``; for ``nnunet`` a complete nnU-Net prediction folder:
``case.npz`` ``(C, z, y, x)``, the segmentation ``case.nii.gz`` of the calibrated probabilities written with the
geometry of the input's own segmentation of the case, ``case.pkl`` copied byte for byte (never unpickled), and
nnU-Net's ``plans.json`` / ``dataset.json``. Each file carries the calibration mark and the folder a
``segcal.json`` sidecar with the method, the fitted parameters and the source folders.

Ensembles (nnU-Net folds): ``--val-ensemble-with`` / ``--apply-ensemble-with`` add member folders to
``--val-pred`` / ``--apply-to`` (each repeated once per further fold; ``segcal evaluate --ensemble-with``'s
semantics): every case is the voxel-wise mean of the members' probabilities. Reading lives in
:mod:`segcal.posthoc.folders` and :mod:`segcal.io`; this module only handles the command line.
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
from segcal.io.matching import match_ensemble, match_ensemble_predictions, missing_member_file

if TYPE_CHECKING:  # the computing layers are imported when a command runs, so `--help` stays instant
    import numpy as np

    from segcal.io import Prediction
    from segcal.posthoc import Calibrator

T = TypeVar("T")


class Method(str, Enum):
    ts = "ts"
    vector = "vector"
    matrix = "matrix"
    dirichlet = "dirichlet"
    aux = "aux"
    lts = "lts"
    # the calibrators' own names (the "method" of a saved calibrator), accepted as aliases of the short ones
    temperature = "temperature"
    auxconv = "auxconv"


#: alias -> the short name the command records
_METHOD_ALIASES = {Method.temperature: Method.ts, Method.auxconv: Method.aux}


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


def check_members(option: str, first: Path, members: list[Path]) -> None:
    """Rule: every member folder given with ``option`` exists, and no folder of the ensemble (``first`` and the
    members) is given twice; else a bad parameter naming it."""
    seen = [first.resolve()]
    for d in members:
        if not d.is_dir():
            raise typer.BadParameter(f"{option}: folder not found: {d}")
        if d.resolve() in seen:
            raise typer.BadParameter(f"{option}: the ensemble member folder {d} is given twice")
        seen.append(d.resolve())


def list_apply_cases(folder: Path, fmt: FolderFormat, members: list[Path] | None = None) -> dict[str, list[Path]]:
    """Case name → its files: the ``--apply-to`` file (:func:`segcal.io.list_prediction_files`), then one per
    ``--apply-ensemble-with`` member (:func:`segcal.io.matching.match_ensemble_predictions`: a case that a
    member lacks is an error naming the folder and the case); a missing or empty folder is a bad parameter."""
    try:
        if members:
            return match_ensemble_predictions([folder, *members], fmt)
        return {name: [path] for name, path in list_prediction_files(folder, fmt).items()}
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None


def match_validation(
    val_pred: Path, val_labels: Path, fmt: FolderFormat, members: list[Path] | None = None
) -> list[CaseFiles]:
    """Validation cases paired with :func:`segcal.io.match_cases` (with ``--val-ensemble-with`` members,
    :func:`segcal.io.matching.match_ensemble`: every member must hold every case); a prediction without label
    is an error."""
    try:
        if members:
            cases, unmatched = match_ensemble([val_pred, *members], val_labels, fmt)
            missing = missing_member_file(cases)
            if missing is not None:
                raise missing
        else:
            cases, unmatched = match_cases(val_pred, val_labels, fmt)  # type: ignore[assignment]
    except (CaseError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    if unmatched.get("prediction"):
        names = [Path(p).name for p in unmatched["prediction"][:5]]
        raise typer.BadParameter(f"labels missing in {val_labels} for prediction files {names}")
    if not cases:
        raise typer.BadParameter(f"no validation cases found in {val_pred} (format {fmt})")
    return cases  # type: ignore[return-value]


def _make_calibrator(
    method: Method, mode: str, max_voxels: int, kernel_size: int, epochs: int, seed: int
) -> Calibrator:
    """The calibrator of ``--method`` with the command's options."""
    from segcal.posthoc import (
        AuxiliaryConvCalibrator,
        DirichletScaling,
        LocalTemperatureScaling,
        MatrixScaling,
        TemperatureScaling,
        VectorScaling,
    )

    scaling = {Method.ts: TemperatureScaling, Method.vector: VectorScaling, Method.matrix: MatrixScaling,
               Method.dirichlet: DirichletScaling}
    if method == Method.lts:
        return LocalTemperatureScaling(mode=mode, kernel_size=kernel_size, epochs=epochs, seed=seed)
    if method in scaling:
        return scaling[method](mode=mode, max_voxels=max_voxels or None, seed=seed)
    return AuxiliaryConvCalibrator(mode=mode, kernel_size=kernel_size, epochs=epochs, seed=seed)


def _calibrated(
    cal: Calibrator, paths: list[Path], fmt: FolderFormat, kind: str, mode: str
) -> tuple[np.ndarray, Prediction]:
    """``(calibrated probabilities (C, *S), the (first) file as read)`` of one ``--apply-to`` case: its file, or
    the mean probabilities of its ensemble members' files."""
    import torch

    from segcal.posthoc.folders import read_ensemble_logits, read_logits

    if len(paths) > 1:
        folders = [str(p.parent) for p in paths]
        z, pred, _ = read_ensemble_logits(paths, fmt, kind=kind, mode=mode, members=folders)  # type: ignore[arg-type]
    else:
        z, pred, _ = read_logits(paths[0], fmt, kind=kind, mode=mode)  # type: ignore[arg-type]
    return cal.transform(torch.from_numpy(z)[None])[0].numpy(), pred


def _fitted(cal: Calibrator) -> dict[str, Any]:
    """The fitted parameters of ``cal`` as JSON numbers (temperature, or per-class scale and bias)."""
    out: dict[str, Any] = {}
    if hasattr(cal, "temperature_"):
        out["temperature"] = float(cal.temperature_)
    if hasattr(cal, "scale_"):
        out["scale"] = [float(v) for v in cal.scale_.tolist()]
        out["bias"] = [float(v) for v in cal.bias_.tolist()]
    if hasattr(cal, "weight_"):
        out["weight"] = [[float(v) for v in row] for row in cal.weight_.tolist()]
        out["bias"] = [float(v) for v in cal.bias_.tolist()]
    return out


def calibration_record(
    cal: Calibrator,
    method: str,
    val_pred: Path,
    apply_to: Path,
    val_members: list[Path] | None = None,
    apply_members: list[Path] | None = None,
) -> tuple[str, dict[str, Any]]:
    """``(per-file mark, sidecar record)`` of a calibration: the mark is a short text starting with
    ``"segcal calibrated:"`` (it fits a NIfTI ``descrip``); the record names the method, the fitted parameters
    and the source folders (with ensembles, every member folder: ``val_ensemble`` / ``apply_ensemble``, the
    first folder included, and ``ensemble_average: "probabilities"``)."""
    from segcal.io.predictions import CALIBRATION_MARK

    params = _fitted(cal)
    mark = f"{CALIBRATION_MARK} calibrate --method {method}"
    if "temperature" in params:
        mark += f" T={params['temperature']:.4f}"
    if apply_members:
        mark += f" mean of {1 + len(apply_members)}"
    record = {"method": method, **params, "val_pred": str(val_pred.resolve()), "apply_to": str(apply_to.resolve())}
    for key, first, members in (("val_ensemble", val_pred, val_members), ("apply_ensemble", apply_to, apply_members)):
        if members:  # only then: a record without ensembles stays as it was
            record[key] = [str(d.resolve()) for d in (first, *members)]
            record["ensemble_average"] = "probabilities"
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
    progress: Progress, console: Console, cal: Calibrator, targets: dict[str, list[Path]], opts: dict[str, Any]
) -> None:
    """Calibrate every ``--apply-to`` case into ``opts["output"]``, each marked (for ``nnunet``, the complete
    nnU-Net case: :func:`_write_nnunet_case`), then the folder sidecar."""
    from segcal.io import read_folder_info, write_folder_info

    apply_fmt, output = opts["apply_fmt"], opts["output"]
    mark, record = calibration_record(
        cal, opts["method"], opts["val_pred"], opts["apply_to"], opts.get("val_members"), opts.get("apply_members")
    )
    source = read_folder_info(opts["apply_to"])
    task = progress.add_task(f"calibrating ({apply_fmt})", total=len(targets))
    no_segmentation: list[str] = []
    for paths in targets.values():
        probs, pred = _run_or_exit(
            progress, console, lambda p=paths: _calibrated(cal, p, apply_fmt, opts["kind"], opts["mode"]), paths[0]
        )
        sp = pred.spacing if apply_fmt == "npy" else None
        write_prediction_file(paths[0], output, probs, apply_fmt, pred.meta, calibration=mark, spacing=sp)
        if apply_fmt == "nnunet":
            written = _run_or_exit(progress, console, lambda p=paths[0], q=probs: _write_nnunet_case(p, q, opts))
            if not written:
                no_segmentation.append(paths[0].name)
        progress.advance(task)
    if apply_fmt == "nnunet":
        copy_nnunet_side_files(opts["apply_to"], output)
        if no_segmentation:
            console.print(
                f"[yellow]warning:[/yellow] no segmentation written for {len(no_segmentation)} case(s) (e.g. "
                f"{no_segmentation[0]}): {opts['apply_to']} holds no segmentation of them to take the geometry "
                "from, so nnU-Net's evaluation will not find them",
                soft_wrap=True,
            )
    write_folder_info(output, source.merged(kind="probabilities", calibration=record))


def _write_nnunet_case(prediction: Path, probs: np.ndarray, opts: dict[str, Any]) -> bool:
    """The rest of a complete nnU-Net case beside its calibrated ``case.npz``: the segmentation of ``probs``
    (:func:`segcal.io.nnunet.nnunet_segmentation`; region-based with ``--mode multilabel``) written with the
    geometry of the input's segmentation of the case, and ``case.pkl`` copied. Returns whether a segmentation
    was written (not when the input folder has none for the case)."""
    from segcal.io.nnunet import (
        DATASET_JSON,
        copy_nnunet_case_files,
        nnunet_segmentation,
        nnunet_segmentation_path,
        read_nnunet_file_ending,
        read_nnunet_regions_class_order,
        write_nnunet_segmentation,
    )

    output = opts["output"]
    copy_nnunet_case_files(prediction, output)
    template = nnunet_segmentation_path(prediction, read_nnunet_file_ending(prediction.parent))
    if not template.is_file():
        return False
    order = None
    if opts["mode"] == "multilabel":
        dataset = prediction.parent / DATASET_JSON
        order = read_nnunet_regions_class_order(dataset) if dataset.is_file() else None
        if order is None:
            raise CaseError(dataset, "--mode multilabel: the segmentation of region-based predictions needs the "
                            "dataset.json 'regions_class_order' (the label value of each region channel)")
    write_nnunet_segmentation(output / template.name, nnunet_segmentation(probs, order), template)
    return True


@app.command()
def calibrate(
    method: Method = typer.Option(
        Method.ts,
        "--method",
        help="ts (temperature), vector (per-class / Platt), matrix (W z + b), dirichlet (W log p + b; both "
        "exclusive mode only), aux (k×k(×k) conv on the logits) or lts (local temperature scaling: a per-voxel "
        "temperature from a small conv net). 'temperature' and 'auxconv', the names a saved calibrator "
        "records, are accepted for ts and aux.",
    ),
    val_pred: Path = typer.Option(
        ..., "--val-pred", help="Folder of validation predictions (logits or probabilities, see --pred-kind)."
    ),
    val_labels: Path = typer.Option(..., "--val-labels", help="Folder of validation label maps (*spatial)."),
    apply_to: Path = typer.Option(..., "--apply-to", help="Folder of predictions to calibrate."),
    val_ensemble_with: list[Path] | None = typer.Option(
        None,
        "--val-ensemble-with",
        help="Another validation prediction folder of the same cases (repeat it: the folds of an nnU-Net model, "
        "--val-pred being the first); each case is the voxel-wise mean of the folders' probabilities.",
    ),
    apply_ensemble_with: list[Path] | None = typer.Option(
        None,
        "--apply-ensemble-with",
        help="Another folder of predictions to calibrate, of the same cases as --apply-to (repeat it); each case "
        "is the mean of the folders' probabilities, calibrated and written once, named as in --apply-to.",
    ),
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
    max_voxels: int = typer.Option(
        1_000_000,
        help="ts/vector/matrix/dirichlet: fit on a seeded uniform sample of this many voxels over all validation "
        "volumes (0 = every voxel, re-read from disk in each optimiser pass).",
    ),
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
    method = _METHOD_ALIASES.get(method, method)
    val_members, apply_members = list(val_ensemble_with or []), list(apply_ensemble_with or [])
    check_members("--val-ensemble-with", val_pred, val_members)
    check_members("--apply-ensemble-with", apply_to, apply_members)
    try:
        inputs = {"--apply-to": apply_to, "--val-pred": val_pred, "--val-labels": val_labels}
        inputs |= {f"--val-ensemble-with {d}": d for d in val_members}
        inputs |= {f"--apply-ensemble-with {d}": d for d in apply_members}
        check_output_outside_inputs(output, inputs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if mode not in ("exclusive", "multilabel"):
        raise typer.BadParameter(f"--mode must be exclusive or multilabel, got {mode!r}")
    val_fmt = resolve_format(val_pred, fmt)
    apply_fmt = resolve_format(apply_to, fmt)
    cases = match_validation(val_pred, val_labels, val_fmt, val_members)
    targets = list_apply_cases(apply_to, apply_fmt, apply_members)
    try:
        cal = _make_calibrator(method, mode, max_voxels, kernel_size, epochs, seed)
    except ValueError as exc:  # e.g. --method matrix with --mode multilabel
        raise typer.BadParameter(str(exc)) from None
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
                "apply_to": apply_to, "kind": pred_kind.value, "mode": mode, "val_members": val_members,
                "apply_members": apply_members}
        _write_outputs(progress, console, cal, targets, opts)
    if save_calibrator is not None:
        cal.save(save_calibrator)
    console.print(_summary_table(cal, val_fmt, apply_fmt, len(cases), len(targets), output, volumes.saturation))
