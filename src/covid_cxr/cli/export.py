"""``covid-cxr export``: write a checkpoint as an ONNX model carrying its preprocessing metadata.

With ``--int8`` it also writes ``<out stem>.int8.onnx``: a static int8 model (uint8 activations x
full 8-bit int8 per-channel weights; CPUs without VNNI run them as uint8, so that nothing saturates and
every x86 CPU gives the same answers), about twice as fast on VNNI CPUs as bf16 PyTorch. Calibration images come from ``--calibration`` or, by
default, from the training run the checkpoint belongs to (``run.json`` beside it). fp32 and int8 are then compared on
the run's validation images (or, without a run, on the calibration images), and the figures are
printed and stored in the int8 model's metadata. ``predict`` and ``serve`` load either file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covid_cxr.config import (
    CALIBRATION_COUNT,
    CHECK_COUNT,
    DEFAULT_QUANT_FORMAT,
    MIN_CALIBRATION_IMAGES,
    QUANT_FORMATS,
)
from covid_cxr.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a covid-cxr checkpoint (.pt)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    p.add_argument("--out", type=Path, help="output file (default: the checkpoint's path with .onnx)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="make the batch axis dynamic (default: batch of 1; always dynamic with --int8)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the one the exporter is tested with)")
    q = p.add_argument_group("int8")
    q.add_argument("--int8", action="store_true", help="also write <out stem>.int8.onnx, calibrated and checked")
    q.add_argument("--calibration", nargs="+", metavar="PATH",
                   help="X-ray files, folders or globs to calibrate on, resized as the checkpoint records "
                   "(default: training images of the checkpoint's run, from run.json beside it)")
    q.add_argument("--calibration-count", type=int, metavar="N",
                   help=f"calibrate on at most N images (default {CALIBRATION_COUNT}; "
                   f"at least {MIN_CALIBRATION_IMAGES})")
    q.add_argument("--check-count", type=int, metavar="N",
                   help=f"compare fp32 and int8 on at most N of the run's validation images (default {CHECK_COUNT})")
    q.add_argument("--int8-format", choices=QUANT_FORMATS, help=f"int8 graph format (default {DEFAULT_QUANT_FORMAT})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covid_cxr.deploy.export import (  # torch and onnx: only when exporting
        Int8Settings,
        export_checkpoint,
    )

    int8_flags = {"--calibration": args.calibration, "--calibration-count": args.calibration_count,
                  "--check-count": args.check_count, "--int8-format": args.int8_format}
    given = {flag: value for flag, value in int8_flags.items() if value is not None}
    if given and not args.int8:
        raise ConfigError(f"{', '.join(given)} only apply with --int8; add --int8 to write an int8 model")
    int8 = None
    if args.int8:
        int8 = Int8Settings(calibration=tuple(args.calibration or ()),
                            calibration_count=_or(args.calibration_count, CALIBRATION_COUNT),
                            check_count=_or(args.check_count, CHECK_COUNT),
                            quant_format=args.int8_format or DEFAULT_QUANT_FORMAT)
    options = {} if args.opset is None else {"opset": args.opset}
    export_checkpoint(args.checkpoint, args.out, dynamic_batch=args.dynamic_batch, int8=int8, say=_stderr, **options)
    return 0


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)
