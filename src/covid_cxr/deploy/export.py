"""Export a checkpoint for deployment: the fp32 ONNX model, optionally an int8 one, and the model card.

The int8 model is static int8 (uint8 activations x full 8-bit int8 per-channel weights, which CPUs
without VNNI run in their uint8 form so that nothing saturates: :mod:`covid_cxr.deploy.quantize`), about
twice as fast on VNNI CPUs as bf16 PyTorch. Calibration images come from the caller's X-ray files or, by default, from
the training run the checkpoint belongs to (``run.json`` beside it); fp32 and int8 are then compared on
the run's validation images (or, without a run, on the calibration images), and the figures are
stored in the int8 model's metadata (:mod:`covid_cxr.deploy.calibration`) with the method both sets of
images were resized by (``resize``): the checkpoint's own. ``predict`` and ``serve`` load either file.
Both ``covid-cxr export`` and the demo call :func:`export_checkpoint`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from covid_cxr.atomic import atomic_path
from covid_cxr.config import (
    CALIBRATION_COUNT,
    CHECK_COUNT,
    DEFAULT_QUANT_FORMAT,
    MIN_CALIBRATION_IMAGES,
    QUANT_FORMATS,
)
from covid_cxr.deploy.calibration import (
    CalibrationSet,
    Int8Check,
    check_int8,
    load_calibration_files,
    read_run,
    record_in_metadata,
    run_images,
)
from covid_cxr.deploy.onnx import export_onnx
from covid_cxr.deploy.quantize import quantize_onnx
from covid_cxr.deploy.saturation import WEIGHT_SCHEME
from covid_cxr.errors import ConfigError, DataError, did_you_mean
from covid_cxr.inference.int8 import cpu_features, describe_cpu
from covid_cxr.inference.onnx_model import DEFAULT_OPSET, META_PREFIX, OnnxPredictor
from covid_cxr.inference.sink import check_writable_folder
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.checkpoint import load_checkpoint_sha256
from covid_cxr.runs.folder import BEST, LAST
from covid_cxr.runs.lock import note_if_training
from covid_cxr.runs.model_card import write_export_card

Say = Callable[[str], None]


def _quiet(_line: str) -> None:
    """The default ``say``: a library call prints nothing unless asked to."""


@dataclass(frozen=True)
class Int8Settings:
    """How the int8 model is calibrated and checked."""

    calibration: tuple[str, ...] = ()  # X-ray files, folders or globs; empty: the checkpoint's run
    calibration_count: int = CALIBRATION_COUNT  # calibrate on at most this many images (at least 8 needed)
    check_count: int = CHECK_COUNT  # compare fp32 and int8 on at most this many validation images
    quant_format: str = DEFAULT_QUANT_FORMAT

    def __post_init__(self) -> None:
        if self.calibration_count < 1 or self.check_count < 1:
            raise ConfigError("--calibration-count and --check-count must be >= 1")
        if self.quant_format not in QUANT_FORMATS:
            raise ConfigError(f"int8 format must be one of {', '.join(QUANT_FORMATS)}; got {self.quant_format!r}"
                              f"{did_you_mean(self.quant_format, QUANT_FORMATS)}")


@dataclass(frozen=True)
class ExportResult:
    """The files written, and the int8 check when an int8 model was written."""

    onnx: Path
    int8: Path | None
    card: Path
    check: Int8Check | None


def int8_path(onnx_path: Path) -> Path:
    """Where the int8 model of ``onnx_path`` goes: ``<stem>.int8.onnx`` beside it."""
    return onnx_path.with_name(f"{onnx_path.stem}.int8.onnx")


def export_checkpoint(
    checkpoint: Path,
    out: Path | None = None,
    *,
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    int8: Int8Settings | None = None,
    say: Say = _quiet,
) -> ExportResult:
    """Write ``checkpoint`` as ONNX to ``out`` (default: beside it), with ``int8`` the int8 model too, and the card.

    The int8 inputs are read before any export, so that a missing image fails fast; the int8 model's
    final name appears only once it is quantized and checked. ``say`` receives one line per step.
    """
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else checkpoint.with_suffix(".onnx")
    if out.suffix.lower() != ".onnx" or out.resolve() == checkpoint.resolve():
        raise ConfigError(f"--out {out}: an exported model is written to a file ending in .onnx (predict and serve "
                          f"tell formats by it), never over the checkpoint; e.g. --out {checkpoint.with_suffix('.onnx')}")
    if out.is_dir():
        raise ConfigError(f"--out {out}: a folder; name the .onnx file in it, e.g. --out {out / 'model.onnx'}")
    check_writable_folder(out.parent, f"--out {out}")  # before minutes of export and calibration, not after
    if checkpoint.name in (BEST, LAST):
        note_if_training(checkpoint.parent, "this export")
    ckpt, sha256 = load_checkpoint_sha256(checkpoint)
    images = int8_inputs(checkpoint, ckpt.preprocessing, ckpt.classes, int8, say) if int8 else None
    dynamic = dynamic_batch or int8 is not None  # int8 is for throughput: batches of any size
    kept_int8 = _remove_stale_int8(int8_path(out), sha256, say)
    export_onnx(ckpt, out, dynamic_batch=dynamic, opset=opset, source_sha256=sha256)
    fp32 = OnnxPredictor(out)  # proves the file loads and its metadata rebuilds the preprocessing
    pre = fp32.preprocessing
    say(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {ckpt.network}, opset {opset}, "
        f"batch {'dynamic' if dynamic else '1'}, input {pre.image_size}x{pre.image_size} scaling {pre.scaling}, "
        f"classes {','.join(fp32.classes)}")
    check = None
    if int8 is not None and images is not None:
        check = write_int8(out, fp32, images, int8.quant_format, say)
    written = [out, int8_path(out)] if check is not None else [out]
    # an int8 file of these very weights, kept from an earlier export, is still this model's: the card lists it
    card = write_export_card(ckpt, checkpoint, [*written, int8_path(out)] if kept_int8 and check is None else written)
    say(f"wrote {card}")
    return ExportResult(out, written[1] if check is not None else None, card, check)


def _remove_stale_int8(path: Path, sha256: str, say: Say) -> bool:
    """Remove an int8 model beside ``out`` that was made from other weights than the checkpoint being exported;
    True when one of these same weights is there and kept.

    Left there, it would sit beside the new fp32 file under the same stem, and ``predict``/``serve`` would run
    the old weights without a word; an int8 file of these same weights is kept.
    """
    if not path.is_file():
        return False
    import onnx  # deferred: about 1 s to import, and only needed when an int8 file is there

    try:
        meta = {p.key: p.value for p in onnx.load(os.fspath(path), load_external_data=False).metadata_props}
    except Exception:  # noqa: BLE001 - an unreadable file there is stale whatever it holds
        meta = {}
    if meta.get(f"{META_PREFIX}source_sha256") == sha256:
        return True
    path.unlink()
    say(f"removed {path}: an int8 model of other weights than {sha256[:12]}, which would have sat beside the new "
        "fp32 file (export with --int8 to write one of these weights)")
    return False


def int8_inputs(checkpoint: Path, pre: Preprocessing, classes: tuple[str, ...], settings: Int8Settings,
                say: Say = _quiet) -> CalibrationSet:  # fmt: skip
    """Calibration and check images: the caller's files when given, else (and for the check) the checkpoint's run.

    All of them at the model's input size, resized by its method (``pre``), as ``predict`` feeds it.
    """
    from_run = None
    run_problem = "no run.json beside it"
    try:
        run = read_run(checkpoint)
        if run is not None:
            from_run = run_images(checkpoint, run, pre, classes, calibration_count=settings.calibration_count,
                                  check_count=settings.check_count)
    except DataError as exc:
        run_problem = f"its run's data cannot be used ({exc})"
    if settings.calibration:
        failures: list[tuple[str, str]] = []
        calib = load_calibration_files(list(settings.calibration), pre, settings.calibration_count, failures)
        for path, reason in failures:
            say(f"skipped: {path}: {reason}")
        calib_source = f"images from {' '.join(settings.calibration)}"
        _enough(len(calib), calib_source)
        if from_run is not None:
            return replace(from_run, calibration=calib, calibration_source=calib_source)
        say(f"note: {checkpoint}: {run_problem}, so int8 is checked against fp32 on the calibration images, "
            "without labels")
        return CalibrationSet(calib, calib_source, calib, None, "calibration images", pre.resize)
    if from_run is None:
        raise ConfigError(f"{checkpoint}: no calibration images for --int8: {run_problem}. Pass --calibration "
                          "with a folder of X-rays like those the model will see (a few dozen of each class)")
    _enough(len(from_run.calibration), from_run.calibration_source)
    return from_run


def _enough(count: int, source: str) -> None:
    """Refuse too few calibration images before the (slow) fp32 export rather than after it."""
    if count < MIN_CALIBRATION_IMAGES:
        raise ConfigError(f"--int8 needs at least {MIN_CALIBRATION_IMAGES} calibration images; the {source} give "
                          f"{count}. Pass --calibration with more X-rays like those the model will see")


def write_int8(fp32_path: Path, fp32: OnnxPredictor, images: CalibrationSet, quant_format: str,
               say: Say = _quiet) -> Int8Check:  # fmt: skip
    """Quantize beside the fp32 file, check, store the figures; the final name appears only when all is done."""
    final = int8_path(fp32_path)
    with atomic_path(final, suffix=".partial.onnx") as tmp:
        with _root_logger_at(logging.ERROR):  # ORT's quantizer logs advice on the root logger that does not apply
            quantize_onnx(fp32_path, tmp, images.calibration, quant_format=quant_format)
        result = check_int8(fp32, OnnxPredictor(tmp), images.check_images, images.check_labels, images.check_source)
        record_in_metadata(tmp, {"calibration_source": images.calibration_source, "check": result.as_dict(),
                                 "checked_on": cpu_features(), "resize": images.resize})
    say(f"wrote {final} ({final.stat().st_size / 2**20:.1f} MiB): int8 {quant_format} (uint8 activations, "
        f"{WEIGHT_SCHEME}), calibrated on {len(images.calibration)} {images.calibration_source} "
        f"(resized by '{images.resize}', as the model resizes)")
    say(f"{result.summary()}; on {describe_cpu(cpu_features())}")
    problems = result.problems()
    if problems:
        say(f"warning: {final}: int8 {' and '.join(problems)}; calibrate on more images "
            "(--calibration-count, or --calibration with X-rays like those the model will see) or stay with "
            f"{fp32_path.name} (fp32) or the checkpoint in bf16")
    return result


@contextmanager
def _root_logger_at(level: int) -> Iterator[None]:
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(before)
