"""Overlap-based losses and their DSC++ ("++") variants (Yeung et al., "Calibrating the Dice loss to handle
neural network overconfidence for biomedical image segmentation", J. Digit. Imaging 2022; eq. numbers below).

Every ``++`` variant differs from its plain loss only in the exponent ``γ`` applied to the FP and FN terms
(``FP_γ = Σ (p (1 − y))^γ``, ``FN_γ = Σ ((1 − p) y)^γ``, default ``γ = 2``); defaults of the other
hyper-parameters follow Table 2 of that paper. Per-class terms are averaged over classes (MONAI's convention;
the paper's eq. 15/17 sum them, which only rescales the loss by ``C``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from segcal.functional.losses import (
    asymmetric_focal_terms,
    asymmetric_focal_tversky_terms,
    binary_cross_entropy_terms,
    dice_terms,
    focal_tversky_terms,
    tversky_terms,
)
from segcal.losses.base import SegmentationLoss

__all__ = [
    "AsymmetricUnifiedFocalLoss",
    "AsymmetricUnifiedFocalPlusPlusLoss",
    "ComboLoss",
    "ComboPlusPlusLoss",
    "DSCPlusPlusLoss",
    "DiceLoss",
    "FocalTverskyLoss",
    "FocalTverskyPlusPlusLoss",
    "TverskyLoss",
    "TverskyPlusPlusLoss",
]


class DiceLoss(SegmentationLoss):
    r"""Soft Dice loss (DSC++ eq. 3-4), numerically identical to MONAI's ``DiceLoss`` for equal settings.

    .. math:: L_{b,c} = 1 - \frac{2 \sum_i p_i y_i + s_{nr}}{\sum_i p_i + \sum_i y_i + s_{dr}}

    Args:
        smooth_nr, smooth_dr: smoothing of numerator / denominator (default ``1e-5``, as MONAI).
        squared_pred: squares in the denominator; jaccard: the soft Jaccard loss; batch: sum over the batch
            before the ratio (one value per class).
        **kwargs: :class:`~segcal.losses.base.SegmentationLoss` arguments (``softmax``, ``to_onehot_y``, ...).

    ``reduction="none"`` returns ``(B, C)`` (``(1, C)`` with ``batch=True``).
    """

    def __init__(
        self,
        *,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        squared_pred: bool = False,
        jaccard: bool = False,
        batch: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.smooth_nr, self.smooth_dr = float(smooth_nr), float(smooth_dr)
        self.squared_pred, self.jaccard, self.batch = bool(squared_pred), bool(jaccard), bool(batch)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p, y = self.prepare(input, target)
        f = dice_terms(
            p,
            y,
            smooth_nr=self.smooth_nr,
            smooth_dr=self.smooth_dr,
            squared_pred=self.squared_pred,
            jaccard=self.jaccard,
            batch=self.batch,
        )
        return self.reduce(f)


class TverskyLoss(SegmentationLoss):
    r"""Tversky loss (DSC++ eq. 15-16) and, with ``fpfn_gamma > 1``, Tversky++.

    .. math:: L_{b,c} = 1 - \frac{TP + s_{nr}}{TP + \alpha FP_\gamma + \beta FN_\gamma + s_{dr}}

    ``alpha`` weighs false positives and ``beta`` false negatives (MONAI's naming); defaults ``α = 0.3``,
    ``β = 0.7`` (Table 2). With ``fpfn_gamma = 1`` it matches MONAI's ``TverskyLoss``.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.3,
        beta: float = 0.7,
        fpfn_gamma: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if fpfn_gamma <= 0:
            raise ValueError(f"fpfn_gamma must be > 0, got {fpfn_gamma!r}")
        self.alpha, self.beta, self.fpfn_gamma = float(alpha), float(beta), float(fpfn_gamma)
        self.smooth_nr, self.smooth_dr, self.batch = float(smooth_nr), float(smooth_dr), bool(batch)

    def _tversky_kwargs(self) -> dict[str, float | bool]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "fpfn_gamma": self.fpfn_gamma,
            "smooth_nr": self.smooth_nr,
            "smooth_dr": self.smooth_dr,
            "batch": self.batch,
        }

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p, y = self.prepare(input, target)
        return self.reduce(tversky_terms(p, y, **self._tversky_kwargs()))  # type: ignore[arg-type]


class TverskyPlusPlusLoss(TverskyLoss):
    """Tversky++: :class:`TverskyLoss` with the FP/FN terms raised to ``fpfn_gamma`` (default 2)."""

    def __init__(self, *, fpfn_gamma: float = 2.0, **kwargs) -> None:
        super().__init__(fpfn_gamma=fpfn_gamma, **kwargs)


class DSCPlusPlusLoss(TverskyLoss):
    r"""DSC++ loss (DSC++ eq. 9): the Dice loss with FP and FN terms raised to ``gamma`` (default 2).

    .. math:: L_{b,c} = 1 - \frac{2 TP + s_{nr}}{2 TP + FP_\gamma + FN_\gamma + s_{dr}}

    ``gamma = 1`` gives the Dice loss (:class:`DiceLoss`) up to rounding; larger ``γ`` penalise over-confident
    errors more. Computed as a Tversky index with ``α = β = ½``.
    """

    def __init__(
        self, *, gamma: float = 2.0, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, **kwargs
    ) -> None:
        # (TP + s/2) / (TP + FP/2 + FN/2 + s/2) == (2TP + s) / (2TP + FP + FN + s)
        super().__init__(
            alpha=0.5, beta=0.5, fpfn_gamma=gamma, smooth_nr=smooth_nr / 2, smooth_dr=smooth_dr / 2, **kwargs
        )
        self.gamma = float(gamma)


class FocalTverskyLoss(TverskyLoss):
    r"""Focal Tversky loss ``(1 − TI)^{1/γ}`` (DSC++ eq. 17); ``fpfn_gamma > 1`` gives Focal Tversky++.

    Defaults (Table 2): ``α = 0.3`` (FP), ``β = 0.7`` (FN), ``γ = 4/3``; the other arguments are
    :class:`TverskyLoss`'s.
    """

    def __init__(self, *, gamma: float = 4.0 / 3.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if gamma <= 0:
            raise ValueError(f"gamma and fpfn_gamma must be > 0, got {gamma!r}, {self.fpfn_gamma!r}")
        self.gamma = float(gamma)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p, y = self.prepare(input, target)
        return self.reduce(focal_tversky_terms(p, y, gamma=self.gamma, **self._tversky_kwargs()))  # type: ignore[arg-type]


class FocalTverskyPlusPlusLoss(FocalTverskyLoss):
    """Focal Tversky++: :class:`FocalTverskyLoss` with ``fpfn_gamma = 2`` by default."""

    def __init__(self, *, fpfn_gamma: float = 2.0, **kwargs) -> None:
        super().__init__(fpfn_gamma=fpfn_gamma, **kwargs)


class ComboLoss(SegmentationLoss):
    r"""Combo loss (DSC++ eq. 13-14): ``α · mCE + (1 − α) · (1 − DSC)`` per image and class.

    ``mCE = −(1/N) Σ_i [β y ln p + (1 − β)(1 − y) ln(1 − p)]`` (β weighs false negatives vs positives).
    Eq. 13 writes ``− (1 − α) DSC``; we add the constant ``1 − α`` so the loss is >= 0 (same gradient).
    Defaults ``α = β = 0.5`` (Table 2). ``fpfn_gamma > 1`` replaces the DSC by DSC++ (Combo++).
    """

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        beta: float = 0.5,
        fpfn_gamma: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 <= alpha <= 1 or not 0 <= beta <= 1:
            raise ValueError(f"alpha and beta must lie in [0, 1], got {alpha!r}, {beta!r}")
        self.alpha, self.beta, self.fpfn_gamma = float(alpha), float(beta), float(fpfn_gamma)
        self.smooth_nr, self.smooth_dr = float(smooth_nr), float(smooth_dr)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p, y = self.prepare(input, target)
        dsc = tversky_terms(
            p,
            y,
            alpha=0.5,
            beta=0.5,
            fpfn_gamma=self.fpfn_gamma,
            smooth_nr=self.smooth_nr / 2,
            smooth_dr=self.smooth_dr / 2,
        )
        ce = binary_cross_entropy_terms(p, y, self.beta)
        return self.reduce(self.alpha * ce + (1 - self.alpha) * dsc)


class ComboPlusPlusLoss(ComboLoss):
    """Combo++: :class:`ComboLoss` whose Dice term is DSC++ (``fpfn_gamma = 2`` by default)."""

    def __init__(self, *, fpfn_gamma: float = 2.0, **kwargs) -> None:
        super().__init__(fpfn_gamma=fpfn_gamma, **kwargs)


class AsymmetricUnifiedFocalLoss(SegmentationLoss):
    r"""Asymmetric Unified Focal loss, multi-class (DSC++ eq. 18-21): ``λ L_AF + (1 − λ) L_AFT`` per image.

    * ``L_AF`` (eq. 19) = Σ_c mean_i: rare classes ``−δ y ln p``; other classes
      ``−(1 − δ)(1 − p)^γ y ln p`` (focal suppression of the easy, frequent class);
    * ``L_AFT`` (eq. 20-21) = mean_c: ``1 − TI_c`` for the other classes, ``(1 − TI_c)^{1−γ}`` for rare
      classes, with ``TI_c = TP / (TP + (1 − δ) FP + δ FN)``.

    By default every class except the background (channel 0) is rare; ``rare_classes`` (indices in the input's
    channel numbering) overrides this. In ``multilabel`` mode (``sigmoid=True``) each channel is a binary
    problem whose positive side is rare. Defaults (Table 2): ``γ = 0.5``, ``δ = 0.6``, ``λ = 0.5``.
    ``fpfn_gamma > 1`` raises the FP/FN terms of ``TI`` (Unified Focal++). Class weights multiply the
    per-class terms; ``reduction="none"`` returns one value per image ``(B,)``.
    """

    def __init__(
        self,
        *,
        gamma: float = 0.5,
        delta: float = 0.6,
        lambda_: float = 0.5,
        fpfn_gamma: float = 1.0,
        rare_classes: Sequence[int] | None = None,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 <= delta <= 1 or not 0 <= lambda_ <= 1:
            raise ValueError(f"delta and lambda_ must lie in [0, 1], got {delta!r}, {lambda_!r}")
        self.gamma, self.delta, self.lambda_, self.fpfn_gamma = (
            float(gamma),
            float(delta),
            float(lambda_),
            float(fpfn_gamma),
        )
        self.rare_classes = None if rare_classes is None else [int(c) for c in rare_classes]
        self.smooth_nr, self.smooth_dr = float(smooth_nr), float(smooth_dr)

    def _rare_mask(self, c: int) -> torch.Tensor:
        """``(C,)`` bool: the rare classes (every class but the background unless ``rare_classes`` names them)."""
        rare = torch.ones(c, dtype=torch.bool)
        if self.rare_classes is None:
            rare[0] = False
        else:
            rare[:] = False
            rare[self.rare_classes] = True
        return rare

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        x = self._as_compute(input)
        y = self._onehot(target, x)  # also checks the values of x (and of a label map)
        c = x.shape[1]
        if self.mode == "multilabel" or c == 1:
            if self.sigmoid:
                logp = torch.cat([F.logsigmoid(-x), F.logsigmoid(x)], 1)
            else:
                p1 = self.other_act(x) if self.other_act is not None else x
                logp = torch.cat([(1 - p1).clamp_min(1e-7).log(), p1.clamp_min(1e-7).log()], 1)
            y2 = torch.cat([1 - y, y], 1)
            rare = self._device_constant(("rare2", c), x.device, lambda: torch.arange(2 * c) >= c)
            p = logp.exp()
            af = asymmetric_focal_terms(logp, y2, rare, gamma=self.gamma, delta=self.delta)
            aft = asymmetric_focal_tversky_terms(
                p,
                y2,
                rare,
                gamma=self.gamma,
                delta=self.delta,
                fpfn_gamma=self.fpfn_gamma,
                smooth_nr=self.smooth_nr,
                smooth_dr=self.smooth_dr,
            )
            af = af[:, :c] + af[:, c:]  # per channel: both sides of the binary problem
            aft = (aft[:, :c] + aft[:, c:]) / 2
        else:
            if self.softmax:
                logp = F.log_softmax(x, 1)
            else:
                pp = self.other_act(x) if self.other_act is not None else x
                logp = pp.clamp_min(1e-7).log()
            key = ("rare", c, None if self.rare_classes is None else tuple(self.rare_classes))
            rare = self._device_constant(key, x.device, lambda: self._rare_mask(c))
            logp, y = self._select(logp, y)
            rare = rare if self.include_background or c == 1 else rare[1:]
            p = logp.exp()
            af = asymmetric_focal_terms(logp, y, rare, gamma=self.gamma, delta=self.delta)
            aft = asymmetric_focal_tversky_terms(
                p,
                y,
                rare,
                gamma=self.gamma,
                delta=self.delta,
                fpfn_gamma=self.fpfn_gamma,
                smooth_nr=self.smooth_nr,
                smooth_dr=self.smooth_dr,
            )
        if self.class_weight is not None:
            w = self.class_weight.to(af)
            if w.ndim == 1 and w.numel() != af.shape[1]:
                raise ValueError(f"weight has {w.numel()} values but the loss has {af.shape[1]} classes")
            af, aft = af * w, aft * w
        f = self.lambda_ * af.sum(1) + (1 - self.lambda_) * aft.mean(1)
        if self.reduction == "mean":
            return f.mean()
        if self.reduction == "sum":
            return f.sum()
        return f


class AsymmetricUnifiedFocalPlusPlusLoss(AsymmetricUnifiedFocalLoss):
    """Unified Focal++: :class:`AsymmetricUnifiedFocalLoss` with ``fpfn_gamma = 2`` by default."""

    def __init__(self, *, fpfn_gamma: float = 2.0, **kwargs) -> None:
        super().__init__(fpfn_gamma=fpfn_gamma, **kwargs)
