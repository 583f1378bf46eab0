"""Figures: run on real BinStats, show the numbers of the core functions, write PNG/SVG."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from matplotlib.image import AxesImage
from scipy import stats as sps

from _helpers import PNG_MAGIC as PNG
from segcal.functional import bin_statistics
from segcal.functional.binning import BinStats
from segcal.functional.calibration import calibration_errors
from segcal.plots import (
    dataset_histogram_counts,
    dataset_reliability_comparison,
    dataset_reliability_histogram,
    ensemble_size_curve,
    entropy_dice_scatter,
    pareto_front,
    per_bin_observed,
    probability_overlay,
    quality_scatter,
    reliability_diagram,
    reliability_diagrams,
    save_figure,
    subject_spread,
    threshold_curves,
)
from segcal.plots._common import select


@pytest.fixture(scope="module")
def stats() -> BinStats:
    """Bin sums of a miscalibrated 3-class softmax prediction on 2D phantoms, 5 images, M = 10."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    labels = torch.zeros(5, 24, 24, dtype=torch.int64)
    for b in range(5):
        r = 5 + b
        labels[b][(yy - 12) ** 2 + (xx - 12) ** 2 < r * r] = 1
        labels[b][(yy - 12) ** 2 + (xx - 12) ** 2 < (r // 2) ** 2] = 2
    logits = 4.0 * torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    logits = logits + 2.5 * torch.randn(logits.shape, generator=g)
    return bin_statistics(logits, labels, 10, activation="softmax")


def _legend_values(ax) -> dict[str, str]:
    out = {}
    for t in ax.get_legend().get_texts():
        m = re.fullmatch(r"(ECE|ACE|MCE) = (\S+)", t.get_text())
        if m:
            out[m.group(1)] = m.group(2)
    return out


@pytest.mark.parametrize("min_count", [1, 20])
def test_reliability_diagram_shows_core_numbers(stats: BinStats, tmp_path, min_count: int) -> None:
    fig = reliability_diagram(stats, 1, image=2, min_count=min_count, class_name="tumour")
    ax = fig.axes[0]
    one = select(stats, 2, 1)
    errs = calibration_errors(one, min_count=min_count)
    assert _legend_values(ax) == {
        "ECE": f"{float(errs['ece'][0, 0]):.4f}",
        "ACE": f"{float(errs['ace'][0, 0]):.4f}",
        "MCE": f"{float(errs['mce'][0, 0]):.4f}",
    }
    # observed-frequency bars: exactly the bins with >= min_count voxels, heights = BinStats.mean_y()
    shown = (one.count[0, 0] >= min_count).numpy()
    bars = ax.containers[0]
    assert len(bars) == shown.sum()
    np.testing.assert_allclose([p.get_height() for p in bars], one.mean_y()[0, 0].numpy()[shown])
    gaps = ax.containers[1]
    np.testing.assert_allclose(
        [p.get_height() for p in gaps], (one.mean_y() - one.mean_p()).abs()[0, 0].numpy()[shown]
    )
    if min_count > 1:
        assert shown.sum() < (one.count[0, 0] > 0).sum(), "the test should hide some bins"
    paths = save_figure(fig, tmp_path / "rd.png")
    assert paths == [tmp_path / "rd.png"] and paths[0].read_bytes()[:8] == PNG


def test_reliability_diagrams_all_channels(stats: BinStats) -> None:
    fig = reliability_diagrams(stats, 0, class_names=["bg", "a", "b"])
    main_axes = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert len(main_axes) == 3
    errs = calibration_errors(stats)
    for c, ax in enumerate(main_axes):
        assert _legend_values(ax)["ACE"] == f"{float(errs['ace'][0, c]):.4f}"
    with pytest.raises(ValueError, match="class_names"):
        reliability_diagrams(stats, 0, class_names=["only one"])


def _hand_stats() -> BinStats:
    """N = 3 cases, C = 2 classes, M = 4 bins, written out by hand."""
    count = torch.tensor(
        [
            [[10, 0, 5, 5], [1, 1, 1, 1]],
            [[4, 4, 0, 0], [1, 1, 1, 1]],
            [[0, 0, 0, 8], [1, 1, 1, 1]],
        ],
        dtype=torch.float64,
    )
    sum_y = torch.tensor(
        [
            [[1, 0, 5, 2], [0, 0, 1, 1]],  # o = 0.1, -, 1.0, 0.4
            [[0, 2, 0, 0], [0, 0, 1, 1]],  # o = 0.0, 0.5 (tie → bin 1), -, -
            [[0, 0, 0, 6], [0, 0, 1, 1]],  # o = 0.75 (tie → bin 2)
        ],
        dtype=torch.float64,
    )
    centres = (torch.arange(4, dtype=torch.float64) + 0.5) / 4
    return BinStats(count, count * centres, sum_y)


def test_dataset_histogram_counts_hand_computation() -> None:
    counts, voxels = dataset_histogram_counts(_hand_stats())
    expected0 = np.zeros((4, 4), dtype=np.int64)  # [y_bin, x_bin]
    expected0[0, 0] = 2  # case 0 (o = 0.1) and case 1 (o = 0.0) in x-bin 0
    expected0[3, 2] = 1  # case 0, o = 1.0
    expected0[1, 3] = 1  # case 0, o = 0.4
    expected0[1, 1] = 1  # case 1, o = 0.5
    expected0[2, 3] = 1  # case 2, o = 0.75
    expected1 = np.zeros((4, 4), dtype=np.int64)
    expected1[0, 0] = expected1[0, 1] = expected1[3, 2] = expected1[3, 3] = 3
    np.testing.assert_array_equal(counts[0], expected0)
    np.testing.assert_array_equal(counts[1], expected1)
    np.testing.assert_array_equal(voxels, [[14, 4, 5, 13], [3, 3, 3, 3]])
    # min_count = 5 drops case 1 (4 voxels per bin) in class 0 and everything in class 1
    counts5, _ = dataset_histogram_counts(_hand_stats(), min_count=5)
    expected0[0, 0] -= 1
    expected0[1, 1] -= 1
    np.testing.assert_array_equal(counts5[0], expected0)
    assert counts5[1].sum() == 0


def test_dataset_histogram_figure_columns(tmp_path) -> None:
    fig = dataset_reliability_histogram(_hand_stats(), ["A", "B"])
    images = [a.images[0] for a in fig.axes if a.images]
    assert [a.get_title() for a in fig.axes if a.images] == ["A", "B", "average (all classes)"]
    hist_a = np.ma.filled(images[0].get_array(), np.nan)
    want_a = np.array(
        [[1, 0, 0, 0], [0, 1, 0, 0.5], [0, 0, 0, 0.5], [0, 0, 1, 0]], dtype=float
    )  # columns normalised
    np.testing.assert_allclose(hist_a, want_a)
    counts, _ = dataset_histogram_counts(_hand_stats())
    pooled = counts.sum(0)
    hist_avg = np.ma.filled(images[2].get_array(), np.nan)
    np.testing.assert_allclose(hist_avg, pooled / pooled.sum(0, keepdims=True))
    for im in images:
        np.testing.assert_allclose(np.ma.filled(im.get_array(), 0).sum(0), 1.0)
    # voxel-count strips (log scale) show the summed counts
    strips = [a for a in fig.axes if not a.images and a.get_yscale() == "log"]
    assert len(strips) == 3
    np.testing.assert_allclose([p.get_height() for p in strips[0].patches], [14, 4, 5, 13])
    paths = save_figure(fig, tmp_path / "dh", formats=("png", "svg"))
    assert {p.suffix for p in paths} == {".png", ".svg"}
    assert b"<svg" in paths[1].read_bytes()[:2000]


def test_dataset_histogram_real_stats(stats: BinStats) -> None:
    counts, voxels = dataset_histogram_counts(stats)
    assert counts.sum() == int((stats.count > 0).sum())
    np.testing.assert_allclose(voxels, stats.count.sum(0).numpy())
    fig = dataset_reliability_histogram(stats, ["bg", "a", "b"])
    for im in (a.images[0] for a in fig.axes if a.images):
        col = np.ma.filled(im.get_array(), np.nan)
        filled = ~np.isnan(col).all(0)
        np.testing.assert_allclose(np.nansum(col, 0)[filled], 1.0)


def test_dataset_reliability_comparison(stats: BinStats) -> None:
    worse = BinStats(stats.count, stats.sum_p, stats.sum_y * 0.5)
    fig = dataset_reliability_comparison([stats, worse], ["base", "worse"], ["bg", "a", "b"])
    assert sum(1 for a in fig.axes if a.images) == 8
    fig = dataset_reliability_comparison(
        [stats, worse], ["base", "worse"], ["bg", "a", "b"], mode="difference"
    )
    panels = [a for a in fig.axes if a.images]
    assert len(panels) == 4 and panels[0].get_title().startswith("worse − base")
    diff = np.ma.filled(panels[0].images[0].get_array(), np.nan)
    ca, _ = dataset_histogram_counts(stats)
    cb, _ = dataset_histogram_counts(worse)
    na = ca[0] / np.where(ca[0].sum(0) > 0, ca[0].sum(0), 1)
    nb = cb[0] / np.where(cb[0].sum(0) > 0, cb[0].sum(0), 1)
    np.testing.assert_allclose(np.nan_to_num(diff), nb - na)
    with pytest.raises(ValueError, match="exactly two"):
        dataset_reliability_comparison([stats, stats, stats], list("xyz"), mode="difference")
    with pytest.raises(ValueError, match="mode"):
        dataset_reliability_comparison([stats, stats], list("xy"), mode="overlay!")


def test_subject_spread_medians(stats: BinStats) -> None:
    fig = subject_spread(stats, 1, kind="box")
    ax = fig.axes[0]
    data = per_bin_observed(stats, 1)
    o = stats.mean_y()[:, 1].numpy()
    want = [np.median(o[~np.isnan(o[:, k]), k]) for k in range(o.shape[1]) if (~np.isnan(o[:, k])).any()]
    medians = [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_color() == "k"]
    np.testing.assert_allclose(medians, want)
    assert sum(d.size for d in data) == int((stats.count[:, 1] > 0).sum())
    fig = subject_spread(stats, 1, kind="violin", class_name="a")
    assert "a" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="kind"):
        subject_spread(stats, 1, kind="bars")


def test_pareto_front_and_quality_scatter(tmp_path) -> None:
    cost = np.array([0.1, 0.2, 0.05, 0.3, 0.2])
    gain = np.array([0.8, 0.9, 0.7, 0.85, 0.95])
    assert pareto_front(cost, gain).tolist() == [2, 0, 4]  # (0.05, .7), (0.1, .8), (0.2, .95)
    fig = quality_scatter(list(gain), list(cost), ["a", "b", "c", "d", "e"], calibration_name="ECE")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "Pareto front: c, a, e" in labels
    assert fig.axes[0].get_xlabel().startswith("ECE")
    rng = np.random.default_rng(0)
    fig = quality_scatter(
        [rng.random(8), rng.random(8)], [rng.random(8), rng.random(8)], ["x", "y"], pareto=False
    )
    assert not any(t.get_text().startswith("Pareto") for t in fig.axes[0].get_legend().get_texts())
    save_figure(fig, tmp_path / "q.svg")
    with pytest.raises(ValueError, match="same, non-zero length"):
        quality_scatter([0.1], [0.1, 0.2], ["a"])


def test_entropy_dice_scatter_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    ent = rng.random(30)
    dice = np.clip(0.9 - 0.5 * ent + 0.05 * rng.standard_normal(30), 0, 1)
    dice[0] = 1.0  # clipped, stays finite
    fig = entropy_dice_scatter(ent, dice, groups=["in-distribution"] * 20 + ["shifted"] * 10)
    ax = fig.axes[0]
    d = np.clip(dice, 1e-4, 1 - 1e-4)
    r, p = sps.pearsonr(ent, np.log(d / (1 - d)))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"r = {r:.3f}, p = {p:.2e} (n = 30 cases)" in labels  # the correlation states its unit
    assert {"in-distribution", "shifted"} <= set(labels)
    reg = sps.linregress(ent, np.log(d / (1 - d)))
    line = ax.get_lines()[0]
    np.testing.assert_allclose(line.get_ydata(), reg.intercept + reg.slope * line.get_xdata())
    with pytest.raises(ValueError, match="groups"):
        entropy_dice_scatter(ent, dice, groups=["a"])
    # points of 5 subjects: r and p over the subject means, and the legend says so
    subjects = [f"s{i % 5}" for i in range(30)]
    fig = entropy_dice_scatter(ent, dice, subjects=subjects)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    y = np.log(d / (1 - d))
    mx = [ent[i::5].mean() for i in range(5)]
    my = [y[i::5].mean() for i in range(5)]
    r_s, p_s = sps.pearsonr(mx, my)
    assert f"r = {r_s:.3f}, p = {p_s:.2e} (n = 5 subjects)" in labels


def test_curves() -> None:
    fig = ensemble_size_curve(
        [1, 2, 4, 8], [0.7, 0.75, 0.78, 0.79], [0.6, 0.7, 0.74, 0.76], [0.8, 0.8, 0.82, 0.82], "Dice"
    )
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [0.7, 0.75, 0.78, 0.79])
    assert ax.get_ylabel() == "Dice"
    fig = ensemble_size_curve(
        [1, 2],
        [0.1, 0.2],
        [0.0, 0.1],
        [0.2, 0.3],
        "ECE",
        label="ensemble",
        more={"MC dropout": ([0.3, 0.25], [0.2, 0.2], [0.4, 0.3])},
    )
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["ensemble", "MC dropout"]
    np.testing.assert_allclose(fig.axes[0].get_lines()[1].get_ydata(), [0.3, 0.25])
    t = np.linspace(0.1, 0.9, 9)
    mean = 1 - (t - 0.3) ** 2
    fig = threshold_curves(
        t, {"DSC++": (mean, mean - 0.05, mean + 0.05), "CE": (mean - 0.1, mean - 0.2, mean)}
    )
    labels = [x.get_text() for x in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "DSC++ (best t = 0.30: 1.0000)"
    with pytest.raises(ValueError, match="same length"):
        ensemble_size_curve([1, 2], [0.1], [0.1], [0.1], "x")


def test_probability_overlay_counts(tmp_path) -> None:
    yy, xx = np.mgrid[:32, :32]
    gt = (yy - 16) ** 2 + (xx - 16) ** 2 < 64
    pred = (yy - 16) ** 2 + (xx - 18) ** 2 < 64
    prob = np.clip(1.2 - np.sqrt((yy - 16) ** 2 + (xx - 18) ** 2) / 8, 0, 1)
    fig = probability_overlay(np.random.default_rng(0).random((32, 32)), prob, pred, gt)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        f"TP ({(pred & gt).sum()} px)",
        f"FP ({(pred & ~gt).sum()} px)",
        f"FN ({(~pred & gt).sum()} px)",
    ]
    assert (
        len(ax.collections) + len([a for a in ax.get_children() if a.__class__.__name__ == "QuadContourSet"])
        >= 3
    )
    assert sum(isinstance(a, AxesImage) for a in ax.get_children()) == 2
    save_figure(fig, tmp_path / "ov.png")
    with pytest.raises(ValueError, match="one shape"):
        probability_overlay(np.zeros((4, 4)), np.zeros((4, 5)), np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        probability_overlay(np.zeros((4, 4)), np.full((4, 4), 2.0), np.zeros((4, 4)), np.zeros((4, 4)))


def test_bad_input(stats: BinStats, tmp_path) -> None:
    with pytest.raises(ValueError, match="channel index"):
        reliability_diagram(stats, 7)
    with pytest.raises(ValueError, match=r"\(N, C, 3, M\)"):
        dataset_reliability_histogram(np.zeros((2, 3, 10)))
    with pytest.raises(TypeError, match="BinStats"):
        dataset_reliability_histogram([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="formats"):
        save_figure(reliability_diagram(stats, 0), tmp_path / "x", formats=("jpg",))
    # a stored (N, C, 3, M) array works like the BinStats it came from
    fig = reliability_diagram(stats.numpy(), 0)
    assert _legend_values(fig.axes[0])["ECE"] == f"{float(calibration_errors(stats)['ece'][0, 0]):.4f}"


def test_import_does_not_touch_pyplot(tmp_path) -> None:
    """segcal.plots draws on detached Agg figures: importing and plotting never loads pyplot or a GUI."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; import segcal.plots as P; "
        "fig = P.ensemble_size_curve([1, 2], [0.1, 0.2], [0.0, 0.1], [0.2, 0.3], 'Dice'); "
        f"P.save_figure(fig, {str(tmp_path / 'x.png')!r}); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; "
        "assert type(fig.canvas).__name__ == 'FigureCanvasAgg'"
    )
    env = {"MPLBACKEND": "TkAgg", "DISPLAY": "", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": ":".join(p for p in sys.path if p)},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG
