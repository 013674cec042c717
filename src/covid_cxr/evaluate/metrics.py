"""The paper's metrics and ours, as pure functions over a confusion matrix and probabilities.

Everything starts from one confusion matrix (rows: true class, columns: predicted class), never
from hand-kept counters. Per class, as Table 3 and Table 4 of the paper define them:
correct detected = TP, not detected = FN, wrong detected = FP, TN = N - TP - FN - FP;
recall TP/(TP+FN), specificity TN/(TN+FP), per-class accuracy (TP+TN)/N, precision TP/(TP+FP).

Every proportion carries a 95% Wilson score interval (:mod:`covid_cxr.stats`): with 31 COVID-19
test images a point estimate alone says little. Images of one patient are not independent: given one confusion
matrix per patient (:meth:`Predictions.confusion <covid_cxr.evaluate.predictions.Predictions.confusion>` with
``by_patient=True``, shape (P, C, C)) wherever a matrix is taken, a rate whose images come from fewer patients
gets Wilson's interval adjusted for them (:func:`covid_cxr.stats.clustered_proportion`), and a rate with one image
per patient keeps plain Wilson. One-vs-rest ROC AUC gets a bootstrap interval resampled by patient; none where no
resample can differ from the data (one patient), and a note says why. Rates are percentages, AUC is on 0-1. A rate
whose
denominator is zero (e.g. precision of a class never predicted) is NaN and a note says why.
The ROC curve, the AUC and the calibration bins are scikit-learn's; the patient bootstrap keeps
its own AUC for its inner loop (16x faster, ``benchmarks/metrics_speed.py``).
No I/O here: reading and writing live in ``predictions.py``, ``run.py`` and :mod:`covid_cxr.report`.

Keys of :func:`compute_metrics` (and of ``covid-cxr metrics --json``), for each class ``c`` in
``covid, pneumonia, normal``: ``n``, ``accuracy``, ``balanced_accuracy``; ``c_n``, ``c_correct``,
``c_missed``, ``c_false``, ``c_tn`` (counts); ``c_recall``, ``c_specificity``, ``c_accuracy``,
``c_precision`` (percentages, each with ``_ci_low``/``_ci_high``; so has ``accuracy``); ``c_f1``;
``absent_classes`` (classes with no image: their per-class figures are not defined, not zero);
with probabilities ``c_auc`` (+ ``_ci_low``/``_ci_high``), ``auc_bootstrap`` (``resamples``, ``seed``, ``unit``,
``units``: how many patients or images it draws) and ``ece``; with a
prevalence ``prevalence`` and ``<class>_ppv_at_prevalence`` (+ CI); ``rate_intervals`` (which interval the rates
carry: ``method`` ``wilson`` or ``wilson-design-effect``, ``label`` in words, ``images``, ``patients``, and per rate
key ``patients`` and ``design_effect``); ``notes`` (why a figure is NaN; and, where patients have several images,
how many patients stand behind each rate).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn import metrics as sklearn_metrics
from sklearn.calibration import calibration_curve
from sklearn.exceptions import UndefinedMetricWarning

from covid_cxr.labels import CLASSES
from covid_cxr.stats import (
    DEFAULT_PREVALENCES,
    Proportion,
    clustered_proportion,
    ppv_at_prevalence,
    predictive_values,
)

RATES: tuple[str, ...] = ("recall", "specificity", "accuracy", "precision")
"""Table 4's per-class figures, in the paper's order."""

COUNTS: tuple[str, ...] = ("correct", "missed", "false")
"""Table 3's per-class figures: correct detected (TP), not detected (FN), wrong detected (FP)."""

CLUSTER_NOTE = "rate intervals"
"""How the note that says the rates' intervals allow for patients begins."""


def confusion_matrix(labels: Sequence[str] | np.ndarray, preds: Sequence[str] | np.ndarray,
                     classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Counts (C, C): row = true class, column = predicted class, in ``classes`` order."""
    labels = np.asarray(labels).astype(str)
    preds = np.asarray(preds).astype(str)
    if labels.shape != preds.shape:
        raise ValueError(f"labels and predictions differ in length: {labels.shape} vs {preds.shape}")
    names = np.asarray(list(classes), dtype=str)
    unknown = (set(np.unique(labels)) | set(np.unique(preds))) - set(names)
    if unknown:
        raise ValueError(f"unknown class names {sorted(unknown)}; expected {', '.join(classes)}")
    order = np.argsort(names)
    true_idx = order[np.searchsorted(names, labels, sorter=order)]
    pred_idx = order[np.searchsorted(names, preds, sorter=order)]
    n = len(classes)
    return np.bincount(true_idx * n + pred_idx, minlength=n * n).reshape(n, n)


@dataclass(frozen=True)
class ClassCounts:
    """The four cells of one class's one-vs-rest table (per patient, arrays of them: :func:`rate_proportions`)."""

    tp: int
    fn: int
    fp: int
    tn: int


def class_counts(cm: np.ndarray, k: int) -> ClassCounts:
    """TP, FN, FP, TN of class ``k`` read off the confusion matrix (pooled, where it is one per patient)."""
    cm = pooled_confusion(cm)
    tp = int(cm[k, k])
    fn = int(cm[k].sum() - tp)
    fp = int(cm[:, k].sum() - tp)
    return ClassCounts(tp=tp, fn=fn, fp=fp, tn=int(cm.sum()) - tp - fn - fp)


def pooled_confusion(cm: np.ndarray) -> np.ndarray:
    """The (C, C) confusion matrix of ``cm``: itself, or the sum of one matrix per patient (P, C, C)."""
    cm = np.asarray(cm, dtype=np.int64)
    return cm.sum(axis=0) if cm.ndim == 3 else cm


def patient_confusions(true_idx: np.ndarray, pred_idx: np.ndarray, groups: np.ndarray, n_classes: int) -> np.ndarray:
    """(P, C, C): one confusion matrix per patient (``groups`` holds each image's patient), summing to the pooled."""
    group_idx = _group_index(groups, len(true_idx))
    n_groups = int(group_idx.max()) + 1 if len(group_idx) else 0
    cells = (group_idx * n_classes + np.asarray(true_idx, dtype=np.int64)) * n_classes + np.asarray(pred_idx)
    return np.bincount(cells, minlength=n_groups * n_classes * n_classes).reshape(n_groups, n_classes, n_classes)


_RATE_CELLS: dict[str, Callable[[ClassCounts], tuple[Any, Any]]] = {
    "recall": lambda c: (c.tp, c.tp + c.fn),
    "specificity": lambda c: (c.tn, c.tn + c.fp),
    "accuracy": lambda c: (c.tp + c.tn, c.tp + c.fn + c.fp + c.tn),
    "precision": lambda c: (c.tp, c.tp + c.fp),
    "npv": lambda c: (c.tn, c.tn + c.fn),
}
"""Each one-vs-rest rate as (successes, denominator) of the four cells."""


def _patient_counts(cm: np.ndarray, k: int) -> ClassCounts | None:
    """Class ``k``'s four cells per patient (arrays), from one confusion matrix per patient; None from a pooled one."""
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 3:
        return None
    tp = cm[:, k, k]
    fn = cm[:, k, :].sum(axis=1) - tp
    fp = cm[:, :, k].sum(axis=1) - tp
    return ClassCounts(tp=tp, fn=fn, fp=fp, tn=cm.sum(axis=(1, 2)) - tp - fn - fp)


def _rate(c: ClassCounts, rate: str, patients: ClassCounts | None) -> Proportion:
    """One rate of the four cells, its interval allowing for patients where their cells are given."""
    k, n = _RATE_CELLS[rate](c)
    if patients is None:
        return Proportion(k, n)
    hits, sizes = _RATE_CELLS[rate](patients)
    return clustered_proportion(k, n, hits.tolist(), sizes.tolist())


def overall_accuracy(cm: np.ndarray) -> Proportion:
    """Correct decisions of all images; ``cm`` pooled (C, C) or one per patient (P, C, C)."""
    cm = np.asarray(cm, dtype=np.int64)
    pooled = pooled_confusion(cm)
    k, n = int(np.trace(pooled)), int(pooled.sum())
    if cm.ndim != 3:
        return Proportion(k, n)
    return clustered_proportion(k, n, np.trace(cm, axis1=1, axis2=2).tolist(), cm.sum(axis=(1, 2)).tolist())


def class_proportions(c: ClassCounts, patients: ClassCounts | None = None) -> dict[str, Proportion]:
    """Table 4's four rates of one class, as proportions with known numerator and denominator; ``patients``
    (the same cells per patient, :func:`rate_proportions`) makes their intervals allow for patients."""
    return {rate: _rate(c, rate, patients) for rate in RATES}


def rate_proportions(cm: np.ndarray, k: int) -> dict[str, Proportion]:
    """Class ``k``'s recall, specificity, accuracy, precision and NPV; ``cm`` pooled (C, C), or one per patient
    (P, C, C) for intervals adjusted for patients with several images."""
    c, patients = class_counts(cm, k), _patient_counts(cm, k)
    return {rate: _rate(c, rate, patients) for rate in _RATE_CELLS}


def f1_score(c: ClassCounts) -> float:
    """F1 as a percentage: 2TP / (2TP + FP + FN); NaN for a class with no image (its recall is undefined, so is
    their harmonic mean: scikit-learn's 0 there would read as a model that finds none of a class that is absent)."""
    return 100.0 * 2 * c.tp / (2 * c.tp + c.fp + c.fn) if c.tp + c.fn else math.nan


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present, as a percentage (insensitive to the 31-vs-6851 imbalance)."""
    cm = np.asarray(cm)
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return math.nan
    return float(100.0 * np.mean(np.diag(cm)[present] / support[present]))


@dataclass(frozen=True)
class BinaryFigures:
    """One class against the rest at the model's decision: what a screening reader asks for."""

    sensitivity: Proportion
    specificity: Proportion
    ppv: Proportion
    npv: Proportion

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """Value, interval, k and n of each; where patient ids are known, the patients behind n and the design
        effect (1 where no patient gives two images); ``ci_method`` says in words which interval each carries."""
        out: dict[str, Any] = {}
        methods = []
        for name in ("sensitivity", "specificity", "ppv", "npv"):
            prop: Proportion = getattr(self, name)
            out[f"{prefix}{name}"] = prop.value
            out[f"{prefix}{name}_ci_low"], out[f"{prefix}{name}_ci_high"] = prop.ci
            out[f"{prefix}{name}_k"], out[f"{prefix}{name}_n"] = prop.k, prop.n
            if prop.patients is not None:
                out[f"{prefix}{name}_patients"] = prop.patients
                out[f"{prefix}{name}_design_effect"] = prop.design_effect
            methods.append(f"{name} {prop.method}")
        out[f"{prefix}ci_method"] = "; ".join(methods) if any(
            getattr(self, n).clustered for n in ("sensitivity", "specificity", "ppv", "npv")) else "Wilson"
        return out


def binary_figures(cm: np.ndarray, k: int) -> BinaryFigures:
    """Sensitivity, specificity, PPV and NPV of class ``k`` against the rest, each with its Wilson interval
    (adjusted for patients where ``cm`` is one matrix per patient, (P, C, C), and a patient has several images)."""
    props = rate_proportions(cm, k)
    return BinaryFigures(sensitivity=props["recall"], specificity=props["specificity"], ppv=props["precision"],
                         npv=props["npv"])


def decision_summary(cm: np.ndarray, k: int, prevalences: Sequence[float] = DEFAULT_PREVALENCES) -> dict[str, Any]:
    """Class ``k`` against the rest at the decisions made: sensitivity, specificity, PPV, NPV with intervals,
    and PPV/NPV moved by Bayes' rule to each prevalence (the test set's own mix is rarely a clinic's)."""
    fig = binary_figures(cm, k)
    at = [{"prevalence": p, **predictive_values(fig.sensitivity, fig.specificity, p)} for p in prevalences]
    n_pos, n = fig.sensitivity.n, int(np.asarray(cm).sum())
    return {**fig.as_dict(), "test_prevalence": n_pos / n if n else math.nan, "at_prevalence": at}


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold (descending), from (0, 0).

    scikit-learn's curve with every point kept; NaN rates where a side (positives or negatives) is empty.
    """
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if not len(scores):
        return np.full(1, math.nan), np.full(1, math.nan), np.array([np.inf])
    with warnings.catch_warnings():  # one empty side: scikit-learn warns and answers NaN, as we want
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, thresholds = sklearn_metrics.roc_curve(positive, scores, drop_intermediate=False)
    return fpr, tpr, thresholds


@dataclass(frozen=True)
class _AucPlan:
    """The bootstrap's AUC of one class, sorted once: positives, negatives by score, and where each positive falls.

    Ours, not scikit-learn's, for the bootstrap's inner loop only: one cumulative sum per resample
    over all resamples at once, instead of a sort per resample; ``benchmarks/metrics_speed.py``
    measures both (the test suite checks they agree). :func:`roc_auc` itself is scikit-learn's.

    ``lo[i]`` / ``hi[i]`` count the negatives scored below / at most positive i, so a positive
    beats ``lo[i]`` negatives and ties ``hi[i] - lo[i]`` (each tie counts one half).
    """

    pos: np.ndarray
    neg: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def of(cls, positive: np.ndarray, scores: np.ndarray) -> _AucPlan:
        positive = np.asarray(positive, dtype=bool)
        scores = np.asarray(scores, dtype=np.float64)
        neg = np.flatnonzero(~positive)
        neg = neg[np.argsort(scores[neg], kind="mergesort")]
        pos = np.flatnonzero(positive)
        neg_scores = scores[neg]
        return cls(pos=pos, neg=neg, lo=np.searchsorted(neg_scores, scores[pos], side="left"),
                   hi=np.searchsorted(neg_scores, scores[pos], side="right"))

    def weighted(self, weights: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """AUC for each row of ``weights``; ``columns`` maps images to weight columns (default: one each).

        With image weights (how often the bootstrap drew each image) a resample costs one
        cumulative sum over the negatives instead of a new sort.
        """
        pos_cols = self.pos if columns is None else columns[self.pos]
        neg_cols = self.neg if columns is None else columns[self.neg]
        w_neg = weights[:, neg_cols]
        below = np.zeros((weights.shape[0], len(neg_cols) + 1))
        np.cumsum(w_neg, axis=1, out=below[:, 1:])
        w_pos = weights[:, pos_cols]
        wins = 0.5 * (w_pos * (below[:, self.lo] + below[:, self.hi])).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return wins / (w_pos.sum(axis=1) * below[:, -1])


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """One-vs-rest ROC AUC (scikit-learn's; ties count one half); NaN when one side is empty."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return math.nan
    return float(sklearn_metrics.roc_auc_score(positive, np.asarray(scores, dtype=np.float64)))


def bootstrap_auc_cis(positives: Sequence[np.ndarray], scores: Sequence[np.ndarray], groups: np.ndarray | None = None,
                      *, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> list[tuple[float, float]]:
    """Percentile bootstrap intervals of several AUCs over the same images, drawing whole groups (patients).

    ``groups`` holds a patient id per image; ``None`` draws images. Every AUC sees the same
    resampled patients. The draw is stratified, as pROC's default: patients are drawn within strata
    of the same classes (which of the AUCs' positives their images are), each stratum keeping its
    size, so every resample holds as many positive and negative patients of each AUC as the data.
    An unstratified draw leaves out the resamples with no positive, and with a rare class (2 COVID-19
    patients in 40) the interval would rest on fewer resamples than it says, from a skewed subset.
    Seeded, so a report is reproducible.
    """
    values = bootstrap_auc_values(positives, scores, groups, n_boot=n_boot, seed=seed)
    return [percentile_interval(v, confidence) for v in values]


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap ``values`` (the non-finite left out); NaN bounds for none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    tail = 100 * (1 - confidence) / 2
    return (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) if len(v) else (math.nan, math.nan)


def bootstrap_auc_values(positives: Sequence[np.ndarray], scores: Sequence[np.ndarray],
                         groups: np.ndarray | None = None, *, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(AUCs, n_boot) resampled AUCs of :func:`bootstrap_auc_cis`, column ``b`` of every AUC from the same
    resample ``b`` (so a figure made of several AUCs, such as their mean, can be bootstrapped itself); an AUC
    whose positives or negatives are missing is NaN throughout, and so is every AUC where no resample can differ
    from the data (:func:`bootstrap_can_vary`)."""
    n_images = len(scores[0]) if len(scores) else 0
    plans = [_AucPlan.of(p, s) for p, s in zip(positives, scores, strict=True)]
    usable = [bool(len(plan.pos) and len(plan.neg)) for plan in plans]
    out = np.full((len(plans), max(n_boot, 0)), math.nan)
    if n_boot < 1 or not any(usable):
        return out
    group_idx = _group_index(groups, n_images)
    strata = _strata(positives, group_idx)
    if not bootstrap_can_vary(strata):
        return out
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 2_000_000 // max(n_images, 1)))  # bounds memory at ~16 MB per array
    for start in range(0, n_boot, chunk):
        draws = stratified_draws(rng, strata, min(chunk, n_boot - start))
        for k, plan in enumerate(plans):
            if usable[k]:
                out[k, start : start + len(draws)] = plan.weighted(draws, group_idx)
    return out


def _group_index(groups: np.ndarray | None, n_images: int) -> np.ndarray:
    """Each image's resampling unit, 0-based: its group (patient), or the image itself without groups."""
    if groups is None:
        return np.arange(n_images)
    return np.unique(np.asarray(groups).astype(str), return_inverse=True)[1].reshape(-1)


def bootstrap_strata(positives: Sequence[np.ndarray], groups: np.ndarray | None = None) -> list[np.ndarray]:
    """The resampling units (patients, or images without ``groups``) of each stratum the bootstrap draws within."""
    n_images = len(positives[0]) if len(positives) else 0
    return _strata(positives, _group_index(groups, n_images))


def bootstrap_can_vary(strata: Sequence[np.ndarray]) -> bool:
    """Whether a stratified resample can differ from the data: only where some stratum holds two units or more.

    Where each stratum holds one (one patient; or each patient the only one with its mix of classes), every
    resample draws every unit once, the data itself: the percentile "interval" is the estimate repeated, not a
    confidence interval, so none is given.
    """
    return any(len(members) > 1 for members in strata)


def _strata(positives: Sequence[np.ndarray], group_idx: np.ndarray) -> list[np.ndarray]:
    """The groups of each stratum: groups alike in which AUCs' positives their images include."""
    if not len(group_idx):
        return []
    n_groups = int(group_idx.max()) + 1
    member = np.zeros((n_groups, len(positives)), dtype=bool)
    for k, positive in enumerate(positives):
        member[group_idx[np.asarray(positive, dtype=bool)], k] = True
    _, stratum = np.unique(member, axis=0, return_inverse=True)
    stratum = np.asarray(stratum).reshape(-1)
    return [np.flatnonzero(stratum == s) for s in range(int(stratum.max()) + 1)]


def stratified_draws(rng: np.random.Generator, strata: list[np.ndarray], count: int) -> np.ndarray:
    """(count, groups) times each group is drawn: every stratum drawn with replacement to its own size."""
    n_groups = sum(len(members) for members in strata)
    draws = np.zeros((count, n_groups))
    for members in strata:
        draws[:, members] = rng.multinomial(len(members), np.full(len(members), 1.0 / len(members)), size=count)
    return draws


def bootstrap_auc_ci(positive: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None, *,
                     n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of one AUC (see :func:`bootstrap_auc_cis`)."""
    return bootstrap_auc_cis([positive], [scores], groups, n_boot=n_boot, seed=seed, confidence=confidence)[0]


@dataclass(frozen=True)
class CalibrationBins:
    """Top-label reliability: per bin the mean confidence, the accuracy and the image count."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error as a percentage: count-weighted |accuracy - confidence|."""
        total = self.count.sum()
        if not total:
            return math.nan
        filled = self.count > 0
        gap = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float(100.0 * (gap * self.count[filled]).sum() / total)


def calibration_bins(probs: np.ndarray, true_idx: np.ndarray, n_bins: int = 15) -> CalibrationBins:
    """Bin images by their top probability; compare the mean confidence with the hit rate.

    scikit-learn's ``calibration_curve`` (uniform bins, each (low, high]) gives the filled bins'
    hit rate and mean confidence; the counts, which it does not return, come from the same binning.
    """
    probs = np.asarray(probs, dtype=np.float64)
    true_idx = np.asarray(true_idx, dtype=np.int64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    mean_conf, mean_hit = np.full(n_bins, math.nan), np.full(n_bins, math.nan)
    if not len(probs):
        return CalibrationBins(edges=edges, confidence=mean_conf, accuracy=mean_hit, count=np.zeros(n_bins, np.int64))
    confidence = np.clip(probs.max(axis=1), 0.0, 1.0)  # float32 softmax may overshoot 1 by an ulp
    hit = probs.argmax(axis=1) == true_idx
    count = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=n_bins).astype(np.int64)
    filled = count > 0
    mean_hit[filled], mean_conf[filled] = calibration_curve(hit, confidence, n_bins=n_bins, pos_label=True)
    return CalibrationBins(edges=edges, confidence=mean_conf, accuracy=mean_hit, count=count)


def table3_row(cm: np.ndarray, classes: Sequence[str] = CLASSES) -> dict[str, int]:
    """The paper's Table 3 row: ``<class>_correct``, ``_missed``, ``_false``."""
    row: dict[str, int] = {}
    for k, name in enumerate(classes):
        c = class_counts(cm, k)
        row.update({f"{name}_correct": c.tp, f"{name}_missed": c.fn, f"{name}_false": c.fp})
    return row


def table4_row(cm: np.ndarray, classes: Sequence[str] = CLASSES) -> dict[str, float]:
    """The paper's Table 4 row in its column order: accuracy, then recalls, specificities, accuracies, precisions."""
    cm = pooled_confusion(cm)
    row = {"accuracy": overall_accuracy(cm).value}
    props = {name: class_proportions(class_counts(cm, k)) for k, name in enumerate(classes)}
    for rate in RATES:
        for name in classes:
            row[f"{name}_{rate}"] = props[name][rate].value
    return row


def compute_metrics(
    cm: np.ndarray,
    *,
    classes: Sequence[str] = CLASSES,
    probs: np.ndarray | None = None,
    true_idx: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    prevalence: float | None = None,
    prevalence_class: str = "covid",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every figure with stable keys (see the module doc); NaN marks an undefined one, ``notes`` says why.

    ``cm`` is the pooled confusion matrix (C, C), or one per patient (P, C, C): then the rates' intervals allow
    for patients with several images (``rate_intervals`` and a note say so). ``probs`` (N, C) in ``classes`` order
    and ``true_idx`` (N,) add AUC (bootstrap CI by ``groups``) and ECE. ``prevalence`` adds
    ``<prevalence_class>_ppv_at_prevalence``.
    """
    by_patient = np.asarray(cm, dtype=np.int64)
    cm = pooled_confusion(by_patient)
    n = int(cm.sum())
    notes: list[str] = []
    out: dict[str, Any] = {"n": n}
    overall = overall_accuracy(by_patient)
    out.update(accuracy=overall.value, accuracy_ci_low=overall.ci[0], accuracy_ci_high=overall.ci[1])
    rates: dict[str, Proportion] = {"accuracy": overall}
    out["balanced_accuracy"] = balanced_accuracy(cm)
    out["absent_classes"] = [name for k, name in enumerate(classes) if not cm[k].sum()]
    for k, name in enumerate(classes):
        c = class_counts(cm, k)
        out.update({f"{name}_n": c.tp + c.fn, f"{name}_correct": c.tp, f"{name}_missed": c.fn,
                    f"{name}_false": c.fp, f"{name}_tn": c.tn})
        for rate, prop in class_proportions(c, _patient_counts(by_patient, k)).items():
            rates[f"{name}_{rate}"] = prop
            out[f"{name}_{rate}"] = prop.value
            out[f"{name}_{rate}_ci_low"], out[f"{name}_{rate}_ci_high"] = prop.ci
            if prop.n == 0:
                why = {"recall": "no image of this class", "specificity": "no image of the other classes",
                       "precision": "the class was never predicted", "accuracy": "no images"}[rate]
                notes.append(f"{name}_{rate} is undefined (0/0): {why}")
        out[f"{name}_f1"] = f1_score(c)
        if c.tp + c.fn == 0:
            notes.append(f"{name}_f1 is undefined: no image of this class (its recall is undefined)")
    out["rate_intervals"] = rate_interval_record(rates, n, by_patient)
    if out["rate_intervals"]["method"] != "wilson":
        notes.append(cluster_note(rates, out["rate_intervals"]))
    if prevalence is not None:
        sens, spec = rates[f"{prevalence_class}_recall"], rates[f"{prevalence_class}_specificity"]
        key = f"{prevalence_class}_ppv_at_prevalence"
        out["prevalence"] = prevalence
        if sens.n and spec.n:
            out[key] = 100.0 * ppv_at_prevalence(sens.k / sens.n, spec.k / spec.n, prevalence)
            # Conservative interval: the bounds of sensitivity and specificity pushed through Bayes' rule.
            (s_lo, s_hi), (t_lo, t_hi) = sens.interval(), spec.interval()
            out[f"{key}_ci_low"] = 100.0 * ppv_at_prevalence(s_lo, t_lo, prevalence)
            out[f"{key}_ci_high"] = 100.0 * ppv_at_prevalence(s_hi, t_hi, prevalence)
        else:
            out[key] = out[f"{key}_ci_low"] = out[f"{key}_ci_high"] = math.nan
            notes.append(f"{key} is undefined: recall or specificity of {prevalence_class} is 0/0")
    if probs is not None and true_idx is not None:
        probs = np.asarray(probs, dtype=np.float64)
        true_idx = np.asarray(true_idx, dtype=np.int64)
        positives = [true_idx == k for k in range(len(classes))]
        scores = [probs[:, k] for k in range(len(classes))]
        intervals = bootstrap_auc_cis(positives, scores, groups, n_boot=n_boot, seed=seed)
        for k, name in enumerate(classes):
            auc = out[f"{name}_auc"] = roc_auc(positives[k], scores[k])
            out[f"{name}_auc_ci_low"], out[f"{name}_auc_ci_high"] = (_snap(bound, auc) for bound in intervals[k])
            if math.isnan(auc):
                notes.append(f"{name}_auc is undefined: the labels hold only one side of {name}-vs-rest")
        unit = "patient" if groups is not None else "image"
        strata = bootstrap_strata(positives, groups)
        units = sum(len(members) for members in strata)
        fixed = [f"{name}_auc" for name in classes if not math.isnan(out[f"{name}_auc"])]
        if n_boot >= 1 and fixed and not bootstrap_can_vary(strata):
            notes.append(_fixed_bootstrap_note(fixed, unit, units))
        out["auc_bootstrap"] = {"resamples": n_boot, "seed": seed, "unit": unit, "units": units,
                                "stratified": f"each {unit} drawn among those with images of the same classes"}
        out["ece"] = calibration_bins(probs, true_idx).ece
    out["notes"] = notes
    return out


def rate_interval_record(rates: dict[str, Proportion], n: int, cm: np.ndarray) -> dict[str, Any]:
    """Which interval the rates carry, for metrics.json: the method, in words, the images and patients, and per rate
    its patients and design effect (``patients`` None where no patient ids were given)."""
    patients = int((np.asarray(cm).sum(axis=(1, 2)) > 0).sum()) if np.asarray(cm).ndim == 3 else None
    clustered = any(p.clustered for p in rates.values())
    label = (f"Wilson, adjusted for {patients} patients behind {n} images (a design effect per rate)" if clustered
             else "Wilson" if patients is None else f"Wilson ({n} images of {patients} patients, one image each)")
    return {"method": "wilson-design-effect" if clustered else "wilson", "label": label, "images": n,
            "patients": patients,
            "rates": {key: {"patients": p.patients, "design_effect": p.design_effect} for key, p in rates.items()}}


def cluster_note(rates: dict[str, Proportion], record: dict[str, Any]) -> str:
    """The note that says how the rates' intervals allow for patients, and how many stand behind each rate."""
    per_rate = ", ".join(f"{key} {p.patients}/{p.n} (d {p.design_effect:.2f})"
                         for key, p in rates.items() if p.clustered)
    return (f"{CLUSTER_NOTE}: {record['label']}, since one patient's images are not independent; patients/images "
            f"(design effect) behind each rate: {per_rate}")


def _snap(bound: float, value: float) -> float:
    """A bootstrap bound a float's width off the estimate, as the estimate: the bootstrap's own AUC and
    scikit-learn's add in another order (0.8375 against 0.83749999), and the interval should hold its estimate."""
    return value if math.isclose(bound, value, rel_tol=1e-9) else bound


def _fixed_bootstrap_note(keys: Sequence[str], unit: str, units: int) -> str:
    """Why the intervals of ``keys`` are undefined: no stratum holds two units, so every resample is the data."""
    which = f"the interval{'s' if len(keys) > 1 else ''} of {', '.join(keys)} {'are' if len(keys) > 1 else 'is'}"
    if unit == "patient" and units == 1:
        return (f"{which} undefined: 1 patient: a patient bootstrap cannot vary; give the real patient ids, or leave "
                "the patient_id column out to resample images")
    if unit == "patient":
        return (f"{which} undefined: each of the {units} patients is the only one with its mix of classes, so every "
                "resample (patients drawn among those with images of the same classes) is the data itself; give more "
                "patients, or leave the patient_id column out to resample images")
    return (f"{which} undefined: each of the {units} images is the only one of its class, so every resample (images "
            "drawn among those of the same class) is the data itself; give more images")
