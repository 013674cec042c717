"""Which images of an "external" set are the model's own: images of its training, validation or test split.

A set that holds the images a model was trained or tuned on measures nothing external; scored as external
validation it would hide the very drop it exists to show. The run's images are its split files
(``RUN/splits``, else the fold of the prepared data ``run.json`` names), each with the sha256 of its file as
the prepared cache recorded it (the digests :func:`covid_cxr.data.splits.check_disjoint` compares); an
external image is the model's own when its file's sha256 is one of them, or its image id is, unless both
files' digests are known and differ (another collection's ``img001.png``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from covid_cxr.data.cache import INDEX_FILE, read_cache_build
from covid_cxr.data.prepared import PreparedData
from covid_cxr.errors import DataError
from covid_cxr.runs.folder import RunFolder, RunInfo

PARTS = ("training", "validation", "test")  # an image in several parts counts in the first


@dataclass(frozen=True)
class OwnImages:
    """How many images of a set are the model's own, per part of its split, and what they were compared by."""

    counts: dict[str, int]
    images: int  # images in the set
    compared_by: str

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.total, "of": self.images, **self.counts, "compared_by": self.compared_by}

    def heading(self) -> str:
        """What a heading says of a set that holds the model's own images ("" when it holds none)."""
        if not self.total:
            return ""
        parts = ", ".join(f"{n} {part}" for part, n in self.counts.items() if n)
        return f"not external: {self.total} of {self.images} images are the model's own data ({parts})"


def describe(own: dict[str, Any] | None) -> str:
    """:meth:`OwnImages.heading` for a recorded ``own_images`` block (metrics.json), "" for none or no overlap."""
    if not isinstance(own, dict) or not own.get("images"):
        return ""
    counts = {part: int(own.get(part, 0)) for part in PARTS}
    return OwnImages(counts, int(own.get("of", 0)), str(own.get("compared_by", ""))).heading()


def split_rows(run_dir: Path | None) -> pd.DataFrame | None:
    """Every image of the run's split files (``RUN/splits``), once per part (training phases, validation, test),
    with a ``part`` column; None when the run folder holds none."""
    folder = RunFolder(run_dir).splits if run_dir is not None else None
    if folder is None or not folder.is_dir():
        return None
    parts = {"training": sorted(folder.glob("phase*.csv")), "validation": [folder / "val.csv"],
             "test": [folder / "test.csv"]}
    frames = []
    for part, files in parts.items():
        found = [pd.read_csv(f, dtype=str, keep_default_na=False) for f in files if f.is_file()]
        if found:
            frames.append(pd.concat(found).drop_duplicates("image_id").assign(part=part))
    return pd.concat(frames, ignore_index=True) if frames else None


def _split_files(run_dir: Path | None, run: RunInfo) -> tuple[pd.DataFrame | None, str]:
    """(image_id, part) of every image of the run's split, and where from; None when nothing records them."""
    rows = split_rows(run_dir)
    if rows is not None:
        return rows[["image_id", "part"]], str(RunFolder(run_dir).splits)  # type: ignore[arg-type]
    if run.data and run.fold is not None and Path(run.data).is_dir():
        try:
            fold = PreparedData(Path(run.data)).fold(int(run.fold))
        except DataError:
            return None, ""
        frames = [f.assign(part="training") for f in fold.phases] + [fold.val.assign(part="validation"),
                                                                       fold.test.assign(part="test")]
        return pd.concat(frames, ignore_index=True)[["image_id", "part"]], f"fold {run.fold} of {run.data}"
    return None, ""


def prepared_digests(root: Path) -> dict[str, str]:
    """Image id -> sha256 of its file, as a prepared folder's image cache recorded them ({} without a cache)."""
    for index in sorted((Path(root) / "cache").glob(f"size*/{INDEX_FILE}")):
        try:
            return {k: v for k, v in read_cache_build(index.parent).sha256.items() if v}
        except (DataError, OSError, KeyError, ValueError):
            continue  # a damaged cache folder: another size may still say
    return {}


def own_images(run_dir: Path | None, run: RunInfo, image_ids: Sequence[str], digests: Sequence[str]
               ) -> OwnImages | None:  # fmt: skip
    """How many of a set's images (``image_ids`` and the sha256 of their files, "" where unknown) are images of
    the run's split; None when nothing records which images the model was trained on."""
    split, where = _split_files(run_dir, run)
    if split is None:
        return None
    known = prepared_digests(Path(run.data)) if run.data else {}
    order = {part: k for k, part in enumerate(PARTS)}
    split = split.assign(rank=split["part"].map(order)).sort_values("rank", kind="stable")
    part_of_id: dict[str, str] = {}
    part_of_digest: dict[str, str] = {}
    for image_id, part in zip(split["image_id"], split["part"]):  # in PARTS order: the first part wins
        part_of_id.setdefault(image_id, part)
        if known.get(image_id):
            part_of_digest.setdefault(known[image_id], part)
    counts = dict.fromkeys(PARTS, 0)
    for image_id, digest in zip(image_ids, digests):
        by_digest = part_of_digest.get(digest) if digest else None
        # An id names the run's image unless both files' digests are known and differ (another set's img001.png).
        by_id = None if digest and known.get(image_id) and known[image_id] != digest else part_of_id.get(image_id)
        found = [p for p in (by_digest, by_id) if p]
        if found:
            counts[min(found, key=order.__getitem__)] += 1
    by = "sha256 of the file and image id" if part_of_digest else "image id only (no image cache of the run's data)"
    return OwnImages(counts, len(image_ids), f"{by}, against {where}")


__all__ = ["OwnImages", "describe", "own_images", "prepared_digests", "split_rows"]
