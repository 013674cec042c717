"""The Keras ImageNet weights (no top) for our backbones: find, fetch, verify, cache, load.

The files, their digests and the input scaling they expect are the network entries' (:mod:`covid_cxr.networks`).
Where a file comes from, in order: the files the caller names (``weights_file``: a file, a
folder holding the official file names, or a list of files, each recognised by its layers);
the cache (``$COVID_CXR_CACHE``, else ``$XDG_CACHE_HOME/covid-cxr``, else ``~/.cache/covid-cxr``);
a download from the official URL. Downloaded and cached files are checked against the known
digest before use: Keras' own published MD5 for the official files (what ``keras.applications``
checks), or a SHA-256 where an entry states one. Files the caller names are trusted as chosen,
and checked by their layer names and shapes when loaded.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from covid_cxr.atomic import atomic_path
from covid_cxr.errors import CheckpointError
from covid_cxr.models.concat import CxrNet
from covid_cxr.models.keras_architecture import check_backbones
from covid_cxr.models.keras_import import backbones_in, load_keras_layers
from covid_cxr.models.keras_reader import NOT_KERAS, KerasWeights, read_keras_weights
from covid_cxr.networks import IMAGENET_FILES, WeightsFile

# A --weights-file that is one of our own model files: what training with it asks for, in a training command's words.
_NOT_IMAGENET = (
    "--weights-file takes the Keras ImageNet no-top files (e.g. "
    + ", ".join(entry.filename for entry in IMAGENET_FILES.values())
    + "); to go on training a run, use 'covid-cxr train --resume RUN'"
)
NOT_WEIGHTS: dict[str, str] = {
    **NOT_KERAS,
    "checkpoint": f"a covid-cxr checkpoint, not ImageNet weights: {_NOT_IMAGENET}",
    "onnx": f"an ONNX model, not ImageNet weights: {_NOT_IMAGENET}",
}


def default_cache_dir() -> Path:
    """``$COVID_CXR_CACHE``, else ``$XDG_CACHE_HOME/covid-cxr``, else ``~/.cache/covid-cxr``."""
    if os.environ.get("COVID_CXR_CACHE"):
        return Path(os.environ["COVID_CXR_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "covid-cxr"


def fetch_weights(entry: WeightsFile, *, allow_download: bool = True, cache_dir: Path | None = None) -> Path:
    """Return a verified local copy of ``entry``: from the cache, or downloaded into it."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / entry.filename
    if target.is_file():
        entry.check(target)
        return target
    if not allow_download:
        raise CheckpointError(_missing_message(entry, target, "downloads are off"))
    try:
        with atomic_path(target, suffix=".part") as tmp:
            with open(tmp, "wb") as out, urllib.request.urlopen(entry.url, timeout=60) as response:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
            entry.check(tmp)  # a wrong sha256 raises here: the partial file is removed, nothing is cached
    except (urllib.error.URLError, OSError) as exc:
        raise CheckpointError(_missing_message(entry, target, f"the download failed: {exc}")) from exc
    return target


def _missing_message(entry: WeightsFile, target: Path, why: str) -> str:
    return (
        f"ImageNet weights for {entry.backbone} are not available ({why}): download {entry.url} "
        f"and put it at {target} (or pass it with --weights-file PATH)"
    )


def _named_files(weights_file: Path | Sequence[Path], wanted: Sequence[str]) -> dict[str, KerasWeights]:
    """Map backbone -> weights for the files the caller gave (a file, a folder, or a list of files)."""
    items = [Path(weights_file)] if isinstance(weights_file, (str, Path)) else [Path(p) for p in weights_file]
    found: dict[str, KerasWeights] = {}
    for item in items:
        if item.is_dir():
            for backbone in wanted:
                candidate = item / IMAGENET_FILES[backbone].filename
                if candidate.is_file() and backbone not in found:
                    found[backbone] = read_keras_weights(candidate, not_keras=NOT_WEIGHTS)
            continue
        if not item.is_file():
            raise CheckpointError(f"{item}: no such weights file or folder")
        weights = read_keras_weights(item, not_keras=NOT_WEIGHTS)
        held = [b for b in backbones_in(weights) if b in wanted]
        if len(held) != 1:
            raise CheckpointError(
                f"{item}: not the no-top weights of one of {', '.join(wanted)}; expected e.g. "
                + " or ".join(IMAGENET_FILES[b].filename for b in wanted)
            )
        if held[0] in found:
            raise CheckpointError(f"{item}: a second weights file for {held[0]} (first: {found[held[0]].path})")
        found[held[0]] = weights
    missing = [b for b in wanted if b not in found]
    if missing:
        raise CheckpointError(
            "no weights file given for "
            + ", ".join(f"{b} (expected {IMAGENET_FILES[b].filename}, from {IMAGENET_FILES[b].url})" for b in missing)
        )
    return found


def load_imagenet_weights(
    model: CxrNet,
    *,
    weights_file: Path | Sequence[Path] | None = None,
    allow_download: bool = True,
    cache_dir: Path | None = None,
) -> None:
    """Load the Keras ImageNet no-top weights into every backbone of ``model``; the head stays as it is.

    ``weights_file`` (a file, a folder, or a list with one file per backbone; ``concat`` needs
    both) bypasses the cache and the download entirely.
    """
    wanted = list(model.backbones)
    if weights_file is not None:
        files = _named_files(weights_file, wanted)
    else:
        files = {
            b: read_keras_weights(fetch_weights(IMAGENET_FILES[b], allow_download=allow_download, cache_dir=cache_dir))
            for b in wanted
        }
    for backbone, weights in files.items():
        check_backbones(weights, [backbone])  # a file that records its model (a saved .keras backbone) must be Keras'
        load_keras_layers(model.backbones[backbone], weights.layers, source=str(weights.path))
