"""The manifest: one table of every usable image, whatever dataset it came from.

Columns (:data:`COLUMNS`): ``image_id`` (unique, stable, file-system safe: ``<source
prefix>/<name>``), ``path`` (absolute), ``label`` (a class key of :mod:`covid_cxr.labels`),
``patient_id`` (what splits group on), ``source`` and ``view``. Nothing downstream needs to
know which adapter produced a row.

``source`` is the name of the collection an image came from, as Table 1, the splits and the
audits show it: ``covid-chestxray`` and ``rsna`` for the public datasets, the user's own name for a
folder (``--folder nih=DIR``, or a labels CSV's ``source`` column), ``folder`` when none is given.
The audits compare sources, so two collections must never share a name.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pandas as pd

from covid_cxr.errors import DataError
from covid_cxr.labels import CLASSES

COLUMNS: tuple[str, ...] = ("image_id", "path", "label", "patient_id", "source", "view")
SAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_SOURCE_NAME = 64
RESERVED_SOURCE_NAMES = ("total",)  # Table 1's totals row


def safe_name(text: str) -> str:
    """A file-system safe version of a name: runs of other characters become one ``_``."""
    out = SAFE.sub("_", str(text).strip()).strip("._")
    return out or "_"


def check_source_name(name: object, *, where: str) -> str:
    """A valid source name (stripped), or :class:`DataError` naming ``where`` and what a name may be."""
    text = str(name).strip()
    problem = ""
    if not text:
        problem = "is empty"
    elif len(text) > MAX_SOURCE_NAME:
        problem = f"is longer than {MAX_SOURCE_NAME} characters"
    elif not text.isprintable():
        problem = "holds control characters"
    elif text.lower() in RESERVED_SOURCE_NAMES:
        problem = "is reserved (Table 1's totals row)"
    if problem:
        raise DataError(f"{where}: source name {text!r} {problem}; give a short name such as 'nih' or 'hospital-b'")
    return text


def source_prefix(name: str) -> str:
    """The image-id prefix of a named source: its file-system safe, lower-case form (``NIH ChestX-ray14`` ->
    ``nih_chestx-ray14``)."""
    return safe_name(name).lower()


def make_ids(prefix: str, names: pd.Series) -> pd.Series:
    """Image ids ``<prefix>/<safe stem>``; stems that collide keep their extension (``_png``) too.

    Names that still collide differ only in characters the safe form replaces (``病例一.png`` and
    ``病例二.png`` are both ``___png``): each of those gets 8 hex digits of its name's SHA-1 as well.
    """
    names = names.astype(str)
    stems = names.map(lambda n: safe_name(n.rsplit(".", 1)[0] if "." in n else n))
    clash = stems.duplicated(keep=False)
    stems = stems.where(~clash, names.map(safe_name).str.replace(".", "_", regex=False))
    clash = stems.duplicated(keep=False)
    stems = stems.where(~clash, stems + "-" + names.map(_name_digest))
    return prefix + "/" + stems


def _name_digest(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def finalize(rows: pd.DataFrame, where: str) -> pd.DataFrame:
    """Order the columns, check the values, and return a clean manifest part."""
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:
        raise DataError(f"{where}: manifest rows lack {', '.join(missing)}")
    out = rows.loc[:, list(COLUMNS)].copy()
    for col in COLUMNS:
        out[col] = out[col].fillna("").astype(str)
    bad = sorted(set(out["label"]) - set(CLASSES))
    if bad:
        raise DataError(f"{where}: unknown labels {', '.join(bad)}; valid labels are {', '.join(CLASSES)}")
    if (out["patient_id"] == "").any():
        raise DataError(f"{where}: {int((out['patient_id'] == '').sum())} rows have no patient id")
    if (out["source"] == "").any():
        raise DataError(f"{where}: {int((out['source'] == '').sum())} rows have no source name")
    return out.reset_index(drop=True)


def combine(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate manifest parts; image ids must be unique across all sources."""
    seen: dict[str, int] = {}
    for i, part in enumerate(parts):
        for name in set(part["source"]):
            if name in seen:
                raise DataError(f"two of the given datasets are both named {name!r} (datasets {seen[name] + 1} and "
                                f"{i + 1}); the audits compare sources, so give each its own name: "
                                "--folder nih=DIR --folder hospital-b=DIR")
            seen[name] = i
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(COLUMNS))
    dup = frame["image_id"].duplicated(keep=False)
    if dup.any():
        clashes = frame.loc[dup].groupby("image_id")["path"].apply(lambda paths: " and ".join(map(str, paths)))
        shown = "; ".join(f"{image_id}: {paths}" for image_id, paths in list(clashes.items())[:5])
        raise DataError(f"{int(dup.sum())} images share an image id ({shown}); ids are made from the file names "
                        "within each source, so rename one file of each pair (or list it once in the labels CSV)")
    return frame.sort_values(["source", "image_id"], kind="stable").reset_index(drop=True)


def table1(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images per source and class (the paper's Table 1), with totals."""
    table = pd.crosstab(manifest["source"], manifest["label"]).reindex(columns=list(CLASSES), fill_value=0)
    table.loc["total"] = table.sum()
    table["total"] = table.sum(axis=1)
    return table.astype(int)


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a written ``manifest.csv`` back (every column as text)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="surrogateescape")
    except FileNotFoundError:
        raise DataError(f"{path} not found: run 'covid-cxr prepare' to write it") from None
    return finalize(frame, str(path))
