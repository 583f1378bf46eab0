"""Probability thresholding (DSC++ §2.5): a voxel is foreground of class ``k`` if ``p_k ≥ T``.

:func:`threshold_counts` gives per-case confusion counts for every ``T`` (streamable: concatenate the
counts of
several volumes along the case axis), :func:`threshold_curves` turns them into recall / precision / Dice
curves
(mean over cases) with a seeded case-bootstrap 95% CI, and :func:`pick_threshold` chooses an operating point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from segcal.functional.inputs import Activation, Mode, as_tensor, check_mode
from segcal.functional.overlap import (
    confusion_counts,
    dice_from_counts,
    precision_from_counts,
    recall_from_counts,
)

__all__ = ["default_thresholds", "pick_threshold", "threshold_counts", "threshold_curves", "threshold_sweep"]


def default_thresholds(step: float = 0.05) -> torch.Tensor:
    """``T`` in ``[0.05, 0.95]`` with the given step (19 values by default), float64."""
    n = round(0.9 / step) + 1
    return torch.linspace(0.05, 0.95, n, dtype=torch.float64, device="cpu")


def _threshold_values(thresholds: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    """The thresholds as host float64 values (:func:`default_thresholds` when ``None``)."""
    return default_thresholds() if thresholds is None else as_tensor(thresholds, "cpu").to(torch.float64)


def threshold_counts(
    probs: torch.Tensor,
    target: torch.Tensor,
    class_index: int,
    thresholds: Sequence[float] | torch.Tensor | None = None,
    *,
    activation: Activation = None,
    mode: Mode = "exclusive",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Confusion counts ``(B, T, 3)`` (tp, fp, fn) of class ``class_index`` for ``p_k ≥ T``, per case.

    Uses :func:`segcal.functional.overlap.confusion_counts` with ``threshold=T``.
    """
    mode = check_mode(mode)
    ts = _threshold_values(thresholds)
    if ts.ndim != 1 or ts.numel() == 0 or bool(((ts <= 0) | (ts >= 1)).any()):
        raise ValueError("thresholds must be a non-empty 1-D sequence of values in (0, 1)")
    c = probs.shape[1] if probs.ndim >= 2 else 0
    if not 0 <= class_index < c:
        raise ValueError(f"class_index {class_index} is outside [0, {c - 1}] for {c} channels")
    per_t = [
        confusion_counts(
            probs, target, activation=activation, mode=mode, mask=mask, threshold=float(t), check=(i == 0)
        )[:, class_index]
        for i, t in enumerate(ts)
    ]
    return torch.stack(per_t, dim=1)


def threshold_curves(
    counts: torch.Tensor,
    thresholds: Sequence[float] | torch.Tensor | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Recall, precision and Dice per threshold (mean over cases) with bootstrap CIs.

    Args:
        counts: ``(B, T, 3)`` from :func:`threshold_counts`.
    Returns:
        ``{"threshold": (T,), "recall"|"precision"|"dice": (T,), "<metric>_lo"/"<metric>_hi": (T,)}`` float64;
        the interval is the percentile interval of ``n_bootstrap`` case resamples (seeded).
    """
    if counts.ndim != 3 or counts.shape[-1] != 3:
        raise ValueError(f"counts must have shape (B, T, 3), got {tuple(counts.shape)}")
    b, nt, _ = counts.shape
    counts = counts.detach().cpu()  # the curves are summaries: computed and returned on the host
    ts = _threshold_values(thresholds)
    if ts.numel() != nt:
        raise ValueError(f"{ts.numel()} thresholds given for counts with {nt} thresholds")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, b, (n_bootstrap, b), generator=gen, device="cpu")
    alpha = (1 - confidence) / 2
    out: dict[str, torch.Tensor] = {"threshold": ts}
    for name, fn in (
        ("recall", recall_from_counts),
        ("precision", precision_from_counts),
        ("dice", dice_from_counts),
    ):
        per_case = fn(counts.to(torch.float64))  # (B, T)
        out[name] = per_case.mean(0)
        boot = per_case[idx].mean(1)  # (n_bootstrap, T)
        q = torch.quantile(boot, torch.tensor([alpha, 1 - alpha], dtype=torch.float64, device="cpu"), dim=0)
        out[f"{name}_lo"], out[f"{name}_hi"] = q[0], q[1]
    return out


def threshold_sweep(
    probs: torch.Tensor,
    target: torch.Tensor,
    class_index: int,
    thresholds: Sequence[float] | torch.Tensor | None = None,
    *,
    activation: Activation = None,
    mode: Mode = "exclusive",
    mask: torch.Tensor | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """:func:`threshold_counts` followed by :func:`threshold_curves`."""
    ts = _threshold_values(thresholds)
    counts = threshold_counts(probs, target, class_index, ts, activation=activation, mode=mode, mask=mask)
    return threshold_curves(counts, ts, n_bootstrap, confidence, seed)


def pick_threshold(
    curves: dict[str, torch.Tensor], min_recall: float | None = None, min_precision: float | None = None
) -> float:
    """Operating point from :func:`threshold_curves`.

    ``min_recall``: the largest ``T`` whose mean recall reaches it (the most precise such point);
    ``min_precision``: the smallest ``T`` whose mean precision reaches it (the most sensitive such point).
    With neither, the ``T`` of maximal mean Dice. Raises ``ValueError`` when no ``T`` meets the request.
    """
    ts = curves["threshold"]
    if min_recall is not None and min_precision is not None:
        raise ValueError("give min_recall or min_precision, not both")
    if min_recall is not None:
        ok = torch.nonzero(curves["recall"] >= min_recall).flatten()
        if ok.numel() == 0:
            raise ValueError(
                f"no threshold reaches recall {min_recall} (max {float(curves['recall'].max()):.3f})"
            )
        return float(ts[ok.max()])
    if min_precision is not None:
        ok = torch.nonzero(curves["precision"] >= min_precision).flatten()
        if ok.numel() == 0:
            raise ValueError(
                f"no threshold reaches precision {min_precision} (max {float(curves['precision'].max()):.3f})"
            )
        return float(ts[ok.min()])
    return float(ts[int(torch.argmax(curves["dice"]))])
