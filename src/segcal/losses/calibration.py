"""Calibration-aware auxiliary losses: hard- and soft-binned marginal L1 ACE/ECE/MCE.

References (docs/references.md): Barfoot et al., "Average Calibration Error: A Differentiable Loss for Improved
Reliability in Image Segmentation", MICCAI 2024 (hard binning, eq. 1-4), and its journal extension, Barfoot et
al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation", arXiv:2506.03942,
2025 (soft binning).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from segcal.functional.binning import check_num_bins
from segcal.functional.losses import hard_calibration_error, soft_calibration_error
from segcal.losses.base import Reduction, SegmentationLoss

Variant = Literal["ace", "ece", "mce", "mL1-ACE", "mL1-ECE", "mL1-MCE"]

_VARIANTS = {"ace": "average", "ece": "expected", "mce": "maximum"}

__all__ = ["HardL1ACELoss", "SoftL1ACELoss"]


def _variant(v: str) -> str:
    key = v.lower().removeprefix("ml1-").removeprefix("ml1_")
    if key not in _VARIANTS:
        raise ValueError(
            f"variant must be one of 'mL1-ACE', 'mL1-ECE', 'mL1-MCE' (or ace/ece/mce), got {v!r}"
        )
    return _VARIANTS[key]


class _CalibrationLoss(SegmentationLoss):
    def __init__(
        self,
        *,
        num_bins: int = 20,
        variant: Variant | str = "mL1-ACE",
        ignore_empty_classes: bool = False,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable[[torch.Tensor], torch.Tensor] | None = None,
        weight: Sequence[float] | float | torch.Tensor | None = None,
        reduction: Reduction | str = "mean",
        mode: Literal["exclusive", "multilabel"] | None = None,
    ) -> None:
        super().__init__(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            weight=weight,
            reduction=reduction,
            mode=mode,
        )
        check_num_bins(num_bins)  # an integer in [1, MAX_BINS]; a bool is not a count
        self.num_bins = int(num_bins)
        self.variant = variant
        self._reduction_kind = _variant(variant)
        self.ignore_empty_classes = bool(ignore_empty_classes)

    def _terms(self, probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``input`` ``(B, C, *spatial)``, ``target`` as described in :class:`SegmentationLoss`.

        Returns the reduced loss, or ``(B, C)`` per image and class with ``reduction="none"``.
        """
        probs, onehot = self.prepare(input, target)
        f = self._terms(probs, onehot)
        if self.ignore_empty_classes:
            present = onehot.flatten(2).amax(-1) > 0
            f = torch.where(present, f, torch.zeros_like(f))
        return self.reduce(f)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, variant={self.variant!r}, " + super().extra_repr()


class HardL1ACELoss(_CalibrationLoss):
    r"""Hard-binned marginal L1 average calibration error (mL1-ACE) as a loss (ACE-MICCAI eq. 3).

    Per image ``b`` and class ``c``, probabilities fall in ``M`` bins ``(k/M, (k+1)/M]`` (the binning core's
    :func:`~segcal.functional.binning.hard_bin_sums`); with ``n_k`` voxels, ``e_k = Σp/n_k`` and
    ``o_k = Σy/n_k``:

    .. math:: \mathrm{ACE}_{b,c} = \frac{1}{K^+} \sum_{k: n_k > 0} |o_k - e_k|

    ``variant="mL1-ECE"`` weighs the gaps by ``n_k / N`` (eq. 1), ``"mL1-MCE"`` takes the largest (eq. 4).
    The gradient flows through ``e_k`` (the assignment is piecewise constant):
    ``∂/∂p_i = sign(e_k − o_k) / (n_k K⁺)``. Fully vectorised over images, classes and voxels.

    Args:
        num_bins: ``M`` (default 20).
        variant: ``"mL1-ACE"`` (default), ``"mL1-ECE"`` or ``"mL1-MCE"``.
        ignore_empty_classes: zero the term of a class absent from the target of an image.
        others: see :class:`~segcal.losses.base.SegmentationLoss`.

    Example:
        >>> loss = HardL1ACELoss(softmax=True, to_onehot_y=True)
        >>> logits = torch.randn(2, 3, 16, 16, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 1, 16, 16))
        >>> loss(logits, labels).backward()
    """

    def _terms(self, probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return hard_calibration_error(probs, onehot, self.num_bins, self._reduction_kind)  # type: ignore[arg-type]


class SoftL1ACELoss(_CalibrationLoss):
    r"""Soft-binned marginal L1 ACE (ACE-journal).

    Each probability is shared linearly between its two nearest bin centres ``c_k = (k + ½)/M`` (triangular
    kernel; below ``c_0`` / above ``c_{M−1}`` all weight goes to the edge bin), via the core's
    :func:`~segcal.functional.binning.soft_bin_sums`. With bin weights ``W_k = Σ_i w_ik``,
    ``e_k = Σ w p / W_k`` and ``o_k = Σ w y / W_k``; bins with ``W_k < min_weight`` are excluded:

    .. math:: \mathrm{sACE}_{b,c} = \frac{1}{|\{k: W_k \ge \epsilon\}|} \sum_{k: W_k \ge \epsilon} |o_k - e_k|

    Gradients flow through the weights as well as the sums. ``variant`` as in :class:`HardL1ACELoss`.

    Args:
        min_weight: ``ε``, the smallest total weight a bin must hold to count (default ``1e-3``).
        **kwargs: every argument of :class:`HardL1ACELoss` (``num_bins``, ``variant``, ``ignore_empty_classes``
            and the MONAI-style ``include_background``, ``to_onehot_y``, ``sigmoid``, ``softmax``, ``other_act``,
            ``weight``, ``reduction``, ``mode``).
    """

    def __init__(self, *, min_weight: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not min_weight >= 0:
            raise ValueError(f"min_weight must be >= 0, got {min_weight!r}")
        self.min_weight = float(min_weight)

    def _terms(self, probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return soft_calibration_error(
            probs,
            onehot,
            self.num_bins,
            self._reduction_kind,
            self.min_weight,  # type: ignore[arg-type]
        )
