"""Uncertainty maps, segment-level uncertainty, correlation with quality, OOD scores and failure flags.

Segment entropy and its correlation with ``logit(Dice)`` follow Mehrtash et al., IEEE TMI 2020 (eq. 7, Fig. 3);
the mutual information of MC-dropout or ensemble samples is BALD (Houlsby et al. 2011; Gal & Ghahramani, ICML
2016), with MC dropout as in Rousseau et al., ISBI 2021 (§2.2). Full citations in docs/references.md.

All entropies use the natural logarithm; probabilities are clipped into ``[EPS, 1 − EPS]`` first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scipy import stats

from segcal.functional.calibration import EPS
from segcal.functional.inputs import Mode, check_mode, check_probabilities
from segcal.functional.overlap import hard_prediction

__all__ = [
    "auroc",
    "binary_entropy",
    "choose_threshold",
    "entropy_map",
    "flag_failures",
    "mutual_information",
    "ood_score",
    "pearson_logit_dice",
    "pearsonr",
    "segment_mean_entropy",
]


def binary_entropy(p: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Element-wise binary entropy ``−p ln p − (1 − p) ln(1 − p)`` (same shape as ``p``)."""
    q = p.clamp(eps, 1 - eps)
    return -(q * q.log() + (1 - q) * (1 - q).log())


def entropy_map(probs: torch.Tensor, mode: Mode = "exclusive", eps: float = EPS) -> torch.Tensor:
    """Voxel entropy of probabilities ``(B, C, *spatial)``.

    Exclusive: ``−Σ_c p_c ln p_c`` → ``(B, 1, *spatial)`` (a single channel is taken as ``p(foreground)``,
    binary entropy). Multilabel: per-channel binary entropy → ``(B, C, *spatial)``.
    """
    mode = check_mode(mode)
    if mode == "multilabel" or probs.shape[1] == 1:
        return binary_entropy(probs, eps)
    q = probs.clamp(eps, 1.0)
    return -(probs * q.log()).sum(1, keepdim=True)


def mutual_information(
    mean_probs: torch.Tensor, mean_entropy: torch.Tensor, mode: Mode = "exclusive"
) -> torch.Tensor:
    """BALD mutual information ``H(E[p]) − E[H(p)]`` from the mean probability over samples and the mean of
    the per-sample entropies (:func:`entropy_map`); clamped at 0 against round-off."""
    return (entropy_map(mean_probs, mode) - mean_entropy).clamp_min(0)


def segment_mean_entropy(
    probs: torch.Tensor,
    mode: Mode = "exclusive",
    include_background: bool = False,
    threshold: float | None = None,
    eps: float = EPS,
) -> torch.Tensor:
    """Mean binary entropy of ``p_k`` inside the predicted segment ``Ŝ_k``, ``(B, C')`` float64 (Ensembles eq. 7).

    ``Ŝ_k`` is ``argmax == k`` (exclusive) or ``p_k ≥ threshold`` (multilabel, default 0.5). NaN where the
    predicted segment is empty. The background channel is dropped unless ``include_background`` (exclusive).
    """
    mode = check_mode(mode)
    hard = hard_prediction(probs, mode, threshold).to(torch.float64)
    h = binary_entropy(probs.to(torch.float64), eps)
    dims = tuple(range(2, probs.ndim))
    num = (h * hard).sum(dims)
    den = hard.sum(dims)
    out = torch.where(den > 0, num / den.clamp_min(1), torch.nan)
    if mode == "exclusive" and not include_background and probs.shape[1] > 1:
        out = out[:, 1:]
    return out


def pearsonr(
    x: Sequence[float] | torch.Tensor | np.ndarray, y: Sequence[float] | torch.Tensor | np.ndarray
) -> tuple[float, float]:
    """Pearson correlation ``r`` and two-sided p-value (t-test with ``n − 2`` degrees of freedom)."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"x and y must have the same length, got {a.size} and {b.size}")
    if a.size < 3:
        raise ValueError(f"Pearson correlation needs at least 3 cases, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("x and y must be finite (drop cases with empty segments first)")
    da, db = a - a.mean(), b - b.mean()
    den = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    if den == 0:
        raise ValueError("Pearson correlation is undefined for a constant input")
    r = float(np.clip((da * db).sum() / den, -1.0, 1.0))
    n = a.size
    if abs(r) == 1.0:
        return r, 0.0
    t = r * math.sqrt((n - 2) / (1 - r * r))
    return r, float(2 * stats.t.sf(abs(t), n - 2))


def pearson_logit_dice(
    uncertainty: Sequence[float] | torch.Tensor, dice: Sequence[float] | torch.Tensor, eps: float = 1e-3
) -> tuple[float, float]:
    """Pearson ``(r, p)`` between per-case uncertainty and ``logit(Dice)``, Dice clipped into [eps, 1 − eps].

    As in Mehrtash et al., IEEE TMI 2020, Fig. 3 (docs/references.md). Cases with a NaN uncertainty (empty
    predicted segment) are dropped."""
    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    d = np.clip(np.asarray(dice, dtype=np.float64).ravel(), eps, 1 - eps)
    if u.shape != d.shape:
        raise ValueError(f"uncertainty and dice must have the same length, got {u.size} and {d.size}")
    keep = np.isfinite(u) & np.isfinite(d)
    return pearsonr(u[keep], np.log(d[keep] / (1 - d[keep])))


def ood_score(
    probs: torch.Tensor,
    kind: Literal["segment_entropy", "max_probability", "mean_entropy"] = "segment_entropy",
    mode: Mode = "exclusive",
) -> torch.Tensor:
    """Per-case OOD / failure score ``(B,)`` float64 — higher means more anomalous.

    * ``"segment_entropy"``: mean over foreground classes of :func:`segment_mean_entropy` (empty segments
      skipped; a case with no predicted foreground scores the maximum ``ln 2``);
    * ``"max_probability"``: ``1 − mean_voxels max_c p_c``;
    * ``"mean_entropy"``: mean voxel entropy (:func:`entropy_map`).
    """
    mode = check_mode(mode)
    check_probabilities(probs, mode, "probs")
    dims = tuple(range(1, probs.ndim))
    if kind == "segment_entropy":
        s = segment_mean_entropy(probs, mode)
        finite = torch.isfinite(s)
        num = torch.where(finite, s, torch.zeros_like(s)).sum(1)
        den = finite.sum(1)
        return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.log(2)))
    if kind == "max_probability":
        conf = probs.max(1).values if mode == "exclusive" else torch.maximum(probs, 1 - probs)
        return 1 - conf.to(torch.float64).flatten(1).mean(1)
    if kind == "mean_entropy":
        return entropy_map(probs, mode).to(torch.float64).mean(dims)
    raise ValueError(f"kind must be 'segment_entropy', 'max_probability' or 'mean_entropy', got {kind!r}")


def auroc(
    scores_positive: Sequence[float] | torch.Tensor, scores_negative: Sequence[float] | torch.Tensor
) -> float:
    """Area under the ROC curve for "positive scores higher", exactly, via the Mann–Whitney U statistic.

    ``AUROC = (R⁺ − n⁺(n⁺ + 1)/2) / (n⁺ n⁻)`` with ``R⁺`` the sum of mid-ranks of the positives in the pooled
    sample (ties count one half).
    """
    pos = np.asarray(scores_positive, dtype=np.float64).ravel()
    neg = np.asarray(scores_negative, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("auroc scores must be finite")
    ranks = stats.rankdata(np.concatenate([pos, neg]), method="average")
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def choose_threshold(
    scores: Sequence[float] | torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    criterion: Literal["youden", "sensitivity"] = "youden",
    target_sensitivity: float = 0.95,
) -> float:
    """Score threshold flagging ``score ≥ t`` as positive (failure / OOD), chosen on validation data.

    ``"youden"`` maximises ``J = sensitivity + specificity − 1``; ``"sensitivity"`` takes the largest threshold
    whose sensitivity reaches ``target_sensitivity``. Candidates are the observed scores.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.size} and {y.size}")
    if y.all() or not y.any():
        raise ValueError("choose_threshold needs both positive and negative validation cases")
    cand = np.unique(s)
    flagged = s[None, :] >= cand[:, None]  # (T, N)
    sens = (flagged & y).sum(1) / y.sum()
    spec = (~flagged & ~y).sum(1) / (~y).sum()
    if criterion == "youden":
        return float(cand[int(np.argmax(sens + spec - 1))])
    if criterion == "sensitivity":
        if not 0 < target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity must lie in (0, 1], got {target_sensitivity}")
        ok = np.nonzero(sens >= target_sensitivity)[0]
        return float(cand[ok.max()])
    raise ValueError(f"criterion must be 'youden' or 'sensitivity', got {criterion!r}")


def flag_failures(scores: Sequence[float] | torch.Tensor, threshold: float) -> np.ndarray:
    """Boolean flags ``score ≥ threshold`` (likely failure / OOD), one per case."""
    return np.asarray(scores, dtype=np.float64).ravel() >= threshold
