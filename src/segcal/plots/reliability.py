"""Reliability figures drawn from bin statistics only (paper short names: docs/references.md).

* :func:`reliability_diagram` — one image, one class: observed frequency per bin, gap bars to the expected
  frequency, bin counts, ECE/ACE/MCE in the legend (ACE-MICCAI Fig. 1, Ensembles Fig. 4).
* :func:`dataset_reliability_histogram` — ACE-MICCAI Fig. 2: a joint histogram of per-image observed
  frequencies per predicted-probability bin, one panel per class plus an all-classes panel.
* :func:`dataset_reliability_comparison` — the same for two or more runs, side by side or as a difference.
* :func:`subject_spread` — the spread of per-bin accuracy across subjects (PostHoc Fig. 3).

Every number comes from :meth:`BinStats.mean_p`, :meth:`BinStats.mean_y` and
:func:`segcal.functional.calibration.calibration_errors`; y-axis bins use
:func:`segcal.functional.binning.bin_index`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter

from segcal.functional.binning import BinStats, Closed, bin_index
from segcal.functional.calibration import calibration_errors
from segcal.plots._common import as_binstats, legend_outside, new_figure, select, short_label

__all__ = [
    "dataset_histogram_counts",
    "dataset_reliability_comparison",
    "dataset_reliability_histogram",
    "format_metric",
    "per_bin_observed",
    "reliability_diagram",
    "reliability_diagrams",
    "subject_spread",
]


def format_metric(value: float) -> str:
    """The one number format used in legends and tables (4 decimals, 'n/a' for NaN)."""
    return "n/a" if not np.isfinite(value) else f"{value:.4f}"


def _class_names(names: Sequence[str] | None, c: int) -> list[str]:
    if names is None:
        return [f"class {i}" for i in range(c)]
    names = [str(n) for n in names]
    if len(names) != c:
        raise ValueError(f"class_names has {len(names)} names but the statistics have {c} channels")
    return names


# ----------------------------------------------------------------------------------------------------
# per-image reliability diagram
# ----------------------------------------------------------------------------------------------------


def _draw_reliability(
    ax: Axes, ax_count: Axes | None, one: BinStats, min_count: int, title: str | None
) -> dict[str, float]:
    """Draw one image/channel (``one`` is ``(1, 1, M)``); returns the legend metrics."""
    m = one.num_bins
    count = one.count[0, 0].numpy()
    e = one.mean_p()[0, 0].numpy()
    o = one.mean_y()[0, 0].numpy()
    shown = count >= max(1, min_count)
    errs = {k: float(v[0, 0]) for k, v in calibration_errors(one, min_count=min_count).items()}
    width = 1.0 / m
    left = np.arange(m) / m
    centres = left + width / 2
    ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect calibration")
    ax.bar(
        left[shown],
        o[shown],
        width=width,
        align="edge",
        color="#4c72b0",
        edgecolor="white",
        lw=0.5,
        label="observed frequency",
    )
    gap_bottom = np.minimum(o, e)[shown]
    gap_height = np.abs(o - e)[shown]
    ax.bar(
        left[shown],
        gap_height,
        bottom=gap_bottom,
        width=width,
        align="edge",
        color="#dd8452",
        alpha=0.55,
        edgecolor="#c44e52",
        hatch="//",
        lw=0.5,
        label="gap |o − e|",
    )
    ax.plot(centres[shown], e[shown], "o", ms=3, color="#c44e52", label="mean predicted p")
    # metric lines: invisible artists whose labels carry the values, so the legend shows them
    for key, name in (("ece", "ECE"), ("ace", "ACE"), ("mce", "MCE")):
        ax.plot([], [], " ", label=f"{name} = {format_metric(errs[key])}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency")
    legend_outside(ax, fontsize=6.5)
    if title:
        ax.set_title(title, fontsize=9)
    if ax_count is not None:
        ax_count.bar(
            left,
            np.where(count > 0, count, np.nan),
            width=width,
            align="edge",
            color=np.where(shown, "#4c72b0", "#bbbbbb").tolist(),
            edgecolor="white",
            lw=0.5,
        )
        if (count > 0).any():
            ax_count.set_yscale("log")
            ax_count.yaxis.set_minor_formatter(NullFormatter())
        ax_count.set_xlim(0, 1)
        ax_count.set_ylabel("voxels", fontsize=8)
        ax_count.set_xlabel("predicted probability")
        ax.tick_params(labelbottom=False)
        if min_count > 1:
            ax_count.axhline(min_count, color="#c44e52", lw=0.8, ls=":")
    else:
        ax.set_xlabel("predicted probability")
    return errs


def reliability_diagram(
    stats: BinStats | np.ndarray,
    channel: int = 0,
    *,
    image: int = 0,
    min_count: int = 1,
    class_name: str | None = None,
    title: str | None = None,
    show_counts: bool = True,
) -> Figure:
    """Per-image reliability diagram of one channel with gap bars and a bin-count strip.

    Args:
        stats: per-image bin sums ``(B, C, M)`` (or a stored ``(B, C, 3, M)`` array).
        channel: channel ``c`` to draw. image: image ``b`` to draw.
        min_count: hide bins with fewer voxels (Ensembles used 1000); the legend ECE/ACE/MCE are computed
            with the same ``min_count`` by :func:`calibration_errors`, so the numbers match the bars drawn.
        class_name / title: labels. show_counts: add the log-scale voxel-count strip below.

    The legend lists ``ECE``, ``ACE`` and ``MCE`` (ACE-MICCAI eq. 1, 3, 4) with 4 decimals.
    """
    stats = as_binstats(stats)
    one = select(stats, image, channel)
    fig = new_figure(5.8, 4.6 if show_counts else 3.8)
    if show_counts:
        gs = fig.add_gridspec(2, 1, height_ratios=[4, 1])
        ax = fig.add_subplot(gs[0])
        ax_count = fig.add_subplot(gs[1], sharex=ax)
    else:
        ax, ax_count = fig.add_subplot(), None
    name = class_name if class_name is not None else f"channel {channel}"
    _draw_reliability(ax, ax_count, one, min_count, title if title is not None else name)
    return fig


def reliability_diagrams(
    stats: BinStats | np.ndarray,
    image: int = 0,
    *,
    class_names: Sequence[str] | None = None,
    min_count: int = 1,
    title: str | None = None,
) -> Figure:
    """All channels of one image side by side (one :func:`reliability_diagram` panel per channel)."""
    stats = as_binstats(stats)
    c = stats.num_channels
    names = _class_names(class_names, c)
    fig = new_figure(5.0 * c, 4.6)
    gs = fig.add_gridspec(2, c, height_ratios=[4, 1])
    for ci in range(c):
        ax = fig.add_subplot(gs[0, ci])
        ax_count = fig.add_subplot(gs[1, ci], sharex=ax)
        _draw_reliability(ax, ax_count, select(stats, image, ci), min_count, names[ci])
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------------
# dataset reliability histogram (ACE-MICCAI Fig. 2)
# ----------------------------------------------------------------------------------------------------


def dataset_histogram_counts(
    stats_per_case: BinStats | np.ndarray, min_count: int = 1, closed: Closed = "right"
) -> tuple[np.ndarray, np.ndarray]:
    """Joint histogram counts behind :func:`dataset_reliability_histogram`.

    For each image ``b``, channel ``c`` and bin ``k`` with at least ``min_count`` voxels, the observed
    frequency ``o_k`` is assigned to a y-bin with the same M-bin convention as the predictions
    (:func:`bin_index`); each such (image, bin) adds one count.

    Returns:
        ``counts`` ``(C, M, M)`` int64 indexed ``[c, y_bin, x_bin]`` and ``voxels`` ``(C, M)`` float64, the
        total voxel count per predicted-probability bin summed over images.
    """
    stats = as_binstats(stats_per_case, "stats_per_case")
    n, c, m = stats.count.shape
    o = stats.mean_y()
    valid = stats.count >= max(1, min_count)
    ybin = bin_index(torch.where(valid, o, torch.zeros_like(o)).clamp(0, 1), m, closed)  # (N, C, M)
    xbin = torch.arange(m).expand(n, c, m)
    cls = torch.arange(c).view(1, c, 1).expand(n, c, m)
    flat = (cls * m * m + ybin * m + xbin)[valid]
    counts = torch.bincount(flat.reshape(-1), minlength=c * m * m).reshape(c, m, m)
    voxels = stats.count.sum(0)
    return counts.numpy().astype(np.int64), voxels.numpy()


def _normalise_columns(counts: np.ndarray) -> np.ndarray:
    """Divide each x-column by its total (columns without any count become NaN = blank)."""
    tot = counts.sum(-2, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, counts / np.where(tot > 0, tot, 1), np.nan)


def _panel_data(
    counts: np.ndarray, voxels: np.ndarray, names: list[str]
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    panels = [(names[i], _normalise_columns(counts[i]), voxels[i]) for i in range(counts.shape[0])]
    if counts.shape[0] > 1:
        panels.append(("average (all classes)", _normalise_columns(counts.sum(0)), voxels.sum(0)))
    return panels


def _draw_histogram_panel(
    ax: Axes,
    ax_strip: Axes | None,
    hist: np.ndarray,
    voxels: np.ndarray,
    title: str,
    *,
    cmap: str = "viridis",
    norm: object = None,
    vmax: float = 1.0,
) -> object:
    m = hist.shape[-1]
    scale = {"norm": norm} if norm is not None else {"vmin": 0, "vmax": vmax}
    im = ax.imshow(
        np.ma.masked_invalid(hist),
        origin="lower",
        extent=(0, 1, 0, 1),
        aspect="auto",
        cmap=cmap,
        interpolation="nearest",
        **scale,
    )
    ax.plot([0, 1], [0, 1], ls="--", color="white" if norm is None else "0.3", lw=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    if ax_strip is not None:
        ax.tick_params(labelbottom=False)
        left = np.arange(m) / m
        ax_strip.bar(left, np.where(voxels > 0, voxels, np.nan), width=1 / m, align="edge", color="0.35")
        if (voxels > 0).any():
            ax_strip.set_yscale("log")
            ax_strip.yaxis.set_minor_formatter(NullFormatter())
        ax_strip.set_xlim(0, 1)
        ax_strip.set_xlabel("predicted probability")
        ax_strip.set_ylabel("voxels", fontsize=8)
    else:
        ax.set_xlabel("predicted probability")
    return im


def dataset_reliability_histogram(
    stats_per_case: BinStats | np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    min_count: int = 1,
    cmap: str = "viridis",
    title: str | None = None,
) -> Figure:
    """Dataset reliability histogram (ACE-MICCAI Fig. 2), one panel per class plus an average panel.

    x = predicted-probability bin k; for each image and each non-empty bin (``count >= min_count``) the
    image's observed frequency ``o_k`` is binned on the y axis (same M bins); each image adds one count; every
    column is normalised to sum to 1 (a column's colours are the distribution of ``o_k`` over images). The
    average panel pools the counts of all classes. Below each panel, a strip shows the total voxel count per
    bin (log scale). Well-calibrated models concentrate mass on the diagonal.

    Args:
        stats_per_case: ``(N, C, M)`` per-case bin sums (or a stored ``(N, C, 3, M)`` array).
        class_names: ``C`` panel titles.
    """
    counts, voxels = dataset_histogram_counts(stats_per_case, min_count)
    names = _class_names(class_names, counts.shape[0])
    panels = _panel_data(counts, voxels, names)
    k = len(panels)
    fig = new_figure(3.2 * k + 0.8, 4.2)
    gs = fig.add_gridspec(2, k, height_ratios=[4, 1])
    im = None
    for i, (name, hist, vox) in enumerate(panels):
        ax = fig.add_subplot(gs[0, i])
        im = _draw_histogram_panel(ax, fig.add_subplot(gs[1, i], sharex=ax), hist, vox, name, cmap=cmap)
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="fraction of images in column")
    if title:
        fig.suptitle(short_label(title, 80), fontsize=10)
    return fig


def dataset_reliability_comparison(
    runs: Sequence[BinStats | np.ndarray],
    run_names: Sequence[str],
    class_names: Sequence[str] | None = None,
    *,
    mode: str = "side_by_side",
    min_count: int = 1,
    cmap: str = "viridis",
) -> Figure:
    """Dataset reliability histograms of several runs on the same classes.

    ``mode="side_by_side"``: one row of panels per run (same colour scale). ``mode="difference"`` (exactly two
    runs): the column-normalised histogram of the second run minus the first (red = more images there).
    """
    if len(runs) != len(run_names) or len(runs) < 2:
        raise ValueError("dataset_reliability_comparison needs at least two runs and one name per run")
    data = [dataset_histogram_counts(r, min_count) for r in runs]
    shapes = {d[0].shape for d in data}
    if len(shapes) != 1:
        raise ValueError(f"runs have different (C, M, M) histogram shapes: {sorted(shapes)}")
    names = _class_names(class_names, data[0][0].shape[0])
    panel_sets = [_panel_data(cnt, vox, names) for cnt, vox in data]
    k = len(panel_sets[0])
    if mode == "side_by_side":
        rows = len(runs)
        fig = new_figure(3.2 * k + 1.2, 3.9 * rows)
        gs = fig.add_gridspec(2 * rows, k, height_ratios=[4, 1] * rows)
        for r, panels in enumerate(panel_sets):
            im, row_axes = None, []
            for i, (name, hist, vox) in enumerate(panels):
                ax = fig.add_subplot(gs[2 * r, i])
                im = _draw_histogram_panel(
                    ax,
                    fig.add_subplot(gs[2 * r + 1, i], sharex=ax),
                    hist,
                    vox,
                    f"{short_label(run_names[r])}: {name}",
                    cmap=cmap,
                )
                row_axes.append(ax)
            # one colour bar per run, beside its own panels
            fig.colorbar(im, ax=row_axes, shrink=0.9, label="fraction of images")
        return fig
    if mode == "difference":
        if len(runs) != 2:
            raise ValueError("mode='difference' needs exactly two runs")
        fig = new_figure(3.2 * k + 0.8, 3.6)
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-1.0, vmax=1.0)
        im = None
        for i in range(k):
            name, ha, _ = panel_sets[0][i]
            _, hb, _ = panel_sets[1][i]
            diff = np.where(np.isnan(ha) & np.isnan(hb), np.nan, np.nan_to_num(hb) - np.nan_to_num(ha))
            ax = fig.add_subplot(1, k, i + 1)
            im = _draw_histogram_panel(
                ax,
                None,
                diff,
                np.zeros(diff.shape[-1]),
                f"{short_label(run_names[1], 20)} − {short_label(run_names[0], 20)}: {name}",
                cmap="RdBu_r",
                norm=norm,
            )
        fig.colorbar(im, ax=fig.axes, shrink=0.8, label="difference in column fraction")
        return fig
    raise ValueError(f"mode must be 'side_by_side' or 'difference', got {mode!r}")


# ----------------------------------------------------------------------------------------------------
# subject-level spread (PostHoc Fig. 3)
# ----------------------------------------------------------------------------------------------------


def per_bin_observed(
    stats_per_case: BinStats | np.ndarray, channel: int, min_count: int = 1
) -> list[np.ndarray]:
    """Per bin k, the observed frequencies ``o_k`` of every image whose bin has ``>= min_count`` voxels."""
    stats = select(as_binstats(stats_per_case, "stats_per_case"), None, channel)
    o = stats.mean_y()[:, 0].numpy()  # (N, M)
    valid = stats.count[:, 0].numpy() >= max(1, min_count)
    return [o[valid[:, k], k] for k in range(o.shape[1])]


def subject_spread(
    stats_per_case: BinStats | np.ndarray,
    channel: int = 0,
    *,
    kind: str = "violin",
    min_count: int = 1,
    class_name: str | None = None,
    unit: str = "subjects",
) -> Figure:
    """Spread over subjects of the per-bin observed frequency (accuracy), as violins or boxes.

    One violin/box per predicted-probability bin at the bin centre; the dashed diagonal is perfect
    calibration and the dots are the pooled mean predicted probability per bin. Median and quartiles are drawn
    (full and dashed lines for violins, as in PostHoc Fig. 3). Above each bin: the number of subjects. Each
    image of ``stats_per_case`` is one subject: pass per-subject bin sums (a subject's cases summed) when the
    cases are slices or patches of fewer subjects, or name the ``unit`` (``"cases"``) shown in the labels.
    """
    if kind not in ("violin", "box"):
        raise ValueError(f"kind must be 'violin' or 'box', got {kind!r}")
    stats = as_binstats(stats_per_case, "stats_per_case")
    data = per_bin_observed(stats, channel, min_count)
    m = len(data)
    centres = (np.arange(m) + 0.5) / m
    keep = [k for k in range(m) if data[k].size > 0]
    fig = new_figure(max(6.5, 0.35 * m + 3.5), 4.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect calibration")
    w = 0.8 / m
    if keep:
        vals = [data[k] for k in keep]
        pos = centres[keep]
        if kind == "violin":
            parts = ax.violinplot(vals, positions=pos, widths=w, showextrema=False)
            for body in parts["bodies"]:
                body.set_alpha(0.6)
            q = np.array([np.percentile(v, [25, 50, 75]) for v in vals])
            ax.hlines(q[:, 1], pos - w / 2, pos + w / 2, color="k", lw=1.2, label="median")
            ax.hlines(
                np.concatenate([q[:, 0], q[:, 2]]),
                np.tile(pos - w / 2, 2),
                np.tile(pos + w / 2, 2),
                color="k",
                lw=0.8,
                ls="--",
                label="quartiles",
            )
        else:
            ax.boxplot(
                vals,
                positions=pos,
                widths=w,
                manage_ticks=False,
                showfliers=True,
                medianprops={"color": "k"},
                flierprops={"markersize": 2},
            )
        pooled = select(stats, None, channel).pooled().mean_p()[0, 0].numpy()
        ax.plot(pos, pooled[keep], "o", ms=3, color="#c44e52", label="mean predicted p (pooled)")
        for k in keep:
            ax.text(
                centres[k],
                1.01,
                str(data[k].size),
                ha="center",
                va="bottom",
                fontsize=6,
                transform=ax.get_xaxis_transform(),
            )
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("predicted probability bin")
    ax.set_ylabel(f"observed frequency per {unit.rstrip('s')}")
    ax.set_title(
        (class_name if class_name is not None else f"channel {channel}") + f" — spread over {unit}",
        fontsize=9,
        pad=12,
    )
    handles, labels = ax.get_legend_handles_labels()
    if kind == "violin" and keep:
        handles.append(Patch(alpha=0.6, label=unit))
        labels.append(unit)
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return fig
