"""The paper's Tables 3 and 4 (Rahimzadeh & Attar 2020), shipped inside the package.

A user's ``report`` sets our figures beside the paper's without the fixtures folder; a test
checks these copies equal ``fixtures/paper_tables/*.csv`` cell for cell. The rows are the
paper's own text (Table 4 truncates some figures, e.g. 27/31 = 87.096...% printed as 87.09).
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import pandas as pd

from covid_cxr.errors import DataError
from covid_cxr.labels import CLASSES

NETWORK_NAMES: dict[str, str] = {"xception": "Xception", "resnet50v2": "ResNet50V2", "concat": "Concatenated"}
"""Our registry names -> the paper's network names."""

_TABLE3 = """\
fold,network,covid_correct,covid_missed,covid_false,pneumonia_correct,pneumonia_missed,pneumonia_false,normal_correct,normal_missed,normal_false
1,Xception,26,5,101,3983,437,569,6245,606,378
1,ResNet50V2,27,4,96,3858,562,480,6334,517,507
1,Concatenated,26,5,68,3745,675,309,6526,325,628
2,Xception,23,8,42,3874,546,409,6426,425,528
2,ResNet50V2,22,9,67,3659,761,501,6340,511,713
2,Concatenated,23,8,27,3913,507,434,6413,438,492
3,Xception,21,9,28,3942,478,436,6411,440,463
3,ResNet50V2,22,8,97,3770,650,392,6433,418,587
3,Concatenated,25,5,35,3847,573,342,6502,349,550
4,Xception,22,9,42,3818,602,433,6411,440,576
4,ResNet50V2,22,9,78,4015,405,758,6065,786,364
4,Concatenated,26,5,77,3860,560,480,6340,511,519
5,Xception,21,10,41,4041,379,502,6335,516,362
5,ResNet50V2,21,10,42,3604,816,284,6549,302,802
5,Concatenated,24,7,43,3941,479,390,6442,409,462
"""

_TABLE4 = """\
fold,network,accuracy,covid_recall,pneumonia_recall,normal_recall,covid_specificity,pneumonia_specificity,normal_specificity,covid_accuracy,pneumonia_accuracy,normal_accuracy,covid_precision,pneumonia_precision,normal_precision
1,Xception,90.72,83.87,90.11,91.15,99.1,91.73,91.51,99.06,91.10,91.29,20.47,87.50,94.29
1,ResNet50V2,90.41,87.09,87.28,92.45,99.15,93.03,88.61,99.12,90.78,90.94,21.95,88.93,92.58
1,Concatenated,91.10,83.87,84.72,95.25,99.4,95.51,85.89,99.35,91.29,91.57,27.65,92.37,91.22
2,Xception,91.33,74.19,87.64,93.79,99.63,94.06,88.14,99.56,91.55,91.57,35.38,90.45,92.40
2,ResNet50V2,88.66,70.96,82.78,92.54,99.41,92.72,83.98,99.33,88.83,89.17,24.71,87.95,89.89
2,Concatenated,91.56,74.19,88.52,93.60,99.76,93.69,88.95,99.69,91.67,91.77,46,90.01,92.87
3,Xception,91.79,70,89.18,93.57,99.75,93.66,89.6,99.67,91.91,92.01,42.85,90.04,93.26
3,ResNet50V2,90.47,73.33,85.29,93.89,99.14,94.30,86.81,99.07,90.78,91.11,18.48,90.58,91.63
3,Concatenated,91.79,83.33,87.03,94.90,99.69,95.03,87.64,99.65,91.90,92.04,41.66,91.83,92.20
4,Xception,90.70,70.96,86.38,93.57,99.63,93.71,87.06,99.55,90.84,91.01,34.37,89.81,91.75
4,ResNet50V2,89.38,70.96,90.83,88.52,99.31,88.99,91.82,99.23,89.71,89.82,22,84.11,94.33
4,Concatenated,90.47,83.87,87.33,92.54,99.32,93.03,88.34,99.27,90.8,90.89,25.24,88.94,92.43
5,Xception,91.99,67.74,91.42,92.46,99.64,92.71,91.87,99.55,92.20,92.23,33.87,88.95,94.59
5,ResNet50V2,90.01,67.74,81.53,95.59,99.63,95.87,81.98,99.54,90.27,90.23,33.33,92.69,89.08
5,Concatenated,92.08,77.41,89.16,94.03,99.62,94.33,89.62,99.56,92.31,92.29,35.82,90.99,93.30
average,Xception,91.31,73.35,88.95,92.91,99.55,93.17,89.63,99.48,91.52,91.62,33.39,89.35,93.26
average,ResNet50V2,89.79,74.02,85.54,92.60,99.33,92.98,86.64,99.26,90.07,90.25,24.09,88.85,91.50
average,Concatenated,91.40,80.53,87.35,94.06,99.56,94.32,88.09,99.50,91.60,91.71,35.27,90.83,92.40
"""


def table3() -> pd.DataFrame:
    """Table 3: per fold and network, correct detected / not detected / wrong detected per class."""
    return pd.read_csv(io.StringIO(_TABLE3), dtype={"fold": str})


def table4() -> pd.DataFrame:
    """Table 4: per fold (and 'average') and network, the percentages the paper reports."""
    return pd.read_csv(io.StringIO(_TABLE4), dtype={"fold": str})


def paper_network_name(network: str) -> str | None:
    """The paper's name for one of our networks (or a paper name given as is); None if the paper has none."""
    if network in NETWORK_NAMES:
        return NETWORK_NAMES[network]
    by_lower = {name.lower(): name for name in NETWORK_NAMES.values()}
    return by_lower.get(network.lower())


def paper_average(network: str) -> dict[str, float] | None:
    """The paper's Table 4 'average' row for ``network`` (ours or the paper's spelling), or None."""
    name = paper_network_name(network)
    if name is None:
        return None
    t4 = table4()
    row = t4[(t4["fold"] == "average") & (t4["network"] == name)]
    return {k: float(v) for k, v in row.drop(columns=["fold", "network"]).iloc[0].items()}


def confusion_from_counts(row: Mapping[str, int], classes: tuple[str, ...] = CLASSES) -> np.ndarray:
    """A confusion matrix with exactly the Table 3 counts of ``row`` (rows true, columns predicted).

    Table 3 gives TP, FN and FP per class: six constraints (five independent) on the six
    off-diagonal cells, so one cell is free. Any non-negative choice gives the same Table 4
    figures; this picks the smallest. Used to rebuild prediction files from the paper's counts.
    """
    if classes != CLASSES:
        raise ValueError(f"confusion_from_counts works in the order {', '.join(CLASSES)}")
    fn = [int(row[f"{c}_missed"]) for c in classes]
    fp = [int(row[f"{c}_false"]) for c in classes]
    if sum(fn) != sum(fp):
        raise DataError(f"inconsistent Table 3 row: {sum(fn)} missed but {sum(fp)} wrong detections")
    # Cells: a = covid->pneumonia, then the rest follow from the row (FN) and column (FP) sums.
    for a in range(0, fn[0] + 1):
        b = fn[0] - a  # covid -> normal
        f = fp[1] - a  # normal -> pneumonia
        e = fn[2] - f  # normal -> covid
        c = fp[0] - e  # pneumonia -> covid
        d = fn[1] - c  # pneumonia -> normal
        if min(b, c, d, e, f) >= 0 and b + d == fp[2]:
            tp = [int(row[f"{name}_correct"]) for name in classes]
            return np.array([[tp[0], a, b], [c, tp[1], d], [e, f, tp[2]]], dtype=np.int64)
    raise DataError("no non-negative confusion matrix has these Table 3 counts")
