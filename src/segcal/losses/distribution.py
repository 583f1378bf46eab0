"""Voxel-wise (distribution-based) losses: cross-entropy with class weights, label smoothing and spatially
varying label smoothing (SVLS), the focal loss and its sample-dependent schedule FLSD-53.

References (docs/references.md): Lin et al., ICCV 2017 (focal loss); Mukhoti et al., "Calibrating Deep Neural
Networks using Focal Loss", NeurIPS 2020, arXiv:2002.09437 (FLSD-53); Islam & Glocker, "Spatially Varying Label
Smoothing: Capturing Uncertainty from Expert Annotations", IPMI 2021, arXiv:2104.05788 (SVLS).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from segcal.functional.losses import (
    LOG_EPS,
    focal_terms,
    log_probabilities,
    sample_dependent_gamma_mask,
    smooth_target,
    svls_kernel,
)
from segcal.losses.base import SegmentationLoss, autocast_off

__all__ = [
    "CrossEntropyLoss",
    "FocalLoss",
    "LabelSmoothingCrossEntropyLoss",
    "SVLSLoss",
    "SampleDependentFocalLoss",
]


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

    def _focal(self, x: torch.Tensor, y: torch.Tensor, act: str | None, multilabel: bool) -> torch.Tensor:
        """Unweighted focal terms per voxel and class ``(B, C, *spatial)`` (before ``alpha`` and selection)."""
        return focal_terms(x, y, activation=act, multilabel=multilabel, gamma=self.gamma, alpha=None)  # type: ignore[arg-type]

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        x = self._as_compute(input)
        y = self._onehot(target, x)  # also checks the values of x (and of a label map)
        multilabel = self.mode == "multilabel" or x.shape[1] == 1
        act = self.activation
        if self.other_act is not None:
            x, act = self.other_act(x), None
        if multilabel and act == "softmax":
            act = None
        per_voxel = self._focal(x, y, act, multilabel)
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
        x, w = self._input_and_weight(input)
        c = x.shape[1]
        if self.mode == "multilabel" or c == 1:
            y = self._onehot(target, x)
            if self.label_smoothing > 0:  # each channel is a two-class problem: (1 − ε) y + ε / 2
                y = y * (1 - self.label_smoothing) + self.label_smoothing / 2
            return self._binary(x, y, w)
        return self._exclusive(x, target, w)

    def _input_and_weight(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The checked input in the compute dtype and the class weight on its device (its length checked)."""
        self._check_input(input)
        x = self._as_compute(input)
        c = x.shape[1]
        w = None if self.class_weight is None else self.class_weight.to(x)
        if w is not None and w.ndim == 1 and w.numel() != c:
            raise ValueError(f"weight has {w.numel()} values but the input has {c} channels")
        return x, w

    def _binary(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """Binary cross-entropy per channel (multilabel or a single channel) against ``y`` ``(B, C, *spatial)``
        (hard or soft), weighted by ``w``."""
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

    def _log_probs(self, x: torch.Tensor) -> torch.Tensor:
        if self.other_act is not None:
            return self.other_act(x).clamp_min(LOG_EPS).log()
        return log_probabilities(x, "softmax" if self.softmax else None)

    def _exclusive(self, x: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """Categorical cross-entropy, label-weighted (label map) or a plain voxel mean (one-hot / soft)."""
        c = x.shape[1]
        wc = w if (w is None or w.ndim == 1) else w.expand(c)
        if not self.to_onehot_y:
            y = self._onehot(target, x)  # also checks the values of x
            if self.label_smoothing > 0:
                y = y * (1 - self.label_smoothing) + self.label_smoothing / c
            return self._soft_exclusive(self._log_probs(x), y, wc)
        lab = self._labels(target, x)  # also checks the values of x
        logp = self._log_probs(x)
        per = F.nll_loss(logp, lab, weight=wc, reduction="none")
        if self.label_smoothing > 0:
            smooth = -(logp * (wc.view([1, -1] + [1] * (x.ndim - 2)) if wc is not None else 1)).mean(1)
            per = (1 - self.label_smoothing) * per + self.label_smoothing * smooth
        den = wc[lab] if wc is not None else torch.ones_like(per)
        if self.reduction == "mean":
            return per.sum() / den.sum()
        if self.reduction == "sum":
            return per.sum()
        return per.flatten(1).sum(1) / den.flatten(1).sum(1)

    def _soft_exclusive(self, logp: torch.Tensor, y: torch.Tensor, wc: torch.Tensor | None) -> torch.Tensor:
        """``−Σ_c w_c y_c ln p_c`` per voxel against a one-hot or soft ``y`` ``(B, C, *spatial)``, a plain voxel
        mean (reduced as ``reduction`` says; ``(B,)`` for ``"none"``)."""
        wy = y * wc.view([1, -1] + [1] * (y.ndim - 2)) if wc is not None else y
        per = -(wy * logp).sum(1)
        if self.reduction == "mean":
            return per.mean()
        if self.reduction == "sum":
            return per.sum()
        return per.flatten(1).mean(1)


class LabelSmoothingCrossEntropyLoss(CrossEntropyLoss):
    r"""Cross-entropy against label-smoothed targets ``(1 − ε) y + ε / K`` (Szegedy et al., CVPR 2016).

    :class:`CrossEntropyLoss` with ``label_smoothing=epsilon``: with a label map it equals
    ``torch.nn.functional.cross_entropy(..., label_smoothing=ε)`` (class weights included); with ``sigmoid=True``
    each channel is a two-class problem, ``K = 2``. Default ``ε = 0.1``.
    """

    def __init__(self, *, epsilon: float = 0.1, **kwargs: Any) -> None:
        if "label_smoothing" in kwargs:
            raise ValueError("LabelSmoothingCrossEntropyLoss takes epsilon, not label_smoothing")
        super().__init__(label_smoothing=epsilon, **kwargs)
        self.epsilon = self.label_smoothing


class SVLSLoss(CrossEntropyLoss):
    r"""Spatially varying label smoothing (Islam & Glocker, IPMI 2021): cross-entropy against the one-hot target
    smoothed by the SVLS kernel.

    .. math:: L = -\frac{1}{N} \sum_i \sum_c w_c\, (K * y)_{i,c} \ln p_{i,c}

    ``K`` is :func:`~segcal.functional.losses.svls_kernel`: a sampled Gaussian (``sigma``) on a ``k^d`` grid
    whose centre weight is replaced by the sum of its neighbours' and which is normalised to sum 1 (the centre
    weighs ``½``), applied per class with replicate padding, so a voxel inside a uniform region keeps its hard
    label and voxels near a boundary get the class proportions of their neighbourhood. ``sigmoid=True``: each
    channel's binary map is smoothed the same way and scored with the binary cross-entropy.

    Args:
        kernel_size: odd edge ``k`` of the kernel (default 3, the paper's).
        sigma: ``σ`` of the Gaussian (default 1).
        **kwargs: the arguments of :class:`CrossEntropyLoss` except ``label_smoothing``. Like it, all classes
            take part (``include_background`` is ignored); ``reduction="none"`` returns ``(B,)``.
    """

    def __init__(self, *, kernel_size: int = 3, sigma: float = 1.0, **kwargs: Any) -> None:
        if kwargs.get("label_smoothing"):
            raise ValueError("SVLSLoss smooths the target with its kernel; label_smoothing must not be set")
        super().__init__(**kwargs)
        svls_kernel(kernel_size, sigma, 2)  # checks kernel_size and sigma now, not at the first call
        self.kernel_size, self.sigma = int(kernel_size), float(sigma)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``input`` ``(B, C, *spatial)``; ``target`` as in :class:`SegmentationLoss` (soft targets are smoothed
        as they are)."""
        x, w = self._input_and_weight(input)
        c = x.shape[1]
        y = self._onehot(target, x)  # also checks the values of x (and of a label map)
        with autocast_off(x.device):
            d = x.ndim - 2
            kernel = self._device_constant(
                ("svls", self.kernel_size, self.sigma, d),
                x.device,
                lambda: svls_kernel(self.kernel_size, self.sigma, d, dtype=torch.float64),
            )
            ys = smooth_target(y, kernel, padding="replicate")
            if self.mode == "multilabel" or c == 1:
                return self._binary(x, ys, w)
            wc = w if (w is None or w.ndim == 1) else w.expand(c)
            return self._soft_exclusive(self._log_probs(x), ys, wc)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sigma={self.sigma}, " + super().extra_repr()


class SampleDependentFocalLoss(FocalLoss):
    r"""Focal loss with the sample-dependent ``γ`` of FLSD-53 (Mukhoti et al., NeurIPS 2020, Sec. 5).

    :class:`FocalLoss` with ``γ = gamma_below`` (5) where the probability of the true class
    ``p_true < threshold`` (0.2) and ``γ = gamma_above`` (3) elsewhere, chosen per voxel (per voxel and channel
    with ``sigmoid=True``, where ``p_true = p_t``); the choice is piecewise constant, so no gradient flows
    through it. ``alpha``, class weights and reductions as :class:`FocalLoss`.
    """

    def __init__(
        self,
        *,
        gamma_below: float = 5.0,
        gamma_above: float = 3.0,
        threshold: float = 0.2,
        alpha: float | list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        if "gamma" in kwargs:
            raise ValueError("SampleDependentFocalLoss chooses gamma per voxel; set gamma_below / gamma_above")
        super().__init__(gamma=gamma_above, alpha=alpha, **kwargs)
        if not gamma_below >= 0:
            raise ValueError(f"gamma_below must be >= 0, got {gamma_below!r}")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
        self.gamma_below, self.gamma_above, self.threshold = float(gamma_below), self.gamma, float(threshold)

    def _focal(self, x: torch.Tensor, y: torch.Tensor, act: str | None, multilabel: bool) -> torch.Tensor:
        if multilabel:
            p = torch.sigmoid(x) if act == "sigmoid" else x
            p_true = y * p + (1 - y) * (1 - p)
        else:
            p = torch.softmax(x, 1) if act == "softmax" else x
            p_true = (p * y).sum(1, keepdim=True)
        below = sample_dependent_gamma_mask(p_true, self.threshold)
        kw: dict[str, Any] = {"activation": act, "multilabel": multilabel, "alpha": None}
        return torch.where(
            below, focal_terms(x, y, gamma=self.gamma_below, **kw), focal_terms(x, y, gamma=self.gamma_above, **kw)
        )

    def extra_repr(self) -> str:
        return (
            f"gamma_below={self.gamma_below}, gamma_above={self.gamma_above}, threshold={self.threshold}, "
            + super().extra_repr()
        )
