"""``covid-cxr report RUN...``: per-fold tables, mean ± sd over folds, pooled CIs, the paper beside ours."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        description="Each RUN is a run folder (its eval-test/ is read, and its external-*/ evaluations are put beside "
        "it), an evaluation folder or a predictions CSV. Runs are grouped by network; each fold may appear once per "
        "network. External evaluations ('evaluate --external') are compared with their network's internal test.",
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="evaluated runs (one per fold)")
    p.add_argument("--out", type=Path, default=Path("report"), help="output folder (default ./report)")
    p.add_argument("--network-label", help="display name for the runs' network (one network only); a paper "
                   "name (Xception, ResNet50V2, Concatenated) also picks the paper row to compare with")
    p.add_argument("--audit", type=Path, metavar="DIR", help="audit results to add as the 'Did it learn the "
                   "disease?' section: a run folder or its audit/ folder ('covid-cxr audit' writes them)")
    p.add_argument("--allow-mixed-settings", action="store_true",
                   help="report folds of one network trained with different settings (config.yaml) together; each "
                   "fold's settings are listed and the mean is marked mixed (default: refused; seeds may differ)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="AUC bootstrap resamples (default 1000)")
    p.add_argument("--prevalences", metavar="P,P,...",
                   help="state COVID-19 PPV and NPV at the operating point at these prevalences "
                   "(default 0.01,0.05,0.2; 5%% also works)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from covid_cxr.report.report import (
        write_report,  # the library (pandas, matplotlib) loads only when run
    )
    from covid_cxr.runs.results import load_results
    from covid_cxr.stats import DEFAULT_PREVALENCES, parse_prevalences

    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0; got {args.bootstrap}")
    prevalences = parse_prevalences(args.prevalences) if args.prevalences is not None else DEFAULT_PREVALENCES
    audit = None
    if args.audit is not None:
        if not args.audit.is_dir():
            raise FileNotFoundError(f"{args.audit}: no such folder; give a run folder or its audit/ folder")
        audit = load_results(args.audit)
        if audit is None:
            raise FileNotFoundError(f"{args.audit}: no audit results (source.json, ablation.json, ...); "
                                    "run 'covid-cxr audit' on the model first")
    path = write_report(args.runs, args.out, network_label=args.network_label, audit=audit, n_boot=args.bootstrap,
                        prevalences=prevalences, allow_mixed_settings=args.allow_mixed_settings)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0
