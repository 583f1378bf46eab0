"""torchmetrics integration: segcal's calibration errors as a :class:`torchmetrics.Metric` of mergeable bin sums.

:class:`SegmentationCalibrationError` keeps, as its only state, the dataset-level bin sums of
:mod:`segcal.functional.binning` (count, Σp, Σy per class and bin, and the same for the top-label confidence):
fixed-size float64 tensors reduced with ``dist_reduce_fx="sum"``, so its memory does not grow with voxels or
images and DDP sync, ``forward`` and ``merge_state`` are additions. ``update()`` calls
:func:`~segcal.functional.binning.bin_statistics` (and
:func:`~segcal.functional.calibration.top_label_statistics`); ``compute()`` calls
:func:`~segcal.functional.calibration.calibration_errors`. Guide: docs/integrations/torchmetrics.md.

Relation to torchmetrics' ``MulticlassCalibrationError``: its value is segcal's top-label error with
``closed="left"`` (bins ``[k/M, (k+1)/M)``) and ``norm`` ``"l1"`` / ``"l2"`` / ``"max"`` =
``top_label_ece`` / ``top_label_ece_l2`` / ``top_label_mce``, except that torchmetrics puts a confidence of
exactly 1 into an extra bin of its own (segcal: the last bin). Its bin edges come from ``linspace`` in the
input dtype, which are the correctly rounded ``k/M`` for every ``M`` a power of two (segcal always uses the
correctly rounded edges).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torchmetrics import Metric

from segcal.functional.binning import BinStats, Closed, bin_statistics, check_num_bins
from segcal.functional.calibration import calibration_errors, top_label_statistics
from segcal.functional.inputs import Activation, Mode, check_mode, to_probabilities

__all__ = ["ERRORS", "SegmentationCalibrationError"]

#: the errors :func:`~segcal.functional.calibration.calibration_errors` gives, in its order
ERRORS: tuple[str, ...] = ("ece", "ace", "mce", "ece_l2", "ace_l2")


class SegmentationCalibrationError(Metric):
    """Dataset-level marginal (class-wise) and top-label calibration errors of a segmentation.

    Args:
        num_classes: channels ``C`` of the predictions (fixes the state's size).
        num_bins: ``M`` equal-width bins, bin ``k`` = ``(k/M, (k+1)/M]`` (``closed="right"``, MONAI's and the
            ACE papers' convention); ``closed="left"`` gives torchmetrics' ``[k/M, (k+1)/M)``.
        include_background: keep channel 0 in the marginal errors (exclusive mode; default False).
        activation: ``"softmax"`` / ``"sigmoid"`` when ``update`` receives logits, ``None`` for probabilities.
        mode: ``"exclusive"`` (softmax classes) or ``"multilabel"``.
        errors: which of ``ece``, ``ace``, ``mce``, ``ece_l2``, ``ace_l2`` ``compute()`` returns.
        top_label: also return ``top_label_<error>`` for each of ``errors`` (confidence ``max_c p_c`` against
            ``argmax == label``; multilabel: the per-channel binary curves summed).
        average: ``"macro"``: the marginal errors averaged over the kept classes (mL1-ECE, mL1-ACE, ...),
            NaN-ignoring; ``"none"``: one value per kept class ``(C',)``.
        kwargs: torchmetrics' ``Metric`` options (``sync_on_compute``, ``process_group``, ...).

    ``update(preds, target)``: ``preds`` ``(B, C, *spatial)``, ``target`` a label map ``(B, *spatial)`` /
    ``(B, 1, *spatial)`` or one-hot / soft ``(B, C, *spatial)``. ``compute()`` returns a dict of float64 tensors
    (a :class:`torchmetrics.MetricCollection` flattens it into its own keys). The errors are pooled over every
    voxel of every image seen (micro), exactly as
    ``calibration_errors(bin_statistics(all_images).pooled())``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        num_bins: int = 20,
        *,
        include_background: bool = False,
        activation: Activation = None,
        mode: Mode = "exclusive",
        closed: Closed = "right",
        errors: Sequence[str] = ("ece", "ace", "mce"),
        top_label: bool = True,
        average: Literal["macro", "none"] = "macro",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_num_bins(num_bins)
        self.mode = check_mode(mode)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise ValueError(f"num_classes must be an integer, got {num_classes!r}")
        kept = num_classes - (0 if include_background or self.mode != "exclusive" else 1)
        if kept < 1:
            raise ValueError(f"num_classes={num_classes} leaves no class to score (include_background=False)")
        bad = [e for e in errors if e not in ERRORS]
        if bad or not errors:
            raise ValueError(f"errors must be among {ERRORS}, got {list(errors)}")
        if average not in ("macro", "none"):
            raise ValueError(f"average must be 'macro' or 'none', got {average!r}")
        if closed not in ("right", "left"):
            raise ValueError(f"closed must be 'right' or 'left', got {closed!r}")
        self.num_classes = num_classes
        self.num_bins = int(num_bins)
        self.include_background = include_background
        self.activation = activation
        self.closed = closed
        self.errors = tuple(errors)
        self.top_label = top_label
        self.average = average
        for name, rows in (("", kept), ("top_", 1)):
            for s in ("count", "sum_p", "sum_y"):
                zeros = torch.zeros(rows, self.num_bins, dtype=torch.float64)
                self.add_state(f"{name}{s}", default=zeros, dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add the bin sums of a batch (validated by segcal's core)."""
        if preds.ndim < 3 or preds.shape[1] != self.num_classes:
            raise ValueError(f"preds must be (B, {self.num_classes}, *spatial), got {tuple(preds.shape)}")
        probs = to_probabilities(preds.detach(), self.activation, self.mode)
        target = target.detach()
        stats = bin_statistics(
            probs, target, self.num_bins, mode=self.mode, include_background=self.include_background,
            closed=self.closed,
        ).pooled()
        self._add("", stats)
        if self.top_label:
            top = top_label_statistics(probs, target, self.num_bins, mode=self.mode, closed=self.closed, check=False)
            one = BinStats(top.count.sum((0, 1))[None, None], top.sum_p.sum((0, 1))[None, None],
                           top.sum_y.sum((0, 1))[None, None])
            self._add("top_", one)

    def _add(self, prefix: str, stats: BinStats) -> None:
        for s in ("count", "sum_p", "sum_y"):
            state = getattr(self, f"{prefix}{s}")
            state += getattr(stats, s)[0].to(device=state.device, dtype=state.dtype)

    def bin_stats(self, top_label: bool = False) -> BinStats:
        """The accumulated sums as a one-image :class:`~segcal.functional.binning.BinStats` ``(1, C', M)``
        (``top_label``: ``(1, 1, M)``), e.g. for :mod:`segcal.plots`."""
        p = "top_" if top_label else ""
        return BinStats(*(getattr(self, f"{p}{s}")[None].clone() for s in ("count", "sum_p", "sum_y")))

    def compute(self) -> dict[str, torch.Tensor]:
        """``{error: value}`` for the marginal errors (macro-averaged or per class) and ``top_label_<error>``."""
        marginal = calibration_errors(self.bin_stats())
        out = {}
        for e in self.errors:
            per_class = marginal[e][0]
            out[e] = per_class if self.average == "none" else torch.nanmean(per_class)
        if self.top_label:
            top = calibration_errors(self.bin_stats(top_label=True))
            out.update({f"top_label_{e}": top[e][0, 0] for e in self.errors})
        return out
