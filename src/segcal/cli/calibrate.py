"""``segcal calibrate``: fit a post-hoc calibrator on validation logits and write calibrated probabilities.

Folders hold one file per case, matched by file stem: logits ``(C, *spatial)`` as ``.npy`` or ``.npz`` (key
``"logits"`` or a single array), labels ``(*spatial)`` integer arrays. Output files keep the input format
(``.npz`` outputs store the key ``"probabilities"``). All file access goes through :func:`read_case` and
:func:`write_case` so another reader (NIfTI, nnU-Net) can be swapped in.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from segcal.cli import app
from segcal.posthoc import AuxiliaryConvCalibrator, TemperatureScaling, VectorScaling

SUFFIXES = (".npy", ".npz")


class Method(str, Enum):
    ts = "ts"
    vector = "vector"
    aux = "aux"


def list_cases(folder: Path) -> dict[str, Path]:
    """Case id (file stem) → file, for the supported array files in ``folder``."""
    if not folder.is_dir():
        raise typer.BadParameter(f"folder not found: {folder}")
    cases = {p.name.split(".")[0]: p for p in sorted(folder.iterdir()) if p.suffix in SUFFIXES}
    if not cases:
        raise typer.BadParameter(f"{folder}: no .npy/.npz files found")
    return cases


def read_case(path: Path, key: str) -> np.ndarray:
    """Read one array (never unpickles). ``.npz`` files use ``key`` or their single array."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    with np.load(path, allow_pickle=False) as z:
        if key in z.files:
            return z[key]
        if len(z.files) == 1:
            return z[z.files[0]]
        raise ValueError(f"{path}: expected key {key!r} or a single array, found {z.files}")


def write_case(src: Path, out_dir: Path, probs: np.ndarray) -> Path:
    """Write ``probs`` next to the case name of ``src`` in ``out_dir``, in the same format as ``src``."""
    out = out_dir / src.name
    if src.suffix == ".npy":
        np.save(out, probs)
    else:
        np.savez_compressed(out, probabilities=probs)
    return out


class _FolderVolumes:
    """Re-iterable ``(logits (1, C, *S), labels (1, *S))`` volumes read lazily from two folders."""

    def __init__(self, pred: dict[str, Path], labels: dict[str, Path], cases: list[str]) -> None:
        self.pred, self.labels, self.cases = pred, labels, cases

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self[i] for i in range(len(self.cases)))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[i]
        z = read_case(self.pred[case], "logits").astype(np.float32)
        y = read_case(self.labels[case], "labels")
        if not np.issubdtype(y.dtype, np.integer):
            if not np.all(y == np.round(y)):
                raise ValueError(f"{self.labels[case]}: labels must be integers")
            y = y.astype(np.int64)
        if y.shape == z.shape:  # multi-hot (multilabel) labels (C, *spatial)
            return torch.from_numpy(z)[None], torch.from_numpy(y.astype(np.float32))[None]
        if z.shape[1:] != y.shape:
            raise ValueError(
                f"case {case}: logits {self.pred[case].name} have spatial shape {z.shape[1:]} but labels "
                f"{self.labels[case].name} have {y.shape}"
            )
        return torch.from_numpy(z)[None], torch.from_numpy(y.astype(np.int64))[None]


@app.command()
def calibrate(
    method: Method = typer.Option(
        Method.ts,
        "--method",
        help="ts (temperature), vector (per-class / Platt) or aux (k×k(×k) conv on the logits).",
    ),
    val_pred: Path = typer.Option(..., "--val-pred", help="Folder of validation logits (C, *spatial)."),
    val_labels: Path = typer.Option(..., "--val-labels", help="Folder of validation label maps (*spatial)."),
    apply_to: Path = typer.Option(..., "--apply-to", help="Folder of logits to calibrate."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder for calibrated probabilities."),
    mode: str = typer.Option("exclusive", help="exclusive (softmax) or multilabel (sigmoid)."),
    max_voxels: int = typer.Option(
        200_000, help="Random voxels per validation volume for ts/vector (0 = all)."
    ),
    kernel_size: int = typer.Option(5, help="Kernel size of the aux conv."),
    epochs: int = typer.Option(20, help="Epochs for the aux conv."),
    seed: int = typer.Option(0, help="Seed of voxel subsampling / training."),
    save_calibrator: Path | None = typer.Option(None, help="Also save the fitted calibrator to this file."),
) -> None:
    """Fit a calibrator on validation logits + labels, then write calibrated probability maps for
    --apply-to."""
    console = Console()
    pred = list_cases(val_pred)
    labels = list_cases(val_labels)
    missing = sorted(set(pred) - set(labels))
    if missing:
        raise typer.BadParameter(f"labels missing in {val_labels} for cases {missing[:5]}")
    cases = sorted(pred)
    volumes = _FolderVolumes(pred, labels, cases)
    if method == Method.ts:
        cal = TemperatureScaling(mode=mode, max_voxels_per_volume=max_voxels or None, seed=seed)
    elif method == Method.vector:
        cal = VectorScaling(mode=mode, max_voxels_per_volume=max_voxels or None, seed=seed)
    else:
        cal = AuxiliaryConvCalibrator(mode=mode, kernel_size=kernel_size, epochs=epochs, seed=seed)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"fitting {method.value} on {len(cases)} cases", total=None)
        try:
            cal.fit(volumes)
        except (ValueError, TypeError) as exc:
            progress.stop()
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        progress.update(task, total=1, completed=1)
        targets = list_cases(apply_to)
        output.mkdir(parents=True, exist_ok=True)
        task = progress.add_task("calibrating", total=len(targets))
        for _case, path in targets.items():
            z = torch.from_numpy(read_case(path, "logits").astype(np.float32))[None]
            try:
                probs = cal.transform(z)[0].numpy()
            except ValueError as exc:
                progress.stop()
                console.print(f"[red]error:[/red] {path}: {exc}")
                raise typer.Exit(1) from None
            write_case(path, output, probs)
            progress.advance(task)
    if save_calibrator is not None:
        cal.save(save_calibrator)

    table = Table(title="segcal calibrate")
    table.add_column("item")
    table.add_column("value")
    table.add_row("method", type(cal).__name__)
    table.add_row("validation cases", str(len(cases)))
    if hasattr(cal, "temperature_"):
        table.add_row("temperature", f"{cal.temperature_:.4f}")
    if hasattr(cal, "scale_"):
        table.add_row("scale", ", ".join(f"{v:.3f}" for v in cal.scale_.tolist()))
        table.add_row("bias", ", ".join(f"{v:.3f}" for v in cal.bias_.tolist()))
    table.add_row("calibrated cases", str(len(targets)))
    table.add_row("output", str(output))
    console.print(table)
