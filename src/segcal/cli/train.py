"""``segcal train CONFIG.yaml`` and ``segcal predict``: thin wrappers over :mod:`segcal.training`."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from segcal.cli import app

console = Console()


@app.command("train")
def train_command(
    config: Path = typer.Argument(..., help="YAML training config (see docs/training.md)."),
    output_dir: str | None = typer.Option(
        None, "--output-dir", "-o", help="Override output_dir of the config."
    ),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Continue from OUTPUT_DIR/last.pt if present."
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Override the number of epochs."),
) -> None:
    """Train a MONAI UNet from a YAML config (works under torchrun for DDP)."""
    from segcal.training import load_config, train

    try:
        cfg = load_config(config)
        if output_dir is not None:
            cfg.output_dir = output_dir
        if epochs is not None:
            cfg.epochs = epochs
            cfg.validate()
        result = train(cfg, resume=resume)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    table = Table(title=f"training finished: {result.output_dir}")
    for col in ("epoch", "train_loss", "val_dice", "seconds"):
        table.add_column(col, justify="right")
    for row in result.history:
        table.add_row(
            str(row["epoch"]), f"{row['train_loss']:.4f}", f"{row['val_dice']:.4f}", f"{row['seconds']:.1f}"
        )
    console.print(table)
    console.print(f"best validation Dice {result.best_dice:.4f} at epoch {result.best_epoch}")


def _roi(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise typer.BadParameter(f"--roi-size must look like 96,96 or 64,64,64, got {text!r}") from exc


@app.command("predict")
def predict_command(
    inputs: list[Path] = typer.Argument(..., help="Image files or folders (.npz key 'image', .nii/.nii.gz)."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Folder for the probability maps."),
    checkpoint: list[Path] = typer.Option(
        ..., "--checkpoint", "-c", help="Checkpoint(s); several = ensemble."
    ),
    output_format: str = typer.Option("npz", "--format", help="npz (key 'probabilities', (C, *S)) or nifti."),
    roi_size: str | None = typer.Option(
        None, "--roi-size", help="Sliding window, e.g. 96,96 (default: image)."
    ),
    overlap: float = typer.Option(0.25, "--overlap", help="Sliding-window overlap in [0, 1)."),
    mc_samples: int = typer.Option(0, "--mc-samples", help="MC-dropout passes (0 = off)."),
    temperature: float = typer.Option(
        1.0, "--temperature", help="Post-hoc temperature T: softmax(logits / T)."
    ),
    save_logits: bool = typer.Option(False, "--save-logits", help="Also save logits."),
    float16: bool = typer.Option(False, "--float16", help="Store .npz probabilities as float16."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Sliding-window prediction of probability maps (optional MC dropout, ensemble, temperature).

    Exit codes: 1 when prediction cannot start or its output cannot be written (an unusable checkpoint, an
    output folder that cannot be written); 2 for other errors (inputs, options).
    """
    from rich.markup import escape

    from segcal.io import OutputError
    from segcal.training import predict_files
    from segcal.training.trainer import CheckpointError

    try:
        written = predict_files(
            [str(c) for c in checkpoint],
            [str(i) for i in inputs],
            output_dir,
            output_format=output_format,
            dtype="float16" if float16 else "float32",
            save_logits=save_logits,
            device=device,
            progress=True,
            roi_size=_roi(roi_size),
            overlap=overlap,
            mc_samples=mc_samples,
            temperature=temperature,
        )
    except (CheckpointError, OutputError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except (ValueError, FileNotFoundError, TypeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"wrote {len(written)} prediction(s) to {output_dir}")
