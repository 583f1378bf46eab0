"""``segcal calibrate``: fit a post-hoc calibrator on validation predictions and write calibrated probabilities.

Input folders use the formats of ``segcal evaluate`` (:mod:`segcal.io`; ``--format auto`` detects each folder
with :func:`segcal.io.detect_format`):

* ``npy``: one ``.npy`` / ``.npz`` **logits** file ``(C, *S)`` per case (npz: key ``"logits"`` or a single
  array); labels ``(*S)`` integer maps (or multi-hot ``(C, *S)`` for ``--mode multilabel``);
* ``nifti``: **probability** maps ``case.nii.gz`` ``(x, y, z, C)`` (validation cases may also use any layout
  :func:`segcal.io.read_probabilities` reads) + NIfTI label maps ``(x, y, z)``;
* ``nnunet``: nnU-Net v2 prediction folders, ``case.npz`` with key ``"probabilities"`` ``(C, z, y, x)``,
  labels ``case.nii.gz`` ``(x, y, z)``.

Probabilities are turned into logits as ``log(clip(p, 1e-7))``: ``softmax(log p) = p``, so the calibrators
see exactly the model's distribution (a temperature ``T`` then gives ``p^(1/T) / Σ p^(1/T)``).

Outputs keep the format of the ``--apply-to`` folder: ``.npy`` (probabilities ``(C, *S)``) / ``.npz`` (key
``"probabilities"``) for ``npy``; NIfTI ``(x, y, z, C)`` float32 with the input's affine and header for
``nifti``; ``case.npz`` with key ``"probabilities"`` ``(C, z, y, x)`` float32 for ``nnunet`` (nnU-Net's
``plans.json`` / ``dataset.json`` are copied; ``.pkl`` files are never read or written). Reading and writing
live in :func:`read_apply_case` and :func:`write_case`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from segcal.cli import app
from segcal.io import (
    NIFTI_SUFFIXES,
    NUMPY_SUFFIXES,
    CaseError,
    CaseFiles,
    detect_format,
    load_case,
    match_cases,
    read_label,
    read_nifti,
    read_nnunet_probabilities,
    read_numpy,
)
from segcal.posthoc import AuxiliaryConvCalibrator, TemperatureScaling, VectorScaling

FolderFormat = Literal["nifti", "npy", "nnunet"]
#: probabilities are clipped to this value before the log (``log(clip(p, EPS))`` are the logits)
PROB_EPS = 1e-7
#: nnU-Net side files copied to an nnU-Net-style output folder (JSON only; pickles are never touched)
NNUNET_SIDE_FILES = ("plans.json", "dataset.json")


class Method(str, Enum):
    ts = "ts"
    vector = "vector"
    aux = "aux"


class InputFormat(str, Enum):
    auto = "auto"
    nifti = "nifti"
    npy = "npy"
    nnunet = "nnunet"


def probabilities_to_logits(p: np.ndarray) -> np.ndarray:
    """``log(clip(p, 1e-7))`` as float32; ``softmax`` of the result gives back ``p`` (up to the clip)."""
    return np.log(np.clip(p.astype(np.float32, copy=False), PROB_EPS, None))


def resolve_format(folder: Path, fmt: InputFormat | str) -> FolderFormat:
    """The format of ``folder``: ``fmt`` itself, or detected by :func:`segcal.io.detect_format` for ``auto``."""
    fmt = InputFormat(fmt)
    if fmt != InputFormat.auto:
        return fmt.value  # type: ignore[return-value]
    if not folder.is_dir():
        raise typer.BadParameter(f"folder not found: {folder}")
    return detect_format(folder)


def read_logits_npy(path: str | Path) -> np.ndarray:
    """Logits ``(C, *S)`` from ``.npy`` or ``.npz`` (key ``"logits"`` or the single array); never unpickles."""
    key = None
    if str(path).endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                key = "logits" if "logits" in z.files else None
        except Exception:
            key = None  # read_numpy reports the problem with the file name
    arr = read_numpy(path, key)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise CaseError(path, f"logits must be a real numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


def read_validation_case(files: CaseFiles, fmt: FolderFormat) -> tuple[np.ndarray, np.ndarray]:
    """``(logits (C, *S) float32, target)`` of one validation case; target ``(*S)`` int64 or multi-hot
    ``(C, *S)`` float32 (``npy`` only). Probability formats are converted with :func:`probabilities_to_logits`;
    shapes, spacing and affine are cross-checked by :func:`segcal.io.load_case`."""
    if fmt == "npy":
        z = read_logits_npy(files.prediction[0])
        y, _, _ = read_label(files.label)
        if y.shape == z.shape:  # multi-hot (multilabel) labels (C, *spatial)
            return z, y.astype(np.float32)
        if z.shape[1:] != y.shape:
            raise CaseError(
                files.prediction[0],
                f"case {files.case_id}: logits have spatial shape {z.shape[1:]} but labels "
                f"{Path(files.label).name} have {y.shape}",
            )
        return z, y.astype(np.int64)
    case = load_case(files, fmt)
    assert case.label is not None
    return probabilities_to_logits(case.probabilities), case.label.astype(np.int64)


def list_apply_cases(folder: Path, fmt: FolderFormat) -> dict[str, Path]:
    """Case id (file name without extension) → file, one prediction file per case, for ``--apply-to``."""
    if not folder.is_dir():
        raise typer.BadParameter(f"folder not found: {folder}")
    suffixes = NIFTI_SUFFIXES if fmt == "nifti" else (".npz",) if fmt == "nnunet" else NUMPY_SUFFIXES
    cases: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        suf = next((s for s in suffixes if p.name.endswith(s)), None)
        if p.is_file() and suf is not None:
            cases[p.name[: -len(suf)]] = p
    if not cases:
        raise typer.BadParameter(f"{folder}: no {'/'.join(suffixes)} files found (format {fmt})")
    return cases


def read_apply_case(path: Path, fmt: FolderFormat) -> tuple[np.ndarray, Any]:
    """``(logits (C, *S) float32, meta)`` of one file to calibrate; ``meta`` is what :func:`write_case`
    needs to write the output in the same format (the NIfTI image for ``nifti``, else ``None``).

    ``nifti``: a 4D ``(x, y, z, C)`` probability map (or a 3D binary foreground probability ``p`` → classes
    ``[1 − p, p]``); ``nnunet``: ``(C, z, y, x)`` → ``(C, x, y, z)``; ``npy``: logits as stored.
    """
    if fmt == "npy":
        return read_logits_npy(path), None
    if fmt == "nnunet":
        return probabilities_to_logits(read_nnunet_probabilities(path)), None
    data, _, _ = read_nifti(path)  # raises CaseError naming the file when corrupt
    if not np.issubdtype(data.dtype, np.floating):
        raise CaseError(path, f"probabilities must be a floating-point array, got dtype {data.dtype}")
    if data.ndim == 4:
        probs = np.moveaxis(data, -1, 0)
    elif data.ndim in (2, 3):
        probs = np.stack([1 - data, data])
    else:
        raise CaseError(path, f"expected a 3D or 4D (x, y, z, C) probability map, got shape {data.shape}")
    import nibabel as nib

    return probabilities_to_logits(probs), nib.load(str(path))


def write_case(src: Path, out_dir: Path, probs: np.ndarray, fmt: FolderFormat, meta: Any = None) -> Path:
    """Write calibrated ``probs`` ``(C, *S)`` (label axis order) as ``out_dir / src.name`` in ``fmt``.

    ``npy``: ``.npy`` array or ``.npz`` key ``"probabilities"``, ``(C, *S)``; ``nifti``: ``(x, y, z, C)``
    float32 with the affine and header of the input image ``meta``; ``nnunet``: ``.npz`` key
    ``"probabilities"`` ``(C, z, y, x)`` float32.
    """
    out = out_dir / src.name
    probs = probs.astype(np.float32, copy=False)
    if fmt == "nifti":
        img = meta
        header = img.header.copy()
        header.set_data_dtype(np.float32)
        new = type(img)(np.ascontiguousarray(np.moveaxis(probs, 0, -1)), img.affine, header)
        new.header.set_slope_inter(1.0, 0.0)
        new.to_filename(str(out))
    elif fmt == "nnunet":
        np.savez_compressed(
            out, probabilities=np.ascontiguousarray(np.transpose(probs, (0, *range(probs.ndim - 1, 0, -1))))
        )
    elif src.suffix == ".npy":
        np.save(out, probs)
    else:
        np.savez_compressed(out, probabilities=probs)
    return out


def copy_nnunet_side_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy nnU-Net's JSON side files (``plans.json``, ``dataset.json``) so the output is detected as
    ``nnunet`` by ``segcal evaluate``; pickles are never copied."""
    copied = []
    for name in NNUNET_SIDE_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out_dir / name)
            copied.append(name)
    return copied


class _FolderVolumes:
    """Re-iterable ``(logits (1, C, *S), target (1, *S) or (1, C, *S))`` volumes read lazily from disk."""

    def __init__(self, cases: list[CaseFiles], fmt: FolderFormat) -> None:
        self.cases, self.fmt = cases, fmt

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self[i] for i in range(len(self.cases)))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        z, y = read_validation_case(self.cases[i], self.fmt)
        return torch.from_numpy(z)[None], torch.from_numpy(y)[None]


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


@app.command()
def calibrate(
    method: Method = typer.Option(
        Method.ts,
        "--method",
        help="ts (temperature), vector (per-class / Platt) or aux (k×k(×k) conv on the logits).",
    ),
    val_pred: Path = typer.Option(
        ..., "--val-pred", help="Folder of validation predictions (npy logits, NIfTI or nnU-Net probabilities)."
    ),
    val_labels: Path = typer.Option(..., "--val-labels", help="Folder of validation label maps (*spatial)."),
    apply_to: Path = typer.Option(..., "--apply-to", help="Folder of predictions to calibrate."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder for calibrated probabilities."),
    fmt: InputFormat = typer.Option(
        InputFormat.auto, "--format", help="auto (detected per folder), nifti, npy (logits) or nnunet."
    ),
    mode: str = typer.Option("exclusive", help="exclusive (softmax) or multilabel (sigmoid)."),
    max_voxels: int = typer.Option(200_000, help="Random voxels per validation volume for ts/vector (0 = all)."),
    kernel_size: int = typer.Option(5, help="Kernel size of the aux conv."),
    epochs: int = typer.Option(20, help="Epochs for the aux conv."),
    seed: int = typer.Option(0, help="Seed of voxel subsampling / training."),
    save_calibrator: Path | None = typer.Option(None, help="Also save the fitted calibrator to this file."),
) -> None:
    """Fit a calibrator on validation predictions + labels, then write calibrated probability maps for
    --apply-to in the same format as its input."""
    console = Console()
    val_fmt = resolve_format(val_pred, fmt)
    apply_fmt = resolve_format(apply_to, fmt)
    if val_fmt != "npy" and mode != "exclusive":
        raise typer.BadParameter(f"--mode {mode} needs npy logits; {val_fmt} folders hold softmax probabilities")
    cases = match_validation(val_pred, val_labels, val_fmt)
    targets = list_apply_cases(apply_to, apply_fmt)
    volumes = _FolderVolumes(cases, val_fmt)
    if method == Method.ts:
        cal = TemperatureScaling(mode=mode, max_voxels_per_volume=max_voxels or None, seed=seed)
    elif method == Method.vector:
        cal = VectorScaling(mode=mode, max_voxels_per_volume=max_voxels or None, seed=seed)
    else:
        cal = AuxiliaryConvCalibrator(mode=mode, kernel_size=kernel_size, epochs=epochs, seed=seed)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"fitting {method.value} on {len(cases)} {val_fmt} cases", total=None)
        try:
            cal.fit(volumes)
        except (ValueError, TypeError) as exc:
            progress.stop()
            console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
            raise typer.Exit(1) from None
        progress.update(task, total=1, completed=1)
        output.mkdir(parents=True, exist_ok=True)
        task = progress.add_task(f"calibrating ({apply_fmt})", total=len(targets))
        for path in targets.values():
            try:
                z, meta = read_apply_case(path, apply_fmt)
                probs = cal.transform(torch.from_numpy(z)[None])[0].numpy()
            except (ValueError, TypeError) as exc:
                progress.stop()
                msg = str(exc) if isinstance(exc, CaseError) else f"{path}: {exc}"
                console.print(f"[red]error:[/red] {msg}", soft_wrap=True)
                raise typer.Exit(1) from None
            write_case(path, output, probs, apply_fmt, meta)
            progress.advance(task)
        if apply_fmt == "nnunet":
            copy_nnunet_side_files(apply_to, output)
    if save_calibrator is not None:
        cal.save(save_calibrator)

    table = Table(title="segcal calibrate")
    table.add_column("item")
    table.add_column("value")
    table.add_row("method", type(cal).__name__)
    table.add_row("formats", f"validation {val_fmt}, apply-to {apply_fmt}")
    table.add_row("validation cases", str(len(cases)))
    if hasattr(cal, "temperature_"):
        table.add_row("temperature", f"{cal.temperature_:.4f}")
    if hasattr(cal, "scale_"):
        table.add_row("scale", ", ".join(f"{v:.3f}" for v in cal.scale_.tolist()))
        table.add_row("bias", ", ".join(f"{v:.3f}" for v in cal.bias_.tolist()))
    table.add_row("calibrated cases", str(len(targets)))
    table.add_row("output", str(output))
    console.print(table)
