"""``covid-cxr demo [--out DIR] [--small]``: the whole pipeline on an embedded synthetic default.

synthetic data in both public layouts -> ``prepare`` -> the concatenated network trained with the
``cpu`` preset on fold 1 through every phase -> evaluation on the fold's test split -> report ->
``export --int8`` (ONNX, and int8 checked against it on the fold's validation images).
Needs no data and no download. The default sizes its training to ``--minutes`` (10) on the machine it
runs on: it times a few training steps first and picks the largest plan of
:data:`~covid_cxr.pipeline.budget.PLANS` that fits (see :mod:`covid_cxr.pipeline.budget`); ``--plan``
fixes one. ``--small`` (CI) is one fixed, smaller run of a few minutes. The pipeline itself is
:func:`covid_cxr.pipeline.demo.run_demo`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from covid_cxr import fmt
from covid_cxr.cli import seed
from covid_cxr.config import PRECISIONS
from covid_cxr.errors import ConfigError
from covid_cxr.networks import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

if TYPE_CHECKING:
    from covid_cxr.pipeline.budget import DemoPlan


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        description="Runs the whole pipeline on a synthetic dataset made on the spot and prints where "
        "everything is. The training is sized to --minutes (10) on this machine: a few timed training steps "
        "at the start pick the largest plan projected to fit, and the choice is printed. --small is a fixed, "
        "CI-sized run of a few minutes.",
    )
    p.add_argument("--out", type=Path, default=Path("covid-cxr-demo"), help="output folder (default covid-cxr-demo)")
    p.add_argument("--small", action="store_true", help="a smaller, quicker run (CI size)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the data, splits and training (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="autocast precision (default auto)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="time budget: the training is sized, by a timed probe, to finish the demo within it (default 10)")
    p.add_argument("--plan", type=parse_plan, metavar="SIDExEPOCHS",
                   help="train this plan instead of sizing to --minutes, e.g. 96x5 (96 px, 5 epochs a phase)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.small and args.plan is not None:
        raise ConfigError("--small is a fixed plan; give --small or --plan, not both")
    if not 0 < args.minutes < float("inf"):
        raise ConfigError(f"--minutes must be a number of minutes above 0; got {args.minutes}")
    from covid_cxr.deploy.saturation import agreement_words
    from covid_cxr.pipeline.demo import (
        run_demo,  # the whole library: only when the demo runs
    )

    result = run_demo(args.out, small=args.small, seed=args.seed, device=args.device, precision=args.precision,
                      minutes=args.minutes, plan=args.plan)  # fmt: skip
    s = result["seconds"]
    print()
    print(f"plan                {result['plan'].describe()}")
    print(f"synthetic datasets  {result['synthetic']}  ({s['synthetic']:.0f} s)")
    print(f"prepared data       {result['data']}  ({s['prepare']:.0f} s)")
    print(f"training run        {result['run']}  ({s['train']:.0f} s; best checkpoint {result['best']})")
    print(f"evaluation          {result['evaluation']}  ({s['evaluate']:.0f} s)")
    print(f"report              {result['report']}")
    check = result["int8_check"]
    print(f"ONNX + int8         {result['onnx']}, {result['int8']}  ({s['export']:.0f} s; int8 agrees with fp32 on "
          f"{check['images']} validation images: {agreement_words(check)})")
    # Balanced accuracy has no interval computed (the report has every class's recall with its own): not shown here.
    print(f"test accuracy {fmt.with_ci(result['test_accuracy'], *result['test_accuracy_ci'])} on "
          f"{result['test_images']} synthetic test images; total {s['total'] / 60:.1f} min")  # fmt: skip
    return 0


def parse_plan(text: str) -> DemoPlan:
    """``96x5`` -> 96 px, 5 epochs a phase (``--plan``)."""
    from covid_cxr.pipeline.budget import (
        DemoPlan,  # torch: only when --plan is given, never for --help
    )

    side, sep, epochs = text.lower().partition("x")
    if (not sep or not side.isdigit() or not epochs.isdigit() or int(epochs) < 1
            or not MIN_IMAGE_SIZE <= int(side) <= MAX_IMAGE_SIZE):
        raise argparse.ArgumentTypeError(f"--plan takes SIDExEPOCHS with SIDE from {MIN_IMAGE_SIZE} to "
                                         f"{MAX_IMAGE_SIZE} px and EPOCHS >= 1, e.g. 96x5 (96 px, 5 epochs a phase); "
                                         f"got {text!r}")
    return DemoPlan(image_size=int(side), epochs_per_phase=int(epochs))
