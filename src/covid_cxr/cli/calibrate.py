"""``covid-cxr calibrate RUN_OR_CHECKPOINT --operating-point RULE``: set the decision rule without retraining.

The rule's threshold is chosen on fp32 probabilities of the run's validation split (whatever
--precision says: the fp32 model is the one export ships) and written into the checkpoint (atomically: a crash leaves the old file or the new one), where ``predict``,
``serve``, ``evaluate``, ``export`` and the report find it. ``--out`` writes a copy instead.
Rules: argmax (the paper's; removes a stored threshold), youden, sensitivity=T, specificity=T.
Where the validation split shares images with the test split (data prepared with --protocol paper),
calibrate refuses: the threshold would be fitted on test images. --allow-test-overlap chooses it
anyway, and the checkpoint, evaluate, the report and the model card then say so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from covid_cxr.choices import PRECISIONS
from covid_cxr.config import FORMS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", type=Path, help="run folder (its best.pt is rewritten) or a .pt checkpoint")
    p.add_argument("--operating-point", required=True, metavar="RULE", help=f"one of: {FORMS}")
    p.add_argument("--data", type=Path, help="prepared data folder (default: the run's run.json 'data')")
    p.add_argument("--fold", type=int, help="fold, 1-based (default: the run's fold)")
    p.add_argument("--out", type=Path, help="write the calibrated checkpoint here instead of rewriting TARGET's")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="ignored for choosing: the threshold is always chosen on fp32 probabilities (ONNX Runtime or "
                   "PyTorch fp32), the ones an exported ONNX model gives")
    p.add_argument("--allow-test-overlap", action="store_true",
                   help="choose the threshold even where the validation split shares images with test (--protocol "
                   "paper); the record, evaluate, the report and the model card then say so")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covid_cxr.evaluate.run import (
        calibrate,  # torch and the evaluation package: only when calibrating
    )
    from covid_cxr.inference.settings import InferenceSettings
    from covid_cxr.operating_point import parse_rule

    parse_rule(args.operating_point)  # refuse a bad rule before loading anything
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.out is not None and args.out.suffix != ".pt":
        raise ValueError(f"--out must end in .pt; got {args.out}")
    settings = InferenceSettings(batch_size=args.batch_size, device=args.device, precision=args.precision)
    op, path = calibrate(args.target, args.operating_point, settings, data=args.data, fold=args.fold, out=args.out,
                         progress=not args.no_progress, allow_test_overlap=args.allow_test_overlap)
    print(f"operating point: {op.describe()}")
    if op.chosen_on():
        print(op.chosen_on())
    print(f"wrote {path}; 'covid-cxr evaluate' and 'covid-cxr export' use it from now on")
    return 0
