"""Quality figures from per-case or per-method arrays (paper short names: docs/references.md).

* :func:`quality_scatter` — Dice vs a calibration error with the Pareto front (PostHoc Fig. 1).
* :func:`entropy_dice_scatter` — segment entropy vs logit(Dice) with a regression line and Pearson r, p
  (Ensembles Fig. 3).
* :func:`ensemble_size_curve` — a metric vs the number of ensemble members with its CI (Ensembles Fig. 2).
* :func:`threshold_curves` — metrics vs the softmax threshold with their CIs (DSC++ Fig. 5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy import stats as sps

from segcal.plots._common import legend_outside, new_figure, series_style, short_label
from segcal.plots.reliability import format_metric

__all__ = [
    "ensemble_size_curve",
    "entropy_dice_scatter",
    "pareto_front",
    "quality_scatter",
    "threshold_curves",
]


def _vec(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def pareto_front(cost: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points (lower ``cost`` and higher ``gain`` are better), by cost.

    A point is dominated if another point is at least as good in both and strictly better in one. NaN points
    are never on the front.
    """
    cost, gain = _vec(cost, "cost"), _vec(gain, "gain")
    if cost.shape != gain.shape:
        raise ValueError(f"cost and gain must have the same length, got {cost.shape} and {gain.shape}")
    ok = np.isfinite(cost) & np.isfinite(gain)
    idx = np.flatnonzero(ok)
    c, g = cost[idx][:, None], gain[idx][:, None]
    dominated = ((c.T <= c) & (g.T >= g) & ((c.T < c) | (g.T > g))).any(axis=1)
    front = idx[~dominated]
    return front[np.argsort(cost[front], kind="stable")]


def quality_scatter(
    dice: Sequence[object] | np.ndarray,
    calibration: Sequence[object] | np.ndarray,
    labels: Sequence[str],
    pareto: bool = True,
    *,
    calibration_name: str = "ACE",
    dice_name: str = "Dice",
    title: str | None = None,
) -> Figure:
    """Dice (y) vs calibration error (x) for several series (methods, runs or classes).

    ``dice[i]`` and ``calibration[i]`` are the values of series ``labels[i]``: a scalar (one point per method,
    as in PostHoc Fig. 1) or a 1-D array of per-case values (drawn as small points with the series mean as a
    large marker). With ``pareto=True`` the Pareto front of the series means (low calibration error, high
    Dice) is drawn as a step line and its members are listed in the legend. Each series has its own colour and
    marker (:func:`~segcal.plots._common.series_style`: 20 colours, 7 markers); the legend sits outside the
    data area.
    """
    if not (len(dice) == len(calibration) == len(labels)) or len(labels) == 0:
        raise ValueError("dice, calibration and labels must have the same, non-zero length (one per series)")
    fig = new_figure(5.2 + 1.6 * (1 + len(labels) // 24), 4.2)
    ax = fig.add_subplot()
    means_x, means_y = [], []
    for i, (d, cal, lab) in enumerate(zip(dice, calibration, labels, strict=True)):
        d, cal = _vec(d, f"dice[{i}]"), _vec(cal, f"calibration[{i}]")
        if d.shape != cal.shape:
            raise ValueError(f"series {lab!r}: dice has {d.size} values, calibration {cal.size}")
        ok = np.isfinite(d) & np.isfinite(cal)
        mx = float(np.mean(cal[ok])) if ok.any() else np.nan
        my = float(np.mean(d[ok])) if ok.any() else np.nan
        means_x.append(mx)
        means_y.append(my)
        style = series_style(i)
        if d.size > 1:
            ax.scatter(cal[ok], d[ok], s=12, alpha=0.35, lw=0, **style)
            ax.scatter([mx], [my], s=80, edgecolor="k", lw=0.8, label=short_label(lab), zorder=3, **style)
        else:
            ax.scatter(cal[ok], d[ok], s=60, edgecolor="k", lw=0.8, label=short_label(lab), zorder=3, **style)
    if pareto and len(labels) > 1:
        front = pareto_front(np.array(means_x), np.array(means_y))
        if front.size:
            ax.step(
                np.array(means_x)[front],
                np.array(means_y)[front],
                where="post",
                color="k",
                lw=1,
                ls="--",
                label=(
                    "Pareto front: " + ", ".join(short_label(labels[j], 16) for j in front)
                    if front.size <= 4 else f"Pareto front ({front.size} series)"
                ),
                zorder=2,
            )
    ax.set_xlabel(f"{calibration_name} (lower is better)")
    ax.set_ylabel(f"{dice_name} (higher is better)")
    if title:
        ax.set_title(title, fontsize=10)
    legend_outside(ax, ncols=1 + len(labels) // 24)
    ax.grid(alpha=0.3)
    return fig


def _subject_means(x: np.ndarray, y: np.ndarray, subjects: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per subject (sorted), the means of its points' finite ``x`` and ``y``."""
    s = np.asarray([str(v) for v in subjects])
    names = sorted(set(s.tolist()))
    with np.errstate(all="ignore"):
        mx = np.array([np.nanmean(np.where(np.isfinite(x[s == n]), x[s == n], np.nan)) for n in names])
        my = np.array([np.nanmean(np.where(np.isfinite(y[s == n]), y[s == n], np.nan)) for n in names])
    return mx, my


def entropy_dice_scatter(
    segment_entropy: Sequence[float] | np.ndarray,
    dice: Sequence[float] | np.ndarray,
    groups: Sequence[str] | None = None,
    *,
    subjects: Sequence[str] | None = None,
    unit: str = "cases",
    eps: float = 1e-4,
    title: str | None = None,
) -> Figure:
    """Segment entropy (x) vs logit(Dice) (y) with a least-squares line and Pearson r, p (Ensembles Fig. 3).

    ``logit(d) = ln(d / (1 − d))`` with Dice clipped into ``[eps, 1 − eps]`` (perfect or empty segmentations
    stay finite). ``groups`` (one label per point, e.g. "in-distribution" / "shifted") colours the points; the
    regression and the correlation (:func:`scipy.stats.pearsonr`, :func:`scipy.stats.linregress`) use all
    points, each point one ``unit`` (the legend says ``r = …, p = … (n = 48 cases)``).

    ``subjects`` (one subject id per point, e.g. the slices' subjects): points of one subject are not
    independent, so the regression, r and p are computed over the **subject means** of entropy and
    logit(Dice), drawn as large markers, and the legend states ``n`` subjects; the points stay as small dots.
    """
    x, d = _vec(segment_entropy, "segment_entropy"), _vec(dice, "dice")
    if x.shape != d.shape:
        raise ValueError(f"segment_entropy has {x.size} values but dice has {d.size}")
    if groups is not None and len(groups) != x.size:
        raise ValueError(f"groups has {len(groups)} labels but there are {x.size} points")
    if subjects is not None and len(subjects) != x.size:
        raise ValueError(f"subjects has {len(subjects)} ids but there are {x.size} points")
    dc = np.clip(d, eps, 1 - eps)
    y = np.log(dc / (1 - dc))
    ok = np.isfinite(x) & np.isfinite(y)
    fig = new_figure(6.2, 4.0)
    ax = fig.add_subplot()
    small = subjects is not None
    if groups is None:
        ax.scatter(x[ok], y[ok], s=8 if small else 14, alpha=0.4 if small else 0.7, label=unit)
    else:
        g = np.asarray([str(v) for v in groups])
        for i, name in enumerate(dict.fromkeys(g[ok])):
            sel = ok & (g == name)
            ax.scatter(x[sel], y[sel], s=8 if small else 14, alpha=0.4 if small else 0.7, label=name,
                       **series_style(i))
    fx, fy, n_unit = x[ok], y[ok], unit
    if subjects is not None:
        fx, fy = _subject_means(x, y, subjects)
        keep = np.isfinite(fx) & np.isfinite(fy)
        fx, fy, n_unit = fx[keep], fy[keep], "subjects"
        ax.scatter(fx, fy, s=70, color="k", marker="D", label="subject means", zorder=3)
    if fx.size >= 3 and np.ptp(fx) > 0:
        reg = sps.linregress(fx, fy)
        r, p = sps.pearsonr(fx, fy)
        xs = np.linspace(fx.min(), fx.max(), 50)
        label = f"r = {float(r):.3f}, p = {float(p):.2e} (n = {fx.size} {n_unit})"
        ax.plot(xs, reg.intercept + reg.slope * xs, color="k", lw=1.2, label=label)
    ax.set_xlabel("segment entropy")
    ax.set_ylabel("logit(Dice)")
    if title:
        ax.set_title(title, fontsize=10)
    legend_outside(ax)
    ax.grid(alpha=0.3)
    return fig


def _band(ax: Axes, x: np.ndarray, mean: object, lo: object, hi: object, label: str, color: str) -> None:
    m, l_, h = _vec(mean, "mean"), _vec(lo, "ci_low"), _vec(hi, "ci_high")
    if not (x.shape == m.shape == l_.shape == h.shape):
        raise ValueError(f"{label}: x, mean, ci_low and ci_high must have the same length")
    ax.plot(x, m, "o-", ms=3, color=color, label=label)
    ax.fill_between(x, l_, h, color=color, alpha=0.2, lw=0)


def ensemble_size_curve(
    sizes: Sequence[int] | np.ndarray,
    mean: Sequence[float] | np.ndarray,
    ci_low: Sequence[float] | np.ndarray,
    ci_high: Sequence[float] | np.ndarray,
    metric_name: str,
    *,
    label: str | None = None,
    more: Mapping[str, tuple[object, object, object]] | None = None,
    title: str | None = None,
) -> Figure:
    """A metric vs the ensemble size with its confidence band (Ensembles Fig. 2).

    ``more`` adds further named curves ``{name: (mean, ci_low, ci_high)}`` on the same sizes (e.g. MC dropout
    samples next to ensemble members).
    """
    x = _vec(sizes, "sizes")
    fig = new_figure(6.0, 3.6)
    ax = fig.add_subplot()
    _band(ax, x, mean, ci_low, ci_high, label or metric_name, "C0")
    for i, (name, triple) in enumerate((more or {}).items(), start=1):
        if len(triple) != 3:
            raise ValueError(f"curve {name!r} must be (mean, ci_low, ci_high)")
        _band(ax, x, *triple, str(name), f"C{i % 10}")
    ax.set_xlabel("number of ensemble members")
    ax.set_ylabel(metric_name)
    ax.set_xticks(x)
    if title:
        ax.set_title(title, fontsize=10)
    legend_outside(ax)
    ax.grid(alpha=0.3)
    return fig


def threshold_curves(
    thresholds: Sequence[float] | np.ndarray,
    curves: Mapping[str, tuple[object, object, object]],
    *,
    ylabel: str = "Dice",
    mark_best: bool = True,
    higher_is_better: bool = True,
    title: str | None = None,
) -> Figure:
    """Metric vs probability threshold per method, ``curves[name] = (mean, ci_low, ci_high)`` (DSC++ Fig. 5).

    With ``mark_best`` the best threshold of each curve is marked and named in the legend.
    """
    x = _vec(thresholds, "thresholds")
    if not curves:
        raise ValueError("curves must contain at least one named curve")
    fig = new_figure(7.0, 3.8)
    ax = fig.add_subplot()
    for i, (name, triple) in enumerate(curves.items()):
        if len(triple) != 3:
            raise ValueError(f"curve {name!r} must be (mean, ci_low, ci_high)")
        mean, lo, hi = triple
        label = str(name)
        m = _vec(mean, "mean")
        if mark_best and np.isfinite(m).any():
            j = int(np.nanargmax(m) if higher_is_better else np.nanargmin(m))
            label = f"{name} (best t = {x[j]:.2f}: {format_metric(m[j])})"
            ax.plot([x[j]], [m[j]], "*", ms=10, color=f"C{i % 10}", mec="k", mew=0.5)
        _band(ax, x, mean, lo, hi, label, f"C{i % 10}")
    ax.set_xlabel("probability threshold")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    legend_outside(ax)
    ax.grid(alpha=0.3)
    return fig
