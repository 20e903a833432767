"""How the studies' reports write values: ``fmt`` and ``pct`` (the prose and tables of REPORT.md,
CLAIMS.md and ZOO.md), ``format_cell`` (a value in its column's units: vae-report's runs table
and heatmap cells, so that a plot reads like the table), and the markdown table cells
``md_row`` / ``md_cell``.
"""

from __future__ import annotations

import math
from typing import Any


def fmt(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals; "—" when absent (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def pct(value: Any) -> str:
    """A fraction as a percentage with two decimals ("84.01 %"); "—" when absent."""
    return "—" if value is None else f"{100 * value:.2f} %"


def format_cell(column: str, value: Any) -> str:
    """A value as vae-report shows it: "—" when absent, units by column."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if column.endswith("_acc"):
            return f"{100 * value:.2f}%"
        if column.endswith("mse"):
            return f"{value:.4f}"
        if column.startswith("time/"):
            return f"{value:.1f}"
        if column in ("beta", "val/active_units"):
            return f"{value:g}"
        return f"{value:.2f}"  # losses, nats per image
    return str(value)


def md_row(*cells: Any) -> str:
    """One markdown table row of the cells as given."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_cell(text: str, limit: int | None = None) -> str:
    """``text`` as one table cell: on one line, cut to ``limit`` characters, ``|`` escaped."""
    text = " ".join(text.split())  # a table row is one line
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")
