"""``covid-cxr export``: write a checkpoint as an ONNX model carrying its preprocessing metadata."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covid_cxr.checkpoint import load_checkpoint
from covid_cxr.deploy.onnx import DEFAULT_OPSET, OnnxPredictor, export_onnx, file_sha256


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX (with its preprocessing in the metadata)",
                       description=__doc__)
    p.add_argument("checkpoint", type=Path, help="a covid-cxr checkpoint (.pt)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    p.add_argument("--out", type=Path, help="output file (default: the checkpoint's path with .onnx)")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch axis dynamic (default: batch of 1)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    out = args.out or args.checkpoint.with_suffix(".onnx")
    export_onnx(ckpt, out, dynamic_batch=args.dynamic_batch, opset=args.opset,
                source_sha256=file_sha256(args.checkpoint))
    check = OnnxPredictor(out)  # proves the file loads and its metadata rebuilds the preprocessing
    pre = check.preprocessing
    batch = "dynamic" if args.dynamic_batch else "1"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {ckpt.network}, opset {args.opset}, batch {batch}, "
          f"input {pre.image_size}x{pre.image_size} scaling {pre.scaling}, classes {','.join(check.classes)}",
          file=sys.stderr)
    return 0
