"""Source probes scored out of sample on every image, by patient-grouped cross-fitting.

A probe trained on a fold's training pool and tested on its test set sees a fifth of the data
at test time and, on small pools, trains on a few dozen images: on the real fixture (NIH vs
Hannover) such a CNN answered AUC 0.81 [0.70, 0.99] for two collections that any radiologist
tells apart at a glance. Here the images are cut into :data:`CV_FOLDS` parts by patient
(patients that share a byte-identical file kept together; stratified by source and class),
each part is scored by probes trained on the others, and every image gets an out-of-sample
source score, so the AUC and its interval use all of them.

Two probes, because no single one sees every kind of source difference:

- ``stats``: logistic regression on image statistics that acquisition and post-processing set
  (intensity histogram and percentiles, an 8x8 thumbnail for borders, collimation and markers,
  Laplacian energy at four scales and the gradient histogram for noise, sharpening and
  resolution). Seconds on a CPU.
- ``cnn``: the small CNN of :mod:`covid_cxr.audit.source` (its fit-and-score function lives there), trained for
  at least :data:`MIN_CNN_STEPS` steps per part, for what hand-made statistics miss (text, shapes).

A very large collection is sampled down to :data:`MAX_PER_CELL` images per source and class
(seeded), which keeps the probes to minutes on the paper's 15,000 images.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covid_cxr.data.splits import groups_of
from covid_cxr.errors import DataError

PROBES: tuple[str, ...] = ("stats", "cnn")
CV_FOLDS = 5
MAX_PER_CELL = 1000
MIN_CNN_STEPS = 300
STATS_SIZE = 128
"""Side the statistics are computed at: fine enough for noise and sharpening, cheap on 15,000 images."""


def cap_cells(frame: pd.DataFrame, max_per_cell: int = MAX_PER_CELL, seed: int = 0) -> np.ndarray:
    """Row positions of ``frame`` keeping at most ``max_per_cell`` images per (source, class), seeded, sorted."""
    rng = np.random.default_rng(seed)
    keep = []
    for _, rows in frame.groupby(["source", "label"], sort=True).indices.items():
        keep.append(rows if len(rows) <= max_per_cell else rng.choice(rows, max_per_cell, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def crossfit_parts(frame: pd.DataFrame, k: int = CV_FOLDS, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped parts stratified by source and class: (train rows, test rows) for each of up to ``k``.

    The groups are the splitter's (:func:`~covid_cxr.data.splits.groups_of`): the ``group`` column
    where the caller merged patients that share a byte-identical file
    (:func:`~covid_cxr.data.splits.merge_identical`), else the patient. A probe tested on one copy of
    a file while trained on the other would score the file, not the source.
    """
    groups = groups_of(frame)
    per_source = groups.groupby(frame["source"]).nunique()
    if per_source.min() < 2:
        few = ", ".join(per_source[per_source < 2].index)
        raise DataError(f"source(s) {few} hold images of one patient only (patients that share a byte-identical "
                        "image count as one): a source probe must be tested on patients it was not trained on, so "
                        "every source needs two patients or more")
    k = int(min(k, per_source.min()))
    strata = (frame["source"] + "|" + frame["label"]).to_numpy()
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # small strata: sklearn warns that a cell has fewer members than parts
        warnings.simplefilter("ignore", UserWarning)
        return list(splitter.split(np.zeros(len(frame)), strata, groups.to_numpy()))


def image_statistics(images: np.ndarray, size: int = STATS_SIZE) -> np.ndarray:
    """Per image: what acquisition and post-processing leave in the pixels (float32, (N, 131))."""
    out = []
    for image in images:
        f = image.astype(np.float32) / 255.0
        if f.shape[0] != size:
            f = cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA)
        hist = np.histogram(f, 32, (0.0, 1.0))[0] / f.size
        pct = np.percentile(f, [1, 5, 25, 50, 75, 95, 99])
        thumb = cv2.resize(f, (8, 8), interpolation=cv2.INTER_AREA).ravel()
        lap, g = [], f
        for _ in range(4):
            edges = np.abs(cv2.Laplacian(g, cv2.CV_32F))
            lap += [edges.mean(), edges.std(), np.percentile(edges, 99)]
            g = cv2.pyrDown(g)
        grad = np.hypot(cv2.Sobel(f, cv2.CV_32F, 1, 0), cv2.Sobel(f, cv2.CV_32F, 0, 1))
        ghist = np.histogram(grad, 16, (0.0, 2.0))[0] / f.size
        out.append(np.concatenate([hist, pct, thumb, lap, ghist]).astype(np.float32))
    return np.stack(out) if out else np.zeros((0, 131), np.float32)


def stats_probe(features: np.ndarray, seed: int = 0) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """A fit-and-score function of the statistics probe (L2 logistic regression, sources weighted equally)."""

    def fit_score(train: np.ndarray, targets: np.ndarray, test: np.ndarray) -> np.ndarray:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000,
                                                                   random_state=seed))
        model.fit(features[train], targets)
        probs = np.zeros((len(test), int(targets.max()) + 1))
        probs[:, model.classes_] = model.predict_proba(features[test])
        return probs

    return fit_score


def crossfit(fit_score: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], targets: np.ndarray,
             parts: Sequence[tuple[np.ndarray, np.ndarray]], num_sources: int) -> np.ndarray:
    """Out-of-sample probabilities (N, num_sources): each part scored by a probe fitted on the others."""
    probs = np.zeros((len(targets), num_sources))
    for train, test in parts:
        fitted = fit_score(train, targets[train], test)
        probs[test, : fitted.shape[1]] = fitted
    return probs
