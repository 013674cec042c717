"""Evaluate a trained run (or a bare checkpoint) on a prepared split and write every artefact.

``evaluate_run`` resolves what to evaluate, reads the fold's split from the prepared data,
runs the checkpoint over the image cache in batches through the package's one inference loop
(:func:`covid_cxr.inference.protocol.predict_in_batches`), and writes into the output folder:
``predictions.csv``, ``metrics.json``, ``table3.csv``, ``table4.csv``,
``confusion_matrix.png``/``.pdf``, ``roc.png`` (the operating point marked) and ``calibration.png``.

``pred`` is decided by the checkpoint's operating point (:mod:`covid_cxr.operating_point`;
argmax when it has none), and ``metrics.json`` holds under ``decision`` the COVID-19
sensitivity, specificity, PPV and NPV at it, with PPV/NPV at other prevalences. :func:`calibrate`
chooses a rule on the validation split and stores it in the checkpoint.

A rule is always chosen on fp32 probabilities (ONNX Runtime or PyTorch fp32, whatever ``--precision``
the rest of the job runs in): bf16 moves a probability near a threshold by up to ~0.1, so a threshold
chosen in bf16 would not describe the fp32 model that ``export`` ships. A threshold rule is also applied
to fp32 probabilities under ``--precision auto`` (as ``predict`` and ``serve`` apply it); an explicit
``--precision bf16`` evaluates in bf16. Where the validation split shares
images with the test split (``--protocol paper``), choosing is refused unless asked for explicitly, and
then every output says so.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_cxr.atomic import write_json, write_text
from covid_cxr.data.prepared import ImageCache, PreparedData
from covid_cxr.errors import ConfigError
from covid_cxr.evaluate import plots
from covid_cxr.evaluate.metrics import decision_summary, table3_row, table4_row
from covid_cxr.evaluate.predictions import (
    Predictions,
    predictions_frame,
    validate_predictions,
    write_predictions,
)
from covid_cxr.inference.backends import make_predictor, precision_of, resolve_compile
from covid_cxr.inference.protocol import Predictor, predict_in_batches
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.inference.torch_model import TorchPredictor
from covid_cxr.labels import CLASSES, DISPLAY_NAMES, normalize_label
from covid_cxr.operating_point import OperatingPoint, choose_from_probs, parse_rule
from covid_cxr.progress import progress_bar
from covid_cxr.runs.checkpoint import Checkpoint, load_checkpoint_sha256, save_checkpoint
from covid_cxr.runs.folder import BEST, LAST, RunFolder
from covid_cxr.runs.lock import hold_run
from covid_cxr.runs.resolve import (
    Target,
    load_split,
    open_split,
    resolve_target,
    trained_splits,
)
from covid_cxr.stats import DEFAULT_PREVALENCES

FP32 = "fp32"  # the precision every operating point is chosen in
ALLOW_OVERLAP_FLAG = "--allow-test-overlap"


@dataclass
class EvaluationResult:
    """What one evaluation produced: where, the figures, and the per-image table."""

    out_dir: Path
    metrics: dict[str, Any]
    predictions: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


def roc_marks(metrics: dict[str, Any], ops: Sequence[dict[str, Any] | None]) -> list[plots.RocMark]:
    """Where the decisions of ``metrics`` fall beside their class's ROC curve (from the confusion matrix).

    ``ops`` are the operating points the decisions were made by: one for an evaluation, one per fold
    for a pooled report. Only one threshold on the class's probability lies on that class's curve;
    argmax (which weighs all three probabilities) and folds decided at different thresholds give a
    point that may lie off it, and the label says so rather than let it read as a point of the curve.
    """
    points = [OperatingPoint.from_dict(op) for op in ops] or [OperatingPoint()]
    point = points[0]
    c = point.positive_class
    sens, spec = metrics.get(f"{c}_recall", math.nan), metrics.get(f"{c}_specificity", math.nan)
    if sens is None or spec is None or math.isnan(sens) or math.isnan(spec):
        return []
    figures = f"sens {sens:.1f}%, spec {spec:.1f}%"
    if len({(p.rule, p.target, p.threshold, p.positive_class) for p in points}) > 1:
        label = f"each fold's own rule: {figures} (thresholds differ: may lie off the pooled curve)"
    elif point.rule == "argmax":
        label = f"argmax: {figures} (not a threshold on p({DISPLAY_NAMES.get(c, c)}): may lie off the curve)"
    else:
        label = f"{point.name}: {figures}"
    return [plots.RocMark(c, 1.0 - spec / 100.0, sens / 100.0, label)]


METRICS = "metrics.json"
"""The file that makes an evaluation folder whole: written last, and removed first when the folder is rewritten."""


def write_evaluation(preds: Predictions, out_dir: Path, info: dict[str, Any], *, table: pd.DataFrame | None = None,
                     prevalence: float | None = None, prevalence_class: str = "covid", n_boot: int = 1000,
                     seed: int = 0, prevalences: tuple[float, ...] = DEFAULT_PREVALENCES) -> dict[str, Any]:
    """Write predictions.csv (``table``, when given), table3.csv, table4.csv, the plots and metrics.json; return the
    metrics.

    ``info`` (network, fold, split, paths...) goes into metrics.json under ``evaluation`` and
    names the rows of the two tables. ``decision`` holds the operating point's figures
    (:func:`~covid_cxr.evaluate.metrics.decision_summary`, PPV/NPV at ``prevalences``) and where its
    threshold was chosen; ``prevalence``/``prevalence_class`` add one class's PPV at that prevalence.

    Everything is computed before the first file is touched, and the folder's old metrics.json is removed
    before any other file is replaced and the new one written last: a stop part-way (Ctrl-C, a kill) leaves a
    folder without metrics.json, which the report and the model card refuse ("evaluate again"), never new
    predictions beside the old figures.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = preds.metrics(prevalence=prevalence, prevalence_class=prevalence_class, n_boot=n_boot, seed=seed)
    op = OperatingPoint.from_dict(info.get("operating_point"))
    metrics["decision"] = {"operating_point": op.to_dict(), "positive_class": op.positive_class,
                           "chosen_on": op.chosen_on(), "fitted_on_test": op.fitted_on_test,
                           **decision_summary(preds.confusion(by_patient=True), CLASSES.index(op.positive_class),
                                             prevalences)}
    (out_dir / METRICS).unlink(missing_ok=True)
    if table is not None:
        write_predictions(table, out_dir / "predictions.csv")
    cm = preds.confusion()
    key = {"fold": info.get("fold", ""), "network": info.get("network", "")}
    write_text(out_dir / "table3.csv", pd.DataFrame([{**key, **table3_row(cm)}]).to_csv(index=False))
    write_text(out_dir / "table4.csv",
               pd.DataFrame([{**key, **table4_row(cm)}]).to_csv(index=False, float_format="%.2f"))
    title = " ".join(str(v) for v in (info.get("network"), f"fold {info['fold']}" if "fold" in info else "",
                                      info.get("split", "")) if v)
    plots.save_figure(plots.confusion_figure(cm, title=f"Confusion matrix, {title} (N = {int(cm.sum())})"),
                      out_dir / "confusion_matrix.png", out_dir / "confusion_matrix.pdf")
    if preds.has_probs:
        aucs = {c: (metrics[f"{c}_auc"], metrics[f"{c}_auc_ci_low"], metrics[f"{c}_auc_ci_high"]) for c in CLASSES}
        marks = roc_marks(metrics, [info.get("operating_point")])
        plots.save_figure(plots.roc_figure(preds.true_idx, preds.probs, aucs=aucs, title=f"ROC, {title}",
                                           marks=marks), out_dir / "roc.png")
        plots.save_figure(plots.calibration_figure(
            preds.true_idx, preds.probs, title=f"Calibration, {title}: ECE {metrics['ece']:.2f}%"),
            out_dir / "calibration.png")
    else:  # no probabilities: no curves, and none of an earlier evaluation's left beside these figures
        for name in ("roc.png", "calibration.png"):
            (out_dir / name).unlink(missing_ok=True)
    write_json(out_dir / METRICS, {**metrics, "evaluation": info})
    return metrics


def predict_rows(predictor: Predictor, images: np.ndarray, rows: np.ndarray, *, batch_size: int, progress: bool,
                 description: str) -> tuple[np.ndarray, float]:
    """Probabilities for ``images[rows]`` in the order of ``rows``, with a progress bar; also the seconds taken.

    A memory-mapped cache is read front to back (rows sorted), and the output put back in the given order.
    """
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    started = time.perf_counter()
    with progress_bar(f"[bold]evaluate[/] {description}", len(rows), enabled=progress, rate_unit="img") as advance:
        probs_sorted = predict_in_batches(predictor, images, batch_size=batch_size, indices=rows[order],
                                          on_batch=advance)
    probs = np.empty_like(probs_sorted)
    probs[order] = probs_sorted
    return probs, time.perf_counter() - started


def decided_table(frame: pd.DataFrame, probs: np.ndarray, classes: tuple[str, ...], op: OperatingPoint) -> pd.DataFrame:
    """The predictions table with ``pred`` decided by the operating point (argmax when the model has none)."""
    table = predictions_frame(frame, probs, classes)
    table["pred"] = np.asarray(classes)[op.decide(probs, classes)]
    return table


@dataclass
class _Model:
    """A checkpoint opened for evaluation over a prepared split."""

    target: Target
    ckpt: Checkpoint
    prepared: PreparedData
    predictor: Predictor
    choice: Any  # the BackendChoice: which backend runs it, and why
    exact: bool  # an exact fp32 path (ONNX Runtime, or PyTorch fp32 uncompiled): fit to choose a rule on
    sha256: str  # of the checkpoint file: which model an evaluation is of (external ones are paired by it)
    cache: ImageCache | None = None  # the image cache the last split was read from


def _open(target: Path, data: Path | None, fold: int | None, split: str, out_dir: Path | None,
          settings: InferenceSettings, *, compile: str, images: int | None = None, follow_rule: bool = False) -> _Model:
    """Resolve ``target``, load its checkpoint and prepared data, and make the predictor that runs it
    (``follow_rule``: decided by the checkpoint's operating point, see :func:`make_predictor`)."""

    tgt = resolve_target(Path(target), data, fold, split, out_dir)
    ckpt, sha256 = load_checkpoint_sha256(tgt.checkpoint)
    prepared = PreparedData(tgt.data)
    compiled = resolve_compile(compile, images or 0, settings, model=tgt.checkpoint, follow_rule=follow_rule)
    predictor, choice = make_predictor(ckpt, sha256, settings, compile=compiled, follow_rule=follow_rule)
    exact = predictor.backend == "onnx" or (
        isinstance(predictor, TorchPredictor) and predictor.runtime.precision == FP32 and not compiled)
    return _Model(tgt, ckpt, prepared, predictor, choice, exact, sha256)


def _split_probs(m: _Model, split: str, *, batch_size: int, progress: bool, where: Path
                 ) -> tuple[pd.DataFrame, str, np.ndarray, float]:
    """One split's table, split hash, probabilities (model's class order) and seconds."""
    opened = open_split(m.prepared, m.target.fold, split, m.target.run, m.ckpt, where, progress=progress)
    m.cache = opened.cache
    rows = np.asarray(opened.cache.rows(opened.frame["image_id"].to_numpy()), dtype=np.int64)
    probs, seconds = predict_rows(m.predictor, opened.cache.images, rows, batch_size=batch_size, progress=progress,
                                  description=f"{m.ckpt.network} fold {m.target.fold} {split}")
    return opened.frame, opened.split_hash, probs, seconds


def _fp32_model(where: Path, data: Path | None, fold: int | None, settings: InferenceSettings) -> _Model:
    """The checkpoint on an exact fp32 path (ONNX Runtime or PyTorch fp32, never compiled), to choose a rule on."""
    return _open(where, data, fold, "val", None, replace(settings, precision=FP32), compile="off")


def shared_with_test(m: _Model, val: pd.DataFrame, where: Path) -> tuple[int, int]:
    """How many validation images are also test images (by image id), and how many test images there are."""
    test = trained_splits(m.prepared, m.target.fold, m.target.run, where).test
    test_ids = set(test["image_id"]) if test is not None else set()
    return int(val["image_id"].isin(test_ids).sum()), len(test_ids)


def overlap_refusal(where: Path, m: _Model, shared: int, n_val: int) -> ConfigError:
    """The error for a validation split that holds test images: why it matters, and the two ways out."""
    return ConfigError(
        f"{where}: fold {m.target.fold}'s validation split shares {shared} of its {n_val} images with the test split "
        f"(data {m.prepared.root} prepared with --protocol {m.prepared.protocol}; the paper's validation set holds "
        "its test COVID-19 images), so a threshold chosen on it would be fitted on the images the test scores. "
        "Prepare the data with --protocol strict or --protocol kfold and retrain, or pass "
        f"{ALLOW_OVERLAP_FLAG} to choose it anyway (every output then says so)")


def choose_on_validation(m: _Model, rule: str, *, batch_size: int, progress: bool, where: Path,
                         allow_test_overlap: bool = False) -> OperatingPoint:
    """The operating point ``rule`` chosen on the run's validation split, with ``m`` (an fp32 model).

    Refused when the validation split shares images with the test split, unless ``allow_test_overlap``;
    the record says how many it shares and which backend and precision gave the probabilities.
    """
    if parse_rule(rule)[0] == "argmax":  # a bad rule fails before any image is read; argmax needs none
        return OperatingPoint()
    val, _ = load_split(m.prepared, m.target.fold, "val", m.target.run, where)
    shared, n_test = shared_with_test(m, val, where)
    if shared and not allow_test_overlap:
        raise overlap_refusal(where, m, shared, len(val))
    # m is an exact path: ONNX Runtime, or PyTorch fp32 (true fp32 on a GPU too: TF32 off, see exact_fp32)
    frame, split_hash, probs, _ = _split_probs(m, "val", batch_size=batch_size, progress=progress, where=where)
    op = choose_from_probs(rule, probs, [normalize_label(v) for v in frame["label"]], m.ckpt.classes)
    record = {**op.validation, "fold": m.target.fold, "split_hash": split_hash, "precision": FP32,
              "backend": m.predictor.backend, "runtime": m.predictor.describe(),
              "test_images_shared": shared, "test_images": n_test}
    return OperatingPoint.from_dict({**op.to_dict(), "validation": record})


def calibrate(target: Path, rule: str, settings: InferenceSettings = InferenceSettings(), *,
              data: Path | None = None, fold: int | None = None, out: Path | None = None,
              progress: bool = True, allow_test_overlap: bool = False) -> tuple[OperatingPoint, Path]:
    """Choose ``rule`` on the run's validation split and write it into the checkpoint (atomically).

    ``target`` is a run folder (its best.pt is rewritten) or a checkpoint in a run folder (or with
    ``data``/``fold``). ``out`` writes a new checkpoint instead of rewriting. No retraining: only the
    validation split's probabilities are computed, in fp32 whatever ``settings.precision`` says.
    """
    target = Path(target)
    dest = Path(out) if out is not None else (RunFolder(target).best if target.is_dir() else target)
    home = RunFolder.containing(dest) if dest.name in (BEST, LAST) else None  # the files a training writes
    hold = contextlib.nullcontext() if home is None else hold_run(
        home.root, f"rewriting {dest.name} in it",
        "wait for the training to end (its next best epoch would replace the calibrated file), or write a "
        "calibrated copy elsewhere with --out")  # fmt: skip
    with hold:  # no training replaces the file between reading it and writing it back
        m = _fp32_model(target, data, fold, settings)
        op = choose_on_validation(m, rule, batch_size=settings.batch_size, progress=progress, where=target,
                                  allow_test_overlap=allow_test_overlap)
        m.ckpt.operating_point = None if op.rule == "argmax" else op.to_dict()
        path = save_checkpoint(m.ckpt, dest)
    return op, path


def evaluation_warnings(op: OperatingPoint, split: str, split_hash: str, fold: int) -> list[str]:
    """What a reader of the figures at ``op`` must know: a threshold fitted on the images it is scored on."""
    if op.rule == "argmax":
        return []
    v, warnings = op.validation, []
    if op.fitted_on_test and split == "test":
        warnings.append(f"the threshold ({op.name}) was chosen on a validation split that includes "
                        f"{v['test_images_shared']} of these test images (--allow-test-overlap): the figures at it "
                        "are optimistic; prepare with --protocol strict or kfold for honest ones")
    same = v.get("split_hash") == split_hash if v.get("split_hash") else v.get("fold") in (fold, None)
    if split == "val" and same:
        warnings.append(f"the threshold ({op.name}) was chosen on this validation split and is scored on the same "
                        "images: the figures at it are optimistic by construction; evaluate on test for honest ones")
    return warnings


def evaluate_run(
    target: Path,
    settings: InferenceSettings = InferenceSettings(),
    *,
    data: Path | None = None,
    fold: int | None = None,
    split: str = "test",
    out_dir: Path | None = None,
    prevalence: float | None = None,
    prevalence_class: str = "covid",
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
    compile: str = "auto",
    operating_point: str | None = None,
    allow_test_overlap: bool = False,
    prevalences: tuple[float, ...] = DEFAULT_PREVALENCES,
) -> EvaluationResult:
    """Evaluate a run folder (its ``best.pt``) or a checkpoint on one split of the prepared data.

    ``data`` and ``fold`` default to the run's ``run.json``; a bare checkpoint needs both. ``compile``
    (auto|on|off): ``torch.compile`` the network; auto does so for splits large enough to repay it.
    ``operating_point`` (e.g. ``sensitivity=0.95``) chooses a decision rule on the validation split for
    this evaluation, in fp32 (the checkpoint is left as it is; ``calibrate`` stores one); default: the
    checkpoint's. ``allow_test_overlap``: choose it even where validation shares images with test.
    ``settings.backend``: auto (None), torch or onnx (``covid_cxr.inference.backends.choose_backend``);
    ``compile`` applies when the backend is PyTorch. ``prevalence``/``prevalence_class`` and ``seed`` (of
    the AUC bootstrap) as in ``covid-cxr metrics``.
    """
    where = Path(target)
    tgt = resolve_target(where, data, fold, split, out_dir, note=False)  # _open resolves it again, and notes then
    n_images = len(load_split(PreparedData(tgt.data), tgt.fold, split, tgt.run, where)[0])
    # A threshold rule was chosen on fp32 probabilities: under auto it decides on them too, as predict and serve
    # do (a given rule here; the checkpoint's own through follow_rule).
    given_threshold = operating_point is not None and parse_rule(operating_point)[0] != "argmax"
    opened = replace(settings, precision=FP32) if given_threshold and settings.precision == "auto" else settings
    m = _open(where, data, fold, split, out_dir, opened, compile=compile, images=n_images,
              follow_rule=operating_point is None)
    batch_size = settings.batch_size
    if operating_point is not None:
        exact = m if m.exact else _fp32_model(where, data, fold, settings)
        op = choose_on_validation(exact, operating_point, batch_size=batch_size, progress=progress, where=where,
                                  allow_test_overlap=allow_test_overlap)
    else:
        op = OperatingPoint.from_dict(m.ckpt.operating_point)
    frame, split_hash, probs, seconds = _split_probs(m, split, batch_size=batch_size, progress=progress, where=where)
    table = decided_table(frame, probs, m.ckpt.classes, op)
    preds = validate_predictions(table, str(tgt.out_dir / "predictions.csv"))
    ckpt, predictor = m.ckpt, m.predictor
    info = {
        "kind": "internal",
        "network": ckpt.network,
        "fold": tgt.fold,
        "split": split,
        "checkpoint": str(tgt.checkpoint.resolve()),
        "model_sha256": m.sha256,
        "data": str(tgt.data.resolve()),
        "protocol": m.prepared.protocol,
        "split_hash": split_hash,
        "image_size": ckpt.preprocessing.image_size,
        "scaling": ckpt.preprocessing.scaling,
        "resize": ckpt.preprocessing.resize,
        "cache": str(m.cache.folder.resolve()),
        "classes_checkpoint": list(ckpt.classes),
        "operating_point": op.to_dict(),
        "runtime": f"{predictor.backend} ({m.choice.reason}): {predictor.describe()}",
        "backend": predictor.backend, "precision": precision_of(predictor)[0],  # what the card's rows name
        "batch_size": batch_size,
        "images": len(frame),
        "seconds": seconds,
        "images_per_second": len(frame) / seconds if seconds > 0 else math.nan,
        "run_status": tgt.run.status,
        "checkpoint_epoch": ckpt.meta.get("global_epoch"),  # the file's own record, not run.json's best epoch
        "warnings": evaluation_warnings(op, split, split_hash, tgt.fold),
    }
    metrics = write_evaluation(preds, tgt.out_dir, info, table=table, prevalence=prevalence,
                               prevalence_class=prevalence_class, n_boot=n_boot, seed=seed, prevalences=prevalences)
    return EvaluationResult(out_dir=tgt.out_dir, metrics=metrics, predictions=table, info=info)
