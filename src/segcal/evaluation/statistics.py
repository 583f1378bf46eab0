"""Dataset statistics: summaries with bootstrap CI, paired / unpaired tests, effect sizes, Holm correction.

Methods (full citations in docs/references.md, section Statistics): percentile bootstrap (Efron 1979),
Wilcoxon signed-rank test (Wilcoxon 1945), rank-sum / Mann–Whitney U test (Mann & Whitney 1947),
matched-pairs rank-biserial correlation (Kerby 2014), Cliff's delta (Cliff 1993), paired Cohen's d
(Cohen 1988), Holm's step-down correction (Holm 1979).

NaN values (undefined per-case metrics, e.g. HD95 with one empty mask) are dropped (pairwise for paired
statistics) and their number is reported, never replaced by a number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

__all__ = [
    "bootstrap_ci",
    "cliffs_delta",
    "cohens_d_paired",
    "holm",
    "paired_bootstrap_ci",
    "rank_biserial_paired",
    "rank_sum_test",
    "relative_change",
    "summarize",
    "wilcoxon_signed_rank",
]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: Callable[..., np.ndarray] = np.mean,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` (vectorised: one ``(n_resamples, n)`` index draw, seeded).

    Returns ``(nan, nan)`` for fewer than 2 finite values.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    boot = statistic(x[idx], axis=1)
    a = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return float(lo), float(hi)


def relative_change(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """``(mean(b) − mean(a)) / |mean(a)|`` along ``axis`` (NaN where ``mean(a)`` is 0)."""
    ma, mb = np.mean(a, axis=axis), np.mean(b, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ma != 0, (mb - ma) / np.abs(ma), np.nan)


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray] = relative_change,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(a, b)`` over resampled **pairs** (the pairs with both values
    finite; one seeded ``(n_resamples, n)`` index draw; ``statistic`` reduces along the last axis).

    Default statistic: the relative change of the mean, ``(mean(b) − mean(a)) / |mean(a)|``. Returns
    ``(nan, nan)`` for fewer than 2 pairs or when a resample's statistic is not finite.
    """
    x, y = _paired(a, b)
    if x.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    boot = np.asarray(statistic(x[idx], y[idx]), dtype=np.float64)
    if not np.isfinite(boot).all():
        return float("nan"), float("nan")
    q = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [q, 1 - q])
    return float(lo), float(hi)


def summarize(
    values: Sequence[float] | np.ndarray, *, n_resamples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """mean, std (ddof=1), median, q1, q3, iqr, bootstrap 95% CI of the mean, n (finite) and n_nan."""
    x = np.asarray(values, dtype=np.float64)
    fin = x[np.isfinite(x)]
    out: dict[str, float] = {"n": int(fin.size), "n_nan": int(x.size - fin.size)}
    if fin.size == 0:
        nan = float("nan")
        out.update(mean=nan, std=nan, median=nan, q1=nan, q3=nan, iqr=nan, ci_low=nan, ci_high=nan)
        return out
    q1, med, q3 = np.quantile(fin, [0.25, 0.5, 0.75])
    lo, hi = bootstrap_ci(fin, n_resamples=n_resamples, seed=seed)
    out.update(
        mean=float(fin.mean()),
        std=float(fin.std(ddof=1)) if fin.size > 1 else float("nan"),
        median=float(med),
        q1=float(q1),
        q3=float(q3),
        iqr=float(q3 - q1),
        ci_low=lo,
        ci_high=hi,
    )
    return out


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal lengths, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def wilcoxon_signed_rank(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test on paired samples (NaN: < 2 pairs, all equal)."""
    x, y = _paired(a, b)
    if x.size < 2 or np.all(x == y):
        return float("nan")
    return float(stats.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue)


def rank_sum_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the Wilcoxon rank-sum (Mann-Whitney U) test on independent samples."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if x.size < 1 or y.size < 1:
        return float("nan")
    return float(stats.mannwhitneyu(x, y, alternative="two-sided").pvalue)


def rank_biserial_paired(a: Sequence[float], b: Sequence[float]) -> float:
    """Matched-pairs rank-biserial correlation: ``(R+ − R−) / (R+ + R−)`` over ranks of ``|a − b|``
    (zeros dropped).

    Positive when ``a`` tends to exceed ``b``; in [−1, 1].
    """
    x, y = _paired(a, b)
    d = x - y
    d = d[d != 0]
    if d.size == 0:
        return float("nan")
    r = stats.rankdata(np.abs(d))
    return float((r[d > 0].sum() - r[d < 0].sum()) / r.sum())


def cliffs_delta(a: Sequence[float], b: Sequence[float]) -> float:
    """Cliff's delta ``P(a > b) − P(a < b)`` over all pairs of two independent samples."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if x.size == 0 or y.size == 0:
        return float("nan")
    diff = np.sign(x[:, None] - y[None, :])
    return float(diff.mean())


def cohens_d_paired(a: Sequence[float], b: Sequence[float]) -> float:
    """Paired Cohen's d (d_z): mean of ``a − b`` over its standard deviation (ddof=1)."""
    x, y = _paired(a, b)
    d = x - y
    if d.size < 2:
        return float("nan")
    sd = d.std(ddof=1)
    if sd == 0:
        return 0.0 if d.mean() == 0 else float(np.sign(d.mean()) * np.inf)
    return float(d.mean() / sd)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaN entries stay NaN.

    With ``m`` valid p-values sorted ascending ``p_(1) <= ... <= p_(m)``:
    ``p̃_(i) = max_{j <= i} min(1, (m − j + 1) p_(j))``.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adj)
    return out
