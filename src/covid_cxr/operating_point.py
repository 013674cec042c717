"""From a score to a decision: the operating point, chosen on the validation split, in fp32.

The paper decides by argmax. A screening tool wants a known COVID-19 sensitivity (or specificity),
which means a threshold on the COVID-19 probability chosen where the model has not been tested.
An :class:`OperatingPoint` is that rule and its threshold:

``argmax``            the class with the highest probability (the paper's rule; the default)
``sensitivity=T``     the highest threshold whose validation sensitivity is at least T
``specificity=T``     the lowest threshold whose validation specificity is at least T
``youden``            the threshold maximising sensitivity + specificity - 1 on validation

With a threshold, an image is COVID-19 when ``p_covid >= threshold``; otherwise it gets the more
probable of the other classes. The threshold sits halfway between the two validation scores it
separates, and is chosen on fp32 probabilities (ONNX Runtime or PyTorch fp32, which agree to about
1e-6), so the fp32 model that ``export`` ships makes the validation decisions the record states.
bf16 autocast (``--precision auto`` on GPUs and AVX512-BF16/AMX CPUs) moves a probability by up to
~0.1, so bf16 decisions may differ on images near the threshold. The record says which precision and
backend gave the probabilities, and how many of the validation images are also test images.
The rule travels in the checkpoint (key ``operating_point``) and in the ONNX metadata
(``covid_cxr.operating_point``) as :meth:`OperatingPoint.to_dict`; a model without it decides by argmax.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from covid_cxr import fmt
from covid_cxr.config import FORMS
from covid_cxr.errors import ConfigError
from covid_cxr.stats import Proportion

RULES: tuple[str, ...] = ("argmax", "sensitivity", "specificity", "youden")
POSITIVE_CLASS = "covid"
ONNX_KEY = "operating_point"  # under the covid_cxr. metadata prefix


def parse_rule(text: str) -> tuple[str, float | None]:
    """``'sensitivity=0.95'`` -> ``('sensitivity', 0.95)``; errors name the valid forms."""
    raw = str(text).strip().lower()
    name, sep, value = raw.partition("=")
    name = name.strip()
    if name not in RULES:
        raise ConfigError(f"unknown operating point {text!r}; use one of: {FORMS}")
    if name in ("argmax", "youden"):
        if sep:
            raise ConfigError(f"operating point {name!r} takes no target; got {text!r}. Valid forms: {FORMS}")
        return name, None
    try:
        target = float(value)
    except ValueError:
        raise ConfigError(f"operating point {text!r} needs a number after '='; use {FORMS}") from None
    if not 0.0 < target <= 1.0 or math.isnan(target):
        hint = f" ({target:g}% is written {target / 100:g})" if 1.0 < target <= 100.0 else ""
        raise ConfigError(f"target {name} must lie in (0, 1]; got {value.strip()}{hint}. Valid forms: {FORMS}")
    return name, target


@dataclass(frozen=True)
class OperatingPoint:
    """A decision rule over class probabilities, with what it achieved on the validation split."""

    rule: str = "argmax"
    target: float | None = None
    threshold: float | None = None
    positive_class: str = POSITIVE_CLASS
    validation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"unknown operating point rule {self.rule!r}; use one of: {FORMS}")
        if self.rule != "argmax" and self.threshold is None:
            raise ConfigError(f"operating point {self.rule!r} needs a threshold; choose one with 'covid-cxr calibrate'")

    @property
    def name(self) -> str:
        """The rule as the command line writes it."""
        return self.rule if self.target is None else f"{self.rule}={self.target:g}"

    def describe(self) -> str:
        """One line for a console or a report."""
        if self.rule == "argmax":
            return "argmax (the class with the highest probability)"
        # Every digit of the stored threshold: rounded, two rules would print alike and an image between the printed
        # and the stored threshold would be decided against the rule as printed.
        text = f"{self.name}: {self.positive_class} when p_{self.positive_class} >= {fmt.exact(self.threshold)}"
        v = self.validation
        if v.get("sensitivity") is not None:
            # with counts and intervals: a target met on 5 images is not a target shown (100.0% [56.6, 100], 5/5)
            sens = Proportion.of_fraction(v["sensitivity"], v["n_positive"])
            spec = Proportion.of_fraction(v["specificity"], v["n_negative"])
            text += (f" (validation{self.probabilities()}: sensitivity {fmt.counted(sens)}, "
                     f"specificity {fmt.counted(spec)})")
        return text

    def probabilities(self) -> str:
        """Which probabilities the threshold was chosen on (``", fp32 onnx"``), or "" where not recorded."""
        v = self.validation
        return f", {v['precision']} {v.get('backend', '')}".rstrip() if v.get("precision") else ""

    def chosen_on(self) -> str:
        """Where the threshold was chosen, as a sentence true of this record ("" for argmax)."""
        return where_chosen([self])

    @property
    def fitted_on_test(self) -> bool:
        """Whether the threshold was chosen on images that include test images."""
        return self.rule != "argmax" and bool(self.validation.get("test_images_shared"))

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "target": self.target, "positive_class": self.positive_class,
                "threshold": self.threshold, "validation": dict(self.validation)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> OperatingPoint:
        """The stored rule; ``None`` (a model from before operating points) means argmax."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ConfigError(f"malformed operating point {data!r}: expected a mapping with 'rule'")
        unknown = set(data) - {"rule", "target", "positive_class", "threshold", "validation"}
        if unknown:
            raise ConfigError(f"operating point has unknown keys {sorted(unknown)}")
        target, threshold = data.get("target"), data.get("threshold")
        return cls(rule=str(data.get("rule", "argmax")), target=None if target is None else float(target),
                   threshold=None if threshold is None else float(threshold),
                   positive_class=str(data.get("positive_class", POSITIVE_CLASS)),
                   validation=dict(data.get("validation") or {}))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> OperatingPoint:
        if not text:
            return cls()
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"malformed operating point metadata ({exc})") from exc

    def decide(self, probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
        """Class indices (N,) into ``classes`` (the order of the columns of ``probs``)."""
        probs = np.asarray(probs)
        if probs.ndim != 2 or probs.shape[1] != len(classes):
            raise ValueError(f"expected probabilities of shape (N, {len(classes)}); got {probs.shape}")
        if self.rule == "argmax":
            return probs.argmax(axis=1)
        if self.positive_class not in classes:
            raise ConfigError(f"operating point on {self.positive_class!r}, but the model predicts "
                              f"{', '.join(classes)}")
        k = list(classes).index(self.positive_class)
        others = probs.astype(np.float64, copy=True)
        others[:, k] = -np.inf
        out = others.argmax(axis=1)
        # In float64, as the threshold was chosen and printed: against float32 probabilities NumPy would round the
        # threshold to float32 (the nearer of the two validation scores it lies halfway between) and decide otherwise.
        out[probs[:, k].astype(np.float64) >= self.threshold] = k
        return out


def audit_note(op: OperatingPoint) -> list[str]:
    """An audit's note on how it decided classes: the model's rule, as ``evaluate``, ``predict`` and ``serve`` do
    (nothing to say for argmax)."""
    if op.rule == "argmax":
        return []
    return [f"Classes are decided by the model's stored rule, as evaluate, predict and serve decide them: "
            f"{op.describe()}."]


def where_chosen(points: Sequence[OperatingPoint]) -> str:
    """One sentence, true of every record in ``points`` (e.g. a report's folds), on where the thresholds were chosen.

    "Never on test" is said only where each record checked its validation images against the test split.
    """
    chosen = [p for p in points if p.rule != "argmax"]
    if not chosen:
        return ""
    fitted = [p for p in chosen if p.fitted_on_test]
    if fitted:
        shared = "; ".join(f"{p.validation['test_images_shared']} of {p.validation.get('test_images', '?')}"
                           for p in fitted)
        return (f"Its threshold was chosen on a validation split that includes test images ({shared} test images; "
                "--allow-test-overlap): the figures on test at it are optimistic.")
    if any(p.validation.get("test_images_shared") is None for p in chosen):
        return ("Its threshold was chosen on the validation split; whether that split shares images with test was "
                "not recorded (re-run 'covid-cxr calibrate' to check).")
    return "Its threshold was chosen on the validation split, which shares no image with the test split."


def choose(rule: str | tuple[str, float | None], positive: np.ndarray, scores: np.ndarray, *,
           positive_class: str = POSITIVE_CLASS) -> OperatingPoint:
    """Choose the rule's threshold on validation scores (``positive``: the image is ``positive_class``).

    Raises :class:`ConfigError` when the validation set cannot support the rule (one side empty).
    """
    name, target = parse_rule(rule) if isinstance(rule, str) else rule
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if name == "argmax":
        return OperatingPoint()
    if not np.isfinite(scores).all():  # scikit-learn's words were "Input contains NaN."
        raise ConfigError(f"{int((~np.isfinite(scores)).sum())} of {len(scores)} validation scores are not finite "
                          "(NaN or infinity): the model's weights are damaged; use a sound checkpoint")
    if not n_pos or not n_neg:
        raise ConfigError(f"the validation split holds {n_pos} {positive_class} and {n_neg} other images; "
                          f"choosing {name} needs both")
    fpr, tpr, thresholds = roc_curve(positive, scores, drop_intermediate=False)
    # thresholds[0] is +inf (nothing positive); every later one is a distinct validation score, descending.
    if name == "sensitivity":
        i = int(np.flatnonzero(tpr >= target - 1e-12)[0])  # the first (highest) threshold reaching the target
    elif name == "specificity":
        i = int(np.flatnonzero(1.0 - fpr >= target - 1e-12)[-1])  # the last (lowest) one keeping it
    else:
        i = int(np.argmax(tpr - fpr))
    threshold = _between(thresholds, i)
    decided = scores >= threshold
    validation = {"sensitivity": float(decided[positive].mean()), "specificity": float((~decided[~positive]).mean()),
                  "n_positive": n_pos, "n_negative": n_neg, "tp": int(decided[positive].sum()),
                  "tn": int((~decided[~positive]).sum())}
    return OperatingPoint(rule=name, target=target, threshold=threshold, positive_class=positive_class,
                          validation=validation)


def _between(thresholds: np.ndarray, i: int) -> float:
    """Halfway between the chosen score and the next lower one: the same split of validation, away from both."""
    if i == 0:  # nothing called positive: just above the highest score (probabilities never exceed 1)
        return float(np.nextafter(max(thresholds[1], 1.0), np.inf))
    if i == len(thresholds) - 1:  # everything positive: the lowest score itself
        return float(thresholds[i])
    return float((thresholds[i] + thresholds[i + 1]) / 2)


def choose_from_probs(rule: str, probs: np.ndarray, true_classes: Sequence[str], classes: Sequence[str],
                      positive_class: str = POSITIVE_CLASS) -> OperatingPoint:
    """:func:`choose` for a model's probabilities (columns in ``classes`` order) and true class names."""
    if positive_class not in classes:
        raise ConfigError(f"the model predicts {', '.join(classes)}: "
                          f"no {positive_class!r} to set an operating point on")
    k = list(classes).index(positive_class)
    positive = np.asarray([c == positive_class for c in true_classes], dtype=bool)
    return choose(rule, positive, np.asarray(probs)[:, k], positive_class=positive_class)


def decision_precision(precision: str, rule: str) -> str:
    """The precision a model deciding by ``rule`` (an :attr:`OperatingPoint.name`) runs in.

    ``auto`` means fp32 for a threshold rule, the precision its threshold was chosen and validated in, so that
    ``evaluate``, ``predict``, ``serve`` and the audits decide each image as the record says; anything asked
    for explicitly is kept (``precision_warning`` in ``inference.backends`` says what it costs).
    """
    return "fp32" if precision == "auto" and rule != "argmax" else precision


def of_predictor(predictor: Any) -> OperatingPoint:
    """The rule a loaded model carries: a checkpoint's ``operating_point``, or an ONNX model's metadata."""
    checkpoint = getattr(predictor, "checkpoint", None)
    if checkpoint is not None:
        return OperatingPoint.from_dict(getattr(checkpoint, "operating_point", None))
    metadata = getattr(predictor, "metadata", None) or {}
    return OperatingPoint.from_json(metadata.get(ONNX_KEY))
