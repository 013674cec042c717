"""``covid-cxr export``: write a checkpoint as an ONNX model carrying its preprocessing metadata.

With ``--int8`` it also writes ``<out stem>.int8.onnx``: a static int8 model (uint8 activations x
int8 per-channel weights kept to 7 bits, so that CPUs without VNNI cannot saturate them), about
twice as fast on VNNI CPUs as bf16 PyTorch. Calibration images come from ``--calibration`` or, by
default, from the training run the checkpoint belongs to (``run.json`` beside it). fp32 and int8 are then compared on
the run's validation images (or, without a run, on the calibration images), and the figures are
printed and stored in the int8 model's metadata. ``predict`` and ``serve`` load either file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from covid_cxr.atomic import file_sha256
from covid_cxr.deploy.onnx import export_onnx
from covid_cxr.deploy.quantize import DEFAULT_FORMAT, QUANT_FORMATS
from covid_cxr.errors import ConfigError, DataError
from covid_cxr.inference.onnx_model import DEFAULT_OPSET, OnnxPredictor
from covid_cxr.runs.checkpoint import load_checkpoint

if TYPE_CHECKING:  # onnx and the data area load only with --int8
    from covid_cxr.deploy.calibration import CalibrationSet

CALIBRATION_COUNT = 64  # about 21 per class, as benchmarks/reference.py calibrates; memory stays at one batch
CHECK_COUNT = 300  # paired: the agreement figure shows changes much smaller than each accuracy's interval


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX (with its preprocessing in the metadata), "
                       "optionally also as int8", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a covid-cxr checkpoint (.pt)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    p.add_argument("--out", type=Path, help="output file (default: the checkpoint's path with .onnx)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="make the batch axis dynamic (default: batch of 1; always dynamic with --int8)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    q = p.add_argument_group("int8")
    q.add_argument("--int8", action="store_true", help="also write <out stem>.int8.onnx, calibrated and checked")
    q.add_argument("--calibration", nargs="+", metavar="PATH",
                   help="X-ray files, folders or globs to calibrate on (default: training images of the "
                   "checkpoint's run, from run.json beside it)")
    q.add_argument("--calibration-count", type=int, metavar="N",
                   help=f"calibrate on at most N images (default {CALIBRATION_COUNT}; at least 8)")
    q.add_argument("--check-count", type=int, metavar="N",
                   help=f"compare fp32 and int8 on at most N of the run's validation images (default {CHECK_COUNT})")
    q.add_argument("--int8-format", choices=QUANT_FORMATS, help=f"int8 graph format (default {DEFAULT_FORMAT})")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    int8_flags = {"--calibration": args.calibration, "--calibration-count": args.calibration_count,
                  "--check-count": args.check_count, "--int8-format": args.int8_format}
    given = [flag for flag, value in int8_flags.items() if value is not None]
    if given and not args.int8:
        raise ConfigError(f"{', '.join(given)} only apply with --int8; add --int8 to write an int8 model")
    args.calibration_count = CALIBRATION_COUNT if args.calibration_count is None else args.calibration_count
    args.check_count = CHECK_COUNT if args.check_count is None else args.check_count
    args.int8_format = args.int8_format or DEFAULT_FORMAT
    if args.calibration_count < 1 or args.check_count < 1:
        raise ConfigError("--calibration-count and --check-count must be >= 1")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    ckpt = load_checkpoint(args.checkpoint)
    out = args.out or args.checkpoint.with_suffix(".onnx")
    prepared = _int8_inputs(args, ckpt.preprocessing.image_size, ckpt.classes) if args.int8 else None
    dynamic = args.dynamic_batch or args.int8  # int8 is for throughput: batches of any size
    export_onnx(ckpt, out, dynamic_batch=dynamic, opset=args.opset, source_sha256=file_sha256(args.checkpoint))
    check = OnnxPredictor(out)  # proves the file loads and its metadata rebuilds the preprocessing
    pre = check.preprocessing
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {ckpt.network}, opset {args.opset}, "
          f"batch {'dynamic' if dynamic else '1'}, input {pre.image_size}x{pre.image_size} scaling {pre.scaling}, "
          f"classes {','.join(check.classes)}", file=sys.stderr)
    if prepared is not None:
        _write_int8(args, out, check, prepared)
    from covid_cxr.runs.model_card import write_export_card

    int8 = [out.with_name(f"{out.stem}.int8.onnx")] if prepared is not None else []
    print(f"wrote {write_export_card(ckpt, args.checkpoint, [out, *int8])}", file=sys.stderr)
    return 0


def _int8_inputs(args: argparse.Namespace, image_size: int, classes: tuple[str, ...]) -> CalibrationSet:
    """Calibration and check images, read before any export so that a missing image fails fast."""
    from covid_cxr.deploy.calibration import (
        CalibrationSet,
        load_calibration_files,
        read_run,
        run_images,
    )

    from_run = None
    run_problem = "no run.json beside it"
    try:
        run = read_run(args.checkpoint)
        if run is not None:
            from_run = run_images(args.checkpoint, run, image_size, classes, calibration_count=args.calibration_count,
                                  check_count=args.check_count)
    except DataError as exc:
        run_problem = f"its run's data cannot be used ({exc})"
    if args.calibration:
        failures: list[tuple[str, str]] = []
        calib = load_calibration_files(args.calibration, image_size, args.calibration_count, failures)
        for path, reason in failures:
            print(f"skipped: {path}: {reason}", file=sys.stderr)
        calib_source = f"images from {' '.join(args.calibration)}"
        _enough(len(calib), calib_source)
        if from_run is not None:
            return replace(from_run, calibration=calib, calibration_source=calib_source)
        print(f"note: {args.checkpoint}: {run_problem}, so int8 is checked against fp32 on the calibration images, "
              "without labels", file=sys.stderr)
        return CalibrationSet(calib, calib_source, calib, None, "calibration images")
    if from_run is None:
        raise ConfigError(f"{args.checkpoint}: no calibration images for --int8: {run_problem}. Pass --calibration "
                          "with a folder of X-rays like those the model will see (a few dozen of each class)")
    _enough(len(from_run.calibration), from_run.calibration_source)
    return from_run


def _enough(count: int, source: str) -> None:
    """Refuse too few calibration images before the (slow) fp32 export rather than after it."""
    from covid_cxr.deploy.quantize import MIN_CALIBRATION_IMAGES

    if count < MIN_CALIBRATION_IMAGES:
        raise ConfigError(f"--int8 needs at least {MIN_CALIBRATION_IMAGES} calibration images; the {source} give "
                          f"{count}. Pass --calibration with more X-rays like those the model will see")


def _write_int8(args: argparse.Namespace, fp32_path: Path, fp32: OnnxPredictor, images: CalibrationSet) -> None:
    """Quantize beside the fp32 file, check, store the figures; the final name appears only when all is done."""
    from covid_cxr.deploy.calibration import check_int8, record_in_metadata
    from covid_cxr.deploy.quantize import quantize_onnx
    from covid_cxr.deploy.saturation import WEIGHT_SCHEME, cpu_features, describe_cpu

    final = fp32_path.with_name(f"{fp32_path.stem}.int8.onnx")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial.onnx", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ORT's quantizer logs advice on the root logger that does not apply here
        try:
            quantize_onnx(fp32_path, tmp, images.calibration, quant_format=args.int8_format)
        finally:
            root.setLevel(level)
        result = check_int8(fp32, OnnxPredictor(tmp), images.check_images, images.check_labels, images.check_source)
        record_in_metadata(tmp, {"calibration_source": images.calibration_source, "check": result.as_dict(),
                                 "checked_on": cpu_features()})
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {final} ({final.stat().st_size / 2**20:.1f} MiB): int8 {args.int8_format} (uint8 activations, "
          f"{WEIGHT_SCHEME}), calibrated on {len(images.calibration)} {images.calibration_source}",
          file=sys.stderr)
    print(f"{result.summary()}; on {describe_cpu(cpu_features())}", file=sys.stderr)
    problems = result.problems()
    if problems:
        print(f"warning: {final}: int8 {' and '.join(problems)}; calibrate on more images "
              "(--calibration-count, or --calibration with X-rays like those the model will see) or stay with "
              f"{fp32_path.name} (fp32) or the checkpoint in bf16", file=sys.stderr)
