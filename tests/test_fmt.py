"""Figures as text: one way to write a percentage, an interval, a rate and a table."""

from __future__ import annotations

import math

import numpy as np

from covid_cxr import fmt
from covid_cxr.stats import Proportion, wilson_interval


def test_undefined_figures_read_na_or_the_callers_mark() -> None:
    for value in (None, math.nan, np.float32("nan")):
        assert fmt.number(value) == "n/a" and fmt.percent(value) == "n/a"
        assert fmt.interval(value, 1.0, 2.0) == "n/a" and fmt.with_ci(value, 0.1, 0.2) == "n/a"
    assert fmt.interval(None, None, None, na="-") == "-"
    assert fmt.percent("not a number", na="unknown") == "unknown"


def test_numbers_and_percentages() -> None:
    assert fmt.number(0.9512, 3) == "0.951" and fmt.number(np.float64(2.5)) == "2.50"
    assert fmt.number("fold 1") == "fold 1"
    assert fmt.percent(89.44) == "89.4%" and fmt.percent(0.894, fraction=True) == "89.4%"
    assert fmt.percent(np.int64(1), 2) == "1.00%" and fmt.percent(0.05, None, fraction=True) == "5%"
    assert fmt.signed(3.25, 1) == "+3.2" and fmt.signed(-0.04, 1) == "-0.0"
    assert fmt.mean_sd(91.4, 2.312) == "91.40 ± 2.31" and fmt.mean_sd(91.4, math.nan) == "91.40"
    assert fmt.duration(65) == "01:05" and fmt.duration(3723) == "1:02:03"


def test_intervals_in_a_cell_and_in_a_sentence() -> None:
    assert fmt.interval(89.44, 87.5, 91.04) == "89.4 [87.5, 91.0]"
    assert fmt.interval(0.95, math.nan, math.nan, 3) == "0.950"  # no interval: the value alone, never "nan"
    assert fmt.interval(3.2, -1.0, 7.5, sign=True) == "+3.2 [-1.0, +7.5]"
    assert fmt.with_ci(0.806, 0.637, 0.908, fraction=True) == "80.6% (95% CI 63.7-90.8%)"
    assert fmt.with_ci(0.95, 0.9, 0.99, as_percent=False) == "0.950 (95% CI 0.900-0.990)"
    iv = Proportion(14, 20).as_interval()
    assert fmt.record(iv) == fmt.with_ci(70.0, *Proportion(14, 20).ci) == "70.0% (95% CI 48.1-85.5%)"
    assert fmt.record({"value": 0.5, "low": None, "high": None}) == "50.0%" and fmt.record(None) == "n/a"


def test_a_proportion_carries_its_counts() -> None:
    p = Proportion(25, 31)
    assert fmt.proportion(p) == f"{p.value:.1f} [{p.ci[0]:.1f}, {p.ci[1]:.1f}] (25/31)"
    assert fmt.proportion(Proportion(0, 0)) == "n/a (0/0)"


def test_a_table_renders_as_markdown_html_and_lines() -> None:
    table = fmt.table_of(["metric", "value"], [["a|b", 1], ["<c>", 2.5]])
    assert table.markdown().splitlines() == ["| metric | value |", "|---|---|", "| a/b | 1 |", "| <c> | 2.5 |"]
    assert "<td>&lt;c&gt;</td>" in table.html() and table.html().startswith("<table><thead><tr><th>metric</th>")
    assert table.lines() == ["  metric | value", "  a|b | 1", "  <c> | 2.5"]
    rich = table.rich("T")
    assert rich.title == "T" and [c.justify for c in rich.columns] == ["left", "right"]


def test_a_recorded_fraction_reads_back_as_its_count_with_its_interval() -> None:
    # A record keeps 107/108 as 0.9907407...; the sentence gives the count back and Wilson's interval around it.
    rate = Proportion.of_fraction(round(107 / 108, 5), 108)
    low, high = wilson_interval(107, 108)
    assert (rate.k, rate.n) == (107, 108)
    assert fmt.counted(rate) == f"99.1% (95% CI {100 * low:.1f}-{100 * high:.1f}%), 107/108"
    assert Proportion.of_fraction(1.0, 5).k == 5 and Proportion.of_fraction(-0.0, 5).k == 0
    assert fmt.counted(Proportion(0, 0)) == "n/a (0/0)"
