"""``covid-cxr cv DATA --network NAME --folds 1-5``: every fold in turn, each evaluated, then one report.

Each fold is an independent ``train_fold`` job (the same one ``covid-cxr train --fold K`` runs),
so folds can equally be launched on separate machines and reported together with ``covid-cxr report``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from covid_cxr.cli.train import add_train_options, config_from_args
from covid_cxr.errors import ConfigError


def parse_folds(text: str) -> list[int]:
    """``"1-5"``, ``"2"`` or ``"1,3,5"`` -> fold numbers in the order given."""
    folds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                if low > high:
                    raise ValueError(part)
                folds.extend(range(low, high + 1))
            else:
                folds.append(int(part))
    except ValueError as exc:
        raise ConfigError(f"--folds takes '1-5', '3' or '1,3,5'; got {text!r}") from exc
    if not folds or min(folds) < 1 or len(set(folds)) != len(folds):
        raise ConfigError(f"--folds must name distinct folds >= 1; got {text!r}")
    return folds


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cv`` verb."""
    p = subparsers.add_parser(
        "cv",
        help="train and evaluate several folds one after another, then report over them",
        description="Trains each fold into RUNS/NETWORK-foldK, evaluates its best.pt on the fold's test split "
        "(RUN/eval-test/), and writes a report over the folds (RUNS/NETWORK-cv-report/).",
    )
    p.add_argument("data", type=Path, help="prepared folder (covid-cxr prepare --out DATA)")
    p.add_argument("--folds", default="1-5", help="folds to run: '1-5', '2' or '1,3,5' (default 1-5)")
    p.add_argument("--eval-batch-size", type=int, default=64, metavar="B", help="evaluation batch (default 64)")
    p.add_argument("--no-eval", action="store_true", help="train only; evaluate later with covid-cxr evaluate")
    add_train_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train (and evaluate) each fold in turn, then report over them."""
    from covid_cxr.evaluate.run import (
        evaluate_run,  # the library is loaded by the verb, not by --help
    )
    from covid_cxr.inference.settings import InferenceSettings
    from covid_cxr.report.report import write_report
    from covid_cxr.train.runner import train_fold

    folds = parse_folds(args.folds)
    base = config_from_args(args, data=str(args.data))
    runs: list[Path] = []
    for k in folds:
        print(f"== fold {k} ({folds.index(k) + 1} of {len(folds)}) ==")
        run_dir = train_fold(replace(base, fold=k))
        runs.append(run_dir)
        if not args.no_eval:
            how = InferenceSettings(batch_size=args.eval_batch_size, device=base.device, precision=base.precision)
            result = evaluate_run(run_dir, how)
            print(f"fold {k}: test accuracy {float(result.metrics['accuracy']):.2f}% -> {result.out_dir}")
    if not args.no_eval:

        html = write_report(runs, Path(base.out) / f"{base.network}-cv-report")
        print(f"report: {html}")
    print("runs: " + " ".join(str(r) for r in runs))
    return 0
