"""MONAI UNet training: Adam, validation Dice each epoch, best checkpoint, deterministic seeds, resume, DDP.

Checkpoints (``torch.save`` of plain dicts of tensors/numbers; ``torch.load(weights_only=True)`` reads them):

* ``last.pt``: ``model``, ``optimizer``, ``epoch`` (number of finished epochs), ``best_dice``, ``best_epoch``,
  ``rng`` (torch / numpy / python states stored as tensors) and ``config``; rewritten atomically each epoch.
* ``best.pt``: ``model``, ``epoch``, ``val_dice``, ``config`` of the best validation mean Dice (foreground).

``metrics.csv`` gets one row per epoch (epoch, train_loss, val_dice, best_dice, lr, seconds). When launched
with ``torchrun`` (``WORLD_SIZE > 1``), the model is wrapped in ``DistributedDataParallel`` (gloo on CPU, nccl
on CUDA), each rank sees a :class:`~torch.utils.data.DistributedSampler` shard, validation Dice sums are
all-reduced, and only rank 0 writes files.
"""

from __future__ import annotations

import csv
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from segcal.training.config import ModelConfig, TrainConfig, config_from_dict
from segcal.training.data import SegmentationDataset, read_folder

__all__ = [
    "TrainResult",
    "build_loss",
    "build_model",
    "get_rng_state",
    "load_checkpoint",
    "seed_everything",
    "set_rng_state",
    "train",
    "validation_dice",
]

ArrayPair = tuple[Any, Any]


def build_model(cfg: ModelConfig | dict[str, Any]) -> nn.Module:
    """MONAI ``UNet`` from a :class:`ModelConfig` (or the dict stored in a checkpoint)."""
    from monai.networks.nets import UNet

    if isinstance(cfg, dict):
        cfg = ModelConfig(**cfg)
    cfg.validate()
    return UNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=tuple(cfg.channels),
        strides=tuple(cfg.strides),
        num_res_units=cfg.num_res_units,
        dropout=cfg.dropout,
        norm=cfg.norm,
    )


def build_loss(spec: str) -> nn.Module:
    """Loss from a string via ``segcal.losses.loss_from_string(spec, softmax=True, to_onehot_y=True)``.

    The loss receives logits ``(B, C, *S)`` and integer labels ``(B, 1, *S)`` (MONAI convention). The import
    is lazy so this module works without ``segcal.losses``; pass ``loss_fn=`` for another loss.
    """
    try:
        from segcal.losses import loss_from_string
    except ImportError as exc:
        raise ImportError(
            f"loss {spec!r} needs segcal.losses.loss_from_string, which is not available ({exc}); "
            "pass loss_fn= to segcal.training.train instead"
        ) from exc
    return loss_from_string(spec, softmax=True, to_onehot_y=True)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed ``random``, ``numpy`` and ``torch``; ``deterministic`` asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (legacy global RNG, seeded for third-party code)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def get_rng_state() -> dict[str, torch.Tensor]:
    """torch / numpy / python RNG states as tensors (so ``torch.load(weights_only=True)`` can read them)."""
    np_state = np.random.get_state()  # noqa: NPY002
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_meta": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor(list(py_state[1]), dtype=torch.int64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    meta = state["numpy_meta"].tolist()
    np.random.set_state(  # noqa: NPY002
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            int(meta[0]),
            int(meta[1]),
            float(state["numpy_gauss"][0]),
        )
    )
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a segcal checkpoint safely (``weights_only=True``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path}: cannot load checkpoint (corrupt, truncated or not a segcal checkpoint): {exc}"
        ) from exc


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def validation_dice(
    model: nn.Module,
    dataset: SegmentationDataset,
    indices: list[int],
    *,
    device: torch.device,
    roi_size: tuple[int, ...] | None,
    size_factor: int,
    overlap: float = 0.25,
    include_background: bool = False,
) -> tuple[float, int]:
    """Sum over ``indices`` of per-image mean Dice (argmax, ``segcal.functional.overlap``), and the count.

    Whole images go through sliding-window inference with ``roi_size`` (default: the image size rounded up to
    a multiple of ``size_factor``; the window pads and crops back). Returns ``(sum, n)`` so ranks can merge.
    """
    from monai.inferers import sliding_window_inference

    from segcal.functional.overlap import confusion_counts, dice_from_counts

    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in indices:
        img = dataset.images[i][None].to(device)
        lab = dataset.labels[i][None].to(device)
        roi = roi_size or tuple(-(-s // size_factor) * size_factor for s in img.shape[2:])
        logits = sliding_window_inference(img, roi, 4, model, overlap=overlap)
        probs = torch.softmax(logits.float(), 1)
        counts = confusion_counts(probs, lab, include_background=include_background, check=False)
        total += float(dice_from_counts(counts).mean())
        n += 1
    model.train(was_training)
    return total, n


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model (unwrapped, last epoch) and the run's records."""

    model: nn.Module
    output_dir: Path
    best_dice: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if cfg.device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(cfg.device)


def _load_data(cfg: TrainConfig, data: ArrayPair | None, folder: str | None):
    if data is not None:
        return data
    if folder:
        _, images, labels = read_folder(folder, cfg.model.spatial_dims)
        return images, labels
    return None


def train(
    config: TrainConfig | dict[str, Any],
    train_data: ArrayPair | None = None,
    val_data: ArrayPair | None = None,
    *,
    resume: bool = True,
    stop_after_epoch: int | None = None,
    loss_fn: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_epoch_end: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
) -> TrainResult:
    """Train a MONAI UNet as described by ``config``.

    Args:
        config: a :class:`TrainConfig` or a dict with the same structure (validated, unknown keys rejected).
        train_data: ``(images (N, C_in, *S) float32, labels (N, *S) int64)`` arrays or sequences of per-case
            arrays; defaults to ``config.data.train_dir``.
        val_data: same for validation; defaults to ``config.data.val_dir``; without it the training loss picks
            the "best" checkpoint (lowest loss, reported as ``-loss``).
        resume: continue from ``output_dir/last.pt`` when it exists (model, optimizer, epoch, RNG states).
        stop_after_epoch: stop after this many finished epochs (as if killed after that checkpoint); the
            config's
            ``epochs`` stays the schedule, so a later ``resume`` finishes the run.
        loss_fn: override the loss built from ``config.loss`` (called ``loss_fn(logits, labels[:, None])``).
        on_epoch_end: called as ``on_epoch_end(finished_epochs, model, optimizer)`` after each checkpoint.
    """
    cfg = config if isinstance(config, TrainConfig) else config_from_dict(config)
    cfg.validate()
    world, rank, local_rank = _dist_env()
    distributed = world > 1
    device = _device(cfg, local_rank)
    if distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    is_main = rank == 0
    seed_everything(cfg.seed, cfg.deterministic)

    tr = _load_data(cfg, train_data, cfg.data.train_dir)
    if tr is None:
        raise ValueError("no training data: pass train_data=(images, labels) or set data.train_dir")
    va = _load_data(cfg, val_data, cfg.data.val_dir)
    factor = cfg.model.size_factor
    train_ds = SegmentationDataset(tr[0], tr[1], cfg.data.patch_size, factor, cfg.seed)
    # validation takes whole, unpadded images of any shape (sliding window)
    val_ds = (
        SegmentationDataset(va[0], va[1], None, factor, cfg.seed, same_shape=False)
        if va is not None
        else None
    )
    c_in = train_ds.images[0].shape[0]
    if c_in != cfg.model.in_channels:
        raise ValueError(f"images have {c_in} channel(s) but model.in_channels is {cfg.model.in_channels}")
    for what, ds in (("training", train_ds), ("validation", val_ds)):
        if ds is None:
            continue
        lo, hi = min(int(lb.min()) for lb in ds.labels), max(int(lb.max()) for lb in ds.labels)
        if hi >= cfg.model.out_channels or lo < 0:
            raise ValueError(
                f"{what} labels must be in [0, {cfg.model.out_channels - 1}] "
                f"(model.out_channels={cfg.model.out_channels}), found [{lo}, {hi}]"
            )

    model = build_model(cfg.model).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas)
    )
    criterion = loss_fn if loss_fn is not None else build_loss(cfg.loss)
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(device)  # class weights and other buffers

    out = Path(cfg.output_dir)
    last_path, best_path, csv_path = out / "last.pt", out / "best.pt", out / "metrics.csv"
    start_epoch, best_dice, best_epoch = 0, -math.inf, -1
    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path, map_location="cpu")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(
                f"{last_path}: cannot resume, the checkpoint does not match this config "
                f"(use another output_dir or resume=False / --no-resume): {exc}"
            ) from exc
        start_epoch = int(ckpt["epoch"])
        best_dice, best_epoch = float(ckpt["best_dice"]), int(ckpt["best_epoch"])
        set_rng_state(ckpt["rng"])
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        _trim_csv(csv_path, start_epoch)

    net: nn.Module = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(
        train_ds,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    writer = _tensorboard(out) if (cfg.tensorboard and is_main) else None
    history: list[dict[str, float]] = []
    last_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    progress = _progress(cfg.progress and is_main)
    with progress:
        task = progress.add_task("training", total=max(0, last_epoch - start_epoch) * len(loader))
        for epoch in range(start_epoch, last_epoch):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            net.train()
            loss_sum = torch.zeros(2, dtype=torch.float64)
            for img, lab in loader:
                img, lab = img.to(device, non_blocking=True), lab.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(net(img), lab[:, None])
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(
                        f"epoch {epoch + 1}: loss is {float(loss.detach())} (not finite)"
                    )
                loss.backward()
                optimizer.step()
                lv = float(loss.detach())
                loss_sum += torch.tensor([lv * img.shape[0], img.shape[0]], dtype=torch.float64)
                progress.update(task, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs} loss {lv:.4f}")
            if distributed:
                dist.all_reduce(loss_sum)
            train_loss = float(loss_sum[0] / loss_sum[1])
            if val_ds is not None:
                idx = list(range(rank, len(val_ds), world))
                s, n = validation_dice(
                    model,
                    val_ds,
                    idx,
                    device=device,
                    roi_size=_roi(cfg),
                    size_factor=factor,
                    overlap=cfg.data.sw_overlap,
                    include_background=cfg.include_background_in_val,
                )
                vals = torch.tensor([s, n], dtype=torch.float64)
                if distributed:
                    dist.all_reduce(vals)
                score = float(vals[0] / vals[1])
            else:
                score = -train_loss
            improved = score > best_dice
            if improved:
                best_dice, best_epoch = score, epoch + 1
            row = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_dice": score if val_ds is not None else math.nan,
                "best_dice": best_dice,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t0,
            }
            history.append(row)
            if is_main:
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                if improved:
                    _atomic_save(
                        {"model": state, "epoch": epoch + 1, "val_dice": score, "config": cfg.to_dict()},
                        best_path,
                    )
                _atomic_save(
                    {
                        "model": state,
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch + 1,
                        "best_dice": best_dice,
                        "best_epoch": best_epoch,
                        "rng": get_rng_state(),
                        "config": cfg.to_dict(),
                    },
                    last_path,
                )
                _append_csv(csv_path, row)
                if writer is not None:
                    for k in ("train_loss", "val_dice"):
                        writer.add_scalar(k, row[k], epoch + 1)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, model, optimizer)
            if distributed:
                dist.barrier()
    if writer is not None:
        writer.close()
    return TrainResult(
        model=model,
        output_dir=out,
        best_dice=best_dice,
        best_epoch=best_epoch,
        epochs_run=last_epoch - start_epoch,
        history=history,
    )


def _roi(cfg: TrainConfig) -> tuple[int, ...] | None:
    return tuple(cfg.data.patch_size) if cfg.data.patch_size is not None else None


_FIELDS = ["epoch", "train_loss", "val_dice", "best_dice", "lr", "seconds"]


def _trim_csv(path: Path, keep_epochs: int) -> None:
    """Drop rows after ``keep_epochs`` (a resumed run rewrites them) so the log has one row per epoch."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_epochs]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_FIELDS)
        w.writeheader()
        w.writerows(rows)


def _append_csv(path: Path, row: dict[str, float]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _progress(enabled: bool):
    if not enabled:
        return _NullProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    )


class _NullProgress:
    """Stand-in with the bits of ``rich.progress.Progress`` used above, doing nothing."""

    def __enter__(self) -> _NullProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *a: object, **k: object) -> int:
        return 0

    def update(self, *a: object, **k: object) -> None:
        return None
