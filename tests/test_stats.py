"""Proportions: Wilson intervals, PPV and NPV at a prevalence, Newcombe's difference, prevalence parsing."""

from __future__ import annotations

import math

import pytest

from covid_cxr.stats import (
    Proportion,
    difference_interval,
    npv_at_prevalence,
    parse_prevalences,
    ppv_at_prevalence,
    predictive_values,
    wilson_interval,
)


def test_wilson_reference_values() -> None:
    low, high = wilson_interval(26, 31)
    assert (round(100 * low, 2), round(100 * high, 2)) == (67.37, 92.91)
    low, high = wilson_interval(25, 31)  # SPEC section 7
    assert (round(100 * low, 1), round(100 * high, 1)) == (63.7, 90.8)
    assert wilson_interval(0, 10)[0] == 0.0 and 0 < wilson_interval(0, 10)[1] < 0.35
    assert wilson_interval(10, 10)[1] == 1.0 and 0.65 < wilson_interval(10, 10)[0] < 1
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    wide, narrow = wilson_interval(80, 100, 0.99), wilson_interval(80, 100, 0.90)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_proportion_is_a_percentage_with_its_wilson_interval_and_an_audit_record() -> None:
    p = Proportion(25, 31)
    low, high = wilson_interval(25, 31)
    assert p.value == pytest.approx(100 * 25 / 31) and p.ci == pytest.approx((100 * low, 100 * high))
    assert p.as_interval() == {"value": 25 / 31, "low": low, "high": high, "n": 31, "k": 25, "method": "wilson"}
    assert math.isnan(Proportion(0, 0).value) and Proportion(0, 0).as_interval()["value"] is None


def test_ppv_at_prevalence() -> None:
    assert ppv_at_prevalence(0.8, 0.99, 0.05) == pytest.approx(0.04 / (0.04 + 0.0095))
    with pytest.raises(ValueError, match="prevalence"):
        ppv_at_prevalence(0.8, 0.9, 1.5)


def test_predictive_values_follow_bayes_and_their_intervals_hold_them() -> None:
    sens, spec = Proportion(25, 31), Proportion(900, 1000)
    for p in (0.01, 0.05, 0.2):
        out = predictive_values(sens, spec, p)
        s, t = 25 / 31, 0.9
        assert out["ppv"] == pytest.approx(100 * s * p / (s * p + (1 - t) * (1 - p)))
        assert out["npv"] == pytest.approx(100 * t * (1 - p) / (t * (1 - p) + (1 - s) * p))
        assert out["ppv_ci_low"] < out["ppv"] < out["ppv_ci_high"]
        assert out["npv_ci_low"] < out["npv"] < out["npv_ci_high"]
    # A perfect test at any prevalence: NPV 1; lower sensitivity lowers NPV.
    assert npv_at_prevalence(1.0, 0.9, 0.05) == 1.0 and npv_at_prevalence(0.8, 0.9, 0.05) < 1.0
    assert math.isnan(predictive_values(Proportion(0, 0), spec, 0.05)["ppv"])


def test_difference_interval_is_newcombes_hybrid_score() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, Table II example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339.
    d, low, high = difference_interval(Proportion(48, 80), Proportion(56, 70))
    assert d == pytest.approx(20.0) and low == pytest.approx(5.24, abs=0.01) and high == pytest.approx(33.39, abs=0.01)
    assert all(math.isnan(v) for v in difference_interval(Proportion(0, 0), Proportion(1, 2)))


def test_parse_prevalences_takes_fractions_or_percentages() -> None:
    assert parse_prevalences("0.01, 5%,0.2") == (0.01, 0.05, 0.2)
    for bad in ("0", "1", "abc", "", "150%"):
        with pytest.raises(ValueError, match="prevalence"):
            parse_prevalences(bad)
