"""Evaluate a trained run (or a bare checkpoint) on a prepared split and write every artefact.

``evaluate_run`` resolves what to evaluate, reads the fold's split from the prepared data,
runs the checkpoint over the image cache in batches through the package's one inference loop
(:func:`covid_cxr.inference.predict_in_batches`), and writes into the output folder:
``predictions.csv``, ``metrics.json``, ``table3.csv``, ``table4.csv``,
``confusion_matrix.png``/``.pdf``, ``roc.png`` (the operating point marked) and ``calibration.png``.

``pred`` is decided by the checkpoint's operating point (:mod:`covid_cxr.operating_point`;
argmax when it has none), and ``metrics.json`` holds under ``decision`` the COVID-19
sensitivity, specificity, PPV and NPV at it, with PPV/NPV at other prevalences. :func:`calibrate`
chooses a rule on the validation split and stores it in the checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from covid_cxr.config import SPLITS
from covid_cxr.errors import CheckpointError, DataError
from covid_cxr.evaluate import plots
from covid_cxr.evaluate.metrics import DEFAULT_PREVALENCES, decision_summary, table3_row, table4_row
from covid_cxr.evaluate.predictions import Predictions, predictions_frame, validate_predictions, write_predictions
from covid_cxr.labels import CLASSES, normalize_label
from covid_cxr.operating_point import OperatingPoint, parse_rule

if TYPE_CHECKING:  # the data area is imported where used, so metrics and reports never load it
    from covid_cxr.data.prepared import ImageCache, PreparedData

CHECKPOINT_IN_RUN = "best.pt"


@dataclass
class EvaluationResult:
    """What one evaluation produced: where, the figures, and the per-image table."""

    out_dir: Path
    metrics: dict[str, Any]
    predictions: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalTarget:
    checkpoint: Path
    data: Path
    fold: int
    out_dir: Path
    run: dict[str, Any]


def read_run_file(path: Path) -> dict[str, Any]:
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); the run folder is damaged") from exc
    if not isinstance(run, dict):
        raise DataError(f"{path}: not a run description (expected a JSON object); the run folder is damaged")
    return run


def resolve_target(target: Path, data: Path | None, fold: int | None, split: str, out_dir: Path | None) -> EvalTarget:
    """Turn a run folder or checkpoint path plus overrides into concrete paths and a fold."""
    target = Path(target)
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if target.is_dir():
        run_file = target / "run.json"
        if not run_file.is_file():
            raise DataError(f"{target}: not a run folder (no run.json); give a run folder or a .pt checkpoint")
        run = read_run_file(run_file)
        checkpoint = target / CHECKPOINT_IN_RUN
        if not checkpoint.is_file():
            raise CheckpointError(
                f"{checkpoint}: no such file; the run has not saved a best checkpoint yet "
                f"(status {run.get('status', 'unknown')!r}); train it further or evaluate last.pt by path"
            )
        default_out = target / f"eval-{split}"
    elif target.is_file():
        # A checkpoint inside a run folder (e.g. RUN/last.pt) takes its data and fold from the run.
        run_file = target.parent / "run.json"
        run = read_run_file(run_file) if run_file.is_file() else {}
        checkpoint = target
        default_out = target.parent / f"{target.stem}-eval-{split}"
    else:
        raise DataError(f"{target}: no such run folder or checkpoint file")
    if data is None and run.get("data"):
        data = Path(run["data"])
    if fold is None:
        fold = run.get("fold")
    out = Path(out_dir) if out_dir is not None else default_out
    if data is None:
        raise DataError(f"{target}: which prepared data? pass --data DATA (the folder 'covid-cxr prepare' wrote)")
    if fold is None:
        raise DataError(f"{target}: which fold was this checkpoint trained on? pass --fold K")
    return EvalTarget(checkpoint=checkpoint, data=Path(data), fold=int(fold), out_dir=out, run=run)


def load_split(
    prepared: PreparedData, fold: int, split: str, run: dict[str, Any], where: Path
) -> tuple[pd.DataFrame, str]:
    """The fold's split table and split hash, after checking they are the splits the model was trained on."""
    if not 1 <= fold <= prepared.num_folds:
        raise DataError(f"{where}: fold {fold} does not exist; the prepared data has folds 1..{prepared.num_folds}")
    splits = prepared.fold(fold)
    trained_on = run.get("split_hash")
    if trained_on and trained_on != splits.split_hash:
        raise DataError(
            f"{where}: the run was trained on fold {fold} splits {trained_on[:12]} but {prepared.root} has "
            f"splits {splits.split_hash[:12]} for that fold; its {split} set may hold training images. Evaluate "
            "with the prepared data the run used (run.json 'data'), or re-train on this data"
        )
    frame = splits.test if split == "test" else splits.val
    if frame is None or len(frame) == 0:
        raise DataError(f"{where}: fold {fold} of {prepared.root} has no {split} images")
    return frame.reset_index(drop=True), splits.split_hash


def cache_for(prepared: PreparedData, image_size: int, where: Path, resize: str = "area", *,
              progress: bool = True) -> ImageCache:
    """The image cache at the checkpoint's input size and resize method (the data area's error names the command).

    ``prepare`` builds the anti-aliased (``area``) cache. A checkpoint that resizes otherwise (an
    imported authors' model: ``bilinear``) is never fed those images: they are decoded again from
    their files by its method into a cache of their own beside it (once; later runs reuse it).
    Also used by the audits (``covid_cxr.audit.data``), as are :func:`resolve_target` and :func:`load_split`.
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


def _cache_resized(prepared: PreparedData, image_size: int, resize: str, where: Path, have: str,
                   progress: bool) -> ImageCache:
    """Decode the prepared images again by ``resize`` (the prepared cache was built by ``have``)."""
    from covid_cxr.data.cache import cache_dirname, cache_key, cache_matches, ensure_cache

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


def _jsonable(value: Any) -> Any:
    """NaN becomes null (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) else value
    return value


def write_json(data: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    return path


def roc_marks(metrics: dict[str, Any], op: dict[str, Any] | None) -> list[plots.RocMark]:
    """The operating point's place on its class's ROC curve (from the confusion matrix: any rule, argmax too)."""
    point = OperatingPoint.from_dict(op)
    c = point.positive_class
    sens, spec = metrics.get(f"{c}_recall", math.nan), metrics.get(f"{c}_specificity", math.nan)
    if sens is None or spec is None or math.isnan(sens) or math.isnan(spec):
        return []
    label = f"{point.name}: sens {sens:.1f}%, spec {spec:.1f}%"
    return [plots.RocMark(c, 1.0 - spec / 100.0, sens / 100.0, label)]


def write_evaluation(preds: Predictions, out_dir: Path, info: dict[str, Any], *,
                     prevalence: float | None = None, n_boot: int = 1000, seed: int = 0,
                     prevalences: tuple[float, ...] = DEFAULT_PREVALENCES) -> dict[str, Any]:
    """Write metrics.json, table3.csv, table4.csv and the plots for a predictions table; return the metrics.

    ``info`` (network, fold, split, paths...) goes into metrics.json under ``evaluation`` and
    names the rows of the two tables. ``decision`` holds the operating point's figures
    (:func:`~covid_cxr.evaluate.metrics.decision_summary`, PPV/NPV at ``prevalences``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = preds.metrics(prevalence=prevalence, n_boot=n_boot, seed=seed)
    op = OperatingPoint.from_dict(info.get("operating_point"))
    metrics["decision"] = {"operating_point": op.to_dict(), "positive_class": op.positive_class,
                           **decision_summary(preds.confusion(), CLASSES.index(op.positive_class), prevalences)}
    write_json({**metrics, "evaluation": info}, out_dir / "metrics.json")
    cm = preds.confusion()
    key = {"fold": info.get("fold", ""), "network": info.get("network", "")}
    pd.DataFrame([{**key, **table3_row(cm)}]).to_csv(out_dir / "table3.csv", index=False)
    pd.DataFrame([{**key, **table4_row(cm)}]).to_csv(out_dir / "table4.csv", index=False, float_format="%.2f")
    title = " ".join(str(v) for v in (info.get("network"), f"fold {info['fold']}" if "fold" in info else "",
                                      info.get("split", "")) if v)
    plots.save_figure(plots.confusion_figure(cm, title=f"Confusion matrix, {title} (N = {int(cm.sum())})"),
                      out_dir / "confusion_matrix.png", out_dir / "confusion_matrix.pdf")
    if preds.has_probs:
        aucs = {c: (metrics[f"{c}_auc"], metrics[f"{c}_auc_ci_low"], metrics[f"{c}_auc_ci_high"]) for c in CLASSES}
        marks = roc_marks(metrics, info.get("operating_point"))
        plots.save_figure(plots.roc_figure(preds.true_idx, preds.probs, aucs=aucs, title=f"ROC, {title}",
                                           marks=marks), out_dir / "roc.png")
        plots.save_figure(plots.calibration_figure(
            preds.true_idx, preds.probs, title=f"Calibration, {title}: ECE {metrics['ece']:.2f}%"),
            out_dir / "calibration.png")
    return metrics


def predict_rows(predictor: Any, images: Any, rows: np.ndarray, *, batch_size: int, progress: bool,
                 description: str) -> tuple[np.ndarray, float]:
    """Probabilities for ``images[rows]`` in the order of ``rows``, with a progress bar; also the seconds taken.

    A memory-mapped cache is read front to back (rows sorted), and the output put back in the given order.
    """
    from covid_cxr.inference import predict_in_batches

    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    console = Console(stderr=True)
    started = time.perf_counter()
    with Progress(TextColumn("[bold]evaluate[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console,
                  disable=not progress, transient=False) as bar:
        task = bar.add_task(description, total=len(rows), rate="")

        def advance(n: int) -> None:
            done = bar.tasks[0].completed + n
            rate = done / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:.1f} img/s")

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

    target: EvalTarget
    ckpt: Any
    prepared: Any
    predictor: Any
    choice: Any  # the BackendChoice: which backend runs it, and why
    cache: Any = None  # the image cache the last split was read from


def _open(target: Path, data: Path | None, fold: int | None, split: str, out_dir: Path | None, *,
          device: str, precision: str, compile: str, images: int | None = None, backend: str | None = None) -> _Model:
    from covid_cxr.checkpoint import load_checkpoint
    from covid_cxr.data.prepared import PreparedData
    from covid_cxr.deploy.backends import make_predictor, resolve_compile
    from covid_cxr.deploy.onnx import file_sha256

    tgt = resolve_target(Path(target), data, fold, split, out_dir)
    ckpt = load_checkpoint(tgt.checkpoint)
    prepared = PreparedData(tgt.data)
    compiled = resolve_compile(compile, images or 0, backend=backend, device=device, precision=precision)
    predictor, choice = make_predictor(ckpt, file_sha256(tgt.checkpoint), backend=backend, device=device,
                                       precision=precision, compile=compiled)
    return _Model(tgt, ckpt, prepared, predictor, choice)


def _split_probs(m: _Model, split: str, *, batch_size: int, progress: bool, where: Path
                 ) -> tuple[pd.DataFrame, str, np.ndarray, float]:
    """One split's table, split hash, probabilities (model's class order) and seconds."""
    frame, split_hash = load_split(m.prepared, m.target.fold, split, m.target.run, where)
    uncovered = set(frame["label"]) - set(m.ckpt.classes)
    if uncovered:
        raise CheckpointError(
            f"{m.target.checkpoint}: predicts {', '.join(m.ckpt.classes)} but the {split} set holds "
            f"{', '.join(sorted(uncovered))}; evaluate it on data of its own classes"
        )
    cache = cache_for(m.prepared, m.ckpt.preprocessing.image_size, m.target.checkpoint, m.ckpt.preprocessing.resize,
                      progress=progress)
    m.cache = cache
    rows = np.asarray(cache.rows(frame["image_id"].to_numpy()), dtype=np.int64)
    probs, seconds = predict_rows(m.predictor, cache.images, rows, batch_size=batch_size, progress=progress,
                                  description=f"{m.ckpt.network} fold {m.target.fold} {split}")
    return frame, split_hash, probs, seconds


def choose_on_validation(m: _Model, rule: str, *, batch_size: int, progress: bool, where: Path) -> OperatingPoint:
    """The operating point ``rule`` chosen on the run's validation split (never on test)."""
    from covid_cxr.operating_point import choose_from_probs

    parse_rule(rule)  # a bad rule fails before any image is read
    frame, split_hash, probs, _ = _split_probs(m, "val", batch_size=batch_size, progress=progress, where=where)
    op = choose_from_probs(rule, probs, [normalize_label(v) for v in frame["label"]], m.ckpt.classes)
    if op.rule != "argmax":
        op = OperatingPoint.from_dict({**op.to_dict(), "validation": {**op.validation, "fold": m.target.fold,
                                                                       "split_hash": split_hash}})
    return op


def calibrate(target: Path, rule: str, *, data: Path | None = None, fold: int | None = None,
              out: Path | None = None, batch_size: int = 64, device: str = "auto", precision: str = "auto",
              progress: bool = True) -> tuple[OperatingPoint, Path]:
    """Choose ``rule`` on the run's validation split and write it into the checkpoint (atomically).

    ``target`` is a run folder (its best.pt is rewritten) or a checkpoint in a run folder (or with
    ``data``/``fold``). ``out`` writes a new checkpoint instead of rewriting. No retraining: only the
    validation split's probabilities are computed.
    """
    from covid_cxr.checkpoint import save_checkpoint

    m = _open(Path(target), data, fold, "val", None, device=device, precision=precision, compile="off")
    op = choose_on_validation(m, rule, batch_size=batch_size, progress=progress, where=Path(target))
    m.ckpt.operating_point = None if op.rule == "argmax" else op.to_dict()
    path = save_checkpoint(m.ckpt, out if out is not None else m.target.checkpoint)
    return op, path


def evaluate_run(
    target: Path,
    *,
    data: Path | None = None,
    fold: int | None = None,
    split: str = "test",
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    out_dir: Path | None = None,
    prevalence: float | None = None,
    n_boot: int = 1000,
    progress: bool = True,
    compile: str = "auto",
    operating_point: str | None = None,
    prevalences: tuple[float, ...] = DEFAULT_PREVALENCES,
    backend: str | None = None,
) -> EvaluationResult:
    """Evaluate a run folder (its ``best.pt``) or a checkpoint on one split of the prepared data.

    ``data`` and ``fold`` default to the run's ``run.json``; a bare checkpoint needs both. ``compile``
    (auto|on|off): ``torch.compile`` the network; auto does so for splits large enough to repay it.
    ``operating_point`` (e.g. ``sensitivity=0.95``) chooses a decision rule on the validation split for
    this evaluation (the checkpoint is left as it is; ``calibrate`` stores one); default: the checkpoint's.
    ``backend``: auto (None), torch or onnx (``covid_cxr.deploy.backends.choose_backend``); ``compile``
    applies when the backend is PyTorch.
    """
    where = Path(target)
    tgt = resolve_target(where, data, fold, split, out_dir)
    from covid_cxr.data.prepared import PreparedData

    n_images = len(load_split(PreparedData(tgt.data), tgt.fold, split, tgt.run, where)[0])
    m = _open(where, data, fold, split, out_dir, device=device, precision=precision, compile=compile, images=n_images,
              backend=backend)
    if operating_point is not None:
        op = choose_on_validation(m, operating_point, batch_size=batch_size, progress=progress, where=where)
    else:
        op = OperatingPoint.from_dict(m.ckpt.operating_point)
    frame, split_hash, probs, seconds = _split_probs(m, split, batch_size=batch_size, progress=progress, where=where)
    table = decided_table(frame, probs, m.ckpt.classes, op)
    preds = validate_predictions(table, str(tgt.out_dir / "predictions.csv"))
    write_predictions(table, tgt.out_dir / "predictions.csv")
    ckpt, predictor = m.ckpt, m.predictor
    info = {
        "kind": "internal",
        "network": ckpt.network,
        "fold": tgt.fold,
        "split": split,
        "checkpoint": str(tgt.checkpoint.resolve()),
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
        "batch_size": batch_size,
        "images": len(frame),
        "seconds": seconds,
        "images_per_second": len(frame) / seconds if seconds > 0 else math.nan,
        "run_status": tgt.run.get("status"),
        "best_epoch": tgt.run.get("best_epoch"),
    }
    metrics = write_evaluation(preds, tgt.out_dir, info, prevalence=prevalence, n_boot=n_boot,
                               prevalences=prevalences)
    return EvaluationResult(out_dir=tgt.out_dir, metrics=metrics, predictions=table, info=info)
