"""Lightning integration: a :class:`lightning.pytorch.Callback` that measures calibration every validation epoch.

:class:`CalibrationCallback` takes the prediction and the target of each validation batch from what
``validation_step`` returns (a dict, keys ``pred_key`` / ``target_key``, or any ``output_transform``),
accumulates their per-image bin sums (:func:`segcal.functional.binning.bin_statistics`), and at the end of the
epoch logs the dataset-level marginal ECE / ACE / MCE (averaged over classes, from the pooled sums, by
:func:`segcal.functional.calibration.calibration_errors`) with ``pl_module.log``, and writes a reliability
diagram (:func:`segcal.plots.reliability_diagrams`) and a dataset reliability histogram
(:func:`segcal.plots.dataset_reliability_histogram`) into the trainer's log dir. Guide:
docs/integrations/lightning.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from segcal.functional.binning import BinStats, Closed, bin_statistics, check_num_bins
from segcal.functional.calibration import calibration_errors
from segcal.functional.inputs import Activation, Mode, check_mode
from segcal.plots import dataset_reliability_histogram, reliability_diagrams, save_figure

__all__ = ["CalibrationCallback"]

OutputTransform = Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor]]


class CalibrationCallback(Callback):
    """Logs calibration errors and writes reliability figures at the end of every validation epoch.

    Args:
        num_bins: ``M`` equal-width bins, bin ``k`` = ``(k/M, (k+1)/M]`` (``closed="right"``).
        pred_key / target_key: where the prediction ``(B, C, *spatial)`` and the target (label map or one-hot)
            are found in the dict returned by ``validation_step``.
        output_transform: ``f(outputs, batch) -> (pred, target)``, used instead of the keys when given (e.g.
            ``lambda out, batch: (out["logits"], batch["label"])``).
        activation: ``"softmax"`` / ``"sigmoid"`` when the prediction holds logits; ``None`` (default) for
            probabilities (a logits tensor then fails the probability check loudly).
        mode, include_background, closed: as in :func:`~segcal.functional.binning.bin_statistics` (background
            excluded by default).
        prefix: logged names are ``{prefix}ece``, ``{prefix}ace``, ``{prefix}mce``.
        log_per_class: also log ``{prefix}ece/{class}`` etc. for each kept class.
        class_names: names of the kept classes (figures, per-class names); default ``class_<index>``.
        figures: write the two figures each epoch (global rank 0 only).
        figure_dir: where; default ``<trainer.log_dir>/calibration``. Files:
            ``reliability_epoch{NNN}.png`` and ``reliability_histogram_epoch{NNN}.png``.
        formats: figure formats (``"png"``, ``"svg"``).

    The errors are dataset-level (micro): every voxel of every validation image enters the same bin sums, as
    ``calibration_errors(bin_statistics(all_images).pooled())``. Under DDP the per-image sums of every rank are
    gathered before the errors are computed, so every rank logs the same values. Batches of the sanity check
    are ignored. ``latest`` holds the last epoch's values, ``written`` the figure files written so far.
    """

    def __init__(
        self,
        num_bins: int = 20,
        *,
        pred_key: str = "pred",
        target_key: str = "target",
        output_transform: OutputTransform | None = None,
        activation: Activation = None,
        mode: Mode = "exclusive",
        include_background: bool = False,
        closed: Closed = "right",
        prefix: str = "val_",
        log_per_class: bool = False,
        class_names: Sequence[str] | None = None,
        figures: bool = True,
        figure_dir: str | Path | None = None,
        formats: Sequence[str] = ("png",),
    ) -> None:
        check_num_bins(num_bins)
        self.num_bins = int(num_bins)
        self.pred_key, self.target_key = pred_key, target_key
        self.output_transform = output_transform
        self.activation = activation
        self.mode = check_mode(mode)
        self.include_background = include_background
        self.closed = closed
        self.prefix = prefix
        self.log_per_class = log_per_class
        self.class_names = list(class_names) if class_names is not None else None
        self.figures = figures
        self.figure_dir = Path(figure_dir) if figure_dir is not None else None
        self.formats = tuple(formats)
        self.latest: dict[str, float] = {}
        self.written: list[Path] = []
        self._parts: list[BinStats] = []

    # ------------------------------------------------------------------ accumulation
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._parts = []

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        pred, target = self._extract(outputs, batch)
        stats = bin_statistics(
            pred.detach(),
            target.detach(),
            self.num_bins,
            activation=self.activation,
            mode=self.mode,
            include_background=self.include_background,
            closed=self.closed,
        )
        self._parts.append(stats.to("cpu"))

    def _extract(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.output_transform is not None:
            return self.output_transform(outputs, batch)
        if not isinstance(outputs, Mapping) or self.pred_key not in outputs or self.target_key not in outputs:
            got = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise ValueError(
                f"CalibrationCallback: validation_step must return a dict with keys {self.pred_key!r} and "
                f"{self.target_key!r} (or pass output_transform=), got {got}"
            )
        return outputs[self.pred_key], outputs[self.target_key]

    # ------------------------------------------------------------------ epoch end
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        stats = _gathered(self._parts)
        self._parts = []
        if stats is None:
            return
        names = self._names(stats.num_channels)
        errs = calibration_errors(stats.pooled())
        self.latest = {}
        for key in ("ece", "ace", "mce"):
            per_class = errs[key][0]
            self.latest[f"{self.prefix}{key}"] = float(torch.nanmean(per_class))
            if self.log_per_class:
                for name, v in zip(names, per_class.tolist(), strict=True):
                    self.latest[f"{self.prefix}{key}/{name}"] = v
        for name, value in self.latest.items():
            pl_module.log(name, torch.tensor(value, dtype=torch.float64), on_step=False, on_epoch=True)
        if self.figures and trainer.is_global_zero:
            self._write_figures(trainer, stats, names)

    def _names(self, c: int) -> list[str]:
        if self.class_names is not None:
            if len(self.class_names) != c:
                raise ValueError(f"class_names has {len(self.class_names)} names for {c} scored classes")
            return self.class_names
        first = 0 if (self.include_background or self.mode != "exclusive") else 1
        return [f"class_{first + i}" for i in range(c)]

    def _write_figures(self, trainer: Trainer, stats: BinStats, names: list[str]) -> None:
        folder = self.figure_dir or Path(trainer.log_dir or trainer.default_root_dir) / "calibration"
        epoch = trainer.current_epoch
        fig = reliability_diagrams(stats.pooled(), class_names=names, title=f"validation, epoch {epoch}")
        self.written += save_figure(fig, folder / f"reliability_epoch{epoch:03d}", self.formats)
        hist = dataset_reliability_histogram(stats, names, title=f"validation, epoch {epoch}")
        self.written += save_figure(hist, folder / f"reliability_histogram_epoch{epoch:03d}", self.formats)


def _gathered(parts: list[BinStats]) -> BinStats | None:
    """This rank's per-image sums, or every rank's (in rank order) under ``torch.distributed``."""
    import torch.distributed as dist

    local = BinStats.cat(parts).numpy() if parts else None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, local)
        arrays = [a for a in every if a is not None]
        return BinStats.from_numpy(np.concatenate(arrays)) if arrays else None
    return BinStats.from_numpy(local) if local is not None else None
