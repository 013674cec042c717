"""What a run folder or checkpoint resolves to: its checkpoint, prepared data, fold, split and image cache.

Evaluation, the audits and int8 calibration all read a model's images through here, so none of
them can disagree about which images a model is tested on, and each check is made once: the
fold's range by :meth:`PreparedData.fold`, the split hash against the run's, the cache's size
and resize method against the checkpoint's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from covid_cxr.config import SPLITS
from covid_cxr.data.cache import cache_dirname, cache_key, cache_matches, ensure_cache
from covid_cxr.data.prepared import FoldSplits, ImageCache, PreparedData
from covid_cxr.errors import CheckpointError, DataError
from covid_cxr.runs.checkpoint import Checkpoint, checkpoint_meta
from covid_cxr.runs.folder import BEST, LAST, RunFolder, RunInfo
from covid_cxr.runs.lock import note_if_training


@dataclass(frozen=True)
class Target:
    """A model to evaluate or audit, with the data and fold it was trained on and where its results go."""

    checkpoint: Path
    data: Path
    fold: int
    out_dir: Path
    run: RunInfo


def resolve_target(target: Path, data: Path | None, fold: int | None, split: str, out_dir: Path | None, *,
                   note: bool = True) -> Target:
    """Turn a run folder or checkpoint path plus overrides into concrete paths and a fold.

    A run folder means its best.pt; a checkpoint inside a run folder (e.g. RUN/last.pt) takes its
    data and fold from the run; a loose checkpoint takes them from what it recorded (its ``meta``),
    else needs ``data`` and ``fold``. A ``fold`` other than the one the model was trained on is
    refused: that fold's test set holds its training images.
    """
    target = Path(target)
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if target.is_dir():
        folder = RunFolder(target)
        if not folder.exists():
            raise DataError(f"{target}: not a run folder (no run.json); give a run folder or a .pt checkpoint")
        run = folder.info()
        checkpoint = folder.best_or_hint()
        default_out = folder.eval_dir(split)
    elif target.is_file():
        home = RunFolder.containing(target)
        run = home.info() if home is not None else RunInfo()
        checkpoint = target
        default_out = target.parent / f"{target.stem}-eval-{split}"
    else:
        raise DataError(f"{target}: no such run folder or checkpoint file")
    if note and checkpoint.name in (BEST, LAST):  # note=False: a caller that resolves the target again says it then
        note_if_training(checkpoint.parent, "this result")
    run = training_record(checkpoint, run)
    data = data if data is not None else (Path(run.data) if run.data else None)
    if fold is not None and run.fold is not None and int(fold) != int(run.fold):
        raise DataError(f"{target}: trained on fold {run.fold}, so fold {fold}'s test and validation sets hold its "
                        f"training images; evaluate it with --fold {run.fold} (or leave --fold out)")
    fold = fold if fold is not None else run.fold
    if data is None:
        raise DataError(f"{target}: which prepared data? pass --data DATA (the folder 'covid-cxr prepare' wrote)")
    if fold is None:
        raise DataError(f"{target}: which fold was this checkpoint trained on? pass --fold K")
    out = Path(out_dir) if out_dir is not None else default_out
    if out.exists() and not out.is_dir():  # found now, not after the whole evaluation
        raise DataError(f"--out {out} is a file; give a folder for the evaluation's files")
    return Target(checkpoint=checkpoint, data=Path(data), fold=int(fold), out_dir=out, run=run)


def training_record(checkpoint: Path, run: RunInfo) -> RunInfo:
    """``run`` (its run.json; empty for a loose checkpoint) completed by what ``checkpoint`` recorded: fold,
    data and split hash. A checkpoint whose split hash is not its run's is refused: it trained on other splits."""
    meta = checkpoint_meta(checkpoint)
    recorded = meta.get("split_hash")
    if run.split_hash and recorded and recorded != run.split_hash:
        raise DataError(
            f"{checkpoint} was trained on splits {recorded[:12]} but its run.json says {run.split_hash[:12]} (the run "
            "was resumed on data prepared again); its test and validation sets may hold training images: train a new "
            "run on the prepared data"
        )
    fold = meta.get("fold")
    return run.replace(
        fold=run.fold if run.fold is not None else (int(fold) if fold is not None else None),
        data=run.data or meta.get("data"), split_hash=run.split_hash or recorded,
    )


def trained_splits(prepared: PreparedData, fold: int, run: RunInfo | None, where: Path) -> FoldSplits:
    """The fold's splits (its range checked by :meth:`PreparedData.fold`), after checking the run trained on them."""
    splits = prepared.fold(fold)
    trained_on = run.split_hash if run is not None else None
    if trained_on and trained_on != splits.split_hash:
        trained_fold = run.fold if run is not None and run.fold is not None else fold
        raise DataError(
            f"{where}: the run was trained on fold {trained_fold} splits {trained_on[:12]} but {prepared.root} has "
            f"splits {splits.split_hash[:12]} for fold {fold}; its test and validation sets may hold training images. "
            "Evaluate with the prepared data the run used ('data' in run.json or the checkpoint), or re-train on "
            "this data"
        )
    return splits


def load_split(prepared: PreparedData, fold: int, split: str, run: RunInfo | None, where: Path
               ) -> tuple[pd.DataFrame, str]:  # fmt: skip
    """The fold's split table and split hash, after checking they are the splits the model was trained on."""
    splits = trained_splits(prepared, fold, run, where)
    frame = splits.test if split == "test" else splits.val
    if frame is None or len(frame) == 0:
        raise DataError(f"{where}: fold {fold} of {prepared.root} has no {split} images")
    return frame.reset_index(drop=True), splits.split_hash


@dataclass(frozen=True)
class Split:
    """One split of a fold, checked for a checkpoint, and the image cache its images are read from."""

    frame: pd.DataFrame
    split_hash: str
    cache: ImageCache


def open_split(prepared: PreparedData, fold: int, split: str, run: RunInfo | None, ckpt: Checkpoint, where: Path, *,
               progress: bool = True) -> Split:  # fmt: skip
    """The fold's ``split`` for ``ckpt``: the run's own splits, classes it predicts, a cache at its input size.

    The cache is resized by the checkpoint's own method, as ``predict`` resizes what it is given.
    """
    frame, split_hash = load_split(prepared, fold, split, run, where)
    uncovered = set(frame["label"]) - set(ckpt.classes)
    if uncovered:
        raise CheckpointError(
            f"{where}: predicts {', '.join(ckpt.classes)} but the {split} set holds {', '.join(sorted(uncovered))}; "
            "evaluate or audit it with data of the classes it was trained on"
        )
    pre = ckpt.preprocessing
    cache = cache_for(prepared, pre.image_size, where, pre.resize, progress=progress)
    return Split(frame, split_hash, cache)


def training_pool(prepared: PreparedData, fold: int) -> pd.DataFrame:
    """Every image a model of ``fold`` may have learned from: all phases and the validation set."""
    splits = prepared.fold(fold)
    frames = [*splits.phases, splits.val]
    pool = pd.concat([f for f in frames if f is not None and len(f)], ignore_index=True)
    return pool.drop_duplicates("image_id").reset_index(drop=True)


def cache_for(prepared: PreparedData, image_size: int, where: Path | str, resize: str, *,
              progress: bool = True) -> ImageCache:
    """The image cache at the checkpoint's input size and resize method (the data area's error names the command).

    ``prepare`` builds the anti-aliased (``area``) cache. A checkpoint that resizes otherwise (an
    imported authors' model: ``bilinear``) is never fed those images: they are decoded again from
    their files by its method into a cache of their own beside it (once; later runs reuse it).
    ``resize`` has no default: every caller says whose method it is (the checkpoint's, the ONNX
    model's metadata), so no model is fed images resized another way by omission.
    """
    try:
        cache = prepared.cache(image_size=image_size)
    except DataError as exc:
        raise DataError(f"{where}: the checkpoint takes {image_size}x{image_size} images, but {exc}") from exc
    if cache.image_size != image_size:
        raise DataError(
            f"{where}: the checkpoint takes {image_size}x{image_size} images but the cache of {prepared.root} is "
            f"{cache.image_size}x{cache.image_size}; run 'covid-cxr prepare ... --out {prepared.root} "
            f"--image-size {image_size}'"
        )
    if cache.resize != resize:
        cache = _cache_resized(prepared, image_size, resize, where, cache.resize, progress)
    if cache.resize != resize:
        raise DataError(f"{cache.folder}: built by '{cache.resize}' resizing, not '{resize}' as {where} needs; "
                        "delete that folder and run again")
    return cache


def _cache_resized(prepared: PreparedData, image_size: int, resize: str, where: Path | str, have: str,
                   progress: bool) -> ImageCache:
    """Decode the prepared images again by ``resize`` (the prepared cache was built by ``have``)."""
    key = cache_key(prepared.manifest, image_size, resize)
    if not cache_matches(prepared.root / "cache" / cache_dirname(image_size, resize), key):
        print(f"note: {where} resizes images by '{resize}' but the cache of {prepared.root} was built by '{have}': "
              f"decoding them again by '{resize}' from their files (once; later runs reuse it)", file=sys.stderr)
    build = ensure_cache(prepared.root / "cache", prepared.manifest, image_size, resize, progress=progress)
    if build.failures:
        listed = "; ".join(f"{f['path']}: {f['reason']}" for f in build.failures[:5])
        raise DataError(
            f"{where} resizes images by '{resize}', the cache of {prepared.root} was built by '{have}', and "
            f"{len(build.failures)} of the prepared images cannot be decoded again ({listed}); restore those files "
            f"(or prepare the data again), or import the model with --resize {have} to evaluate it on '{have}' images"
        )
    return prepared.cache(image_size, resize)
