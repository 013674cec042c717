"""Proportions and their intervals: the statistics every area states its rates with.

A rate here is k out of n with a 95% Wilson score interval (small COVID-19 test sets live at
k = 0 or k = n, where the normal approximation fails); a difference of two independent rates
carries Newcombe's hybrid score interval; PPV and NPV move to another prevalence by Bayes' rule.
Pure Python, no NumPy: ``data/``, ``evaluate/``, ``audit/`` and the command line all import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

_Z95 = NormalDist().inv_cdf(0.975)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n, as fractions; (nan, nan) when n == 0.

    Unlike the normal approximation it stays inside [0, 1] and behaves at k = 0 or k = n,
    which is where small COVID-19 test sets live.
    """
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"successes must lie in 0..{n}; got {k}")
    z = _Z95 if confidence == 0.95 else NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 (k = n) the bound is exactly 0 (1); say so rather than leave a rounding residue.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


@dataclass(frozen=True)
class Proportion:
    """k out of n as a percentage with its Wilson interval (NaN when n == 0)."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return 100.0 * self.k / self.n if self.n else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        low, high = wilson_interval(self.k, self.n)
        return (100.0 * low, 100.0 * high)

    def as_interval(self) -> dict[str, Any]:
        """The audits' interval record, as fractions: value, low, high, n, k, method (value None when n == 0)."""
        low, high = wilson_interval(self.k, self.n)
        return {"value": self.k / self.n if self.n else None, "low": low, "high": high, "n": self.n, "k": self.k,
                "method": "wilson"}


def ppv_at_prevalence(sensitivity: float, specificity: float, prevalence: float) -> float:
    """Precision a classifier would have where the class has ``prevalence`` (fractions in, fraction out).

    A test set's COVID-19 share (31 of 11302) is not a clinic's; Bayes' rule moves precision there.
    """
    if not 0.0 < prevalence < 1.0:
        raise ValueError(f"prevalence must lie strictly between 0 and 1; got {prevalence}")
    true_pos = sensitivity * prevalence
    false_pos = (1.0 - specificity) * (1.0 - prevalence)
    total = true_pos + false_pos
    return true_pos / total if total > 0 else math.nan


def npv_at_prevalence(sensitivity: float, specificity: float, prevalence: float) -> float:
    """Negative predictive value where the class has ``prevalence`` (Bayes' rule; fractions in and out)."""
    if not 0.0 < prevalence < 1.0:
        raise ValueError(f"prevalence must lie strictly between 0 and 1; got {prevalence}")
    true_neg = specificity * (1.0 - prevalence)
    false_neg = (1.0 - sensitivity) * prevalence
    total = true_neg + false_neg
    return true_neg / total if total > 0 else math.nan


def predictive_values(sens: Proportion, spec: Proportion, prevalence: float) -> dict[str, float]:
    """PPV and NPV (percentages) at ``prevalence``, with intervals propagated from those of sens and spec.

    Both values rise with sensitivity and with specificity, so the Wilson bounds of the two,
    pushed through Bayes' rule together, bound them (conservatively: both ends at once).
    """
    if not (sens.n and spec.n):
        return {f"{w}{s}": math.nan for w in ("ppv", "npv") for s in ("", "_ci_low", "_ci_high")}
    (s_lo, s_hi), (t_lo, t_hi) = wilson_interval(sens.k, sens.n), wilson_interval(spec.k, spec.n)
    s, t = sens.k / sens.n, spec.k / spec.n
    out = {}
    for name, fn in (("ppv", ppv_at_prevalence), ("npv", npv_at_prevalence)):
        out[name] = 100.0 * fn(s, t, prevalence)
        out[f"{name}_ci_low"] = 100.0 * fn(s_lo, t_lo, prevalence)
        out[f"{name}_ci_high"] = 100.0 * fn(s_hi, t_hi, prevalence)
    return out


def difference_interval(a: Proportion, b: Proportion, confidence: float = 0.95) -> tuple[float, float, float]:
    """b - a in percentage points with Newcombe's hybrid score interval (independent samples, Wilson-based).

    Newcombe (1998), method 10: the interval of a difference built from each proportion's Wilson
    interval, good at the small counts and extreme rates of COVID-19 test sets. NaN when either is 0/0.
    """
    if not a.n or not b.n:
        return (math.nan, math.nan, math.nan)
    p1, p2 = a.k / a.n, b.k / b.n
    l1, u1 = wilson_interval(a.k, a.n, confidence)
    l2, u2 = wilson_interval(b.k, b.n, confidence)
    d = p2 - p1
    low = d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    high = d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return (100.0 * d, 100.0 * low, 100.0 * high)


DEFAULT_PREVALENCES: tuple[float, ...] = (0.01, 0.05, 0.20)
"""Where PPV and NPV are stated besides the test set's own mix: a low, a middling and a high COVID-19 share."""


def parse_prevalences(text: str) -> tuple[float, ...]:
    """``'0.01,0.05,0.2'`` or ``'1%,5%,20%'`` -> fractions strictly between 0 and 1."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part[:-1]) / 100 if part.endswith("%") else float(part)
        except ValueError:
            raise ValueError(f"prevalence {part!r} is not a number; "
                             "write fractions (0.05) or percentages (5%)") from None
        if not 0.0 < value < 1.0:
            raise ValueError(f"prevalence {part!r} must lie strictly between 0 and 1 (0.05 or 5%)")
        out.append(value)
    if not out:
        raise ValueError("no prevalence given; write e.g. 0.01,0.05,0.2 or 1%,5%,20%")
    return tuple(out)
