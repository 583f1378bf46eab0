"""A self-contained HTML report: one file, images as base64 PNG data URIs, inline CSS, no scripts.

Every user-supplied string (titles, paragraphs, table cells, captions, tooltips) is escaped with
:func:`html.escape` before the few inline markers of the markdown-ish paragraphs (``**bold**``, ``*italic*``,
`` `code` ``, lines starting with ``- `` as bullet items, continued on the lines below) are turned into tags.
Tables leave out columns without any value; :class:`Cell` gives one cell a tooltip (``title``) or a CSS class;
:class:`Details` folds tables and figures under a ``<details>`` summary line.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from segcal.plots._common import figure_to_png_bytes

__all__ = ["Cell", "Details", "ReportFigure", "Section", "Table", "render_html", "table_from_rows"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#ffffff;--alt:#f6f8fa;--accent:#0969da}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.5 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif}
main{max-width:1200px;margin:0 auto;padding:24px 32px 64px}
h1,h2,p,li,figcaption,summary{overflow-wrap:anywhere}
h1{font-size:26px;margin:8px 0 4px;border-bottom:1px solid var(--line);padding-bottom:8px}
h2{font-size:20px;margin:36px 0 8px;border-bottom:1px solid var(--line);padding-bottom:4px}
p{margin:6px 0 10px}
code{background:var(--alt);padding:1px 4px;border-radius:4px;font-size:90%}
nav{background:var(--alt);border:1px solid var(--line);border-radius:6px;padding:8px 16px;margin:12px 0}
nav ol{margin:4px 0;padding-left:20px}
a{color:var(--accent);text-decoration:none}
.tablewrap{overflow-x:auto;margin:10px 0 16px}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0;color:var(--muted)}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:right;white-space:nowrap}
th{background:var(--alt);text-align:center}
td.text{text-align:left;white-space:normal}
tr:nth-child(even) td{background:#fbfcfd}
td.bad{color:#cf222e;font-weight:600}
td.better{background:#dafbe1 !important;color:#116329;font-weight:600}
td.worse{background:#ffebe9 !important;color:#a40e26;font-weight:600}
td[title]{text-decoration:underline dotted}
details{border:1px solid var(--line);border-radius:6px;padding:6px 12px;margin:10px 0}
summary{cursor:pointer;font-weight:600}
figure{margin:14px 0 22px}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px}
figcaption{color:var(--muted);font-size:13px;margin-top:4px}
.meta{color:var(--muted);font-size:13px}
"""


@dataclass
class Table:
    """A table: ``rows`` (list of dicts, or a pandas DataFrame) and an optional caption / column order.

    Floats are written with ``float_format`` (per column: ``formats[column]``, a format string or a function
    of the value returning the text); NaN and None become an empty cell. ``highlight`` is a function
    ``(column, value) -> bool | str`` marking a cell with the class ``bad`` (True) or the class it returns
    (e.g. ``"better"`` / ``"worse"``). Columns without any value are left out unless ``keep_empty``.
    """

    rows: Any
    caption: str = ""
    columns: Sequence[str] | None = None
    float_format: str = "{:.4g}"
    highlight: Any = None
    formats: Mapping[str, Any] = field(default_factory=dict)
    keep_empty: bool = False


@dataclass
class Cell:
    """One table cell: ``value`` shown as usual, with an optional tooltip ``title`` and CSS class ``css``."""

    value: Any
    title: str = ""
    css: str = ""

    def __str__(self) -> str:
        return str(self.value)


@dataclass
class Details:
    """A folded block (``<details>``): the ``summary`` line, then text, tables and figures when opened."""

    summary: str
    text: str | Sequence[str] = ""
    tables: list[Any] = field(default_factory=list)
    figures: list[Any] = field(default_factory=list)
    open: bool = False


@dataclass
class ReportFigure:
    """A figure to embed: a matplotlib Figure (rendered to PNG) or PNG bytes, with a caption."""

    figure: Figure | bytes
    caption: str = ""
    alt: str = ""


@dataclass
class Section:
    """A report section: a title, markdown-ish paragraphs, tables and figures (rendered in that order)."""

    title: str
    text: str | Sequence[str] = ""
    tables: list[Any] = field(default_factory=list)
    figures: list[Any] = field(default_factory=list)
    #: folded blocks after the tables and figures
    details: list[Details] = field(default_factory=list)


def table_from_rows(rows: Any) -> tuple[list[str], list[Mapping[str, Any]]]:
    """Normalise a list of dict rows or a DataFrame (duck-typed, pandas is optional) to (columns, rows)."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        frame = rows.reset_index() if getattr(rows.index, "name", None) is not None else rows
        return [str(c) for c in frame.columns], frame.to_dict(orient="records")
    if isinstance(rows, Mapping):
        raise TypeError("table rows must be a list of dicts or a DataFrame, got a dict (wrap it in a list)")
    rows = list(rows)
    cols: dict[str, None] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise TypeError(f"table row {i} must be a dict, got {type(r).__name__}")
        cols.update(dict.fromkeys(str(k) for k in r))
    return list(cols), [{str(k): v for k, v in r.items()} for r in rows]


def _fmt(value: Any, float_format: Any) -> tuple[str, bool]:
    """Cell text (escaped) and whether it is text (left-aligned); ``float_format`` is a format string or a
    function of the value."""
    if value is None:
        return "", False
    if isinstance(value, bool):
        return html.escape(str(value)), True
    if isinstance(value, int | np.integer) and isinstance(float_format, str):
        return str(int(value)), False
    try:
        f = float(value)
        is_num = not isinstance(value, str)
    except (TypeError, ValueError):
        is_num = False
    if is_num:
        if math.isnan(f):
            return "", False
        text = float_format(f) if callable(float_format) else float_format.format(f)
        return html.escape(text), False
    return html.escape(str(value)), True


def _empty(value: Any) -> bool:
    value = value.value if isinstance(value, Cell) else value
    if value is None or (isinstance(value, str) and not value.strip()):
        return True
    try:
        return not isinstance(value, str) and math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _cell(t: Table, column: str, v: Any) -> str:
    """One ``<td>``: formatted value, alignment, highlight class and tooltip."""
    title, css = "", []
    if isinstance(v, Cell):
        title, css, v = v.title, [v.css] if v.css else [], v.value
    text, is_text = _fmt(v, t.formats.get(column, t.float_format))
    if is_text:
        css.append("text")
    mark = t.highlight(column, v) if t.highlight is not None and v is not None else False
    if mark:
        css.append(mark if isinstance(mark, str) else "bad")
    attr = f' class="{" ".join(css)}"' if css else ""
    if title:
        attr += f' title="{html.escape(title, quote=True)}"'
    return f"<td{attr}>{text}</td>"


def _render_table(t: Table | Any) -> str:
    if not isinstance(t, Table):
        t = Table(rows=t)
    cols, rows = table_from_rows(t.rows)
    if t.columns is not None:
        cols = [str(c) for c in t.columns]
    if not t.keep_empty and rows:
        cols = [c for c in cols if not all(_empty(r.get(c)) for r in rows)]
    out = ['<div class="tablewrap"><table>']
    if t.caption:
        out.append(f"<caption>{html.escape(t.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>" + "".join(_cell(t, c, r.get(c)) for c in cols) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _png_bytes(fig: Figure | bytes) -> bytes:
    if isinstance(fig, Figure):
        return figure_to_png_bytes(fig)
    if isinstance(fig, bytes | bytearray):
        if not bytes(fig[:8]) == _PNG_MAGIC:
            raise ValueError("figure bytes must be a PNG image (missing PNG signature)")
        return bytes(fig)
    raise TypeError(f"figures must be matplotlib Figures or PNG bytes, got {type(fig).__name__}")


def _render_figure(item: Any) -> str:
    if isinstance(item, tuple):
        item = ReportFigure(*item)
    if not isinstance(item, ReportFigure):
        item = ReportFigure(item)
    data = base64.b64encode(_png_bytes(item.figure)).decode("ascii")
    alt = html.escape(item.alt or item.caption or "figure", quote=True)
    cap = f"<figcaption>{html.escape(item.caption)}</figcaption>" if item.caption else ""
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{cap}</figure>'


_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?![*\w])"), r"<em>\1</em>"),
]


def _inline(text: str) -> str:
    s = html.escape(text)
    for pat, rep in _INLINE:
        s = pat.sub(rep, s)
    return s


def _render_block(lines: list[str]) -> str:
    """One blank-line separated block: paragraph lines, then bullet items (``- `` lines, each continued by the
    lines that follow it until the next item)."""
    out, para, items = [], [], []
    for ln in lines:
        if ln.startswith("- "):
            items.append(ln[2:])
        elif items:
            items[-1] += " " + ln
        else:
            para.append(ln)
    if para:
        out.append(f"<p>{_inline(' '.join(para))}</p>")
    if items:
        out.append("<ul>" + "".join(f"<li>{_inline(it)}</li>" for it in items) + "</ul>")
    return "".join(out)


def _render_text(text: str | Sequence[str]) -> str:
    blocks: Iterable[str]
    blocks = re.split(r"\n\s*\n", text) if isinstance(text, str) else list(text)
    out = []
    for block in blocks:
        lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        if lines:
            out.append(_render_block(lines))
    return "".join(out)


def _render_details(d: Details) -> str:
    parts = [f"<details{' open' if d.open else ''}><summary>{html.escape(d.summary)}</summary>"]
    parts.append(_render_text(d.text))
    parts.extend(_render_table(t) for t in d.tables)
    parts.extend(_render_figure(f) for f in d.figures)
    parts.append("</details>")
    return "".join(parts)


def _slug(i: int) -> str:
    return f"s{i + 1}"


def render_html(title: str, sections: Sequence[Section], *, subtitle: str = "") -> str:
    """Render a complete, self-contained HTML5 document (no external resources)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f'<p class="meta">{html.escape(subtitle)}</p>')
    if len(sections) > 1:
        items = "".join(
            f'<li><a href="#{_slug(i)}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections)
        )
        parts.append(f"<nav><strong>Contents</strong><ol>{items}</ol></nav>")
    for i, sec in enumerate(sections):
        if not isinstance(sec, Section):
            raise TypeError(f"sections[{i}] must be a Section, got {type(sec).__name__}")
        parts.append(f'<section id="{_slug(i)}"><h2>{html.escape(sec.title)}</h2>')
        parts.append(_render_text(sec.text))
        parts.extend(_render_table(t) for t in sec.tables)
        parts.extend(_render_figure(f) for f in sec.figures)
        parts.extend(_render_details(d) for d in sec.details)
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts)
