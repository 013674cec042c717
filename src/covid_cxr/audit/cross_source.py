"""Cross-source recall: does a class's recall hold on a collection the model never saw for that class?

A model that learned COVID-19 should find it in COVID-19 images from another collection. One
that learned "images from covid-chestxray are COVID-19" loses it there. Both recalls carry Wilson
intervals: with a few dozen images a drop must be large before it means anything.

The other collection is a named source (``hospital-b``): a folder or labels CSV given as
``--source-data hospital-b=DIR`` (decoded here as ``prepare`` decodes, never trained on), a
folder that ``prepare`` wrote, or a source of the model's own prepared data that its fold never
trained on for the class. Images from either side are resized by the checkpoint's own method, so
a recall drop is the model's, not one of images it would never be given in use.

A source's name says nothing of its files: a "hospital-b" folder may hold copies of the images the
model trained on. Every unseen image whose file's sha256 is that of an image in the fold's training
pool (as the prepared cache recorded it) is left out with a note that names it; when none is left,
the audit is refused.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_cxr import fmt
from covid_cxr.audit import results as R
from covid_cxr.audit.data import resolve_target, rows_of, split_images
from covid_cxr.data.cache import IMAGES_FILE, CacheBuild, build_cache
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.sources import parse_folder_spec, read_folder
from covid_cxr.errors import DataError
from covid_cxr.inference.protocol import Predictor, predict_in_batches
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.operating_point import audit_note, of_predictor
from covid_cxr.runs.own_images import prepared_digests
from covid_cxr.runs.resolve import cache_for, training_pool
from covid_cxr.runs.results import audit_dir_for, make_result, write_result
from covid_cxr.stats import Proportion

RECALL_DROP = 0.20
"""Flag when recall on the unseen source is this much (absolute) below in-source recall..."""

NAMED = 5
"""Images of the model's own a note names, before '... and N more'."""


def recall_of(predictor: Predictor, images: np.ndarray, cls: str, batch_size: int) -> dict[str, Any]:
    """Share of ``images`` (all of class ``cls``) predicted as ``cls`` by the model's rule (as evaluate decides),
    with its Wilson interval."""
    probs = predict_in_batches(predictor, images, batch_size=batch_size)
    decided = of_predictor(predictor).decide(probs, predictor.classes)
    hits = int((decided == list(predictor.classes).index(cls)).sum())
    return Proportion(hits, len(images)).as_interval()


def run_cross_source(
    predictor: Predictor, in_images: np.ndarray, in_sources: Sequence[str], out_images: np.ndarray, *,
    source: str, cls: str, batch_size: int = 64, inputs: dict[str, Any] | None = None, left_out_own: int = 0,
) -> dict[str, Any]:
    """Recall of ``cls`` on in-source test images vs on images of the unseen ``source``; the audit result.

    ``left_out_own``: images of ``source`` left out as copies of the model's training images (recorded).
    """
    if cls not in predictor.classes:
        raise DataError(f"class {cls!r} is not one of the checkpoint's classes ({', '.join(predictor.classes)})")
    if not len(out_images):
        raise DataError(f"no {cls} images from source {source!r} to evaluate")
    if not len(in_images):
        raise DataError(f"no {cls} test images from the sources seen in training to compare with")
    metrics = {
        "class": cls,
        "source": source,
        "in_source": {"sources": sorted(set(in_sources)), "n": int(len(in_images)),
                      "recall": recall_of(predictor, in_images, cls, batch_size)},
        "unseen_source": {"n": int(len(out_images)), "recall": recall_of(predictor, out_images, cls, batch_size),
                          "left_out_own": int(left_out_own)},
        "operating_point": of_predictor(predictor).to_dict(),
    }
    seen, unseen = metrics["in_source"]["recall"], metrics["unseen_source"]["recall"]
    metrics["difference"] = seen["value"] - unseen["value"]
    flags = []
    if metrics["difference"] >= RECALL_DROP and unseen["high"] < seen["low"]:
        flags.append(R.flag(
            "cross-source-recall-drop",
            f"{R.class_name(cls)} recall drops on a source the model never saw for it: {fmt.record(unseen)} on "
            f"{source} against {fmt.record(seen)} on the training sources. The model may have learned the source "
            "of its training images rather than the disease.",
        ))
    thresholds = {"recall_drop": R.threshold(
        RECALL_DROP, "a drop of at least this much, with the two 95% intervals apart, is flagged; smaller or "
        "overlapping differences may be chance")}
    return make_result("cross_source", inputs=inputs or {}, metrics=metrics, thresholds=thresholds, flags=flags,
                       notes=audit_note(of_predictor(predictor)))


@dataclass
class UnseenImages:
    """The manifest of ``--source-data``, and a way to get its images at the checkpoint's size and resize method.

    ``digests``: image id -> sha256 of its file ("" or absent where unknown), to spot the model's own images.
    """

    manifest: pd.DataFrame
    images: Callable[[pd.Series], np.ndarray]
    digests: dict[str, str]
    notes: list[str] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)


def unseen_images(source_data: Path | str | None, prepared: PreparedData, size: int, resize: str,
                  where: Path) -> UnseenImages:  # fmt: skip
    """The images to look for the unseen source in: ``--source-data``, or the model's own prepared data.

    ``where`` (the checkpoint) is what messages about its size or resize method name.
    """
    if source_data is not None:
        return external_data(source_data, size, resize, where)
    return UnseenImages(prepared.manifest, lambda ids: rows_of(cache_for(prepared, size, where, resize), ids),
                        prepared_digests(prepared.root))


def external_data(spec: Path | str, size: int, resize: str, where: Path) -> UnseenImages:
    """``--source-data``: a folder ``prepare`` wrote, or ``[NAME=]DIR`` decoded here as ``prepare`` decodes.

    Either way its images are resized by ``resize``: a prepared folder's cache built by another
    method is decoded again by this one, once (:func:`~covid_cxr.runs.resolve.cache_for`).
    """
    if (Path(spec) / "prepare.json").is_file():
        external = PreparedData(Path(spec))
        return UnseenImages(external.manifest, lambda ids: rows_of(cache_for(external, size, where, resize), ids),
                            prepared_digests(external.root))
    name, root = parse_folder_spec(spec)
    manifest, notes = read_folder(root, name)
    build, decoded = decode_in_memory(manifest, size, resize)
    row = {image_id: i for i, image_id in enumerate(build.image_ids)}
    notes += [f"left out, cannot be decoded: {f['path']}: {f['reason']}" for f in build.failures]
    return UnseenImages(manifest, lambda wanted: decoded[[row[i] for i in wanted]], build.sha256, notes,
                        {f["image_id"] for f in build.failures})


def decode_in_memory(manifest: pd.DataFrame, size: int, resize: str) -> tuple[CacheBuild, np.ndarray]:
    """Decode ``manifest``'s images as ``prepare`` does, resized by ``resize``: the build (ids, failures,
    sha256 of the files) and the uint8 images of its ids."""
    with tempfile.TemporaryDirectory(prefix="covid-cxr-source-") as tmp:
        build = build_cache(manifest, size, Path(tmp), progress=False, resize=resize)
        images = np.load(Path(tmp) / IMAGES_FILE)
    return build, images[: len(build.image_ids)]


def trained_copies(frame: pd.DataFrame, digests: dict[str, str], pool: pd.DataFrame, pool_digests: dict[str, str]
               ) -> np.ndarray:  # fmt: skip
    """Which rows of ``frame`` are byte-identical (by their files' sha256) to an image of the training ``pool``."""
    trained = {pool_digests[i] for i in pool["image_id"] if pool_digests.get(i)}
    return np.array([bool(digests.get(i)) and digests[i] in trained for i in frame["image_id"]], dtype=bool)


def own_note(names: Sequence[str], of: int, cls: str, source: str, fold: int) -> str:
    """What is said of the images left out as the model's own (count and the first :data:`NAMED` names)."""
    shown = ", ".join(names[:NAMED]) + (f" and {len(names) - NAMED} more" if len(names) > NAMED else "")
    return (f"left out {len(names)} of {of} {R.class_name(cls)} images of {source}: their files are byte-identical "
            f"(sha256) to images fold {fold} trained on, so they are the model's own, not unseen: {shown}")


def audit_cross_source(
    target: Path, settings: InferenceSettings = InferenceSettings(), *, source: str | None = None, cls: str = "covid",
    data: Path | None = None, fold: int | None = None, source_data: Path | str | None = None,
    out_dir: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """``covid-cxr audit cross-source``: writes ``cross_source.json``.

    The unseen images are the ``cls`` images of ``source`` in ``source_data`` (``NAME=DIR``, a
    folder or labels CSV never used for training; or a folder ``prepare`` wrote), or in the
    model's own prepared data when ``source_data`` is None. Either way the fold's training pool
    must hold no ``cls`` image of that source, and an image whose file is one the pool holds is left
    out (:func:`unseen_frame`). ``source`` may be left out when ``source_data`` holds one source.
    """
    t = resolve_target(target, data, fold)
    prepared = PreparedData(t.data)
    pre = t.checkpoint.preprocessing
    unseen = unseen_images(source_data, prepared, pre.image_size, pre.resize, t.checkpoint_path)
    out_frame, source, notes, left_out = unseen_frame(unseen, prepared, t.fold, source, cls, source_data)
    test = split_images(prepared, t)
    in_frame = test.frame[(test.frame["label"] == cls) & (test.frame["source"] != source)]
    in_images = test.images[in_frame.index.to_numpy()]
    out_images = unseen.images(out_frame["image_id"])
    predictor = t.predictor(settings)  # decides by the model's rule, in evaluate's precision
    inputs = {**t.inputs(), "source": source,
              "source_data": str(source_data) if source_data is not None else None, "class": cls,
              "image_size": pre.image_size, "resize": pre.resize, "runtime": predictor.runtime.describe()}
    result = run_cross_source(predictor, in_images, list(in_frame["source"]), out_images, source=source, cls=cls,
                              batch_size=settings.batch_size, inputs=inputs, left_out_own=left_out)
    result["notes"] = [*notes, *result.get("notes", [])]
    return result, write_result(result, out_dir or audit_dir_for(target))


def unseen_frame(unseen: UnseenImages, prepared: PreparedData, fold: int, source: str | None, cls: str,
                 source_data: Path | str | None) -> tuple[pd.DataFrame, str, list[str], int]:  # fmt: skip
    """The ``cls`` images of ``source`` to evaluate, the source's name, the notes, and how many were left out
    as the model's own.

    Refused when the fold trains on ``cls`` images of that source by name; images whose files the
    training pool holds (by sha256) are left out with a note, and refused when none is left.
    """
    where = str(source_data) if source_data is not None else str(prepared.root)
    manifest = unseen.manifest
    known = sorted(set(manifest["source"]))
    if source is None:
        if len(known) != 1:
            raise DataError(f"{where} holds the sources {', '.join(known)}; say which with --source NAME")
        source = known[0]
    if source not in known:
        raise DataError(f"{where}: no source {source!r} in the data; its sources are {', '.join(known)}")
    out_frame = manifest[(manifest["source"] == source) & (manifest["label"] == cls)
                         & ~manifest["image_id"].isin(unseen.failed)]
    if out_frame.empty:
        raise DataError(f"{where}: no {cls} images from source {source!r}; cross-source needs {cls} images of a "
                        f"source the model never saw for {cls}")
    pool = training_pool(prepared, fold)
    seen_rows = pool[(pool["source"] == source) & (pool["label"] == cls)]
    if len(seen_rows):
        fix = (f"if {where} is another collection, give it its own name: --source-data hospital-b=DIR"
               if source_data is not None else
               "give another collection with --source-data NAME=DIR (a folder or labels.csv), named apart from "
               f"the training sources ({', '.join(sorted(set(pool['source'])))})")
        raise DataError(f"{prepared.root}: fold {fold} trains on {len(seen_rows)} {cls} images from {source!r}, so "
                        f"{source!r} is not unseen for {cls}; {fix}")
    pool_digests = prepared_digests(prepared.root)
    if not pool_digests:
        return out_frame, source, [*unseen.notes, f"not compared by sha256 with the images fold {fold} trained on: "
                                   f"the image cache of {prepared.root} records no digests"], 0
    own = trained_copies(out_frame, unseen.digests, pool, pool_digests)
    if own.all():
        raise DataError(f"{where}: every one of the {len(out_frame)} {cls} images of {source!r} is byte-identical "
                        f"(sha256) to an image fold {fold} of {prepared.root} trained on: they are the model's own "
                        f"training images, not an unseen source; give a collection the model never trained on")
    notes = list(unseen.notes)
    if own.any():
        notes.append(own_note([str(i) for i in out_frame["image_id"][own]], len(out_frame), cls, source, fold))
    return out_frame[~own], source, notes, int(own.sum())
