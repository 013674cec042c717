"""``covid-cxr cv DATA --network NAME --folds 1-5``: every fold in turn, each evaluated, then one report.

The verb parses ``--folds`` and the training options, checks them against the prepared folder, and calls
:func:`covid_cxr.pipeline.cv.run_cv`, which plans every fold (train, resume, or skip a finished one; a fold
folder trained with other settings is refused before anything trains), trains, evaluates and reports.
"""

from __future__ import annotations

import argparse
import sys
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


def check_options(args: argparse.Namespace) -> None:
    """Refuse a bad evaluation batch in the option's own words (the folds are checked against the data by run_cv)."""
    if args.eval_batch_size < 1:
        raise ConfigError(f"--eval-batch-size must be >= 1; got {args.eval_batch_size}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cv`` verb."""
    p = subparsers.add_parser(
        "cv",
        help="train and evaluate several folds one after another, then report over them",
        description="Trains each fold into RUNS/NETWORK-foldK, evaluates its best.pt on the fold's test split "
        "(RUN/eval-test/), and writes a report over the folds (RUNS/NETWORK-cv-report/): those asked for and "
        "the folds of NETWORK already finished and evaluated in RUNS with the same settings. Run again, it skips "
        "the finished folds and resumes an unfinished one; a fold folder with other settings is refused.",
    )
    p.add_argument("data", type=Path, help="prepared folder (covid-cxr prepare --out DATA)")
    p.add_argument("--folds", default="1-5", help="folds to run: '1-5', '2' or '1,3,5' (default 1-5)")
    p.add_argument("--eval-batch-size", type=int, default=64, metavar="B", help="evaluation batch (default 64)")
    p.add_argument("--no-eval", action="store_true", help="train only; evaluate later with covid-cxr evaluate")
    add_train_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the options against the prepared folder, then train, evaluate and report (:func:`run_cv`)."""
    # the library is loaded by the verb, not by --help
    from covid_cxr.pipeline.cv import run_cv

    folds = parse_folds(args.folds)
    check_options(args)
    base = config_from_args(args, data=str(args.data.resolve()))
    run_cv(base, folds, evaluate=not args.no_eval, eval_batch_size=args.eval_batch_size, warn=_complain)
    return 0


def _complain(line: str) -> None:
    """A line of a failed run, on standard error under the command's name."""
    print(f"covid-cxr cv: {line}", file=sys.stderr)
