"""Voxel-wise (distribution-based) losses: cross-entropy with class weights and the focal loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segcal.functional.losses import LOG_EPS, focal_terms, log_probabilities
from segcal.losses.base import SegmentationLoss

__all__ = ["CrossEntropyLoss", "FocalLoss"]


class FocalLoss(SegmentationLoss):
    r"""Focal loss (Lin et al.; DSC++ eq. 2), MONAI's ``FocalLoss`` formula.

    Exclusive (``softmax=True`` or probabilities): ``−α_c (1 − p_c)^γ y_c ln p_c`` per voxel and class; a
    scalar ``alpha`` means ``1 − α`` for class 0 and ``α`` for the others. Multilabel (``sigmoid=True``): the
    binary focal loss per channel, ``α_t = α`` on positives and ``1 − α`` on negatives. Defaults ``γ = 2`` and
    ``alpha=None`` (MONAI; DSC++ Table 2 uses ``α = 0.5``, which for two classes only halves the loss).

    ``reduction="mean"`` averages over images, classes and voxels (as MONAI), ``"sum"`` sums the per-image,
    per-class voxel means, ``"none"`` returns the voxel means ``(B, C)``. Unlike MONAI, the softmax always
    runs over all channels before ``include_background=False`` drops channel 0.
    """

    def __init__(self, *, gamma: float = 2.0, alpha: float | list[float] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        self.alpha = alpha

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        x = self._as_compute(input)
        y = self._onehot(target, x)
        self._check_values(x)
        multilabel = self.mode == "multilabel" or x.shape[1] == 1
        act = self.activation
        if self.other_act is not None:
            x, act = self.other_act(x), None
        if multilabel and act == "softmax":
            act = None
        per_voxel = focal_terms(x, y, activation=act, multilabel=multilabel, gamma=self.gamma, alpha=None)
        (per_voxel, y) = self._select(per_voxel, y)
        if self.alpha is not None:  # alpha refers to the kept channels (MONAI)
            a = torch.as_tensor(self.alpha, dtype=per_voxel.dtype, device=per_voxel.device)
            shape = [1, -1] + [1] * (per_voxel.ndim - 2)
            if multilabel:
                per_voxel = per_voxel * (
                    (y * a + (1 - y) * (1 - a)) if a.ndim == 0 else torch.where(y == 1, a.view(shape), 1.0)
                )
            else:
                if a.ndim == 0:
                    a = torch.cat([(1 - a).view(1), a.view(1).expand(y.shape[1] - 1)])
                per_voxel = per_voxel * a.view(shape)
        if self.reduction == "mean":
            if self.class_weight is not None:
                per_voxel = per_voxel * self.class_weight.to(per_voxel).view(
                    [1, -1] + [1] * (per_voxel.ndim - 2)
                )
            return per_voxel.mean()
        return self.reduce(per_voxel.flatten(2).mean(-1))


class CrossEntropyLoss(SegmentationLoss):
    r"""Cross-entropy (DSC++ eq. 1) with class weights; ``torch.nn.CrossEntropyLoss`` / ``BCEWithLogitsLoss``.

    Exclusive: ``−Σ_c w_c y_c ln p_c`` per voxel (``log_softmax`` of logits with ``softmax=True``, else
    ``ln p`` of probabilities clipped at ``1e-7``). With a label map (``to_onehot_y=True``) the mean is
    weighted by ``w_{y_i}`` as in PyTorch; with one-hot / soft targets it is a plain voxel mean. Multilabel
    (``sigmoid=True``): the binary cross-entropy per channel, ``w_c`` per channel, mean over channels, voxels.
    All classes always take part (``include_background`` is accepted for uniformity and ignored, as MONAI's
    ``DiceCELoss`` does for its CE term). ``reduction="none"`` returns one value per image ``(B,)``.
    """

    def __init__(self, *, label_smoothing: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 <= label_smoothing <= 1:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        x = self._as_compute(input)
        c = x.shape[1]
        w = None if self.class_weight is None else self.class_weight.to(x)
        if w is not None and w.ndim == 1 and w.numel() != c:
            raise ValueError(f"weight has {w.numel()} values but the input has {c} channels")
        self._check_values(x)
        if self.mode == "multilabel" or c == 1:
            return self._binary(x, target, w)
        return self._exclusive(x, target, w)

    def _binary(self, x: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """Binary cross-entropy per channel (multilabel or a single channel), weighted by ``w``."""
        y = self._onehot(target, x)
        if self.sigmoid:
            per = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        else:
            p = self.other_act(x) if self.other_act is not None else x
            per = F.binary_cross_entropy(p.clamp(LOG_EPS, 1 - LOG_EPS), y, reduction="none")
        if w is not None:
            per = per * (w.view([1, -1] + [1] * (x.ndim - 2)) if w.ndim == 1 else w)
        if self.reduction == "mean":
            return per.mean()
        if self.reduction == "sum":
            return per.sum()
        return per.flatten(1).mean(1)

    def _exclusive(self, x: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """Categorical cross-entropy, label-weighted (label map) or a plain voxel mean (one-hot / soft)."""
        c = x.shape[1]
        if self.other_act is not None:
            logp = self.other_act(x).clamp_min(LOG_EPS).log()
        else:
            logp = log_probabilities(x, "softmax" if self.softmax else None)
        wc = w if (w is None or w.ndim == 1) else w.expand(c)
        if self.to_onehot_y:
            lab = self._labels(target, x)
            per = F.nll_loss(logp, lab, weight=wc, reduction="none")
            if self.label_smoothing > 0:
                smooth = -(logp * (wc.view([1, -1] + [1] * (x.ndim - 2)) if wc is not None else 1)).mean(1)
                per = (1 - self.label_smoothing) * per + self.label_smoothing * smooth
            den = wc[lab] if wc is not None else torch.ones_like(per)
        else:
            y = self._onehot(target, x)
            if self.label_smoothing > 0:
                y = y * (1 - self.label_smoothing) + self.label_smoothing / c
            wy = y * wc.view([1, -1] + [1] * (x.ndim - 2)) if wc is not None else y
            per = -(wy * logp).sum(1)
            den = torch.ones_like(per)
        if self.reduction == "mean":
            return per.sum() / den.sum()
        if self.reduction == "sum":
            return per.sum()
        return per.flatten(1).sum(1) / den.flatten(1).sum(1)
