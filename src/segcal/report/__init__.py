"""Self-contained HTML reports (one file, embedded PNG figures, no external resources).

Generic core: :func:`render_html` with :class:`Section`, :class:`Table`, :class:`ReportFigure`.
Run-level builders: :func:`build_evaluation_report` (one evaluated run folder) and
:func:`build_comparison_report` (several runs plus a statistics table).
"""

from segcal.report.comparison import build_comparison_report
from segcal.report.html import Cell, Details, ReportFigure, Section, Table, render_html
from segcal.report.runs import (
    METRIC_GLOSSARY,
    build_evaluation_report,
    glossary_section,
    load_run,
)

__all__ = [
    "METRIC_GLOSSARY",
    "Cell",
    "Details",
    "ReportFigure",
    "Section",
    "Table",
    "build_comparison_report",
    "build_evaluation_report",
    "glossary_section",
    "load_run",
    "render_html",
]
