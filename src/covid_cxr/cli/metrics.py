"""``covid-cxr metrics PREDICTIONS.csv``: the paper's Table 3 and 4 rows, with intervals, from a predictions file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covid_cxr import fmt
from covid_cxr.cli import seed
from covid_cxr.labels import CLASSES, DISPLAY_NAMES

if TYPE_CHECKING:
    pass


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
    p.add_argument("--seed", type=seed, default=0, help="bootstrap seed (default 0)")


def check_metric_options(args: argparse.Namespace) -> None:
    if args.prevalence is not None and not 0.0 < args.prevalence < 1.0:
        raise ValueError(
            f"--prevalence must lie strictly between 0 and 1 (a fraction, 0.05 for 5%); got {args.prevalence}"
        )
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0; got {args.bootstrap}")


def _ci(m: dict[str, Any], key: str, digits: int = 2) -> str:
    """Figure ``key`` of ``m`` with its interval when it has one."""
    return fmt.interval(m.get(key), m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high"), digits)


def _auc(m: dict[str, Any], c: str) -> str:
    """Class ``c``'s AUC with its bootstrap interval; ``[n/a]`` where the bootstrap ran but could not vary."""
    key = f"{c}_auc"
    if key not in m:
        return "no probabilities"
    cell = _ci(m, key, 3)
    ran = (m.get("auc_bootstrap") or {}).get("resamples", 0) >= 1
    bounds = (m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high"))
    if ran and not fmt.missing(m[key]) and any(fmt.missing(b) for b in bounds):
        cell += f" [{fmt.NA}]"  # a note says why; the value alone would read as a figure that has no interval
    return cell


def print_metrics(m: dict[str, Any], console: Any, title: str = "") -> None:
    """Table 3 (counts), Table 4 (percentages with Wilson 95% CIs) and the extra figures, on a rich console."""
    from covid_cxr.evaluate.metrics import (  # NumPy loads only when a verb prints metrics
        COUNTS,
        RATES,
    )

    t3 = fmt.table_of(["class", *COUNTS, "support"],
                      [[DISPLAY_NAMES[c], *(m[f"{c}_{k}"] for k in COUNTS), m[f"{c}_n"]] for c in CLASSES])
    console.print(t3.rich(f"Table 3 {title}".strip()))
    t4 = fmt.table_of(["class", *RATES, "F1", "AUC [bootstrap CI]"],
                      [[DISPLAY_NAMES[c], *(_ci(m, f"{c}_{r}") for r in RATES), _ci(m, f"{c}_f1"),
                        _auc(m, c)] for c in CLASSES])
    console.print(t4.rich(" ".join(filter(None, ["Table 4", title]))
                          + f": % [95% CI: {m.get('rate_intervals', {}).get('label', 'Wilson')}]"))
    lines = [f"accuracy {_ci(m, 'accuracy')} %   balanced accuracy {_ci(m, 'balanced_accuracy')} %   N = {m['n']}"]
    if "ece" in m:
        lines.append(f"expected calibration error {_ci(m, 'ece')} %   (AUC bootstrap by {m['auc_bootstrap']['unit']}, "
                     f"{m['auc_bootstrap']['resamples']} resamples)")
    for key in [k for k in m if k.endswith("_ppv_at_prevalence")]:
        lines.append(f"{key.split('_')[0]} precision at prevalence {m['prevalence']:g}: {_ci(m, key)} %")
    for note in m.get("notes", []):
        lines.append(f"[yellow]note:[/] {note}")
    console.print("\n".join(lines))


def run(args: argparse.Namespace) -> int:
    """Read the predictions, print the tables, write the JSON when asked."""
    from rich.console import Console

    from covid_cxr.evaluate.predictions import read_predictions
    from covid_cxr.evaluate.run import write_json

    check_metric_options(args)
    preds = read_predictions(args.predictions)
    metrics = preds.metrics(prevalence=args.prevalence, prevalence_class=args.prevalence_class,
                            n_boot=args.bootstrap, seed=args.seed)
    console = Console()
    print_metrics(metrics, console, title=f"({args.predictions})")
    if args.json:
        write_json(args.json, metrics)
        console.print(f"wrote {args.json}")
    return 0
