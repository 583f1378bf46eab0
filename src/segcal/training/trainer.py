"""MONAI UNet training: Adam, validation Dice each epoch, best checkpoint, deterministic seeds, resume, DDP.

Checkpoints (``torch.save`` of plain dicts of tensors/numbers; ``torch.load(weights_only=True)`` reads them):

* ``last.pt``: ``model``, ``optimizer``, ``epoch`` (number of finished epochs), ``best_dice``, ``best_epoch``,
  ``rng`` (torch / numpy / python states stored as tensors) and ``config``; rewritten atomically each epoch.
* ``best.pt``: ``model``, ``epoch``, ``val_dice``, ``config`` of the best validation mean Dice (foreground).

``metrics.csv`` gets one row per epoch (epoch, train_loss, val_dice, best_dice, lr, seconds). When launched
with ``torchrun`` (``WORLD_SIZE > 1``), the model is wrapped in ``DistributedDataParallel`` (gloo on CPU, nccl
on CUDA), each rank sees a :class:`~torch.utils.data.DistributedSampler` shard, validation Dice sums are
all-reduced, and only rank 0 writes files.

:func:`train` runs named stages, each with a typed result: :func:`setup_distributed` (:class:`DistContext`),
:func:`prepare_data` (:class:`TrainData`), :func:`build_parts` (:class:`TrainParts`), :func:`restore_checkpoint`
(:class:`RunState`), :func:`open_run_folder`, :func:`make_loop` (:class:`EpochLoop`), then per epoch
:func:`run_epoch` (:func:`train_epoch` and :func:`validate`, giving an :class:`EpochResult`) and, on rank 0,
:func:`save_epoch`.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from segcal.io import CaseError
from segcal.io.runs import read_csv, write_csv
from segcal.io.torchfile import read_torch_file, write_torch_file
from segcal.training.config import ModelConfig, TrainConfig, config_from_dict
from segcal.training.data import SegmentationDataset, read_folder

if TYPE_CHECKING:
    from rich.progress import Progress
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
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

#: ``(images, labels)``: arrays ``(N, C_in, *S)`` / ``(N, *S)`` or sequences of per-case arrays
ArrayPair = tuple[Any, Any]
#: a loss called as ``loss_fn(logits (B, C, *S), labels (B, 1, *S))``
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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

    The loss receives logits ``(B, C, *S)`` and integer labels ``(B, 1, *S)`` (MONAI convention); pass
    ``loss_fn=`` to :func:`train` for another loss. ``segcal.losses`` is imported here, not at module level, so
    that importing :mod:`segcal.training` does not compile the numba kernels the losses depend on.
    """
    from segcal.losses import loss_from_string

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, unreadable, without a model config, or a config its weights
    contradict); the message names the file and the problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path that is not a file (also a ``FileNotFoundError``)."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a segcal checkpoint safely (``weights_only=True``); errors (:class:`CheckpointError`) name the
    file."""
    try:
        return read_torch_file(path, "checkpoint", map_location)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(str(exc)) from None
    except CaseError as exc:
        raise CheckpointError(str(exc)) from None


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


# ------------------------------------------------------------------------------------------------------------
# The stages of train(): each does one thing and hands a typed result to the next.
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: world size and rank (``torchrun`` environment) and its device."""

    world: int
    rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the only process that writes files."""
        return self.rank == 0


@dataclass
class TrainData:
    """The training dataset (random patches) and the optional validation dataset (whole images)."""

    train: SegmentationDataset
    val: SegmentationDataset | None


@dataclass
class TrainParts:
    """The model (unwrapped), its optimizer and the loss."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module | LossFn


@dataclass(frozen=True)
class RunPaths:
    """The files of a run folder."""

    out: Path
    last: Path
    best: Path
    csv: Path

    @classmethod
    def of(cls, output_dir: str | Path) -> RunPaths:
        out = Path(output_dir)
        return cls(out=out, last=out / "last.pt", best=out / "best.pt", csv=out / "metrics.csv")


@dataclass(frozen=True)
class EpochResult:
    """One finished epoch: ``epoch`` counts finished epochs (1-based), ``score`` picks the best checkpoint."""

    epoch: int
    train_loss: float
    val_dice: float  # NaN without validation data
    score: float  # val_dice, or -train_loss without validation data
    seconds: float


@dataclass
class RunState:
    """Progress of a run: finished epochs and the best score so far (restored by a resume)."""

    start_epoch: int = 0
    best_dice: float = -math.inf
    best_epoch: int = -1

    def update(self, result: EpochResult) -> bool:
        """Record ``result``; True when it is a new best."""
        improved = result.score > self.best_dice
        if improved:
            self.best_dice, self.best_epoch = result.score, result.epoch
        return improved

    def row(self, result: EpochResult, lr: float) -> dict[str, float]:
        """The ``metrics.csv`` / :attr:`TrainResult.history` row of ``result``."""
        return {
            "epoch": result.epoch,
            "train_loss": result.train_loss,
            "val_dice": result.val_dice,
            "best_dice": self.best_dice,
            "lr": lr,
            "seconds": result.seconds,
        }


@dataclass
class EpochLoop:
    """What every epoch iterates: the model as trained (DDP-wrapped when distributed), sampler and loader."""

    net: nn.Module
    sampler: DistributedSampler
    loader: DataLoader


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


def setup_distributed(cfg: TrainConfig) -> DistContext:
    """Read the ``torchrun`` environment, pick the device and join the process group when ``WORLD_SIZE > 1``."""
    world, rank, local_rank = _dist_env()
    ctx = DistContext(world=world, rank=rank, device=_device(cfg, local_rank))
    if ctx.distributed and not dist.is_initialized():
        if ctx.device.type == "cuda":
            torch.cuda.set_device(ctx.device)
        dist.init_process_group(backend="nccl" if ctx.device.type == "cuda" else "gloo")
    return ctx


def _load_data(cfg: TrainConfig, data: ArrayPair | None, folder: str | None) -> ArrayPair | None:
    if data is not None:
        return data
    if folder:
        _, images, labels = read_folder(folder, cfg.model.spatial_dims)
        return images, labels
    return None


def prepare_data(cfg: TrainConfig, train_data: ArrayPair | None, val_data: ArrayPair | None) -> TrainData:
    """The datasets from the given arrays or the config's folders, checked against the model's channels."""
    tr = _load_data(cfg, train_data, cfg.data.train_dir)
    if tr is None:
        raise ValueError("no training data: pass train_data=(images, labels) or set data.train_dir")
    va = _load_data(cfg, val_data, cfg.data.val_dir)
    factor = cfg.model.size_factor
    train_ds = SegmentationDataset(tr[0], tr[1], cfg.data.patch_size, factor, cfg.seed)
    # validation takes whole, unpadded images of any shape (sliding window)
    val_ds = SegmentationDataset(va[0], va[1], None, factor, cfg.seed, same_shape=False) if va is not None else None
    data = TrainData(train=train_ds, val=val_ds)
    _check_data(cfg, data)
    return data


def _check_data(cfg: TrainConfig, data: TrainData) -> None:
    """Images must have ``model.in_channels`` channels and labels lie in ``[0, model.out_channels)``."""
    c_in = data.train.images[0].shape[0]
    if c_in != cfg.model.in_channels:
        raise ValueError(f"images have {c_in} channel(s) but model.in_channels is {cfg.model.in_channels}")
    for what, ds in (("training", data.train), ("validation", data.val)):
        if ds is None:
            continue
        lo, hi = min(int(lb.min()) for lb in ds.labels), max(int(lb.max()) for lb in ds.labels)
        if hi >= cfg.model.out_channels or lo < 0:
            raise ValueError(
                f"{what} labels must be in [0, {cfg.model.out_channels - 1}] "
                f"(model.out_channels={cfg.model.out_channels}), found [{lo}, {hi}]"
            )


def build_parts(cfg: TrainConfig, device: torch.device, loss_fn: nn.Module | LossFn | None) -> TrainParts:
    """The model on ``device``, its Adam optimizer and the loss (``loss_fn`` or the one of ``cfg.loss``)."""
    model = build_model(cfg.model).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas)
    )
    criterion = loss_fn if loss_fn is not None else build_loss(cfg.loss)
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(device)  # class weights and other buffers
    return TrainParts(model=model, optimizer=optimizer, criterion=criterion)


def restore_checkpoint(paths: RunPaths, parts: TrainParts, resume: bool) -> RunState:
    """Load ``last.pt`` into the model and optimizer and restore the RNG states (when resuming and it exists)."""
    if not (resume and paths.last.is_file()):
        return RunState()
    ckpt = load_checkpoint(paths.last, map_location="cpu")
    try:
        parts.model.load_state_dict(ckpt["model"])
        parts.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(
            f"{paths.last}: cannot resume, the checkpoint does not match this config "
            f"(use another output_dir or resume=False / --no-resume): {exc}"
        ) from exc
    set_rng_state(ckpt["rng"])
    return RunState(
        start_epoch=int(ckpt["epoch"]), best_dice=float(ckpt["best_dice"]), best_epoch=int(ckpt["best_epoch"])
    )


def open_run_folder(paths: RunPaths, finished_epochs: int) -> None:
    """Create the run folder and drop ``metrics.csv`` rows after ``finished_epochs`` (a resume rewrites them)."""
    paths.out.mkdir(parents=True, exist_ok=True)
    _trim_csv(paths.csv, finished_epochs)


def make_loop(cfg: TrainConfig, train_ds: SegmentationDataset, model: nn.Module, ctx: DistContext) -> EpochLoop:
    """Wrap ``model`` in DDP when distributed; the shuffling sampler (one shard per rank) and the loader."""
    net = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    sampler = DistributedSampler(train_ds, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(
        train_ds,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=ctx.device.type == "cuda",
    )
    return EpochLoop(net=net, sampler=sampler, loader=loader)


def train_epoch(
    loop: EpochLoop, parts: TrainParts, ctx: DistContext, epoch: int, on_step: Callable[[float], None]
) -> float:
    """One optimisation pass over the loader; returns the sample-weighted mean loss over all ranks.

    ``on_step(loss)`` is called after each optimizer step. A non-finite loss raises ``FloatingPointError``
    naming the (1-based) epoch.
    """
    net = loop.net
    net.train()
    total, count = 0.0, 0
    for img, lab in loop.loader:
        img, lab = img.to(ctx.device, non_blocking=True), lab.to(ctx.device, non_blocking=True)
        parts.optimizer.zero_grad(set_to_none=True)
        loss = parts.criterion(net(img), lab[:, None])
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"epoch {epoch + 1}: loss is {float(loss.detach())} (not finite)")
        loss.backward()
        parts.optimizer.step()
        lv = float(loss.detach())
        total, count = total + lv * img.shape[0], count + img.shape[0]
        on_step(lv)
    # on the training device: NCCL (the backend on GPUs) reduces CUDA tensors only
    loss_sum = torch.tensor([total, count], dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(loss_sum)
    return float(loss_sum[0] / loss_sum[1])


def validate(cfg: TrainConfig, model: nn.Module, val_ds: SegmentationDataset, ctx: DistContext) -> float:
    """Mean foreground Dice over the validation images; each rank scores every ``world``-th image."""
    s, n = validation_dice(
        model,
        val_ds,
        list(range(ctx.rank, len(val_ds), ctx.world)),
        device=ctx.device,
        roi_size=_roi(cfg),
        size_factor=cfg.model.size_factor,
        overlap=cfg.data.sw_overlap,
        include_background=cfg.include_background_in_val,
    )
    vals = torch.tensor([s, n], dtype=torch.float64, device=ctx.device)  # NCCL reduces CUDA tensors only
    if ctx.distributed:
        dist.all_reduce(vals)
    return float(vals[0] / vals[1])


def run_epoch(
    cfg: TrainConfig,
    epoch: int,
    loop: EpochLoop,
    data: TrainData,
    parts: TrainParts,
    ctx: DistContext,
    on_step: Callable[[float], None],
) -> EpochResult:
    """Epoch ``epoch`` (0-based): reshuffle and redraw patches, train, validate."""
    t0 = time.perf_counter()
    loop.sampler.set_epoch(epoch)
    data.train.set_epoch(epoch)
    train_loss = train_epoch(loop, parts, ctx, epoch, on_step)
    if data.val is not None:
        val_dice = validate(cfg, parts.model, data.val, ctx)
        score = val_dice
    else:
        val_dice, score = math.nan, -train_loss
    return EpochResult(
        epoch=epoch + 1, train_loss=train_loss, val_dice=val_dice, score=score, seconds=time.perf_counter() - t0
    )


def save_epoch(
    cfg: TrainConfig, paths: RunPaths, parts: TrainParts, state: RunState, row: dict[str, float], improved: bool
) -> None:
    """Rank 0's files after an epoch: ``best.pt`` (when ``improved``), ``last.pt`` and a ``metrics.csv`` row."""
    epoch = int(row["epoch"])
    weights = {k: v.detach().cpu() for k, v in parts.model.state_dict().items()}
    if improved:
        write_torch_file(
            paths.best, {"model": weights, "epoch": epoch, "val_dice": state.best_dice, "config": cfg.to_dict()}
        )
    write_torch_file(
        paths.last,
        {
            "model": weights,
            "optimizer": parts.optimizer.state_dict(),
            "epoch": epoch,
            "best_dice": state.best_dice,
            "best_epoch": state.best_epoch,
            "rng": get_rng_state(),
            "config": cfg.to_dict(),
        },
    )
    _append_csv(paths.csv, row)


def train(
    config: TrainConfig | dict[str, Any],
    train_data: ArrayPair | None = None,
    val_data: ArrayPair | None = None,
    *,
    resume: bool = True,
    stop_after_epoch: int | None = None,
    loss_fn: nn.Module | LossFn | None = None,
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
            config's ``epochs`` stays the schedule, so a later ``resume`` finishes the run.
        loss_fn: override the loss built from ``config.loss`` (called ``loss_fn(logits, labels[:, None])``).
        on_epoch_end: called as ``on_epoch_end(finished_epochs, model, optimizer)`` after each checkpoint.
    """
    cfg = config if isinstance(config, TrainConfig) else config_from_dict(config)
    cfg.validate()
    ctx = setup_distributed(cfg)
    seed_everything(cfg.seed, cfg.deterministic)
    data = prepare_data(cfg, train_data, val_data)
    parts = build_parts(cfg, ctx.device, loss_fn)
    paths = RunPaths.of(cfg.output_dir)
    state = restore_checkpoint(paths, parts, resume)
    if ctx.is_main:
        open_run_folder(paths, state.start_epoch)
    loop = make_loop(cfg, data.train, parts.model, ctx)
    writer = _tensorboard(paths.out) if (cfg.tensorboard and ctx.is_main) else None
    history: list[dict[str, float]] = []
    last_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    progress = _progress(cfg.progress and ctx.is_main)
    with progress:
        task = progress.add_task("training", total=max(0, last_epoch - state.start_epoch) * len(loop.loader))
        for epoch in range(state.start_epoch, last_epoch):

            def on_step(loss: float, epoch: int = epoch) -> None:
                progress.update(task, advance=1, description=f"epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f}")

            for group in parts.optimizer.param_groups:
                group["lr"] = cfg.optim.lr_at(epoch, cfg.epochs)
            result = run_epoch(cfg, epoch, loop, data, parts, ctx, on_step)
            improved = state.update(result)
            row = state.row(result, parts.optimizer.param_groups[0]["lr"])
            history.append(row)
            if ctx.is_main:
                save_epoch(cfg, paths, parts, state, row, improved)
                _log_tensorboard(writer, row)
            if on_epoch_end is not None:
                on_epoch_end(result.epoch, parts.model, parts.optimizer)
            if ctx.distributed:
                dist.barrier()
    if writer is not None:
        writer.close()
    return TrainResult(
        model=parts.model,
        output_dir=paths.out,
        best_dice=state.best_dice,
        best_epoch=state.best_epoch,
        epochs_run=last_epoch - state.start_epoch,
        history=history,
    )


def _roi(cfg: TrainConfig) -> tuple[int, ...] | None:
    return tuple(cfg.data.patch_size) if cfg.data.patch_size is not None else None


_FIELDS = ["epoch", "train_loss", "val_dice", "best_dice", "lr", "seconds"]


def _trim_csv(path: Path, keep_epochs: int) -> None:
    """Drop rows after ``keep_epochs`` (a resumed run rewrites them) so the log has one row per epoch."""
    if path.is_file():
        rows = [r for r in read_csv(path) if int(r["epoch"]) <= keep_epochs]
        write_csv(path, rows, _FIELDS)


def _append_csv(path: Path, row: dict[str, float]) -> None:
    """Add one epoch's row; the file is rewritten atomically, so a crash never leaves half a row."""
    rows = read_csv(path) if path.is_file() else []
    write_csv(path, [*rows, row], _FIELDS)


def _tensorboard(out: Path) -> SummaryWriter | None:
    """A TensorBoard writer under ``out/tensorboard``, or None when the optional ``tensorboard`` is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ModuleNotFoundError as exc:  # the optional tensorboard package is not installed: CSV only
        if exc.name != "tensorboard":
            raise
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _log_tensorboard(writer: SummaryWriter | None, row: dict[str, float]) -> None:
    if writer is not None:
        for k in ("train_loss", "val_dice"):
            writer.add_scalar(k, row[k], row["epoch"])


def _progress(enabled: bool) -> Progress | _NullProgress:
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
