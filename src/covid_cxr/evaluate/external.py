"""External validation: any checkpoint or exported model on any labelled set, in one command.

The internal test set comes from the same collections as the training images; a model that
learned a collection's look scores well there and falls on another hospital's images. This
module evaluates a model (run folder, ``.pt`` checkpoint or exported ``.onnx``) on:

- a prepared data folder's whole manifest (its image cache when it was prepared at the model's size),
- a labelled folder (one sub-folder per class) or a CSV of images (``path,label[,patient_id,source,...]``,
  paths relative to the CSV), as the ``folder`` source reads them,

with the model's own operating point, and writes the same artefacts as ``evaluate`` into
``RUN/external-NAME/`` (``metrics.json`` says ``kind: external``), which ``report`` and the model card put
beside the internal test figures of the same model file at the same rule. A model file of a run other than
its best.pt writes ``RUN/external-NAME-FILE/`` (``external-hospital-b-best.int8.onnx``); a loose model file
``STEM-external-NAME/`` beside it. NAME defaults to the set's folder name, or a CSV's stem where it says
more than ``labels``; an earlier evaluation of another set under that name is replaced only when asked by
name. Classes the model knows but the set lacks are listed as absent.

Each image is compared with the run's own split (by the sha256 of its file and by image id,
:mod:`covid_cxr.runs.own_images`): a set holding the model's training, validation or test images is
evaluated, but every output says how many of them it holds and that the figures are not external.
A file that does not decode, for whatever reason, is skipped and named; the others are evaluated.

Every image is resized by the model's own method (the checkpoint's ``Preprocessing.resize``, or
the ONNX model's metadata), as ``predict`` resizes, and ``metrics.json`` records it: a prepared
cache built by another method is decoded again by the model's, once
(:func:`~covid_cxr.runs.resolve.cache_for`).
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from covid_cxr.atomic import file_sha256, read_json_object
from covid_cxr.data.images import load_image
from covid_cxr.data.manifest import safe_name
from covid_cxr.data.names import display_path
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.sources.folder import read_folder
from covid_cxr.errors import DataError, ImageDecodeError
from covid_cxr.evaluate.predictions import validate_predictions
from covid_cxr.evaluate.run import (
    EvaluationResult,
    decided_table,
    predict_rows,
    write_evaluation,
)
from covid_cxr.inference.backends import load_model, precision_of
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.labels import CLASSES
from covid_cxr.operating_point import of_predictor
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.evaluations import internal_for, no_internal_text
from covid_cxr.runs.folder import RunFolder, RunInfo
from covid_cxr.runs.own_images import OwnImages, own_images, prepared_digests
from covid_cxr.runs.resolve import cache_for, training_record
from covid_cxr.stats import DEFAULT_PREVALENCES

GENERIC_STEMS = frozenset({"labels", "label", "manifest", "metadata", "data", "dataset", "images", "index", "list",
                           "files", "all"})  # a CSV named so says nothing of the set: its folder names it


def model_path(target: Path) -> tuple[Path, Path | None]:
    """The model file to load and the run folder it belongs to (None for a loose file)."""
    target = Path(target)
    if target.is_dir():
        if not (target / "run.json").is_file():
            raise DataError(f"{target}: not a run folder (no run.json); give a run folder, a .pt or an .onnx model")
        path = RunFolder(target).best
        if not path.is_file():
            raise DataError(f"{path}: no such file; the run has not saved a best checkpoint yet")
        return path, target
    if target.is_file():
        return target, target.parent if (target.parent / "run.json").is_file() else None
    raise DataError(f"{target}: no such run folder, checkpoint or ONNX model")


def read_external(source: Path) -> tuple[pd.DataFrame, PreparedData | None]:
    """Manifest rows of a labelled set and, for a prepared folder, its :class:`PreparedData` (else None)."""
    source = Path(source)
    if source.is_dir() and (source / "prepare.json").is_file():
        prepared = PreparedData(source)
        return prepared.manifest.reset_index(drop=True), prepared
    if not source.exists():
        raise DataError(f"{source}: no such folder or CSV; give a prepared data folder, a folder with one "
                        "sub-folder per class, or a CSV with path,label columns")
    frame, _ = read_folder(source)  # a CSV's own source column (several hospitals in one file) names each row
    return frame, None


def default_name(external: Path) -> str:
    """The set's name when none is given: a folder's name; a CSV's stem, or its folder's where the stem says
    nothing (``hospital-b/labels.csv`` is ``hospital-b``, so two hospitals' label files do not share one name)."""
    path = Path(external).absolute()
    if path.is_dir() or path.stem.lower() not in GENERIC_STEMS:
        return path.name if path.is_dir() else path.stem
    return path.parent.name or path.stem


def output_dir(path: Path, run_dir: Path | None, name: str) -> Path:
    """``RUN/external-NAME`` for a run's best.pt, ``RUN/external-NAME-FILE`` for its other model files, and
    ``STEM-external-NAME`` beside a model file outside any run folder."""
    if run_dir is None:
        return path.parent / f"{path.stem}-external-{name}"
    folder = RunFolder(run_dir)
    return folder.external_dir(name if path.resolve() == folder.best.resolve() else f"{name}-{safe_name(path.name)}")


def replaced_set(out: Path, data: Path, name: str, explicit: bool) -> str | None:
    """The other set whose evaluation ``out`` holds (None: empty, or the same set); refused unless ``explicit``."""
    saved = out / "metrics.json"
    if not saved.is_file():
        return None
    try:
        before = read_json_object(saved).get("evaluation", {}).get("data")
    except (DataError, AttributeError):
        return None  # a damaged evaluation: nothing worth keeping to protect
    if not before or str(before) == str(data.resolve()):
        return None
    if not explicit:
        raise DataError(f"{out} holds the evaluation on {before}, another set than {data}: give --name NAME to keep "
                        f"both, or --name {name} to replace it")
    return str(before)


def _decode_one(path: str, pre: Preprocessing) -> tuple[np.ndarray, str] | str:
    """(the image, its file's sha256), or why the file is refused: any failure of one file is that file's."""
    try:
        return load_image(path, pre.image_size, resize=pre.resize), file_sha256(path)
    except ImageDecodeError as exc:
        return exc.reason
    except Exception as exc:  # an unforeseen failure of one file is that file's error, not the end of the evaluation
        return f"unexpected error while decoding ({type(exc).__name__}: {exc})"


def _decode_all(frame: pd.DataFrame, pre: Preprocessing, workers: int
                ) -> tuple[np.ndarray, list[int], list[tuple[str, str]], list[str]]:  # fmt: skip
    """Decode and resize (by the model's method) every image, in threads: the images, which rows they are,
    the unreadable ones as (path, reason), and the sha256 of each readable file."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda p: _decode_one(p, pre), frame["path"].tolist()))
    good = [i for i, r in enumerate(results) if not isinstance(r, str)]
    failed = [(frame["path"].iloc[i], str(r)) for i, r in enumerate(results) if isinstance(r, str)]
    size = pre.image_size
    images = np.stack([results[i][0] for i in good]) if good else np.empty((0, size, size), np.uint8)
    return images, good, failed, [results[i][1] for i in good]


def external_images(frame: pd.DataFrame, prepared: PreparedData | None, pre: Preprocessing, workers: int,
                    where: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, list[tuple[str, str]]]:  # fmt: skip
    """(images, rows into them, the frame of readable images, failures), at the model's size and resize method.

    A prepared folder prepared at the model's size gives its cache (decoded again by the model's
    method when built by another, once); anything else is decoded from its files. The frame's
    ``sha256`` column holds each file's digest (from the prepared cache's record, or hashed as read;
    "" where unknown), to tell the model's own images (:mod:`covid_cxr.runs.own_images`).
    """
    if prepared is not None and prepared.image_size == pre.image_size:
        cache = cache_for(prepared, pre.image_size, where, pre.resize)
        digests = prepared_digests(prepared.root)
        frame = frame.assign(sha256=[digests.get(i, "") for i in frame["image_id"]])
        return cache.images, np.asarray(cache.rows(frame["image_id"].to_numpy()), dtype=np.int64), frame, []
    images, good, failed, digests = _decode_all(frame, pre, workers)
    kept = frame.iloc[good].reset_index(drop=True).assign(sha256=digests)
    return images, np.arange(len(good), dtype=np.int64), kept, failed


def model_images(path: Path, run_dir: Path | None, frame: pd.DataFrame) -> OwnImages | None:
    """How many of the set's images (``frame``, with its ``sha256`` column) the model was trained, validated or
    tested on (None: nothing records its training images)."""
    run = RunFolder(run_dir).info() if run_dir is not None else RunInfo()
    if run_dir is None and path.suffix == ".pt":
        run = training_record(path, run)  # a loose checkpoint may record its data and fold
    return own_images(run_dir, run, frame["image_id"].astype(str).tolist(), frame["sha256"].tolist())


def _own_warnings(own: OwnImages | None, path: Path) -> list[str]:
    """The warning every output carries when the set holds the model's own images; a note when none could check."""
    if own is None:
        print(f"note: nothing records which images {path} was trained on (no run folder or training record), so "
              "the set was not checked for them", file=sys.stderr)
        return []
    if not own.total:
        return []
    return [(f"{own.heading()} (compared by {own.compared_by}): these figures are not external validation; "
             "leave those images out of the set")]


def evaluate_external(
    target: Path,
    external: Path,
    settings: InferenceSettings = InferenceSettings(),
    *,
    name: str | None = None,
    out_dir: Path | None = None,
    prevalence: float | None = None,
    prevalence_class: str = "covid",
    prevalences: tuple[float, ...] = DEFAULT_PREVALENCES,
    n_boot: int = 1000,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate a model on an external labelled set; see the module doc for what it reads and writes."""
    path, run_dir = model_path(target)
    external = Path(external)
    explicit = name is not None or out_dir is not None  # asked for by name: may replace another set's evaluation
    name = safe_name(name or default_name(external))
    out = Path(out_dir) if out_dir is not None else output_dir(path, run_dir, name)
    replaced = replaced_set(out, external, name, explicit)
    loaded = load_model(path, settings, follow_rule=True)  # a threshold rule decides on fp32, as it was chosen
    predictor = loaded.predictor
    op = of_predictor(predictor)
    frame, prepared = read_external(external)
    unknown = sorted(set(frame["label"]) - set(predictor.classes))
    if unknown:
        raise DataError(f"{external}: holds {', '.join(unknown)}, which {path} does not predict "
                        f"({', '.join(predictor.classes)}); leave those images out of the set")
    images, rows, frame, failed = external_images(frame, prepared, predictor.preprocessing, workers, path)
    for p, reason in failed:
        print(f"external: skipped {display_path(p)}: {reason}", file=sys.stderr)  # a name not UTF-8 as \xNN
    if not len(frame):
        raise DataError(f"{external}: none of its {len(failed)} images could be read; see the reasons above")
    own = model_images(path, run_dir, frame)
    probs, seconds = predict_rows(predictor, images, rows, batch_size=settings.batch_size, progress=progress,
                                  description=f"{loaded.network} on {name}")
    table = decided_table(frame, probs, predictor.classes, op)
    preds = validate_predictions(table, str(out / "predictions.csv"))
    run = RunFolder(run_dir).info() if run_dir is not None else None
    info = {
        "kind": "external",
        "name": name,
        "network": loaded.network,
        **({"fold": run.fold} if run is not None and run.fold is not None else {}),
        "split": f"external:{name}",
        "model": str(path.resolve()),
        "model_sha256": loaded.sha256,
        "backend": predictor.backend,
        "data": str(external.resolve()),
        "image_size": predictor.preprocessing.image_size,
        "resize": predictor.preprocessing.resize,
        "classes_checkpoint": list(predictor.classes),
        "classes_present": [c for c in CLASSES if (frame["label"] == c).any()],
        "classes_absent": [c for c in predictor.classes if not (frame["label"] == c).any()],
        "sources": {str(k): int(v) for k, v in frame["source"].value_counts().items()} if "source" in frame else {},
        "operating_point": op.to_dict(),
        "own_images": own.to_dict() if own is not None else None,
        "runtime": loaded.describe(),
        "precision": precision_of(predictor)[0],  # with "backend" above: what the card's rows name
        "images": len(frame),
        "failed": [{"path": p, "reason": r} for p, r in failed],
        "seconds": seconds,
        "images_per_second": len(frame) / seconds if seconds > 0 else math.nan,
        "warnings": _own_warnings(own, path),
        **({"replaced": replaced} if replaced else {}),
    }
    internal = internal_for(run_dir if run_dir is not None else path.parent, info)
    info["internal"] = str(internal.resolve()) if internal is not None else None
    if internal is None:
        info["internal_missing"] = no_internal_text(info)
    metrics = write_evaluation(preds, out, info, table=table, prevalence=prevalence, prevalence_class=prevalence_class,
                               n_boot=n_boot, seed=seed, prevalences=prevalences)
    if replaced:
        print(f"external: replaced the evaluation on {replaced} in {out}", file=sys.stderr)
    return EvaluationResult(out_dir=out, metrics=metrics, predictions=table, info=info)


__all__ = ["default_name", "evaluate_external", "external_images", "model_path", "output_dir", "read_external"]
