"""Shared helpers for the figure functions: input coercion, figure creation and saving.

Figures are created with :class:`matplotlib.figure.Figure` directly (no ``pyplot`` global state), and rendered
with the Agg canvas attached explicitly, so plotting is safe in worker processes and on machines without a
display, and importing segcal never switches the user's global matplotlib backend.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.axis import Axis, Tick
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from segcal.functional.binning import BinStats
from segcal.io import atomic_write

__all__ = [
    "MARKERS",
    "PALETTE",
    "as_binstats",
    "figure_to_png_bytes",
    "legend_outside",
    "new_figure",
    "save_figure",
    "select",
    "series_style",
    "short_label",
]

#: 20 distinct colours (matplotlib's tab20, dark shades first, then the light ones)
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)
#: markers paired with the colours: series ``i`` gets colour ``i % 20`` and marker ``i % 7``, so up to 140
#: series have distinct (colour, marker) pairs and every two of the first 20 differ in colour
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X")

_FORMATS = ("png", "svg")


def as_binstats(stats: BinStats | np.ndarray, name: str = "stats") -> BinStats:
    """Accept a :class:`BinStats` or a stored ``(N, C, 3, M)`` array (count, sum_p, sum_y)."""
    if isinstance(stats, BinStats):
        return stats
    if isinstance(stats, np.ndarray | torch.Tensor):
        arr = stats.detach().cpu().numpy() if isinstance(stats, torch.Tensor) else stats
        if arr.ndim != 4 or arr.shape[2] != 3:
            raise ValueError(f"{name}: expected BinStats or a (N, C, 3, M) array, got shape {arr.shape}")
        return BinStats.from_numpy(arr)
    raise TypeError(f"{name}: expected BinStats or a (N, C, 3, M) array, got {type(stats).__name__}")


def select(stats: BinStats, image: int | None, channel: int | None) -> BinStats:
    """Sub-statistics of one image and/or one channel, keeping the ``(B, C, M)`` layout."""
    b, c = stats.count.shape[:2]
    bi = slice(None) if image is None else _index(image, b, "image")
    ci = slice(None) if channel is None else _index(channel, c, "channel")
    return BinStats(stats.count[bi, ci].double(), stats.sum_p[bi, ci].double(), stats.sum_y[bi, ci].double())


def _index(i: int, n: int, what: str) -> slice:
    if not isinstance(i, int | np.integer) or not -n <= int(i) < n:
        raise ValueError(f"{what} index {i!r} out of range for {n} {what}s")
    i = int(i) % n
    return slice(i, i + 1)


def short_label(text: object, width: int = 32) -> str:
    """``text`` for a title or legend entry: at most ``width`` characters, long names cut in the middle with an
    ellipsis (so that a long run name cannot squeeze the data area away)."""
    s = str(text)
    if len(s) <= width:
        return s
    head = (width - 1) // 2
    return s[:head] + "…" + s[-(width - 1 - head):]


def series_style(i: int) -> dict[str, str]:
    """Colour and marker of series ``i`` (:data:`PALETTE`, :data:`MARKERS`)."""
    return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)]}


def legend_outside(ax: Axes, fontsize: float = 7, **kwargs: object) -> None:
    """The axes' legend to the right of its data area (constrained layout makes room for it); nothing when
    there is no labelled artist."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=fontsize,
            **kwargs,  # type: ignore[arg-type]
        )


def _generated_texts(fig: Figure) -> set[int]:
    """The texts matplotlib writes itself (tick labels, axis offsets such as ``1e3``), which may use math text
    (``$10^{3}$`` on log axes)."""
    out: set[int] = set()
    for tick in fig.findobj(Tick):
        out.update((id(tick.label1), id(tick.label2)))
    for axis in fig.findobj(Axis):
        out.add(id(axis.offsetText))
    return out


class LiteralTextFigure(Figure):
    """A figure whose texts are drawn literally: case ids, class and run names are user data, so a ``$`` in
    them is a dollar sign, never matplotlib math text (which would fail to parse, or change the name). Tick
    labels and axis offsets, written by matplotlib's formatters, keep their math text."""

    def draw(self, renderer: object) -> None:  # type: ignore[override]
        generated = _generated_texts(self)
        for text in self.findobj(Text):
            if id(text) not in generated:
                text.set_parse_math(False)
        super().draw(renderer)  # type: ignore[arg-type]


def new_figure(width: float, height: float) -> Figure:
    """A detached figure with an Agg canvas (no pyplot registry, nothing to close); its texts are literal
    (:class:`LiteralTextFigure`)."""
    fig = LiteralTextFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """Render ``fig`` to PNG bytes (for embedding in the HTML report)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_figure(
    fig: Figure, path: str | Path, formats: Iterable[str] | None = None, dpi: int = 150
) -> list[Path]:
    """Write ``fig`` as PNG and/or SVG; returns the written paths.

    ``path`` with a ``.png``/``.svg`` suffix writes that format (unless ``formats`` is given); a path without
    one of these suffixes writes every format in ``formats`` (default both) next to each other.
    """
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if formats is None:
        formats = (suffix,) if suffix in _FORMATS else _FORMATS
    formats = tuple(f.lower().lstrip(".") for f in formats)
    bad = [f for f in formats if f not in _FORMATS]
    if bad or not formats:
        raise ValueError(f"save_figure: formats must be among {_FORMATS}, got {formats}")
    stem = path.with_suffix("") if suffix in _FORMATS else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for f in formats:
        target = stem.parent / f"{stem.name}.{f}"
        with atomic_write(target, "wb") as fh:
            fig.savefig(fh, format=f, dpi=dpi)
        out.append(target)
    return out
