"""covid-chestxray-dataset (Cohen et al.): ``metadata.csv`` + ``images/``.

Kept: X-ray rows whose view is PA, AP, AP Supine or AP semi erect and whose finding maps to a
class (flat ``COVID-19`` or hierarchical ``Pneumonia/Viral/COVID-19``). The patient id is the
``patientid`` column. A file listed on two rows is kept once. Image ids are ``cxr/<file stem>``. A
``folder``/``filename`` written on Windows (``sub\\a.png``) finds the file its ``/`` spelling does.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covid_cxr.data.manifest import finalize, make_ids
from covid_cxr.data.sources._common import (
    listed_file,
    read_table,
    windows_absolute_note,
)
from covid_cxr.labels import covid_chestxray_class

SOURCE = "covid-chestxray"
PREFIX = "cxr"
KEPT_VIEWS = ("PA", "AP", "AP Supine", "AP semi erect")
REQUIRED = ("patientid", "finding", "view", "modality", "filename")
FIX = ("give the folder of https://github.com/ieee8023/covid-chestxray-dataset (holding metadata.csv and images/) "
       "or the path of its metadata CSV")


def metadata_path(root: Path) -> Path:
    """``root`` itself when it is a CSV file, else ``root/metadata.csv``."""
    root = Path(root)
    return root if root.suffix.lower() == ".csv" else root / "metadata.csv"


def _found(base: Path, kept: pd.DataFrame, encoding: str) -> tuple[list[str], list[str]]:
    """Each row's file name as found in its ``folder`` (``images`` when none) and its path; a name written on
    Windows finds the file its ``/`` spelling does, one in metadata that is not UTF-8 the file its bytes name
    (:func:`~._common.listed_file`)."""
    folders = kept["folder"] if "folder" in kept else pd.Series("", index=kept.index)
    names, paths = [], []
    for folder, name in zip(folders, kept["filename"]):
        name, path = listed_file(listed_file(base, folder.strip() or "images", encoding)[1], name, encoding)
        names.append(name)
        paths.append(str(path))
    return names, paths


def read_covid_chestxray(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """Manifest rows of the dataset at ``root`` and notes on what was left out and why."""
    meta_file = metadata_path(root)
    meta = read_table(meta_file, REQUIRED, fix=FIX)
    base = meta_file.parent.resolve()
    view = meta["view"].str.strip()
    modality = meta["modality"].str.strip().str.lower()
    label = meta["finding"].map(covid_chestxray_class)
    is_xray = modality.isin(["x-ray", "xray", "cr", "dx"])
    keep_view = view.isin(KEPT_VIEWS)
    notes = [
        f"{meta_file}: {len(meta)} rows; left out {int((~is_xray).sum())} non-X-ray, "
        f"{int((is_xray & ~keep_view).sum())} X-rays of other views (L, Axial, ...), "
        f"{int((is_xray & keep_view & label.isna()).sum())} of findings outside the classes"
    ]
    kept = meta[is_xray & keep_view & label.notna()].copy()
    kept["label"] = label[kept.index]
    raw_names = kept["filename"].copy()
    kept["filename"], kept["path"] = _found(base, kept, meta.attrs["encoding"])
    dup = kept["filename"].duplicated()
    if dup.any():
        notes.append(f"{meta_file}: {int(dup.sum())} files listed twice, kept once: "
                     f"{', '.join(kept.loc[dup, 'filename'].head(5))}")
        kept = kept[~dup]
    notes += windows_absolute_note(meta_file, raw_names[kept.index], map(Path, kept["path"]))
    kept["image_id"] = make_ids(PREFIX, kept["filename"])
    kept["patient_id"] = kept["patientid"].str.strip()
    kept["source"] = SOURCE
    kept["view"] = view[kept.index]
    return finalize(kept, str(meta_file)), notes
