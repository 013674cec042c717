"""RSNA Pneumonia Detection Challenge (Kaggle): the two stage-2 CSVs and the DICOM folder.

One image per patient: ``Target == 1`` on any of its rows -> pneumonia; class ``Normal`` ->
normal; ``No Lung Opacity / Not Normal`` is neither and left out. The patient id is the
``patientId``; image ids are ``rsna/<patientId>``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covid_cxr.data.manifest import finalize, safe_name
from covid_cxr.data.sources._common import read_table
from covid_cxr.errors import DataError, did_you_mean
from covid_cxr.labels import RSNA_CLASSES

SOURCE = "rsna"
PREFIX = "rsna"
LABELS_FILE = "stage_2_train_labels.csv"
CLASS_FILE = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"
FIX = ("download the RSNA Pneumonia Detection Challenge data from "
       "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge and give its folder")


def read_rsna(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """Manifest rows of the RSNA set at ``root`` and notes on what was left out."""
    root = Path(root).resolve()
    labels = read_table(root / LABELS_FILE, ("patientId", "Target"), fix=FIX)
    info = read_table(root / CLASS_FILE, ("patientId", "class"), fix=FIX)
    unknown = sorted(set(info["class"].str.strip()) - set(RSNA_CLASSES))
    if unknown:
        raise DataError(f"{root / CLASS_FILE}: unknown class value(s) "
                        f"{', '.join(repr(u) + did_you_mean(u, RSNA_CLASSES) for u in unknown)}; "
                        f"expected {', '.join(map(repr, RSNA_CLASSES))}")
    bad_target = sorted(set(labels["Target"].str.strip()) - {"0", "1"})
    if bad_target:
        raise DataError(f"{root / LABELS_FILE}: Target must be 0 or 1; found {', '.join(map(repr, bad_target))}")
    target = labels.assign(t=labels["Target"].str.strip().astype(int)).groupby("patientId")["t"].max()
    cls = info.assign(c=info["class"].str.strip()).groupby("patientId")["c"].first()
    missing = sorted(set(target.index) ^ set(cls.index))
    if missing:
        raise DataError(f"{root}: {len(missing)} patients appear in only one of {LABELS_FILE} and {CLASS_FILE} "
                        f"(e.g. {missing[0]}); use the two files of the same release")
    frame = pd.DataFrame({"patientId": target.index, "target": target.values, "cls": cls[target.index].values})
    conflict = frame[(frame["target"] == 1) != (frame["cls"].map(RSNA_CLASSES) == "pneumonia")]
    if len(conflict):
        raise DataError(f"{root}: {len(conflict)} patients have Target and class that disagree "
                        f"(e.g. {conflict['patientId'].iloc[0]})")
    frame["label"] = frame["cls"].map(RSNA_CLASSES)
    left_out = int(frame["label"].isna().sum())
    frame = frame[frame["label"].notna()].copy()
    image_dir = root / IMAGES_DIR if (root / IMAGES_DIR).is_dir() else root
    frame["path"] = [str(image_dir / f"{p}.dcm") for p in frame["patientId"]]
    frame["image_id"] = PREFIX + "/" + frame["patientId"].map(safe_name)
    frame["patient_id"] = frame["patientId"]
    frame["source"] = SOURCE
    frame["view"] = ""
    notes = [f"{root}: {len(labels)} label rows, {len(target)} patients; left out {left_out} "
             "'No Lung Opacity / Not Normal' patients"]
    return finalize(frame, str(root)), notes
