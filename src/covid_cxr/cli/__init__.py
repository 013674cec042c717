"""The ``covid-cxr`` command: a few verbs, each in its own module under ``covid_cxr.cli``.

Each verb module defines ``register(subparsers)``, which adds its parser and sets
``func=run`` where ``run(args) -> int`` does the work. Verbs stay thin: parse, call the
library, print. Errors a user can fix (``CovidCxrError``, ``ValueError``,
``FileNotFoundError``) are printed as one line and exit with status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from covid_cxr import __version__

# Order here is the order in --help. Add a verb by adding its module name.
VERBS: tuple[str, ...] = (
    "synth", "prepare",
    "train", "cv", "demo",
    "evaluate", "calibrate",
    "metrics",
    "report",
    "predict", "export", "serve", "model-card",
    "import-keras",
    "audit",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covid-cxr",
        description=(
            "Chest X-ray classifiers for COVID-19, pneumonia and normal: reproduce Rahimzadeh & Attar (2020), "
            "train on your own X-rays, evaluate with confidence intervals, audit, and deploy."
        ),
    )
    parser.add_argument("--version", action="version", version=f"covid-cxr {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for name in VERBS:
        module = importlib.import_module(f"covid_cxr.cli.{name.replace('-', '_')}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as exc:
        print(f"covid-cxr {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"covid-cxr {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
