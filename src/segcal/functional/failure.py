"""Failure detection from case-level uncertainty scores: the area under the risk-coverage curve (AURC) and its
excess over the optimal ranking (E-AURC).

A failure detector ranks the cases by an uncertainty score ``u`` (e.g. the mean voxel entropy, or one minus the
mean top-label confidence); accepting the ``k`` most certain cases leaves the selective risk
``r̂(k) = (1/k) Σ_{i among them} risk_i`` with the case risk, e.g. ``1 − Dice`` (Jaeger et al., ICLR 2023;
Kahl et al. (ValUES), ICLR 2024; docs/references.md). Following Geifman et al. (ICLR 2019):

    AURC = (1/N) Σ_{k=1}^{N} r̂(k),      E-AURC = AURC − AURC*,

``AURC*`` being the AURC of the ranking by the risk itself (the best any score can do). Cases whose scores tie
are ranked in every order with equal weight: within a tie group of ``m`` cases with mean risk ``ρ``, the first
``j`` of them add ``j ρ`` to the risk sum, so the value does not depend on the input order. Lower is better for
both; ``E-AURC >= 0`` and it is 0 for a score that orders the cases as their risk does. Cases with a NaN score or
risk are left out (``n`` says how many were used).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["aurc", "excess_aurc", "failure_detection"]


def _pairs(uncertainty: Sequence[float] | np.ndarray, risk: Sequence[float] | np.ndarray) -> tuple[np.ndarray, ...]:
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    if u.shape != r.shape:
        raise ValueError(f"uncertainty and risk must have one value per case, got {u.size} and {r.size}")
    keep = np.isfinite(u) & np.isfinite(r)
    return u[keep], r[keep]


def aurc(uncertainty: Sequence[float] | np.ndarray, risk: Sequence[float] | np.ndarray) -> float:
    """AURC of the ranking of cases by ``uncertainty`` (ascending = accepted first) against their ``risk``
    (module docstring); NaN without any case."""
    u, r = _pairs(uncertainty, risk)
    n = u.size
    if n == 0:
        return float("nan")
    order = np.argsort(u, kind="stable")
    u, r = u[order], r[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], n]
    total, before = 0.0, 0.0
    for s, e in zip(starts, ends, strict=True):
        m = e - s
        rho = r[s:e].mean()
        j = np.arange(1, m + 1)
        total += float(((before + j * rho) / (s + j)).sum())
        before += float(r[s:e].sum())
    return total / n


def excess_aurc(uncertainty: Sequence[float] | np.ndarray, risk: Sequence[float] | np.ndarray) -> float:
    """E-AURC = AURC − AURC of the ranking by the risk itself (module docstring); NaN without any case."""
    u, r = _pairs(uncertainty, risk)
    return aurc(u, r) - aurc(r, r)


def failure_detection(
    scores: dict[str, Sequence[float] | np.ndarray], risk: Sequence[float] | np.ndarray
) -> dict[str, dict[str, float]]:
    """``{score name: {"aurc", "e_aurc", "n"}}`` for several uncertainty scores against the same case risks."""
    out = {}
    for name, u in scores.items():
        uu, rr = _pairs(u, risk)
        out[name] = {"aurc": aurc(uu, rr), "e_aurc": excess_aurc(uu, rr), "n": int(uu.size)}
    return out
