"""External validation: any checkpoint or exported model on any labelled set, in one command.

The internal test set comes from the same collections as the training images; a model that
learned a collection's look scores well there and falls on another hospital's images. This
module evaluates a model (run folder, ``.pt`` checkpoint or exported ``.onnx``) on:

- a prepared data folder's whole manifest (its image cache when it was prepared at the model's size),
- a labelled folder (one sub-folder per class) or a CSV of images (``path,label[,patient_id,source,...]``,
  paths relative to the CSV), as the ``folder`` source reads them,

with the model's own operating point, and writes the same artefacts as ``evaluate`` into
``RUN/external-NAME/`` (``metrics.json`` says ``kind: external``), which ``report`` puts beside
the internal test figures. Classes the model knows but the set lacks are listed as absent.

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

from covid_cxr.data.images import load_image
from covid_cxr.data.manifest import safe_name
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.sources.folder import read_folder
from covid_cxr.errors import DataError, ImageDecodeError
from covid_cxr.evaluate.predictions import validate_predictions, write_predictions
from covid_cxr.evaluate.run import (
    EvaluationResult,
    decided_table,
    predict_rows,
    write_evaluation,
)
from covid_cxr.inference.backends import load_model
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.labels import CLASSES
from covid_cxr.operating_point import of_predictor
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.folder import RunFolder
from covid_cxr.runs.resolve import cache_for
from covid_cxr.stats import DEFAULT_PREVALENCES


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


def _decode_all(frame: pd.DataFrame, pre: Preprocessing, workers: int
                ) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:  # fmt: skip
    """Decode and resize (by the model's method) every image, in threads; unreadable ones come back as (path, reason)."""
    def one(path: str) -> np.ndarray | str:
        try:
            return load_image(path, pre.image_size, resize=pre.resize)
        except ImageDecodeError as exc:
            return exc.reason

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(one, frame["path"].tolist()))
    good = [i for i, r in enumerate(results) if not isinstance(r, str)]
    failed = [(frame["path"].iloc[i], str(r)) for i, r in enumerate(results) if isinstance(r, str)]
    size = pre.image_size
    images = np.stack([results[i] for i in good]) if good else np.empty((0, size, size), np.uint8)
    return images, good, failed


def external_images(frame: pd.DataFrame, prepared: PreparedData | None, pre: Preprocessing, workers: int,
                    where: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, list[tuple[str, str]]]:  # fmt: skip
    """(images, rows into them, the frame of readable images, failures), at the model's size and resize method.

    A prepared folder prepared at the model's size gives its cache (decoded again by the model's
    method when built by another, once); anything else is decoded from its files.
    """
    if prepared is not None and prepared.image_size == pre.image_size:
        cache = cache_for(prepared, pre.image_size, where, pre.resize)
        return cache.images, np.asarray(cache.rows(frame["image_id"].to_numpy()), dtype=np.int64), frame, []
    images, good, failed = _decode_all(frame, pre, workers)
    return images, np.arange(len(good), dtype=np.int64), frame.iloc[good].reset_index(drop=True), failed


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
    name = safe_name(name or Path(external).stem)
    out = Path(out_dir) if out_dir is not None else (
        (run_dir / f"external-{name}") if Path(target).is_dir() else path.parent / f"{path.stem}-external-{name}")
    loaded = load_model(path, settings)
    predictor = loaded.predictor
    op = of_predictor(predictor)
    frame, prepared = read_external(Path(external))
    unknown = sorted(set(frame["label"]) - set(predictor.classes))
    if unknown:
        raise DataError(f"{external}: holds {', '.join(unknown)}, which {path} does not predict "
                        f"({', '.join(predictor.classes)}); leave those images out of the set")
    images, rows, frame, failed = external_images(frame, prepared, predictor.preprocessing, workers, path)
    for p, reason in failed:
        print(f"external: skipped {p}: {reason}", file=sys.stderr)
    if not len(frame):
        raise DataError(f"{external}: none of its {len(failed)} images could be read; see the reasons above")
    probs, seconds = predict_rows(predictor, images, rows, batch_size=settings.batch_size, progress=progress,
                                  description=f"{loaded.network} on {name}")
    table = decided_table(frame, probs, predictor.classes, op)
    preds = validate_predictions(table, str(out / "predictions.csv"))
    write_predictions(table, out / "predictions.csv")
    run = RunFolder(run_dir).info() if run_dir is not None else None
    internal = run_dir / "eval-test" if run_dir is not None and (run_dir / "eval-test" / "metrics.json").is_file() \
        else None
    info = {
        "kind": "external",
        "name": name,
        "network": loaded.network,
        **({"fold": run.fold} if run is not None and run.fold is not None else {}),
        "split": f"external:{name}",
        "model": str(path.resolve()),
        "model_sha256": loaded.sha256,
        "backend": predictor.backend,
        "data": str(Path(external).resolve()),
        "image_size": predictor.preprocessing.image_size,
        "resize": predictor.preprocessing.resize,
        "classes_checkpoint": list(predictor.classes),
        "classes_present": [c for c in CLASSES if (frame["label"] == c).any()],
        "classes_absent": [c for c in predictor.classes if not (frame["label"] == c).any()],
        "sources": {str(k): int(v) for k, v in frame["source"].value_counts().items()} if "source" in frame else {},
        "operating_point": op.to_dict(),
        "internal": str(internal.resolve()) if internal is not None else None,
        "runtime": loaded.describe(),
        "images": len(frame),
        "failed": [{"path": p, "reason": r} for p, r in failed],
        "seconds": seconds,
        "images_per_second": len(frame) / seconds if seconds > 0 else math.nan,
    }
    metrics = write_evaluation(preds, out, info, prevalence=prevalence, prevalence_class=prevalence_class,
                               n_boot=n_boot, seed=seed, prevalences=prevalences)
    return EvaluationResult(out_dir=out, metrics=metrics, predictions=table, info=info)


__all__ = ["evaluate_external", "external_images", "model_path", "read_external"]
