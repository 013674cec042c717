"""Operating points: rules parsed and stored, thresholds chosen on validation scores, decisions made by them.

The end-to-end test calibrates a tiny network on a prepared synthetic split and checks that
``predict`` (PyTorch and ONNX) and the web service give the same, thresholded answers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from covid_cxr.errors import ConfigError
from covid_cxr.evaluate.metrics import Proportion, binary_figures, confusion_matrix, wilson_interval
from covid_cxr.operating_point import OperatingPoint, choose, choose_from_probs, parse_rule

# A known score distribution: COVID-19 scores ~ N(1, 1), the others ~ N(-1, 1), squashed to (0, 1).
MU = 1.0


def _scores(rng: np.random.Generator, n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    z = np.r_[rng.normal(MU, 1, n_pos), rng.normal(-MU, 1, n_neg)]
    return np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)], 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("text, expected", [
    ("argmax", ("argmax", None)), ("youden", ("youden", None)), (" Sensitivity=0.95 ", ("sensitivity", 0.95)),
    ("specificity=0.9", ("specificity", 0.9)), ("sensitivity=1", ("sensitivity", 1.0)),
])
def test_parse_rule_accepts_the_documented_forms(text: str, expected: tuple[str, float | None]) -> None:
    assert parse_rule(text) == expected


@pytest.mark.parametrize("text, hint", [
    ("threshold=0.5", "sensitivity=T"), ("sensitivity", "needs a number"), ("sensitivity=abc", "needs a number"),
    ("sensitivity=95", "0.95"), ("specificity=0", "(0, 1]"), ("youden=0.3", "takes no target"),
])
def test_parse_rule_errors_name_the_valid_forms(text: str, hint: str) -> None:
    with pytest.raises(ConfigError, match="argmax") as err:
        parse_rule(text)
    assert hint in str(err.value)


def test_round_trip_and_missing_means_argmax() -> None:
    op = OperatingPoint("sensitivity", 0.95, 0.3125, validation={"sensitivity": 0.96, "n_positive": 25})
    assert OperatingPoint.from_dict(op.to_dict()) == op
    assert OperatingPoint.from_json(op.to_json()) == op
    assert set(op.to_dict()) >= {"rule", "target", "positive_class", "threshold", "validation"}
    assert OperatingPoint.from_dict(None) == OperatingPoint() == OperatingPoint.from_json("")
    assert OperatingPoint().rule == "argmax" and OperatingPoint().threshold is None
    with pytest.raises(ConfigError, match="threshold"):
        OperatingPoint("youden")
    with pytest.raises(ConfigError, match="unknown keys"):
        OperatingPoint.from_dict({"rule": "argmax", "thresh": 0.5})


def test_decide_thresholds_covid_and_argmaxes_the_rest() -> None:
    classes = ("normal", "covid", "pneumonia")  # the positive class need not come first
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.25, 0.65], [0.6, 0.2, 0.2], [0.2, 0.7, 0.1]])
    assert OperatingPoint().decide(probs, classes).tolist() == [0, 2, 0, 1]
    op = OperatingPoint("sensitivity", 0.9, 0.25)
    assert op.decide(probs, classes).tolist() == [1, 1, 0, 1]  # p_covid >= 0.25 is COVID-19, else the larger other
    with pytest.raises(ConfigError, match="covid"):
        op.decide(probs[:, :2], ("normal", "pneumonia"))


def test_sensitivity_target_is_met_on_validation_and_test_sensitivity_has_its_interval() -> None:
    rng = np.random.default_rng(7)
    y_val, s_val = _scores(rng, 60, 600)
    op = choose("sensitivity=0.95", y_val, s_val)
    decided = s_val >= op.threshold
    assert decided[y_val].mean() >= 0.95 and op.validation["sensitivity"] == decided[y_val].mean()
    # The highest such threshold: moving it above the next validation score misses the target.
    above = np.sort(s_val[s_val > op.threshold])
    assert (s_val[y_val] >= above[1]).mean() < 0.95
    # Halfway between two validation scores, so a backend's rounding cannot move a validation image across it.
    gap = min(np.abs(s_val - op.threshold))
    assert gap > 0 and op.threshold == pytest.approx((above[0] + s_val[s_val < op.threshold].max()) / 2)
    # On test: the sensitivity reached is stated with its Wilson interval, which covers the true one of the rule.
    y_test, s_test = _scores(rng, 400, 400)
    probs = np.c_[s_test, 1 - s_test, np.zeros_like(s_test)]
    pred = op.decide(probs, ("covid", "normal", "pneumonia"))
    cm = confusion_matrix(np.where(y_test, "covid", "normal"), np.array(["covid", "normal", "pneumonia"])[pred])
    fig = binary_figures(cm, 0)
    assert fig.sensitivity == Proportion(int((s_test[y_test] >= op.threshold).sum()), 400)
    low, high = fig.sensitivity.ci
    assert (low, high) == tuple(100 * v for v in wilson_interval(fig.sensitivity.k, 400))
    true_sens = norm.sf(np.log(op.threshold / (1 - op.threshold)), loc=MU)
    assert low <= 100 * true_sens <= high


def test_specificity_target_and_youden() -> None:
    rng = np.random.default_rng(3)
    y, s = _scores(rng, 80, 300)
    op = choose("specificity=0.9", y, s)
    assert (s[~y] < op.threshold).mean() >= 0.9
    below = s[s < op.threshold].max()
    assert (s[~y] < below).mean() < 0.9  # the lowest threshold keeping it: at the next lower score it is lost
    youden = choose("youden", y, s)
    j = lambda t: (s[y] >= t).mean() + (s[~y] < t).mean() - 1  # noqa: E731
    assert j(youden.threshold) == pytest.approx(max(j(t) for t in np.unique(s)))
    assert choose("argmax", y, s) == OperatingPoint()


def test_choosing_needs_both_sides_on_validation() -> None:
    with pytest.raises(ConfigError, match="0 other"):
        choose("youden", np.ones(5, bool), np.linspace(0, 1, 5))
    with pytest.raises(ConfigError, match="no 'covid'"):
        choose_from_probs("youden", np.full((3, 2), 0.5), ["normal"] * 3, ("normal", "pneumonia"))


def test_a_target_of_one_is_met_and_stays_within_probabilities() -> None:
    y = np.array([True, True, False, False])
    s = np.array([0.9, 0.2, 0.5, 0.1])
    assert choose("sensitivity=1", y, s).validation["sensitivity"] == 1.0
    op = choose("specificity=1", y, s)
    assert op.validation["specificity"] == 1.0 and op.validation["tp"] == 1 and math.isfinite(op.threshold)
    json.dumps(op.to_dict(), allow_nan=False)
