"""Decode every image once into one memory-mapped uint8 array.

A cache folder holds ``images.npy`` (N, S, S) uint8, opened with ``mmap_mode='r'`` so
training reads it without loading it), ``index.csv`` (row, image_id, sha256 of the file,
DICOM view) and ``meta.json`` (image size, resize method, the key of its inputs, images left
out and why). The key hashes the image size, the resize method, the decoder version and every
(image id, path, file size, mtime), so an unchanged dataset is never decoded twice.

A cache is built at one resize method (:data:`~covid_cxr.data.images.RESIZE_METHODS`): ``size300``
is the anti-aliased ``area`` one ``prepare`` writes; a model that resizes otherwise (the authors'
imported Keras models: ``bilinear``) gets its own ``size300-bilinear`` beside it
(:func:`ensure_cache`), never the other's images.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_cxr.atomic import read_json, write_json
from covid_cxr.cpus import usable_cpus
from covid_cxr.data.images import decode_radiograph, read_file, resize_gray
from covid_cxr.data.names import name_bytes, printable
from covid_cxr.errors import DataError, ImageDecodeError
from covid_cxr.progress import progress_bar

CACHE_VERSION = 2  # 2: palette-colour DICOMs through their LUT; multi-page, tiny and NaN images refused
IMAGES_FILE, INDEX_FILE, META_FILE = "images.npy", "index.csv", "meta.json"


def cache_dirname(image_size: int, resize: str = "area") -> str:
    return f"size{image_size}" if resize == "area" else f"size{image_size}-{resize}"


def cache_key(manifest: pd.DataFrame, image_size: int, resize: str = "area") -> str:
    """Hash of what the cache depends on: size, resize method, decoder version, each file's id, path, size, mtime."""
    method = "" if resize == "area" else f" resize={resize}"  # area caches keep the key they had before the field
    h = hashlib.sha256(f"covid-cxr-cache v{CACHE_VERSION} size={image_size}{method}\n".encode())
    for image_id, path in zip(manifest["image_id"], manifest["path"]):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(name_bytes(f"{image_id}\t{path}\t{stamp}\n"))  # any file name, UTF-8 or not
    return h.hexdigest()


@dataclass
class CacheBuild:
    """What a build produced: good rows, failures (image id, path, reason), digests and views."""

    folder: Path
    image_ids: list[str]
    failures: list[dict[str, str]] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)
    views: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False
    resize: str = "area"


Job = tuple[str, str, int, str]  # image_id, path, size, resize method
Result = tuple[str, np.ndarray | None, str, str, str]  # image_id, image or None, error, sha256, view


def _decode_one(job: Job) -> Result:
    """Worker: (image_id, path, size, resize) -> (image_id, image or None, error, sha256, view)."""
    image_id, path, size, resize = job
    try:
        data = read_file(Path(path), printable(path))
    except ImageDecodeError as exc:
        return image_id, None, exc.reason + _name_bytes_note(path), "", ""
    digest = hashlib.sha256(data).hexdigest()
    try:
        img, info = decode_radiograph(data, name=printable(path))
    except ImageDecodeError as exc:
        return image_id, None, exc.reason, digest, ""
    except Exception as exc:  # an unforeseen failure of one file is that file's failure, not the end of prepare
        return image_id, None, f"unexpected error while decoding ({type(exc).__name__}: {exc})", digest, ""
    return image_id, resize_gray(img, size, resize), "", digest, info.get("view", "")


def _name_bytes_note(path: str) -> str:
    """For a file not found whose name holds letters beyond ASCII: the name's bytes, so that it is told apart from
    a name that prints alike (``é`` in cp1252 or UTF-8, composed or not)."""
    name = os.path.basename(path)
    if name.isascii() or os.path.lexists(path):
        return ""
    return f" (the name looked for is the bytes {name_bytes(name)!r})"


def _ignore_ctrl_c() -> None:
    """Decoding workers leave Ctrl-C to the main process, which stops them: no worker prints a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _results(jobs: list[Job], workers: int) -> Iterator[Result]:
    if workers <= 1 or len(jobs) < 32:
        yield from map(_decode_one, jobs)
        return
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_ctrl_c)
    try:
        yield from pool.map(_decode_one, jobs, chunksize=16)
    finally:  # on Ctrl-C (or any error) the images not yet begun are dropped, not decoded first
        pool.shutdown(wait=True, cancel_futures=True)


def build_cache(
    manifest: pd.DataFrame, image_size: int, folder: Path, *, workers: int = 0, progress: bool = True,
    resize: str = "area",
) -> CacheBuild:
    """Decode and resize (by ``resize``) every manifest image in parallel into ``folder``; failures are collected.

    Only decodable images get rows, in manifest order. The caller decides whether failures are fatal;
    each is named (printable, whatever bytes its file name holds) with its reason.
    """
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    workers = workers or min(8, usable_cpus())
    jobs = [(i, p, image_size, resize) for i, p in zip(manifest["image_id"], manifest["path"])]
    n = len(jobs)
    scratch = np.lib.format.open_memmap(folder / "decode.tmp.npy", mode="w+", dtype=np.uint8,
                                        shape=(max(n, 1), image_size, image_size))
    ok = np.zeros(n, dtype=bool)
    build = CacheBuild(folder=folder, image_ids=[], resize=resize)
    with progress_bar("decoding", n, enabled=progress, transient=True) as advance:
        for row, (image_id, img, error, digest, view) in enumerate(_results(jobs, workers)):
            if img is None:
                build.failures.append({"image_id": image_id, "path": printable(jobs[row][1]), "reason": error})
            else:
                scratch[row] = img
                ok[row] = True
                build.views[image_id] = view
            if digest:
                build.sha256[image_id] = digest
            advance(1)
    good = np.flatnonzero(ok)
    scratch.flush()
    if len(good) == n and n > 0:  # the usual case: every image decoded, the scratch array is the cache
        del scratch
        (folder / "decode.tmp.npy").rename(folder / IMAGES_FILE)
    else:  # leave the failed rows out
        final = np.lib.format.open_memmap(folder / IMAGES_FILE, mode="w+", dtype=np.uint8,
                                          shape=(len(good), image_size, image_size))
        for first in range(0, len(good), 1024):
            final[first : first + 1024] = scratch[good[first : first + 1024]]
        final.flush()
        del final, scratch
        (folder / "decode.tmp.npy").unlink()
    build.image_ids = [jobs[i][0] for i in good]
    build.seconds = time.perf_counter() - start
    return build


def write_cache_index(build: CacheBuild, image_size: int, key: str) -> None:
    """Write ``index.csv`` and ``meta.json`` beside the images: the cache is complete after this."""
    pd.DataFrame({
        "row": np.arange(len(build.image_ids)),
        "image_id": build.image_ids,
        "sha256": [build.sha256.get(i, "") for i in build.image_ids],
        "view": [build.views.get(i, "") for i in build.image_ids],
    }).to_csv(build.folder / INDEX_FILE, index=False)
    meta: dict[str, Any] = {"version": CACHE_VERSION, "image_size": image_size, "resize": build.resize,
                            "count": len(build.image_ids),
                            "key": key, "failures": build.failures,
                            "failure_sha256": {f["image_id"]: build.sha256.get(f["image_id"], "") for f in build.failures}}
    write_json(build.folder / META_FILE, meta, indent=1)


def read_cache_build(folder: Path) -> CacheBuild:
    """Read a complete cache folder back as a :class:`CacheBuild` (for reuse)."""
    meta = read_json(folder / META_FILE, fix="delete that cache folder and run 'covid-cxr prepare' again")
    index = pd.read_csv(folder / INDEX_FILE, dtype=str, keep_default_na=False)
    sha = dict(zip(index["image_id"], index["sha256"]))
    sha.update({k: v for k, v in meta.get("failure_sha256", {}).items() if v})
    return CacheBuild(folder=folder, image_ids=index["image_id"].tolist(), failures=meta.get("failures", []),
                      sha256=sha, views=dict(zip(index["image_id"], index["view"])), reused=True,
                      resize=meta.get("resize", "area"))


def cache_matches(folder: Path, key: str) -> bool:
    """True when ``folder`` is a complete cache built from exactly these inputs."""
    try:
        meta = read_json(folder / META_FILE)
    except DataError:
        return False
    return meta.get("key") == key and (folder / IMAGES_FILE).is_file() and (folder / INDEX_FILE).is_file()


def ensure_cache(
    root: Path, manifest: pd.DataFrame, image_size: int, resize: str, *, workers: int = 0, progress: bool = True
) -> CacheBuild:
    """The cache of ``manifest`` at ``image_size`` and ``resize`` under ``root`` (``DATA/cache``), decoded if absent.

    Built in a temporary folder and renamed into place, so an interrupted build leaves no half cache.
    """
    folder = root / cache_dirname(image_size, resize)
    key = cache_key(manifest, image_size, resize)
    if cache_matches(folder, key):
        return read_cache_build(folder)
    tmp = root / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build = build_cache(manifest, image_size, tmp, workers=workers, progress=progress, resize=resize)
        write_cache_index(build, image_size, key)
        shutil.rmtree(folder, ignore_errors=True)  # a stale cache of the same name (its inputs changed)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    build.folder = folder
    return build
