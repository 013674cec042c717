"""Figures as text: percentages, intervals, numbers, durations and small tables, written one way everywhere.

The report, the audits, ``covid-cxr metrics`` and the int8 check all print through here, so a rate
reads the same in each. Two interval forms, both fixed:

- in a table cell, where the header names the unit: ``89.4 [87.5, 91.0]`` (:func:`interval`);
- in a sentence: ``89.4% (95% CI 87.5-91.0%)`` (:func:`with_ci`).

An undefined figure (None or NaN) is written as ``n/a`` unless a caller's table uses another mark.
No NumPy here: the command line imports this module at start-up.
"""

from __future__ import annotations

import html
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

NA = "n/a"


def missing(value: Any) -> bool:
    """True for None and NaN: a figure that is not defined."""
    return value is None or (isinstance(value, numbers.Real) and math.isnan(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def number(value: Any, digits: int = 2, *, na: str = NA) -> str:
    """``0.95`` with ``digits`` decimals; a non-number (a name, a fold) as it is; ``na`` when undefined."""
    if missing(value):
        return na
    if _is_number(value):
        return f"{value:.{digits}f}"
    return str(value)


def signed(value: float, digits: int = 1) -> str:
    """``+3.2`` / ``-0.8``: a difference, its sign always written."""
    return f"{value:+.{digits}f}"


def percent(value: Any, digits: int | None = 1, *, fraction: bool = False, na: str = NA) -> str:
    """``89.4%`` from a percentage (or from a fraction with ``fraction=True``); ``na`` when undefined.

    ``digits=None`` writes the shortest form (``5%``, ``0.5%``), for settings rather than measurements.
    """
    if missing(value) or not _is_number(value):
        return na
    shown = 100.0 * value if fraction else value
    return f"{shown:g}%" if digits is None else f"{shown:.{digits}f}%"


def exact(value: float) -> str:
    """The shortest text that reads back as the same float (``0.33270611``), for a threshold: rounded, two rules
    would print alike, and an image between the printed and the stored threshold would fall on the far side of the
    rule as printed."""
    return repr(float(value))


def _around(value: float, low: float, high: float, digits: int) -> tuple[float, float]:
    """``low`` and ``high``, a bound that passes ``value`` by less than half the last printed digit moved onto it.

    Such a bound is the same figure at this precision, yet rounds apart: 0.8375 against 0.83749999 would print
    ``0.837 [0.838, 0.838]``, the value outside its own interval. A bound that passes it by more is kept as it is.
    """
    half = 0.5 * 10.0 ** -digits
    return (value if value < low < value + half else low), (value if value - half < high < value else high)


def interval(value: Any, low: Any, high: Any, digits: int = 1, *, sign: bool = False, na: str = NA) -> str:
    """A table cell: ``89.4 [87.5, 91.0]``; the value alone when the interval is undefined; ``na`` when it is.

    ``sign`` writes every figure with its sign (``+3.2 [-1.0, +7.5]``), for differences. A bound that differs from
    the value only by rounding is written as the value, so the printed interval holds the printed value.
    """
    if missing(value):
        return na
    put = (lambda v: signed(v, digits)) if sign else (lambda v: number(v, digits))
    if missing(low) or missing(high):
        return put(value)
    low, high = _around(value, low, high, digits)
    return f"{put(value)} [{put(low)}, {put(high)}]"


def with_ci(value: Any, low: Any, high: Any, digits: int | None = None, *, as_percent: bool = True,
            fraction: bool = False, na: str = NA) -> str:
    """A sentence's figure: ``80.6% (95% CI 63.7-90.8%)``, or ``0.950 (95% CI 0.900-0.990)`` for a score.

    Percentages take 1 decimal and scores 3 unless ``digits`` says otherwise; ``fraction`` scales
    fractions to percentages. The value alone when the interval is undefined; a bound that differs from the
    value only by rounding is written as the value, as in :func:`interval`.
    """
    if missing(value):
        return na
    scale = 100.0 if as_percent and fraction else 1.0
    d = digits if digits is not None else (1 if as_percent else 3)
    if as_percent:
        shown = f"{scale * value:.{d}f}%"
        if missing(low) or missing(high):
            return shown
        low, high = _around(scale * value, scale * low, scale * high, d)
        return f"{shown} (95% CI {low:.{d}f}-{high:.{d}f}%)"
    if missing(low) or missing(high):
        return number(value, d)
    low, high = _around(value, low, high, d)
    return f"{number(value, d)} (95% CI {number(low, d)}-{number(high, d)})"


def record(iv: Mapping[str, Any] | None, *, as_percent: bool = True) -> str:
    """An interval record of fractions (``{"value", "low", "high"}``, as the audits store them) in a sentence.

    ``80.6% (95% CI 63.7-90.8%)``; a score such as an AUC (``as_percent=False``) as ``0.950 (95% CI 0.900-0.990)``.
    """
    if not iv or iv.get("value") is None:
        return NA
    return with_ci(iv["value"], iv.get("low"), iv.get("high"), as_percent=as_percent, fraction=True)


class Rate(Protocol):
    """k of n as a percentage with its interval (:class:`covid_cxr.stats.Proportion` is one)."""

    @property
    def k(self) -> int: ...

    @property
    def n(self) -> int: ...

    @property
    def value(self) -> float: ...

    @property
    def ci(self) -> tuple[float, float]: ...


def proportion(rate: Rate, digits: int = 1, patients: int | None = None) -> str:
    """``80.6 [63.7, 90.8] (25/31)``: a rate with its interval and its counts (``(25/31, 9 patients)`` given the
    patients behind n); ``n/a (0/0)`` when n is 0."""
    if not rate.n:
        return f"{NA} (0/0)"
    behind = f", {patients} patients" if patients is not None else ""
    return f"{interval(rate.value, *rate.ci, digits)} ({rate.k}/{rate.n}{behind})"


def counted(rate: Rate, digits: int = 1) -> str:
    """``80.6% (95% CI 63.7-90.8%), 25/31``: a sentence's rate (:func:`with_ci`) with its counts; ``n/a (0/0)``."""
    return f"{NA} (0/0)" if not rate.n else f"{with_ci(rate.value, *rate.ci, digits)}, {rate.k}/{rate.n}"


def mean_sd(mean: Any, sd: Any, digits: int = 2) -> str:
    """``91.40 ± 2.31`` (mean ± sample sd over folds); the mean alone when there is no sd (one fold)."""
    return number(mean, digits) if missing(sd) else f"{number(mean, digits)} ± {number(sd, digits)}"


def duration(seconds: float) -> str:
    """``04:07`` or ``1:02:03``: a time span for a progress line."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


@dataclass
class Table:
    """A small table of text cells, rendered as Markdown, HTML, plain console lines or a rich table."""

    headers: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        """GitHub Markdown; a ``|`` inside a cell becomes ``/`` so it cannot split the cell."""
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                       for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def lines(self, indent: str = "  ") -> list[str]:
        """Plain lines for a terminal or a log: the header, then one line per row, cells split by `` | ``."""
        return [indent + " | ".join(self.headers)] + [indent + " | ".join(str(c) for c in row) for row in self.rows]

    def rich(self, title: str = "") -> Any:
        """A :class:`rich.table.Table`: first column left, the figures right-aligned.

        Every text is shown as it is, not read as rich markup, where ``AUC [bootstrap CI]`` or ``0.682 [n/a]`` would
        lose its brackets as an unknown style.
        """
        from rich.markup import escape
        from rich.table import (
            Table as RichTable,  # rich costs start-up time; only a printing verb needs it
        )

        out = RichTable(title=escape(title) if title else None)
        for i, header in enumerate(self.headers):
            out.add_column(escape(header), justify="left" if i == 0 else "right")
        for row in self.rows:
            out.add_row(*(escape(str(c)) for c in row))
        return out


def table_of(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A :class:`Table` from any cells (turned to text)."""
    return Table(list(headers), [[str(c) for c in row] for row in rows])
