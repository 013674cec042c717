"""``covid-cxr metrics PREDICTIONS.csv``: the paper's Table 3 and 4 rows, with intervals, from a predictions file."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from covid_cxr.labels import CLASSES, DISPLAY_NAMES

if TYPE_CHECKING:
    from rich.console import Console


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "metrics",
        description="Read a predictions file (columns label and pred; p_covid, p_pneumonia, p_normal and "
        "patient_id when present) and print the paper's Table 3 and Table 4 rows plus F1, balanced accuracy, "
        "AUC (patient bootstrap CI) and calibration error.",
    )
    p.add_argument("predictions", type=Path, help="predictions CSV (e.g. RUN/eval-test/predictions.csv)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write every figure to this JSON file")
    add_metric_options(p)
    p.set_defaults(func=run)


def add_metric_options(p: argparse.ArgumentParser) -> None:
    """Options shared with ``evaluate``."""
    p.add_argument("--prevalence", type=float, metavar="P",
                   help="also state precision (PPV) where the class has prevalence P (0-1), e.g. 0.05")
    p.add_argument("--prevalence-class", choices=CLASSES, default="covid", help="class --prevalence is for")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="AUC bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def check_metric_options(args: argparse.Namespace) -> None:
    if args.prevalence is not None and not 0.0 < args.prevalence < 1.0:
        raise ValueError(
            f"--prevalence must lie strictly between 0 and 1 (a fraction, 0.05 for 5%); got {args.prevalence}"
        )
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0; got {args.bootstrap}")


def _pct(m: dict[str, Any], key: str, digits: int = 2) -> str:
    value = m.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    if low is None or math.isnan(low):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def print_metrics(m: dict[str, Any], console: Console, title: str = "") -> None:
    """Table 3 (counts), Table 4 (percentages with Wilson 95% CIs) and the extra figures."""
    from rich.table import Table

    from covid_cxr.evaluate.metrics import COUNTS, RATES  # numpy and the evaluation package: only when printing

    t3 = Table(title=f"Table 3 {title}".strip())
    t3.add_column("class")
    for col in (*COUNTS, "support"):
        t3.add_column(col, justify="right")
    for c in CLASSES:
        t3.add_row(DISPLAY_NAMES[c], *(str(m[f"{c}_{k}"]) for k in COUNTS), str(m[f"{c}_n"]))
    console.print(t3)
    t4 = Table(title=" ".join(filter(None, ["Table 4", title])) + ": % [95% Wilson CI]")
    t4.add_column("class")
    for rate in RATES:
        t4.add_column(rate, justify="right")
    t4.add_column("F1", justify="right")
    t4.add_column("AUC [bootstrap CI]", justify="right")
    for c in CLASSES:
        t4.add_row(DISPLAY_NAMES[c], *(_pct(m, f"{c}_{r}") for r in RATES), _pct(m, f"{c}_f1"),
                   _pct(m, f"{c}_auc", 3) if f"{c}_auc" in m else "no probabilities")
    console.print(t4)
    lines = [f"accuracy {_pct(m, 'accuracy')} %   balanced accuracy {_pct(m, 'balanced_accuracy')} %   N = {m['n']}"]
    if "ece" in m:
        lines.append(f"expected calibration error {_pct(m, 'ece')} %   (AUC bootstrap by {m['auc_bootstrap']['unit']}, "
                     f"{m['auc_bootstrap']['resamples']} resamples)")
    for key in [k for k in m if k.endswith("_ppv_at_prevalence")]:
        lines.append(f"{key.split('_')[0]} precision at prevalence {m['prevalence']:g}: {_pct(m, key)} %")
    for note in m.get("notes", []):
        lines.append(f"[yellow]note:[/] {note}")
    console.print("\n".join(lines))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from covid_cxr.evaluate.predictions import read_predictions  # pandas and the evaluation package: only now
    from covid_cxr.evaluate.run import write_json

    check_metric_options(args)
    preds = read_predictions(args.predictions)
    metrics = preds.metrics(prevalence=args.prevalence, prevalence_class=args.prevalence_class,
                            n_boot=args.bootstrap, seed=args.seed)
    console = Console()
    print_metrics(metrics, console, title=f"({args.predictions})")
    if args.json:
        write_json(metrics, args.json)
        console.print(f"wrote {args.json}")
    return 0
