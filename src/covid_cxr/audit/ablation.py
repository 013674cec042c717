"""Lung-field ablation: evaluate the test set as is, with the lungs hidden, and with only the lungs shown.

A model that reads the disease in the lungs falls to chance when the lung fields are hidden.
One that still scores has found its evidence elsewhere: markers, text, borders, body shape,
exposure (Maguolo & Nanni 2021 found exactly that with the lungs blacked out).

"Hidden" means filled with the image's own mean intensity (of the whole, unaltered image). We
chose the mean over black or a fixed gray so that a hidden region adds no new global brightness
cue: an image's overall exposure stays what it was, and a model that keys on exposure keeps that
cue, which is what the audit must reveal rather than destroy.

With the lungs hidden, a margin of :data:`HIDE_MARGIN` of the image side around the fields is
hidden too, so that the border errors of a coarse field (the disease often lies at the lung's
edge) do not leave the disease in view; with only the lungs shown, the fields are used as they are.

A finding rests on intervals, never on a point estimate: balanced accuracy gets a bootstrap
interval drawn by patient (seeded), and a model must score above chance as it is before anything
can "survive". On a test set of 18 images a model of random numbers would otherwise be flagged
about one time in ten.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from covid_cxr import fmt
from covid_cxr.audit import results as R
from covid_cxr.audit.data import load_test_images_and_lungs, patient_groups
from covid_cxr.audit.lungs import LungFields
from covid_cxr.evaluate.metrics import (
    balanced_accuracy,
    bootstrap_can_vary,
    confusion_matrix,
    percentile_interval,
    stratified_draws,
)
from covid_cxr.inference.protocol import Predictor, predict_in_batches
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.operating_point import OperatingPoint, audit_note, of_predictor
from covid_cxr.runs.results import audit_dir_for, make_result, write_result
from covid_cxr.stats import Proportion

CONDITIONS: tuple[str, ...] = ("as_is", "lungs_hidden", "only_lungs")
FILL_DESCRIPTION = "the image's own mean intensity"

CHUNK = 1024
"""Images altered and evaluated at a time."""

HIDE_MARGIN = 0.04
"""Share of the image side by which the lung fields are grown before they are hidden."""

SURVIVAL_MARGIN = 0.15
"""Flag when the lower end of the 95% interval of balanced accuracy with the lungs hidden stays this far
(absolute) above chance."""

COVID_RECALL_SURVIVAL = 0.5
"""Flag when COVID-19 recall with the lungs hidden stays at or above this (and its CI lies above the CI of
the share of non-COVID-19 images called COVID-19)."""

N_BOOT = 1000
"""Bootstrap resamples of the balanced-accuracy interval."""


def grow(masks: np.ndarray, fraction: float = HIDE_MARGIN) -> np.ndarray:
    """Dilate each (N, S, S) mask by ``fraction`` of its side (a square structuring element)."""
    radius = int(round(fraction * masks.shape[-1]))
    if radius < 1:
        return masks
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in masks])


def hide(images: np.ndarray, masks: np.ndarray, keep: str) -> np.ndarray:
    """Fill the lungs (``keep='outside'``) or everything but the lungs (``keep='lungs'``) with each image's mean."""
    if images.shape != masks.shape:
        raise ValueError(f"images {images.shape} and masks {masks.shape} differ in shape")
    if keep not in ("outside", "lungs"):
        raise ValueError(f"keep must be 'outside' or 'lungs'; got {keep!r}")
    means = np.rint(images.reshape(len(images), -1).mean(axis=1)).astype(np.uint8)
    region = masks if keep == "outside" else ~masks
    out = images.copy()
    fill = np.broadcast_to(means[:, None, None], images.shape)
    out[region] = fill[region]
    return out


def balanced_accuracy_interval(labels: np.ndarray, preds: np.ndarray, groups: np.ndarray | None, *,
                               n_boot: int = N_BOOT, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Balanced accuracy (a fraction) with a percentile bootstrap interval drawing whole ``groups`` (patients;
    None: each image its own).

    Stratified, as the AUC bootstrap of :mod:`covid_cxr.evaluate.metrics`: patients are drawn within strata
    of the same classes, each stratum keeping its size, so every resample holds every class and every recall
    is defined. Seeded, so a result is reproducible.
    """
    present, label_idx = np.unique(labels, return_inverse=True)
    _, group_idx = np.unique(np.asarray(np.arange(len(labels)) if groups is None else groups).astype(str),
                             return_inverse=True)
    shape = (int(group_idx.max()) + 1 if len(group_idx) else 0, len(present))
    count, hits = np.zeros(shape), np.zeros(shape)
    np.add.at(count, (group_idx, label_idx), 1)
    np.add.at(hits, (group_idx, label_idx), labels == preds)
    value = float(np.mean(hits.sum(0) / count.sum(0))) if len(labels) else None
    out = {"value": value, "low": None, "high": None, "n": int(len(labels)),
           "method": "bootstrap" if groups is None else "bootstrap by patient"}
    if value is None or n_boot < 1:
        return out
    _, stratum = np.unique(count > 0, axis=0, return_inverse=True)
    stratum = np.asarray(stratum).reshape(-1)
    strata = [np.flatnonzero(stratum == s) for s in range(int(stratum.max()) + 1)]
    if not bootstrap_can_vary(strata):  # every resample would be the data itself: no interval, not a zero-width one
        return out
    draws = stratified_draws(np.random.default_rng(seed), strata, n_boot)
    out["low"], out["high"] = percentile_interval(((draws @ hits) / (draws @ count)).mean(axis=1), confidence)
    return out


def condition_metrics(labels: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                      groups: Sequence[str] | None = None, *, n_boot: int = N_BOOT, seed: int = 0,
                      op: OperatingPoint | None = None) -> dict[str, Any]:
    """Accuracy and per-class recall with Wilson intervals, balanced accuracy with a patient bootstrap interval
    (``groups``: each image's patient; None: each image its own), for one condition; classes decided by ``op``
    (the model's rule)."""
    labels = np.asarray(labels).astype(str)
    decided = (op or OperatingPoint.from_dict(None)).decide(probs, classes)  # None: argmax
    preds = np.asarray(classes)[decided]
    cm = confusion_matrix(labels, preds, classes)
    groups_arr = None if groups is None else np.asarray(groups)
    n = int(cm.sum())
    correct = int(np.trace(cm))
    recall = {}
    for k, cls in enumerate(classes):
        support = int(cm[k].sum())
        if support:
            recall[cls] = Proportion(int(cm[k, k]), support).as_interval()
    return {
        "n": n,
        "accuracy": Proportion(correct, n).as_interval(),
        "balanced_accuracy": balanced_accuracy(cm) / 100.0,
        "balanced_accuracy_interval": balanced_accuracy_interval(labels, preds, groups_arr, n_boot=n_boot, seed=seed),
        "recall": recall,
        "confusion_matrix": cm.tolist(),
    }


def run_ablation(
    predictor: Predictor,
    images: np.ndarray,
    labels: Sequence[str],
    lungs: LungFields,
    *,
    groups: Sequence[str] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``predictor`` on ``images`` under the three conditions and return the audit result.

    ``groups`` (each image's patient; default: each image its own) is what the balanced-accuracy bootstrap
    draws whole; ``seed`` seeds it.
    """
    classes = list(predictor.classes)
    present = sorted(set(labels), key=classes.index)
    probs = {name: np.empty((len(images), len(classes)), np.float32) for name in CONDITIONS}
    # A chunk at a time: three altered copies of a whole paper-size test set (11302 images at 300 px)
    # would take 3 GB.
    for start in range(0, len(images), CHUNK):
        part = slice(start, start + CHUNK)
        chunk, masks = np.ascontiguousarray(images[part]), lungs.masks[part]
        altered = {"as_is": chunk, "lungs_hidden": hide(chunk, grow(masks), keep="outside"),
                   "only_lungs": hide(chunk, masks, keep="lungs")}
        for name in CONDITIONS:
            probs[name][part] = predict_in_batches(predictor, altered[name], batch_size=batch_size)
    op = of_predictor(predictor)  # the rule evaluate decides by: the audit's "as is" is evaluate's test figures
    conditions = {name: condition_metrics(labels, probs[name], classes, groups, seed=seed, op=op)
                  for name in CONDITIONS}
    chance = 1.0 / len(present)
    metrics = {
        "classes": classes,
        "mask_source": lungs.method,
        "mask_description": lungs.description,
        "lung_area": float(lungs.masks.mean()),
        "fill": "image-mean",
        "fill_description": FILL_DESCRIPTION,
        "hide_margin": HIDE_MARGIN,
        "chance_balanced_accuracy": chance,
        "conditions": conditions,
        "operating_point": op.to_dict(),
    }
    thresholds = {
        "survival_margin": R.threshold(
            SURVIVAL_MARGIN,
            "balanced accuracy with the lungs hidden whose 95% interval lies more than this above chance means "
            "the model finds class evidence outside the lung fields; 0.15 leaves room for coarse masks that miss "
            "some lung. Only a model whose balanced accuracy as is lies above chance (its interval) is flagged",
        ),
        "covid_recall_survival": R.threshold(
            COVID_RECALL_SURVIVAL,
            "COVID-19 recall with the lungs hidden of at least this, with its 95% CI above the 95% CI of the "
            "share of other images called COVID-19, means COVID-19 is recognised without the lungs",
        ),
    }
    return make_result(
        "ablation", inputs=inputs or {}, metrics=metrics, thresholds=thresholds, flags=ablation_flags(metrics),
        notes=[f"Lung fields: {lungs.description}.", *audit_note(op)],
    )


def ablation_flags(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """The plain-language findings of an ablation result: none for a model that does not beat chance as is."""
    hidden = metrics["conditions"]["lungs_hidden"]
    as_is = metrics["conditions"]["as_is"]
    chance = metrics["chance_balanced_accuracy"]
    if not above(as_is.get("balanced_accuracy_interval"), chance):
        return []  # nothing can survive lung removal in a model that scores nothing with the lungs
    flags = []
    score = hidden.get("balanced_accuracy_interval")
    if above(score, chance + SURVIVAL_MARGIN, inclusive=True):
        flags.append(R.flag(
            "ablation-score-survives",
            f"The score survives lung removal: with the lung fields hidden, balanced accuracy is "
            f"{fmt.record(score)} (chance {fmt.percent(chance, fraction=True)}; as is "
            f"{fmt.record(as_is['balanced_accuracy_interval'])}). "
            "The model finds class evidence outside the lungs, where the disease is not.",
        ))
    covid = hidden["recall"].get("covid")
    if covid and covid["value"] is not None and "covid" in metrics["classes"]:
        # Recall alone would flag a model that calls everything COVID-19: compare it with how often
        # the other test images are called COVID-19 when their lungs are hidden too, intervals apart.
        k = metrics["classes"].index("covid")
        cm = np.asarray(hidden["confusion_matrix"])
        others = np.delete(cm, k, axis=0)
        false = Proportion(int(others[:, k].sum()), int(others.sum())).as_interval()
        false_high = false["high"] if false["high"] is not None else 1.0
        if covid["value"] >= COVID_RECALL_SURVIVAL and covid["low"] > false_high:
            flags.append(R.flag(
                "ablation-covid-survives",
                f"COVID-19 is still recognised with the lungs hidden: recall {fmt.record(covid)} while only "
                f"{fmt.record(false)} of the other images are called COVID-19 (as is: recall "
                f"{fmt.record(as_is['recall'].get('covid'))}).",
            ))
    return flags


def above(iv: dict[str, Any] | None, level: float, *, inclusive: bool = False) -> bool:
    """Whether an interval record's lower end lies above ``level`` (at or above, ``inclusive``); False without one."""
    low = (iv or {}).get("low")
    return low is not None and (low >= level if inclusive else low > level)


def audit_ablation(
    target: Path,
    settings: InferenceSettings = InferenceSettings(),
    *,
    data: Path | None = None,
    fold: int | None = None,
    masks: Path | None = None,
    out_dir: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """``covid-cxr audit ablation``: the checkpoint over the fold's test set, three ways; writes ``ablation.json``."""
    t, test, lungs = load_test_images_and_lungs(target, data, fold, masks)
    predictor = t.predictor(settings)  # decides by the model's rule, in evaluate's precision
    pre = t.checkpoint.preprocessing
    inputs = {**t.inputs(), "network": t.checkpoint.network, "split": "test", "image_size": pre.image_size,
              "resize": pre.resize, "masks": str(masks) if masks is not None else None, "runtime": predictor.runtime.describe()}
    result = run_ablation(predictor, test.images, [str(v) for v in test.frame["label"]], lungs,
                          groups=list(patient_groups(test.frame, t.data)), batch_size=settings.batch_size,
                          inputs=inputs)
    return result, write_result(result, out_dir or audit_dir_for(target))
