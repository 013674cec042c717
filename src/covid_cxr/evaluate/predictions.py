"""Predictions files: one row per image, the input of every metric, table and plot.

Columns (``evaluate`` writes all of them; ``metrics`` and ``report`` need only ``label`` and
``pred``): ``image_id, patient_id, source, label, p_covid, p_pneumonia, p_normal, pred``.
``pred`` is authoritative (a user may have thresholded); the probabilities feed AUC and
calibration. Labels may use any spelling :func:`covid_cxr.labels.normalize_label` knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_cxr.atomic import write_text
from covid_cxr.data.sources._common import read_table
from covid_cxr.data.splits import patient_key
from covid_cxr.errors import DataError
from covid_cxr.evaluate.metrics import compute_metrics, confusion_matrix, patient_confusions
from covid_cxr.labels import CLASSES, normalize_label

PROB_COLUMNS: tuple[str, ...] = tuple(f"p_{name}" for name in CLASSES)
COLUMNS: tuple[str, ...] = ("image_id", "patient_id", "source", "label", *PROB_COLUMNS, "pred")
PROB_SUM_TOLERANCE = 1e-3
PROB_FORMAT = "%.9g"  # round-trips float32 exactly; see write_predictions


@dataclass(frozen=True)
class Predictions:
    """A validated predictions table: canonical labels, and probabilities when the file had them."""

    frame: pd.DataFrame
    path: Path | None = None

    @property
    def has_probs(self) -> bool:
        return all(col in self.frame.columns for col in PROB_COLUMNS)

    @property
    def probs(self) -> np.ndarray:
        """(N, 3) in :data:`CLASSES` order."""
        return self.frame[list(PROB_COLUMNS)].to_numpy(dtype=np.float64)

    @property
    def true_idx(self) -> np.ndarray:
        return self.frame["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy(dtype=np.int64)

    @property
    def groups(self) -> np.ndarray | None:
        """Patients for the patient bootstrap (``source:patient_id`` where sources are given, since ids are only
        unique within a source), or None when the file has no patient ids."""
        frame = self.frame
        if "patient_id" not in frame.columns or frame["patient_id"].isna().all():
            return None
        if "source" in frame.columns and not frame["source"].isna().any():
            keys = patient_key(frame).to_numpy()
        else:
            keys = frame["patient_id"].astype(str).to_numpy()
        missing = frame["patient_id"].isna().to_numpy()  # a row without an id is a patient of its own, not a reason
        keys[missing] = [f"\0row{i}" for i in np.flatnonzero(missing)]  # to draw every other row alone too
        return keys

    def confusion(self, *, by_patient: bool = False) -> np.ndarray:
        """The confusion matrix (C, C); ``by_patient``: one per patient (P, C, C) where the file has patient ids,
        which the metrics take wherever they take a matrix, so that a rate's interval allows for patients with
        several images (the pooled matrix, without ids)."""
        groups = self.groups if by_patient else None
        if groups is None:
            return confusion_matrix(self.frame["label"], self.frame["pred"], CLASSES)
        pred_idx = self.frame["pred"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy(dtype=np.int64)
        return patient_confusions(self.true_idx, pred_idx, groups, len(CLASSES))

    def metrics(self, *, prevalence: float | None = None, prevalence_class: str = "covid",
                n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
        """All figures of :func:`~covid_cxr.evaluate.metrics.compute_metrics` for this table."""
        return compute_metrics(
            self.confusion(by_patient=True),
            probs=self.probs if self.has_probs else None,
            true_idx=self.true_idx,
            groups=self.groups,
            prevalence=prevalence,
            prevalence_class=prevalence_class,
            n_boot=n_boot,
            seed=seed,
        )


def validate_predictions(frame: pd.DataFrame, where: str) -> Predictions:
    """Check a predictions table and return it with canonical labels; ``where`` names it in errors."""
    missing = [col for col in ("label", "pred") if col not in frame.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(missing)} (it has {', '.join(map(str, frame.columns[:12]))}); a "
            f"predictions file needs at least 'label' (true class) and 'pred' (predicted class), optionally "
            f"{', '.join(PROB_COLUMNS)} and patient_id"
        )
    if frame.empty:
        raise DataError(f"{where}: no rows; write one row per evaluated image")
    frame = frame.copy()
    for col in ("label", "pred"):
        if frame[col].isna().any():
            row = int(np.flatnonzero(frame[col].isna().to_numpy())[0]) + 2  # +1 header, +1 one-based
            raise DataError(f"{where} row {row}: empty '{col}'; every row needs a class ({', '.join(CLASSES)})")
        values = {}
        for raw in frame[col].unique():
            try:
                values[raw] = normalize_label(raw)
            except ValueError:
                row = int(np.flatnonzero((frame[col] == raw).to_numpy())[0]) + 2
                raise DataError(
                    f"{where} row {row}: unknown class {raw!r} in column '{col}'; "
                    f"use one of {', '.join(CLASSES)} (COVID-19 and No Finding are accepted too)"
                ) from None
        frame[col] = frame[col].map(values)
    present = [col for col in PROB_COLUMNS if col in frame.columns]
    if present and len(present) != len(PROB_COLUMNS):
        absent = sorted(set(PROB_COLUMNS) - set(present))
        raise DataError(f"{where}: has {', '.join(present)} but not {', '.join(absent)}; give all or none")
    if present:
        probs = frame[list(PROB_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | (probs > 1).any(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0]) + 2
            raise DataError(f"{where} row {row}: probabilities must be numbers in [0, 1]")
        # the float sum of three 3-decimal values may pass the tolerance by a rounding error (0.9989999999999999)
        off = np.abs(probs.sum(axis=1) - 1.0) > PROB_SUM_TOLERANCE * (1 + 1e-9)
        if off.any():
            row = int(np.flatnonzero(off)[0]) + 2
            raise DataError(
                f"{where} row {row}: probabilities sum to {probs[row - 2].sum():.6f}, not 1 (tolerance "
                f"{PROB_SUM_TOLERANCE}); write softmax outputs, not logits or one-vs-rest scores; for rounded ones, "
                "renormalise each row to sum to 1, or write more decimals (evaluate writes 9 significant digits)"
            )
        frame[list(PROB_COLUMNS)] = probs
    return Predictions(frame=frame.reset_index(drop=True))


def read_predictions(path: str | Path) -> Predictions:
    """Read and validate a predictions CSV; every problem raises :class:`DataError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such predictions file; 'covid-cxr evaluate' writes one as predictions.csv")
    # The labels CSVs' reader: any encoding a spreadsheet saves, comma, semicolon or tab, headers in any case, a
    # separator closing every row. Cells are text ("NA" is a word, not a hole); empty ones are missing values.
    frame = read_table(path, ("label", "pred"), optional=COLUMNS,
                       fix=f"a predictions file needs a header with 'label' and 'pred' (optionally "
                           f"{', '.join(c for c in COLUMNS if c not in ('label', 'pred'))}) and one row per image")
    frame = frame.replace(r"^\s*$", np.nan, regex=True)
    ids = frame["image_id"].dropna() if "image_id" in frame.columns else pd.Series(dtype=str)
    repeated = ids[ids.duplicated()]
    if len(repeated):
        rows = np.flatnonzero((frame["image_id"] == repeated.iloc[0]).to_numpy()) + 2  # +1 header, +1 one-based
        raise DataError(f"{path}: image {repeated.iloc[0]!r} is on rows {', '.join(map(str, rows))} ({len(repeated)} "
                        "repeated rows in all); every row counts as an image, so keep one row per image")
    result = validate_predictions(frame, str(path))
    return Predictions(frame=result.frame, path=path)


def predictions_frame(split: pd.DataFrame, probs: np.ndarray, classes: tuple[str, ...]) -> pd.DataFrame:
    """The predictions table for a split and its probabilities (columns in ``classes`` order).

    The probability columns are written in :data:`CLASSES` order whatever the network's output
    order (the authors' Keras models emit covid, normal, pneumonia); ``pred`` is the argmax.
    """
    probs = np.asarray(probs, dtype=np.float64)
    reorder = [classes.index(name) for name in CLASSES]
    canonical = probs[:, reorder]
    out = pd.DataFrame({
        "image_id": split["image_id"].astype(str).to_numpy(),
        "patient_id": split["patient_id"].astype(str).to_numpy() if "patient_id" in split else None,
        "source": split["source"].astype(str).to_numpy() if "source" in split else None,
        "label": [normalize_label(v) for v in split["label"]],
    })
    for k, col in enumerate(PROB_COLUMNS):
        out[col] = canonical[:, k]
    out["pred"] = np.asarray(CLASSES)[canonical.argmax(axis=1)]
    return out


def write_predictions(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a predictions table with probabilities to 9 significant digits.

    Nine significant digits give back every float32 (what the models output) exactly, and a tiny probability
    keeps its own digits (``3.1e-09``): fixed decimals would round the small scores of a confident model to one
    tied 0.000000, and an AUC recomputed from the file (``metrics``, ``report``) would no longer be the model's.
    """
    # Rendered whole, then written atomically: a failure or a reader mid-write never meets half a table.
    return write_text(path, frame.to_csv(index=False, float_format=PROB_FORMAT, lineterminator="\n"))
