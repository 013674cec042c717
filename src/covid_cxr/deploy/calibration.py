"""Images for int8 quantization and the check that the int8 model still classifies like the fp32 one.

Static quantization fixes every activation's range from calibration images, so those images must
look like what the model will see. By default they come from the training run the checkpoint
belongs to (``run.json`` beside it): training images of the fold's first phase, an equal share of
each class as far as each has images (a rare class still sets the ranges its images produce). The
check then runs both models on the run's validation split, images the model was not trained on.
Without a run, the user's own X-rays (``--calibration``) are decoded exactly as ``predict`` decodes
them; with no labels the check can only say how often fp32 and int8 agree. Either way the images are
resized by the checkpoint's own method (``Preprocessing.resize``): ranges calibrated on images
resized otherwise would be ranges of inputs the model never gets.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_cxr import fmt
from covid_cxr.atomic import atomic_path
from covid_cxr.data.images import load_image
from covid_cxr.data.prepared import PreparedData
from covid_cxr.errors import ConfigError, DataError, ImageDecodeError
from covid_cxr.inference.inputs import expand_inputs
from covid_cxr.inference.protocol import Predictor
from covid_cxr.operating_point import of_predictor
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.folder import RunFolder, RunInfo
from covid_cxr.runs.resolve import cache_for, load_split
from covid_cxr.stats import Proportion

SEED = 0  # the same checkpoint always gets the same calibration and check images
CHECK_BATCH = 16  # images per forward pass in the check: bounds its memory on the full networks
MAX_ACCURACY_LOSS_PP = 0.5
MIN_AGREEMENT_PCT = 99.0


@dataclass(frozen=True)
class CalibrationSet:
    """Images to calibrate on, and images to compare fp32 and int8 on (labelled when known), with where from."""

    calibration: np.ndarray  # uint8 (N, S, S)
    calibration_source: str
    check_images: np.ndarray  # uint8 (M, S, S)
    check_labels: np.ndarray | None  # class names, one per check image; None: unlabelled
    check_source: str
    resize: str  # the method both sets were resized by: the model's own


def read_run(checkpoint: Path) -> RunInfo | None:
    """The ``run.json`` beside ``checkpoint``, or None when the checkpoint is not inside a run folder."""
    home = RunFolder.containing(checkpoint) if Path(checkpoint).is_file() else None
    return home.info() if home is not None else None


def stratified_sample(frame: pd.DataFrame, n: int, seed: int = SEED) -> pd.DataFrame:
    """Up to ``n`` rows, taking classes in turn (equal shares; the larger classes fill what a small one lacks)."""
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(rows)) for _, rows in sorted(frame.groupby("label").indices.items())]
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(int(queue.pop()))
    return frame.iloc[sorted(picked)]


def run_images(
    checkpoint: Path,
    run: RunInfo,
    pre: Preprocessing,
    classes: tuple[str, ...],
    *,
    calibration_count: int,
    check_count: int,
) -> CalibrationSet:
    """Calibration (phase 1 training) and check (validation) images of the run's fold, from its image cache.

    The cache is the one at the model's input size and resize method (``pre``); a prepared cache
    built by another method is decoded again by the model's, once (:func:`~covid_cxr.runs.resolve.cache_for`).

    Raises :class:`DataError` when the prepared data the run names cannot be read, is not the data
    the run was trained on (its validation images might then be training images), or holds classes
    the checkpoint does not predict.
    """
    where = checkpoint.parent / "run.json"
    if not run.data or run.fold is None:
        raise DataError(f"{where} does not name the prepared data and fold the run was trained on")
    prepared = PreparedData(Path(run.data))
    fold = int(run.fold)
    val, _ = load_split(prepared, fold, "val", run, where)
    unknown = sorted(set(val["label"]) - set(classes))
    if unknown:
        raise DataError(f"{where}: the validation images of fold {fold} of {prepared.root} include "
                        f"{', '.join(unknown)}, which {checkpoint} does not predict ({', '.join(classes)})")
    train = prepared.fold(fold).phases[0]
    cache = cache_for(prepared, pre.image_size, checkpoint, pre.resize)
    calib = stratified_sample(train, calibration_count)
    rng = np.random.default_rng(SEED)
    check = val.iloc[np.sort(rng.permutation(len(val))[:check_count])]
    check_rows = cache.rows(check["image_id"])
    order = np.argsort(check_rows)
    return CalibrationSet(
        calibration=np.asarray(cache.images[np.sort(cache.rows(calib["image_id"]))]),
        calibration_source=f"phase-1 training images of fold {fold} of {prepared.root}",
        check_images=np.asarray(cache.images[check_rows[order]]),
        check_labels=check["label"].to_numpy()[order],
        check_source=f"validation images of fold {fold} of {prepared.root}",
        resize=cache.resize,
    )


def load_calibration_files(
    paths: list[str], pre: Preprocessing, count: int, failures: list[tuple[str, str]], workers: int = 2
) -> np.ndarray:
    """Decode up to ``count`` X-rays from files, folders or globs as ``predict`` does; uint8 (N, S, S).

    Each is resized to the model's input size by the model's method (``pre``), as ``predict`` resizes.

    A path that names nothing is an error (named); a file that does not decode, whatever the decoder
    raised, is appended to ``failures`` (path, reason) and skipped, as long as some images remain.
    """
    inputs = expand_inputs(paths)
    if inputs.missing:
        named = "; ".join(f"{path}: {reason}" for path, reason in inputs.missing)
        raise ConfigError(f"--calibration {named}; give files, folders or globs of X-ray images")
    files = inputs.files
    if len(files) > count:  # an even spread over what was given, not the first folder's images only
        files = [files[i] for i in np.sort(np.random.default_rng(SEED).permutation(len(files))[:count])]
    images = []
    with ThreadPoolExecutor(workers) as pool:
        for path, future in [(f, pool.submit(load_image, f, pre.image_size, resize=pre.resize)) for f in files]:
            try:
                images.append(future.result())
            except ImageDecodeError as exc:
                failures.append((str(path), exc.reason))
            except Exception as exc:  # an unforeseen failure of one file is that file's, as predict has it
                failures.append((str(path), f"unexpected error while decoding ({type(exc).__name__}: {exc})"))
    if not files:
        raise ConfigError(f"--calibration {' '.join(paths)}: no image files (PNG, JPEG or DICOM) there")
    if not images:
        raise ConfigError(f"--calibration: none of the {len(files)} files decoded as an X-ray image "
                          f"(first: {failures[0][0]}: {failures[0][1]})")
    return np.stack(images)


@dataclass(frozen=True)
class Int8Check:
    """fp32 and int8 run on the same images: agreement, and accuracies when the images have labels."""

    source: str
    agreed: Proportion  # same decided class, by the model's own decision rule
    fp32: Proportion | None  # None: no labels, accuracy not checked
    int8: Proportion | None
    rule: str = "argmax"  # the decision rule the classes were decided by (the model's operating point)
    argmax_agreed: Proportion | None = None  # same argmax class, when the rule is not argmax

    @property
    def difference_pp(self) -> float | None:
        """int8 accuracy minus fp32 accuracy, in percentage points."""
        return None if self.fp32 is None or self.int8 is None else self.int8.value - self.fp32.value

    def as_dict(self) -> dict[str, Any]:
        """The figures stored in the int8 model's metadata."""
        out: dict[str, Any] = {"images": self.agreed.n, "source": self.source, "labelled": self.fp32 is not None,
                               "agreement_pct": round(self.agreed.value, 3), "decision_rule": self.rule}
        if self.argmax_agreed is not None:
            out["argmax_agreement_pct"] = round(self.argmax_agreed.value, 3)
        if self.fp32 is not None and self.int8 is not None:
            for name, p in (("fp32", self.fp32), ("int8", self.int8)):
                out[f"{name}_accuracy_pct"] = round(p.value, 3)
                out[f"{name}_accuracy_ci95_pct"] = [round(v, 3) for v in p.ci]
            out["accuracy_difference_pp"] = round(float(self.difference_pp), 3)
        return out

    def summary(self) -> str:
        """One line for the terminal."""
        text = f"int8 check on {self.agreed.n} {self.source}: "
        if self.fp32 is not None and self.int8 is not None:
            text += (f"accuracy fp32 {fmt.with_ci(self.fp32.value, *self.fp32.ci)}, "
                     f"int8 {fmt.with_ci(self.int8.value, *self.int8.ci)}, accuracy "
                     f"{round(self.difference_pp, 3):+.2f} pp; ")  # as the record stores it, and predict prints it
        text += f"classes agree on {self.agreed.value:.1f}% ({self.agreed.k}/{self.agreed.n})"
        if self.argmax_agreed is not None:
            text += (f" decided by {self.rule} ({self.argmax_agreed.value:.1f}% by argmax, "
                     f"{self.argmax_agreed.k}/{self.argmax_agreed.n})")
        if self.fp32 is None:
            text += "; accuracy not checked: no labelled images were given"
        return text

    def problems(self) -> list[str]:
        """What makes int8 worse than fp32 here: over 0.5 pp of accuracy lost, or under 99% agreement."""
        found = []
        diff = self.difference_pp
        if diff is not None and diff < -MAX_ACCURACY_LOSS_PP:
            found.append(f"loses {-diff:.2f} percentage points of accuracy")
        if self.agreed.value < MIN_AGREEMENT_PCT:
            found.append(f"gives fp32's class on only {self.agreed.value:.1f}% of the images")
        return found


def _probabilities(predictor: Predictor, images: np.ndarray) -> np.ndarray:
    batches = range(0, len(images), CHECK_BATCH)
    return np.concatenate([predictor.predict_proba(images[i : i + CHECK_BATCH]) for i in batches])


def check_int8(
    fp32: Predictor, int8: Predictor, images: np.ndarray, labels: np.ndarray | None, source: str
) -> Int8Check:
    """Classify ``images`` with both models; ``labels`` (class names of the models' classes) when known.

    Classes are decided as ``predict`` and ``serve`` decide them: by the model's operating point (the int8
    file carries the fp32 file's), so a threshold near which int8 moves probabilities shows up here. With
    a rule other than argmax, the argmax agreement is kept beside it.
    """
    op = of_predictor(fp32)
    p32, p8 = _probabilities(fp32, images), _probabilities(int8, images)
    pred32, pred8 = op.decide(p32, fp32.classes), op.decide(p8, fp32.classes)
    n = len(images)
    agreed = Proportion(int((pred32 == pred8).sum()), n)
    argmax_agreed = None if op.rule == "argmax" else Proportion(int((p32.argmax(1) == p8.argmax(1)).sum()), n)
    rule = op.name if op.rule == "argmax" else f"{op.name} (p_{op.positive_class} >= {fmt.exact(op.threshold)})"
    if labels is None:
        return Int8Check(source, agreed, None, None, rule, argmax_agreed)
    truth = np.asarray([fp32.classes.index(c) for c in labels])
    return Int8Check(source, agreed, Proportion(int((pred32 == truth).sum()), n),
                     Proportion(int((pred8 == truth).sum()), n), rule, argmax_agreed)


def record_in_metadata(model_path: Path, extra: dict[str, Any]) -> None:
    """Merge ``extra`` into the model's ``covid_cxr.quantization`` metadata JSON; rewrites the file atomically."""
    import onnx

    from covid_cxr.deploy.quantize import META_KEY

    model = onnx.load(os.fspath(model_path))
    entry = next((p for p in model.metadata_props if p.key == META_KEY), None)
    if entry is None:
        entry = model.metadata_props.add()
        entry.key, entry.value = META_KEY, "{}"
    entry.value = json.dumps({**json.loads(entry.value), **extra}, sort_keys=True)
    with atomic_path(model_path) as tmp:
        onnx.save(model, os.fspath(tmp))
