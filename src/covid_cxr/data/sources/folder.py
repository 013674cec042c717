"""A user's own images: one sub-folder per class, or a CSV listing them.

Folder layout: ``DIR/<class>/...`` where the class folder is ``covid``/``COVID-19``,
``pneumonia`` or ``normal`` (any depth below). Without patient ids every image is its own
patient. CSV layout: ``DIR/labels.csv`` (or the CSV path itself) with ``path`` (relative to the
CSV) or ``filename``, ``label``, and optionally ``patient_id``, ``view`` and ``source``.

Every folder is a named source (``--folder nih=DIR``): the name the user gives wins; without one,
a CSV's per-row ``source`` column names each image's collection; otherwise the source is
``folder``. Image ids are ``<source, made safe and lower-case>/<relative path, made safe>``
(``folder/...`` when unnamed, as before names existed).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from covid_cxr.data.manifest import check_source_name, finalize, make_ids, source_prefix
from covid_cxr.data.sources._common import read_table
from covid_cxr.errors import DataError
from covid_cxr.labels import normalize_label

SOURCE = "folder"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ""}
FIX = "give a folder with one sub-folder per class (covid, pneumonia, normal) or a labels.csv"


def parse_folder_spec(text: str | os.PathLike[str]) -> tuple[str | None, Path]:
    """``NAME=DIR`` -> (NAME, DIR); a bare ``DIR`` (or an existing path that holds ``=``) -> (None, DIR)."""
    raw = os.fspath(text)
    name, sep, rest = raw.partition("=")
    if sep and name.strip() and "/" not in name and os.sep not in name and rest and not Path(raw).exists():
        return check_source_name(name, where=f"--folder {raw}"), Path(rest)
    return None, Path(raw)


def folder_specs(folder: str | os.PathLike[str] | tuple[str | os.PathLike[str], ...] | list | None) -> tuple[str, ...]:
    """One or several ``[NAME=]DIR`` as a tuple of strings (what ``prepare`` records)."""
    if folder is None:
        return ()
    items = [folder] if isinstance(folder, (str, os.PathLike)) else list(folder)
    return tuple(os.fspath(f) for f in items)


def _sources(frame: pd.DataFrame, csv: Path, name: str | None) -> tuple[pd.Series, list[str]]:
    """Each row's source name: ``name`` when given, else the CSV's ``source`` column, else ``folder``."""
    given = frame["source"].str.strip() if "source" in frame else None
    if name is not None:
        notes = [f"{csv}: its source column is ignored; every image is named {name!r} as given"] \
            if given is not None and (given != "").any() else []
        return pd.Series(name, index=frame.index), notes
    if given is None:
        return pd.Series(SOURCE, index=frame.index), []
    checked = {v: check_source_name(v, where=f"{csv} source column") for v in set(given) if v}
    names = given.map(lambda v: checked.get(v, SOURCE))
    counts = ", ".join(f"{k} ({v})" for k, v in names.value_counts().sort_index().items())
    return names, [f"{csv}: sources from its source column: {counts}"]


def _from_csv(csv: Path, name: str | None) -> tuple[pd.DataFrame, list[str]]:
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
    sources, notes = _sources(frame, csv, name)
    out = pd.DataFrame({"path": [str(base / r) for r in rel], "label": labels, "source": sources.values})
    safe_rel = rel.str.replace("/", "_", regex=False)
    out["image_id"] = ""
    for source in sorted(set(out["source"])):  # ids unique within each source's prefix
        rows = (out["source"] == source).to_numpy()
        out.loc[rows, "image_id"] = make_ids(source_prefix(source), safe_rel[rows]).values
    pid = frame["patient_id"].str.strip() if "patient_id" in frame else pd.Series("", index=frame.index)
    out["patient_id"] = pid.where(pid != "", out["image_id"]).values
    out["view"] = frame["view"].values if "view" in frame else ""
    return out, notes


def _from_tree(root: Path, prefix: str) -> pd.DataFrame:
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
    out["image_id"] = make_ids(prefix, out["rel"].str.replace("/", "_", regex=False))
    out["patient_id"] = out["image_id"]
    out["view"] = ""
    return out


def read_folder(root: Path, name: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Manifest rows of a user's folder (class sub-folders or a labels CSV), as source ``name`` if given."""
    root = Path(root)
    if name is not None:
        name = check_source_name(name, where=f"--folder {name}={root}")
    csv = root if root.suffix.lower() == ".csv" else root / "labels.csv"
    notes: list[str] = []
    if csv.is_file():
        frame, notes = _from_csv(csv, name)
    elif root.is_dir():
        frame = _from_tree(root.resolve(), source_prefix(name or SOURCE))
        frame["source"] = name or SOURCE
    else:
        raise DataError(f"{root} not found; {FIX}")
    names = sorted(set(frame["source"]))
    note = f"{root}: {len(frame)} images" + (f" as source {names[0]!r}" if len(names) == 1 else "")
    if (frame["patient_id"] == frame["image_id"]).all():
        note += " (no patient ids given: every image is its own patient)"
    return finalize(frame, str(root)), [note, *notes]
