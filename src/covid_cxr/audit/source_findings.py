"""What the source audit concludes: source-prediction metrics, the class/source confound, flags.

Two findings, strongest first:

1. ``class-from-one-source``: a class whose every image comes from one source (COVID-19 from
   covid-chestxray and normal from RSNA in the paper's data; every class of the real fixture).
   This is a fact of the data, not a measurement: a classifier can score on that class by
   recognising the source, and no figure measured on this data can tell the two apart. The
   probe's AUC says how visible the sources are; the flag stands whatever it says.
2. ``source-predictable``: within a class that two sources provide, the probe tells them apart
   near-perfectly. The disease cannot explain that, so something else (markers, scanners,
   processing) separates the sources, and a classifier can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from covid_cxr import fmt
from covid_cxr.audit import results as R
from covid_cxr.data.splits import groups_of
from covid_cxr.evaluate.metrics import bootstrap_auc_values, percentile_interval, roc_auc
from covid_cxr.stats import Proportion

NEAR_PERFECT_AUC = 0.95
"""Within-class source AUC at or above this is flagged ("near-perfect")."""

MIN_LOWER_AUC = 0.80
"""...provided the lower end of its 95% interval is at least this (not a lucky small sample)."""

MIN_PER_SOURCE = 5
"""A class enters the within-class figures only with at least this many scored images from each of two sources."""


def source_metrics(
    probs: np.ndarray, sources: Sequence[str], source_names: Sequence[str], groups: Sequence[str] | None = None,
    *, n_boot: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """Accuracy (Wilson), balanced accuracy, and AUC (patient bootstrap) of source predictions."""
    index = {s: i for i, s in enumerate(source_names)}
    true = np.array([index[s] for s in sources], dtype=np.int64)
    pred = probs.argmax(axis=1)
    present = np.unique(true)
    recalls = [float((pred[true == k] == k).mean()) for k in present]
    groups_arr = None if groups is None else np.asarray(groups)
    # Two sources: the AUC of the second's score. More: the macro AUC (mean one-vs-rest), bootstrapped itself:
    # every class's AUC from the same resampled patients, averaged per resample.
    ks = present if len(present) > 2 else present[1:]
    positives = [true == k for k in ks]
    scores = [probs[:, k] for k in ks]
    draws = bootstrap_auc_values(positives, scores, groups_arr, n_boot=n_boot, seed=seed)
    # Every source present has positives and negatives: no NaN among the draws.
    low, high = percentile_interval(draws.mean(axis=0)) if ks.size else (np.nan, np.nan)
    auc = {"value": float(np.mean([roc_auc(p, s) for p, s in zip(positives, scores)])) if ks.size else None,
           "low": None if np.isnan(low) else low, "high": None if np.isnan(high) else high,
           "n": int(len(true)), "method": "bootstrap by patient" if groups is not None else "bootstrap"}
    return {
        "n": int(len(true)),
        "counts": {source_names[k]: int((true == k).sum()) for k in present},
        "accuracy": Proportion(int((pred == true).sum()), int(len(true))).as_interval(),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "auc": auc if len(present) > 1 else None,
    }


def probe_metrics(probs: np.ndarray, frame: pd.DataFrame, names: Sequence[str], *, n_boot: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """Overall source metrics of the scored images, and within every class two sources provide."""
    src = frame["source"].astype(str).to_numpy()
    lab = frame["label"].astype(str).to_numpy()
    # Drawn whole by the bootstrap: patients (ids are only unique within a source), merged where they share a
    # byte-identical file (the ``group`` column), as the cross-fitting's parts keep them.
    pid = groups_of(frame).to_numpy()
    out: dict[str, Any] = {"overall": source_metrics(probs, src, names, pid, n_boot=n_boot, seed=seed),
                           "within_class": {}}
    for cls in sorted(set(lab)):
        where = lab == cls
        counts = {s: int((src[where] == s).sum()) for s in names}
        enough = [s for s, c in counts.items() if c >= MIN_PER_SOURCE]
        if len(enough) >= 2:
            keep = where & np.isin(src, enough)
            out["within_class"][cls] = source_metrics(probs[keep], src[keep], names, pid[keep], n_boot=n_boot,
                                                      seed=seed)
    return out


def confounded_classes(frame: pd.DataFrame) -> dict[str, str]:
    """Class -> its only source, for every class that one source alone provides."""
    per_class = frame.groupby("label")["source"].unique()
    return {str(cls): str(srcs[0]) for cls, srcs in per_class.items() if len(srcs) == 1}


def confound_flag(frame: pd.DataFrame, overall_auc: dict[str, Any] | None) -> dict[str, str] | None:
    """The ``class-from-one-source`` finding, or None when every class comes from two sources or more."""
    confounded = confounded_classes(frame)
    if not confounded:
        return None
    classes_of = frame.groupby("source")["label"].unique()
    parts = []
    for cls, src in confounded.items():
        others = sorted(set(classes_of[src]) - {cls})
        also = (f" (which also provides {', '.join(R.class_name(o) for o in others)})" if others
                else " (which provides no other class)")
        parts.append(f"every {R.class_name(cls)} image comes from {src}{also}")
    probe = (f" The probe tells the sources apart with AUC {fmt.record(overall_auc, as_percent=False)}."
             if overall_auc and overall_auc.get("value") is not None else "")
    return R.flag(
        "class-from-one-source",
        f"Class and source are confounded, the strongest shortcut there is: {'; '.join(parts)}. A classifier can "
        "score on these classes by recognising where an image came from, and no accuracy measured on this data "
        "can tell that from learning the disease; only images of these classes from other sources can "
        f"('covid-cxr audit cross-source').{probe}",
    )


def source_flags(metrics: dict[str, Any], frame: pd.DataFrame | None = None) -> list[dict[str, str]]:
    """The confound (when ``frame`` is given), then near-perfect within-class source prediction."""
    flags = []
    overall = metrics["overall"].get("auc") or {}
    confound = confound_flag(frame, overall) if frame is not None else None
    if confound is not None:
        flags.append(confound)
    for cls, w in (metrics.get("within_class") or {}).items():
        auc = w.get("auc") or {}
        if auc.get("value") is not None and auc["value"] >= NEAR_PERFECT_AUC and (auc.get("low") or 0) >= MIN_LOWER_AUC:
            flags.append(R.flag(
                "source-predictable",
                f"The source is predictable from the image: among {R.class_name(cls)} images alone the probe tells "
                f"{' from '.join(w['counts'])} with AUC {fmt.record(auc, as_percent=False)} and accuracy "
                f"{fmt.record(w['accuracy'])}. The disease cannot explain that; since the class labels are "
                "confounded with source, a classifier can score by recognising the source.",
            ))
    if not metrics.get("within_class") and confound is None:
        if overall.get("value") is not None and overall["value"] >= NEAR_PERFECT_AUC:
            flags.append(R.flag(
                "source-predictable-confounded",
                f"The source is predictable from the image (AUC {fmt.record(overall, as_percent=False)}), and no class "
                "comes from two sources with enough images to tell whether the disease or something else "
                "gives the source away.",
            ))
    return flags


def thresholds() -> dict[str, Any]:
    return {
        "near_perfect_auc": R.threshold(NEAR_PERFECT_AUC, "within-class source AUC at or above this is near-perfect: "
                                        "the probe separates the sources almost without error, by something "
                                        "other than the disease"),
        "min_lower_auc": R.threshold(MIN_LOWER_AUC, "and the interval's lower end must reach this, so a lucky "
                                     "handful of images does not raise the flag"),
        "min_per_source": R.threshold(MIN_PER_SOURCE, "scored images needed from each of two sources for a class "
                                      "to enter the within-class figures"),
    }


def notes_for(metrics: dict[str, Any]) -> list[str]:
    notes = ["Plain accuracy is dominated by the largest source; read balanced accuracy and AUC."]
    if not metrics["within_class"]:
        notes.append("No class has enough images from two sources: class and source cannot be told apart, and "
                     "the probe's AUC measures the source and the disease together.")
    return notes
