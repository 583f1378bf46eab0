"""segcal's losses on nnU-Net v2's ``(logits, target)`` pairs, and how they are put into nnU-Net's loss.

nnU-Net (Isensee et al., Nature Methods 2021, docs/references.md) calls its loss once per deep-supervision scale
through ``DeepSupervisionWrapper`` with its own weights, each call with one ``(logits, target)`` pair:

* label training: logits ``(B, C, *S)`` (softmax), target a label map ``(B, 1, *S)``; with an ignore label the
  target holds that value (``>= C``) where nothing is known;
* region training: logits ``(B, R, *S)`` (sigmoid, overlapping regions), target multi-hot ``(B, R, *S)``; with an
  ignore label one more channel ``(B, R + 1, *S)`` whose last channel marks the ignored voxels.

:func:`nnunet_probabilities` turns such a pair into ``(probs, target, mask)``; :class:`CalibrationTerm` is
segcal's hard or soft mL1-ACE on it and :class:`DSCPlusPlusDice` is segcal's DSC++ with the call signature of
nnU-Net's Dice (``dc(logits, target, loss_mask=None)``). :func:`add_calibration_term` and
:func:`replace_dice` change a loss built by ``nnUNetTrainer._build_loss`` without touching its deep-supervision
wrapper, so the weights stay nnU-Net's. Nothing here imports nnU-Net: the wrapper is recognised by its
``weight_factors`` and ``loss`` attributes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from segcal.functional.inputs import as_tensor
from segcal.losses import DSCPlusPlusLoss, HardL1ACELoss, SoftL1ACELoss

__all__ = [
    "CalibrationTerm",
    "DSCPlusPlusDice",
    "SegcalCompoundLoss",
    "add_calibration_term",
    "inner_loss",
    "nnunet_probabilities",
    "replace_dice",
]


def nnunet_probabilities(
    logits: torch.Tensor, target: torch.Tensor, *, regions: bool, ignore_label: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(probs, onehot, mask)`` from one nnU-Net ``(logits, target)`` pair (see the module docstring).

    ``probs`` and ``onehot`` are ``(B, C, *S)`` (softmax of label logits, sigmoid of region logits), in float32
    at least (half-precision logits under autocast are promoted first); ``mask`` is a bool ``(B, 1, *S)`` of the
    voxels that count, or None when the dataset has no ignore label.
    """
    logits = _as_float(logits)
    if regions:
        target = target.to(logits.dtype) if target.dtype == torch.bool else target
        if ignore_label is not None:
            mask = target[:, -1:] == 0
            target = target[:, :-1]
        else:
            mask = None
        if target.shape != logits.shape:
            raise ValueError(
                f"region target {tuple(target.shape)} does not match the logits {tuple(logits.shape)}"
            )
        return torch.sigmoid(logits), target.to(logits.dtype), mask
    if target.ndim != logits.ndim or target.shape[1] != 1:
        raise ValueError(f"nnU-Net label target must be (B, 1, *S), got {tuple(target.shape)}")
    labels = target.long()
    mask = None
    if ignore_label is not None:
        mask = labels != ignore_label
        labels = torch.where(mask, labels, 0)
    onehot = torch.zeros_like(logits).scatter_(1, labels, 1.0)
    return torch.softmax(logits, 1), onehot, mask


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class CalibrationTerm(nn.Module):
    """Hard or soft marginal L1 ACE (segcal's :class:`~segcal.losses.HardL1ACELoss` /
    :class:`~segcal.losses.SoftL1ACELoss`) on an nnU-Net ``(logits, target)`` pair.

    The value is the mean over images and classes of the per-image, per-class mL1-ACE (Barfoot et al., MICCAI
    2024; soft binning: Barfoot et al., arXiv:2506.03942; docs/references.md). Ignored voxels (ignore label) are
    left out of every bin of their image: each image is then binned over its own known voxels, and an image
    without any known voxel adds nothing.

    Args:
        kind: ``"hard"`` or ``"soft"`` binning.
        regions: region-based training (sigmoid; multi-hot targets) instead of label training (softmax).
        ignore_label: the dataset's ignore label, or None.
        num_bins: ``M`` (default 20, as in both papers).
        include_background: keep channel 0 in label training (default True, as in the authors' configuration;
            region channels are all kept).
        ignore_empty_classes: zero the term of a class absent from an image (default True, as in the authors'
            configuration).
    """

    def __init__(
        self,
        kind: Literal["hard", "soft"],
        *,
        regions: bool = False,
        ignore_label: int | None = None,
        num_bins: int = 20,
        include_background: bool = True,
        ignore_empty_classes: bool = True,
    ) -> None:
        super().__init__()
        if kind not in ("hard", "soft"):
            raise ValueError(f"kind must be 'hard' or 'soft', got {kind!r}")
        cls = HardL1ACELoss if kind == "hard" else SoftL1ACELoss
        # probabilities in, the (B, C) terms out: the activation and the mask are applied here
        self.ace = cls(
            num_bins=num_bins,
            include_background=include_background or regions,
            ignore_empty_classes=ignore_empty_classes,
            mode="multilabel" if regions else "exclusive",
            reduction="none",
        )
        self.kind = kind
        self.regions = bool(regions)
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs, onehot, mask = nnunet_probabilities(
            logits, target, regions=self.regions, ignore_label=self.ignore_label
        )
        if mask is None:
            return self.ace(probs, onehot).mean()
        terms = []
        for p, y, m in zip(probs, onehot, mask, strict=True):
            keep = m.reshape(-1)
            if not bool(keep.any()):
                continue
            c = p.shape[0]
            # the image's known voxels as a (1, C, N, 1) image: the binning is per image and class
            p_known = p.reshape(c, -1)[:, keep].reshape(1, c, -1, 1)
            y_known = y.reshape(c, -1)[:, keep].reshape(1, c, -1, 1)
            terms.append(self.ace(p_known, y_known))
        if not terms:
            return logits.sum() * 0.0
        return torch.cat(terms).mean()

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, regions={self.regions}, ignore_label={self.ignore_label}"


class DSCPlusPlusDice(nn.Module):
    """segcal's DSC++ loss (Yeung et al., J. Digit. Imaging 2023, eq. 9; docs/references.md) in place of
    nnU-Net's Dice: called as ``dc(logits, target, loss_mask=None)`` by ``DC_and_CE_loss`` / ``DC_and_BCE_loss``.

    ``1 − mean_c (2 TP + s) / (2 TP + FP_γ + FN_γ + s)`` with nnU-Net's Dice settings: background excluded in
    label training (``do_bg=False``), every region kept in region training, per image or over the batch
    (``batch_dice`` of the plans), ``s = 1e-5``. A ``loss_mask`` (ignore label) zeroes the probabilities and
    targets of ignored voxels, which removes them from ``TP``, ``FP_γ`` and ``FN_γ``. With DDP and
    ``batch_dice`` the sums are those of each GPU's batch (nnU-Net's own Dice gathers them across GPUs).
    """

    def __init__(
        self,
        *,
        regions: bool = False,
        do_bg: bool | None = None,
        batch_dice: bool = False,
        gamma: float = 2.0,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        self.regions = bool(regions)
        self.loss = DSCPlusPlusLoss(
            gamma=gamma,
            smooth_nr=smooth,
            smooth_dr=smooth,
            batch=batch_dice,
            include_background=regions if do_bg is None else do_bg,
            mode="multilabel" if regions else "exclusive",
        )

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = _as_float(logits)
        if self.regions:
            probs = torch.sigmoid(logits)
            onehot = target.to(probs.dtype)
        else:
            probs = torch.softmax(logits, 1)
            labels = target.long() if target.ndim == logits.ndim else target.long().unsqueeze(1)
            onehot = torch.zeros_like(probs).scatter_(1, labels, 1.0)
        if loss_mask is not None:
            m = loss_mask.to(probs.dtype)
            probs, onehot = probs * m, onehot * m
        return self.loss(probs, onehot)


class SegcalCompoundLoss(nn.Module):
    """``nnunet(logits, target) + weight · term(logits, target)``: nnU-Net's own loss for one scale plus a
    segcal term, with the same call signature, so nnU-Net's ``DeepSupervisionWrapper`` weighs it per scale
    exactly as it weighs its own loss.

    The term's values are summed per output size until :meth:`term_means` reads them (the trainers read them at
    the end of each training epoch, for the log).
    """

    def __init__(self, nnunet_loss: nn.Module, term: nn.Module, weight: float = 1.0) -> None:
        super().__init__()
        self.nnunet_loss = nnunet_loss
        self.term = term
        self.weight = float(weight)
        self.last_components: dict[str, torch.Tensor] = {}
        self._sums: dict[tuple[int, ...], tuple[torch.Tensor, int]] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        base = self.nnunet_loss(logits, target)
        extra = self.term(logits, target)
        self.last_components = {"nnunet": as_tensor(base).detach(), "segcal": extra.detach()}
        # no synchronisation with the device here: summed as tensors, read by term_means
        shape = tuple(logits.shape[2:])
        total, n = self._sums.get(shape, (torch.zeros((), device=extra.device), 0))
        self._sums[shape] = (total + extra.detach().float(), n + 1)
        return base + self.weight * extra

    def term_means(self, reset: bool = True) -> dict[tuple[int, ...], float]:
        """Mean term value per output size ``*S`` over the calls since the last reset."""
        out = {shape: float(total) / n for shape, (total, n) in self._sums.items() if n}
        if reset:
            self._sums = {}
        return out

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}"


def _is_deep_supervision(loss: nn.Module) -> bool:
    return hasattr(loss, "weight_factors") and isinstance(getattr(loss, "loss", None), nn.Module)


def inner_loss(loss: nn.Module) -> nn.Module:
    """The per-scale loss inside nnU-Net's ``DeepSupervisionWrapper`` (the loss itself without deep
    supervision)."""
    return loss.loss if _is_deep_supervision(loss) else loss


def _set_inner(loss: nn.Module, new: nn.Module) -> nn.Module:
    if _is_deep_supervision(loss):
        loss.loss = new
        return loss
    return new


def add_calibration_term(loss: nn.Module, term: nn.Module, weight: float = 1.0) -> nn.Module:
    """nnU-Net's ``loss`` (as ``_build_loss`` returns it) with ``weight · term`` added to every scale."""
    return _set_inner(loss, SegcalCompoundLoss(inner_loss(loss), term, weight))


def replace_dice(loss: nn.Module, dice: nn.Module) -> nn.Module:
    """nnU-Net's ``DC_and_CE_loss`` / ``DC_and_BCE_loss`` (possibly inside the deep-supervision wrapper) with its
    Dice module ``dc`` replaced by ``dice``; the cross-entropy, its ignore label and the weights stay."""
    inner = inner_loss(loss)
    if not isinstance(getattr(inner, "dc", None), nn.Module):
        raise TypeError(f"{type(inner).__name__} has no Dice module 'dc' to replace")
    inner.dc = dice
    return loss
