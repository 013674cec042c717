"""Proportions and their intervals: the statistics every area states its rates with.

A rate here is k out of n with a 95% Wilson score interval (small COVID-19 test sets live at
k = 0 or k = n, where the normal approximation fails); where the n images come from fewer patients
(:func:`clustered_proportion`), Wilson's interval on the design-effect-adjusted effective sample
size, since one patient's images are not independent. A difference of two independent rates
carries Newcombe's hybrid score interval; PPV and NPV move to another prevalence by Bayes' rule.
Pure Python, no NumPy: ``data/``, ``evaluate/``, ``audit/`` and the command line all import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

_Z95 = NormalDist().inv_cdf(0.975)


def wilson_interval(k: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n, as fractions; (nan, nan) when n == 0.

    Unlike the normal approximation it stays inside [0, 1] and behaves at k = 0 or k = n,
    which is where small COVID-19 test sets live. ``k`` and ``n`` may be effective (non-integer)
    counts, as :func:`clustered_proportion` gives.
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
    """k out of n as a percentage with its 95% interval (NaN when n == 0).

    Wilson's score interval on k/n; where the n images come from fewer ``patients`` (see
    :func:`clustered_proportion`), Wilson's interval on the effective counts k/d of n/d, d being the
    ``design_effect``. ``patients`` is None where no patient ids are known (each image counts alone).
    """

    k: int
    n: int
    patients: int | None = None
    design_effect: float = 1.0

    @property
    def value(self) -> float:
        return 100.0 * self.k / self.n if self.n else math.nan

    @classmethod
    def of_fraction(cls, fraction: float, n: int) -> Proportion:
        """The k of n that a record kept as a fraction (a validation sensitivity, an int8 agreement): rounded back,
        exactly for any n a record rounding to 5 significant digits can hold (fewer than 100,000)."""
        return cls(max(0, min(n, round(fraction * n))), n)

    @property
    def clustered(self) -> bool:
        """Whether some patient gives more than one image to n: the interval then allows for it."""
        return self.patients is not None and self.patients < self.n

    @property
    def effective_n(self) -> float:
        return self.n / self.design_effect

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """The interval as fractions: Wilson's on k/n, or on the effective counts where clustered."""
        if self.design_effect == 1.0:
            return wilson_interval(self.k, self.n, confidence)
        return wilson_interval(self.k / self.design_effect, self.n / self.design_effect, confidence)

    @property
    def ci(self) -> tuple[float, float]:
        low, high = self.interval()
        return (100.0 * low, 100.0 * high)

    @property
    def method(self) -> str:
        """Which interval the figure carries, in words: ``Wilson``, or ``Wilson, adjusted for 22 patients``."""
        if not self.clustered:
            return "Wilson"
        return f"Wilson, adjusted for {self.patients} patients (design effect {self.design_effect:.2f})"

    def as_interval(self) -> dict[str, Any]:
        """The audits' interval record, as fractions: value, low, high, n, k, method (value None when n == 0);
        ``patients`` and ``design_effect`` too where the images are clustered."""
        low, high = self.interval()
        out = {"value": self.k / self.n if self.n else None, "low": low, "high": high, "n": self.n, "k": self.k,
               "method": "wilson"}
        if self.clustered:
            out.update(method="wilson-design-effect", patients=self.patients, design_effect=self.design_effect)
        return out


def clustered_proportion(k: int, n: int, hits: Sequence[int] | None = None,
                         sizes: Sequence[int] | None = None) -> Proportion:
    """k of n images with an interval that allows for several images of one patient.

    ``hits[i]`` and ``sizes[i]`` are patient i's share of k and of n (patients with no image in n are
    ignored); without them, or where every patient gives at most one image, this is plain Wilson.
    Otherwise the survey approach for a ratio estimator over clusters (design effect: Kish 1965, *Survey
    Sampling*; ratio variance: Cochran 1977, *Sampling Techniques*, 6.13; an interval on the effective
    sample size: Korn & Graubard 1998, *Survey Methodology* 24:193-201, with Wilson's: Dean & Pagano 2015,
    *J Surv Stat Methodol* 3:484-503): with m patients, N = n images and p = k/n,

        var(p) = m/(m-1) * sum_i (hits_i - p*sizes_i)^2 / N^2     (cluster-robust, between patients)
        d = max(1, var(p) / (p(1-p)/N))                            (design effect, floored at 1)

    and Wilson's interval on the effective counts p*N/d of N/d. Where p is 0 or 1, var(p) is 0 and
    says nothing of how alike a patient's images are (d would be 1, the interval as narrow as if all N
    were independent); there each patient counts once (effective n = m). That stays valid however alike
    one patient's images are: every patient has all images right (or all wrong), so Wilson's bound on
    m of m bounds the share of such patients, and the image rate is no further from 1 (0) than that
    share. One patient is likewise one observation (effective n = 1; var(p) needs two). With few
    patients var(p) is itself uncertain and the interval under-covers somewhat, as any cluster-robust
    one does.
    """
    if hits is None or sizes is None:
        if hits is not None or sizes is not None:
            raise ValueError("give both the per-patient successes and the per-patient image counts, or neither")
        return Proportion(k, n)
    pairs = [(int(h), int(s)) for h, s in zip(hits, sizes, strict=True) if s]
    if any(not 0 <= h <= s for h, s in pairs) or sum(h for h, _ in pairs) != k or sum(s for _, s in pairs) != n:
        raise ValueError(f"per-patient counts must lie in 0..size and add up to {k}/{n}")
    m = len(pairs)
    if m >= n:  # every patient gives at most one image: the images are independent, as Wilson assumes
        return Proportion(k, n, patients=m)
    p = k / n
    if m == 1 or k in (0, n):
        return Proportion(k, n, patients=m, design_effect=n / m)
    var = m / (m - 1) * sum((h - p * s) ** 2 for h, s in pairs) / (n * n)
    return Proportion(k, n, patients=m, design_effect=max(1.0, var / (p * (1 - p) / n)))


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

    Both values rise with sensitivity and with specificity, so the bounds of the two (Wilson's, adjusted for
    patients where clustered), pushed through Bayes' rule together, bound them (conservatively: both ends at once).
    """
    if not (sens.n and spec.n):
        return {f"{w}{s}": math.nan for w in ("ppv", "npv") for s in ("", "_ci_low", "_ci_high")}
    (s_lo, s_hi), (t_lo, t_hi) = sens.interval(), spec.interval()
    s, t = sens.k / sens.n, spec.k / spec.n
    out = {}
    for name, fn in (("ppv", ppv_at_prevalence), ("npv", npv_at_prevalence)):
        out[name] = 100.0 * fn(s, t, prevalence)
        defined = not math.isnan(out[name])  # no interval around a value that is not there (no "not covid" call)
        out[f"{name}_ci_low"] = 100.0 * fn(s_lo, t_lo, prevalence) if defined else math.nan
        out[f"{name}_ci_high"] = 100.0 * fn(s_hi, t_hi, prevalence) if defined else math.nan
    return out


def difference_interval(a: Proportion, b: Proportion, confidence: float = 0.95) -> tuple[float, float, float]:
    """b - a in percentage points with Newcombe's hybrid score interval (independent samples, Wilson-based).

    Newcombe (1998), method 10: the interval of a difference built from each proportion's Wilson
    interval, good at the small counts and extreme rates of COVID-19 test sets; a clustered proportion
    brings its patient-adjusted interval (:meth:`Proportion.interval`). NaN when either is 0/0.
    """
    if not a.n or not b.n:
        return (math.nan, math.nan, math.nan)
    p1, p2 = a.k / a.n, b.k / b.n
    l1, u1 = a.interval(confidence)
    l2, u2 = b.interval(confidence)
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
