"""A prepared dataset folder, as training, evaluation and audits open it.

``DATA/`` holds ``prepare.json`` (the settings used), ``manifest.csv``,
``splits/fold{K}/phase{P}.csv``, ``val.csv``, ``test.csv``, ``splits/summary.json`` and
``cache/size{S}/`` (see :mod:`covid_cxr.data.cache`). Everything here only reads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_cxr.atomic import read_json
from covid_cxr.data.cache import IMAGES_FILE, INDEX_FILE, META_FILE, cache_dirname
from covid_cxr.data.manifest import read_manifest
from covid_cxr.errors import DataError

FORMAT = "covid-cxr-prepared"
SPLIT_COLUMNS = ("image_id", "label", "patient_id", "source")


def split_files(fold_dir: Path, num_phases: int) -> list[Path]:
    """The files of one fold in hashing order: phases, then val, then test."""
    return [fold_dir / f"phase{p}.csv" for p in range(1, num_phases + 1)] + [fold_dir / "val.csv", fold_dir / "test.csv"]


def hash_files(paths: list[Path]) -> str:
    """sha256 over the names and bytes of ``paths``: one fingerprint of a fold's splits."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class FoldSplits:
    """One fold: its phases in order, validation and test tables, and the hash of its files."""

    fold: int
    phases: list[pd.DataFrame]
    val: pd.DataFrame
    test: pd.DataFrame
    split_hash: str
    paths: dict[str, Path]


class ImageCache:
    """The decoded images of one size: a read-only memory map and its index."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        meta = read_json(self.folder / META_FILE, fix="delete that cache folder and run 'covid-cxr prepare' again")
        self.image_size: int = int(meta["image_size"])
        self.resize: str = str(meta.get("resize", "area"))  # caches from before the field were all area
        self.images: np.memmap = np.load(self.folder / IMAGES_FILE, mmap_mode="r")
        index = pd.read_csv(self.folder / INDEX_FILE, dtype={"image_id": str}, keep_default_na=False)
        self.image_ids: list[str] = index["image_id"].tolist()
        self._row = {image_id: i for i, image_id in enumerate(self.image_ids)}
        if self.images.shape != (len(self.image_ids), self.image_size, self.image_size):
            raise DataError(f"{self.folder}: images.npy has shape {self.images.shape} but the index lists "
                            f"{len(self.image_ids)} images of {self.image_size} px; run 'covid-cxr prepare' again")

    def __len__(self) -> int:
        return len(self.image_ids)

    def rows(self, image_ids: Any) -> np.ndarray:
        """Row numbers of ``image_ids`` in :attr:`images` (int64); unknown ids raise :class:`DataError`."""
        ids = list(image_ids)
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise DataError(f"{len(missing)} images are not in the cache {self.folder}: {', '.join(missing[:10])}"
                            f"{' ...' if len(missing) > 10 else ''}; run 'covid-cxr prepare' again")
        return np.fromiter((self._row[i] for i in ids), dtype=np.int64, count=len(ids))


class PreparedData:
    """A folder written by ``covid-cxr prepare``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        info = self.root / "prepare.json"
        try:
            self.info: dict[str, Any] = read_json(info)
        except DataError:
            self.info = {}
        if self.info.get("format") != FORMAT or not (self.root / "manifest.csv").is_file():
            raise DataError(f"{self.root} is not a prepared dataset: run 'covid-cxr prepare --covid-chestxray DIR "
                            f"--rsna DIR --out {self.root}' first")

    @cached_property
    def manifest(self) -> pd.DataFrame:
        return read_manifest(self.root / "manifest.csv")

    @property
    def num_folds(self) -> int:
        return int(self.info["num_folds"])

    @property
    def num_phases(self) -> int:
        return int(self.info["num_phases"])

    @property
    def protocol(self) -> str:
        return str(self.info["protocol"])

    @property
    def image_size(self) -> int | None:
        """The size the cache was prepared at; None after ``--labels-only``."""
        size = self.info.get("image_size")
        return int(size) if size else None

    @property
    def summary(self) -> dict[str, Any]:
        return read_json(self.root / "splits" / "summary.json", fix="run 'covid-cxr prepare' again")

    def fold(self, k: int) -> FoldSplits:
        """Fold ``k`` (1-based) read from its split files."""
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_folds:
            raise DataError(f"fold {k!r} is out of range: {self.root} was prepared with folds 1-{self.num_folds}; "
                            f"give a fold between 1 and {self.num_folds}")
        fold_dir = self.root / "splits" / f"fold{k}"
        files = split_files(fold_dir, self.num_phases)
        tables = []
        for path in files:
            try:
                tables.append(pd.read_csv(path, dtype=str, keep_default_na=False))
            except FileNotFoundError:
                raise DataError(f"{path} is missing: run 'covid-cxr prepare' again for {self.root}") from None
        paths = {f"phase{p}": files[p - 1] for p in range(1, self.num_phases + 1)}
        paths.update(val=files[-2], test=files[-1])
        return FoldSplits(fold=int(k), phases=tables[:-2], val=tables[-2], test=tables[-1],
                          split_hash=hash_files(files), paths=paths)

    def cache(self, image_size: int | None = None, resize: str = "area") -> ImageCache:
        """The image cache of ``image_size`` (default: the prepared size) resized by ``resize``."""
        size = image_size or self.image_size
        if size is None:
            raise DataError(f"{self.root} was prepared with --labels-only and holds no images: run 'covid-cxr prepare' "
                            "without --labels-only to build the image cache")
        folder = self.root / "cache" / cache_dirname(int(size), resize)
        if not (folder / META_FILE).is_file():
            have = sorted(p.name for p in (self.root / "cache").glob("size*")) if (self.root / "cache").is_dir() else []
            raise DataError(f"{self.root} has no image cache of {size} px (has: {', '.join(have) or 'none'}); run "
                            f"'covid-cxr prepare ... --out {self.root} --image-size {size}' to build it")
        return ImageCache(folder)
