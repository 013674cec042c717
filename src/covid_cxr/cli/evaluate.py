"""``covid-cxr evaluate RUN_OR_CHECKPOINT``: batched inference on a prepared split, then every table and plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from covid_cxr.cli.metrics import add_metric_options, check_metric_options, print_metrics
from covid_cxr.deploy.backends import BACKENDS
from covid_cxr.evaluate.run import SPLITS, evaluate_run
from covid_cxr.inference import COMPILE_CHOICES, COMPILE_MIN_IMAGES
from covid_cxr.runtime import PRECISIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a run (its best.pt) or a checkpoint on a fold's test or validation split",
        description="Writes predictions.csv, metrics.json, table3.csv, table4.csv, confusion_matrix.png/.pdf, "
        "roc.png and calibration.png into RUN/eval-SPLIT/ (for a checkpoint: next to it, or --out).",
    )
    p.add_argument("target", type=Path, help="run folder (with run.json and best.pt) or a .pt checkpoint")
    p.add_argument("--data", type=Path, help="prepared data folder (default: the run's run.json 'data')")
    p.add_argument("--fold", type=int, help="fold, 1-based (default: the run's fold; needed for a bare checkpoint)")
    p.add_argument("--split", choices=SPLITS, default="test", help="which split to evaluate (default test)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="autocast precision (default auto)")
    p.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help=f"torch.compile the network (default auto: for splits of {COMPILE_MIN_IMAGES}+ images, "
                   "where the compilation pays for itself)")
    p.add_argument("--backend", choices=BACKENDS, help="auto (default: the fastest exact path here), torch or onnx")
    p.add_argument("--out", type=Path, help="output folder (default RUN/eval-SPLIT or CKPT_STEM-eval-SPLIT)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_metric_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_metric_options(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    result = evaluate_run(
        args.target, data=args.data, fold=args.fold, split=args.split, batch_size=args.batch_size,
        device=args.device, precision=args.precision, out_dir=args.out, prevalence=args.prevalence,
        n_boot=args.bootstrap, progress=not args.no_progress, compile=args.compile, backend=args.backend,
    )
    console = Console()
    info = result.info
    console.print(f"{info['network']} fold {info['fold']} {info['split']}: {info['images']} images in "
                  f"{info['seconds']:.1f} s ({info['images_per_second']:.1f} images/s; {info['runtime']})")
    print_metrics(result.metrics, console)
    console.print(f"wrote {result.out_dir}")
    return 0
