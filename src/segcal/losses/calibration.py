"""Calibration-aware auxiliary losses: hard- and soft-binned marginal L1 ACE/ECE/MCE, and the logit penalties
of NACL and MbLS (each a penalty term to add to a cross-entropy, e.g. ``"ce+nacl"``).

References (docs/references.md): Barfoot et al., "Average Calibration Error: A Differentiable Loss for Improved
Reliability in Image Segmentation", MICCAI 2024 (hard binning, eq. 1-4), and its journal extension, Barfoot et
al., "Average Calibration Losses for Reliable Uncertainty in Medical Image Segmentation", arXiv:2506.03942,
2025 (soft binning); Murugesan et al., "Trust Your Neighbours: Penalty-Based Constraints for Model
Calibration", MICCAI 2023, arXiv:2303.06268 (NACL); Liu et al., "The Devil is in the Margin: Margin-based Label
Smoothing for Network Calibration", CVPR 2022, arXiv:2111.15430 (MbLS).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from segcal.functional.binning import check_num_bins
from segcal.functional.losses import (
    gaussian_erf_kernel_1d,
    hard_calibration_error,
    logit_margin_terms,
    mean_kernel,
    neighbour_penalty_terms,
    smooth_target,
    soft_calibration_error,
)
from segcal.losses.base import SegmentationLoss, autocast_off

Variant = Literal["ace", "ece", "mce", "mL1-ACE", "mL1-ECE", "mL1-MCE"]

_VARIANTS = {"ace": "average", "ece": "expected", "mce": "maximum"}

__all__ = ["HardL1ACELoss", "LogitMarginPenaltyLoss", "NACLPenaltyLoss", "SoftL1ACELoss"]


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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_num_bins(num_bins)  # an integer in [1, MAX_BINS]; a bool is not a count
        self.num_bins = int(num_bins)
        self.variant = variant
        self._reduction_kind = _variant(variant)
        self.ignore_empty_classes = bool(ignore_empty_classes)

    def _terms(self, probs: torch.Tensor, target: torch.Tensor, class_ids: list[int] | None = None) -> torch.Tensor:
        """``(B, C')`` terms of ``probs`` against a one-hot ``target`` ``(B, C', *spatial)``, or against a label map
        ``(B, *spatial)`` whose class ``class_ids[c]`` is channel ``c``."""
        raise NotImplementedError

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``input`` ``(B, C, *spatial)``, ``target`` as described in :class:`SegmentationLoss`.

        Returns the reduced loss, or ``(B, C)`` per image and class with ``reduction="none"``.
        """
        self._check_input(input)  # a clear error before the input's shape is read
        if self.to_onehot_y and self.mode == "exclusive" and input.shape[1] > 1:
            # a label map: the terms read it directly, no (B, C, *spatial) one-hot is built (same checks, values
            # and gradients as the one-hot path)
            x = self._as_compute(input)
            lab = self._labels(target, x)  # also checks the values of x
            first = 0 if self.include_background else 1
            f = self._terms(self._activate(x)[:, first:], lab, list(range(first, x.shape[1])))
            if not self.ignore_empty_classes:
                return self.reduce(f)
            present = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, lab.flatten(1), True)
            present = present[:, first:]
        else:
            probs, onehot = self.prepare(input, target)
            f = self._terms(probs, onehot)
            if not self.ignore_empty_classes:
                return self.reduce(f)
            present = onehot.flatten(2).amax(-1) > 0
        return self.reduce(torch.where(present, f, torch.zeros_like(f)))

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

    def _terms(self, probs: torch.Tensor, target: torch.Tensor, class_ids: list[int] | None = None) -> torch.Tensor:
        return hard_calibration_error(
            probs, target, self.num_bins, self._reduction_kind, class_ids=class_ids  # type: ignore[arg-type]
        )


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

    def _terms(self, probs: torch.Tensor, target: torch.Tensor, class_ids: list[int] | None = None) -> torch.Tensor:
        return soft_calibration_error(
            probs,
            target,
            self.num_bins,
            self._reduction_kind,  # type: ignore[arg-type]
            self.min_weight,
            class_ids,
        )


class _LogitPenalty(SegmentationLoss):
    """A penalty on the logits themselves: ``input`` must hold logits (``softmax=True`` / ``sigmoid=True``)."""

    #: activations the penalty is defined for
    _activations: tuple[str, ...] = ("softmax", "sigmoid")

    def _logits(self, input: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, onehot)``, both ``(B, C, *spatial)`` (all channels, before ``include_background``)."""
        name = type(self).__name__
        if self.activation not in self._activations or self.other_act is not None:
            need = " or ".join(f"{a}=True" for a in self._activations)
            raise ValueError(
                f"{name} penalises logits: pass {need} with logits as input (got "
                f"activation={self.activation}, other_act={self.other_act is not None})"
            )
        self._check_input(input)
        x = self._as_compute(input)
        y = self._onehot(target, x)  # also checks the values of x (and of a label map)
        return x, y


class NACLPenaltyLoss(_LogitPenalty):
    r"""NACL's neighbour-aware penalty on the logits (Murugesan et al., MICCAI 2023, eq. 4), **without** its CE.

    .. math:: L_{b,c} = \alpha \cdot \frac{1}{N} \sum_i \lVert \tau(y)_{i,c} - z_{i,c} \rVert

    with ``z`` the logits ``(B, C, *spatial)``, ``y`` the one-hot target and ``τ`` a ``k^d`` neighbourhood filter
    (``kernel_ops="mean"``: the box mean; ``"gaussian"``: an erf-discretised Gaussian of width ``sigma``
    truncated at ``4σ``) with zero padding, so ``τ(y)`` holds the class proportions around each voxel; ``‖·‖``
    is ``|·|`` (``distance_type="l1"``) or ``(·)²`` (``"l2"``). The whole NACL objective is the cross-entropy
    plus this term: ``loss_from_string("ce+nacl", softmax=True, to_onehot_y=True)`` equals MONAI's
    ``NACLLoss(classes=C, dim=d)`` for the same ``kernel_size``, ``kernel_ops``, ``distance_type``, ``alpha`` and
    ``sigma`` (values and gradients; ``tests/test_losses_peers.py``).

    Args:
        kernel_size: odd edge ``k`` of the mean filter (default 3). A Gaussian's size is set by ``sigma``
            (``2⌊4σ + ½⌋ + 1`` taps, as MONAI); leave it ``None`` for ``kernel_ops="gaussian"``.
        kernel_ops: ``"mean"`` (default) or ``"gaussian"``.
        distance_type: ``"l1"`` (default) or ``"l2"``.
        alpha: the weight ``α`` of the penalty (default 0.1, MONAI's and the paper's).
        sigma: ``σ`` of the Gaussian filter (default 1).
        **kwargs: :class:`~segcal.losses.base.SegmentationLoss` arguments; ``softmax=True`` or ``sigmoid=True``
            is required (the penalty is defined on logits). ``include_background=False`` drops channel 0's term;
            ``reduction="none"`` returns ``(B, C)``.

    Example:
        >>> loss = NACLPenaltyLoss(softmax=True, to_onehot_y=True)
        >>> logits = torch.randn(2, 3, 16, 16, requires_grad=True)
        >>> loss(logits, torch.randint(0, 3, (2, 1, 16, 16))).backward()
    """

    def __init__(
        self,
        *,
        kernel_size: int | None = None,
        kernel_ops: Literal["mean", "gaussian"] = "mean",
        distance_type: Literal["l1", "l2"] = "l1",
        alpha: float = 0.1,
        sigma: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if kernel_ops not in ("mean", "gaussian"):
            raise ValueError(f"kernel_ops must be 'mean' or 'gaussian', got {kernel_ops!r}")
        if distance_type not in ("l1", "l2"):
            raise ValueError(f"distance_type must be 'l1' or 'l2', got {distance_type!r}")
        if not 0 <= alpha < float("inf"):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        kernel = gaussian_erf_kernel_1d(sigma)  # checks sigma for either kernel
        if kernel_ops == "gaussian":
            if kernel_size is not None and kernel_size != kernel.numel():
                raise ValueError(
                    f"kernel_size={kernel_size!r} with kernel_ops='gaussian': the Gaussian's size is set by sigma "
                    f"({kernel.numel()} taps for sigma={sigma!r}, truncated at 4 sigma); leave kernel_size unset"
                )
        else:
            kernel = mean_kernel(3 if kernel_size is None else kernel_size, 1)  # checks the size; d-D at call
        self.kernel_size = int(kernel.numel())
        self.kernel_ops, self.distance_type = kernel_ops, distance_type
        self.alpha, self.sigma = float(alpha), float(sigma)

    def _kernel(self, ndim: int, device: torch.device) -> torch.Tensor:
        if self.kernel_ops == "gaussian":  # separable, one 1-D pass per axis
            return self._device_constant(
                ("gauss", self.sigma), device, lambda: gaussian_erf_kernel_1d(self.sigma, dtype=torch.float64)
            )
        return self._device_constant(
            ("mean", self.kernel_size, ndim), device, lambda: mean_kernel(self.kernel_size, ndim, dtype=torch.float64)
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``input`` logits ``(B, C, *spatial)``; ``target`` as in :class:`SegmentationLoss`. The filtering runs
        outside autocast, in the compute dtype (float32 for half inputs, float64 kept)."""
        x, y = self._logits(input, target)
        with autocast_off(x.device):
            smoothed = smooth_target(y, self._kernel(x.ndim - 2, x.device), padding="zeros")
            f = neighbour_penalty_terms(x, smoothed, self.distance_type)  # type: ignore[arg-type]
        (f,) = self._select(f)
        return self.alpha * self.reduce(f)

    def extra_repr(self) -> str:
        return (
            f"kernel_ops={self.kernel_ops!r}, kernel_size={self.kernel_size}, distance_type={self.distance_type!r}, "
            f"alpha={self.alpha}, " + super().extra_repr()
        )


class LogitMarginPenaltyLoss(_LogitPenalty):
    r"""MbLS's margin penalty on logit distances (Liu et al., CVPR 2022, eq. 9), **without** its CE.

    .. math:: L_{b,c} = \lambda \cdot \frac{1}{N} \sum_i \max(0, \max_k z_{i,k} - z_{i,c} - m)

    over the logits ``z`` ``(B, C, *spatial)`` of exclusive classes: distances ``d_c = max_k z_k − z_c`` above the
    margin ``m`` are penalised linearly, distances below it are free (label smoothing's ``m = 0`` pushes all
    logits equal). The whole MbLS objective is ``loss_from_string("ce+mbls", softmax=True, to_onehot_y=True)``
    with the paper's defaults ``m = 10``, ``λ = 0.1``. The target only fixes the shape (the penalty does not use
    it); the maximum runs over all channels, ``include_background=False`` drops channel 0's term.

    Args:
        margin: ``m`` (default 10).
        lambda_: ``λ``, the weight of the penalty (default 0.1).
        **kwargs: :class:`~segcal.losses.base.SegmentationLoss` arguments; ``softmax=True`` is required.
    """

    _activations = ("softmax",)

    def __init__(self, *, margin: float = 10.0, lambda_: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 <= margin < float("inf"):
            raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
        if not 0 <= lambda_ < float("inf"):
            raise ValueError(f"lambda_ must be a finite number >= 0, got {lambda_!r}")
        self.margin, self.lambda_ = float(margin), float(lambda_)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``input`` logits ``(B, C, *spatial)``; returns the reduced penalty (``(B, C)`` with ``"none"``)."""
        x, _ = self._logits(input, target)
        (f,) = self._select(logit_margin_terms(x, self.margin))
        return self.lambda_ * self.reduce(f)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, lambda_={self.lambda_}, " + super().extra_repr()
