"""A user's own images: one sub-folder per class, or a CSV listing them.

Folder layout: ``DIR/<class>/...`` where the class folder is ``covid``/``COVID-19``,
``pneumonia`` or ``normal`` (any depth below). Without patient ids every image is its own
patient. CSV layout: ``DIR/labels.csv`` (or the CSV path itself) with ``path`` (relative to the
CSV) or ``filename``, ``label``, and optionally ``patient_id`` and ``view``. Image ids are
``folder/<relative path, made safe>``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covid_cxr.data.manifest import finalize, make_ids
from covid_cxr.data.sources._common import read_table
from covid_cxr.errors import DataError
from covid_cxr.labels import normalize_label

SOURCE = "folder"
PREFIX = "folder"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ""}
FIX = "give a folder with one sub-folder per class (covid, pneumonia, normal) or a labels.csv"


def _from_csv(csv: Path) -> pd.DataFrame:
    head = read_table(csv, (), fix=FIX)
    name_col = "path" if "path" in head.columns else "filename"
    frame = read_table(csv, (name_col, "label"), fix="its columns are path (or filename), label, "
                       "optional patient_id and view")
    labels = []
    for i, raw in enumerate(frame["label"]):
        try:
            labels.append(normalize_label(raw, where=f"{csv} row {i + 2}"))
        except ValueError as exc:
            raise DataError(str(exc)) from None
    base = csv.parent.resolve()
    rel = frame[name_col].str.strip()
    out = pd.DataFrame({"path": [str(base / r) for r in rel], "label": labels})
    out["image_id"] = make_ids(PREFIX, rel.str.replace("/", "_", regex=False))
    pid = frame["patient_id"].str.strip() if "patient_id" in frame else pd.Series("", index=frame.index)
    out["patient_id"] = pid.where(pid != "", out["image_id"]).values
    out["view"] = frame["view"].values if "view" in frame else ""
    return out


def _from_tree(root: Path) -> pd.DataFrame:
    rows = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            label = normalize_label(sub.name, where=f"folder name {sub}")
        except ValueError as exc:
            raise DataError(f"{exc}; rename the folder or move it out of {root}") from None
        for f in sorted(sub.rglob("*")):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES:
                rows.append({"path": str(f.resolve()), "label": label, "rel": f.relative_to(root).as_posix()})
    if not rows:
        raise DataError(f"{root} holds no images in class sub-folders; {FIX}")
    out = pd.DataFrame(rows)
    out["image_id"] = make_ids(PREFIX, out["rel"].str.replace("/", "_", regex=False))
    out["patient_id"] = out["image_id"]
    out["view"] = ""
    return out


def read_folder(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """Manifest rows of a user's folder (class sub-folders or a labels CSV)."""
    root = Path(root)
    csv = root if root.suffix.lower() == ".csv" else root / "labels.csv"
    if csv.is_file():
        frame = _from_csv(csv)
    elif root.is_dir():
        frame = _from_tree(root.resolve())
    else:
        raise DataError(f"{root} not found; {FIX}")
    frame["source"] = SOURCE
    note = f"{root}: {len(frame)} images"
    if (frame["patient_id"] == frame["image_id"]).all():
        note += " (no patient ids given: every image is its own patient)"
    return finalize(frame, str(root)), [note]
