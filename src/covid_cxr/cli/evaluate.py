"""``covid-cxr evaluate RUN_OR_CHECKPOINT``: batched inference on a prepared split, then every table and plot.

``--external DATA_OR_CSV --name NAME`` evaluates the model (a run, a checkpoint or an exported
ONNX model) on another labelled set instead, into ``RUN/external-NAME/``; ``report RUN`` then
shows it beside the internal test evaluation of the same model file and rule.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covid_cxr import fmt
from covid_cxr.choices import BACKENDS, COMPILE_CHOICES, COMPILE_MIN_IMAGES, PRECISIONS
from covid_cxr.cli.metrics import (
    add_metric_options,
    check_metric_options,
    print_metrics,
)
from covid_cxr.config import FORMS, SPLITS

if TYPE_CHECKING:
    from rich.console import Console

    from covid_cxr.evaluate.run import EvaluationResult
    from covid_cxr.inference.settings import InferenceSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        description="Writes predictions.csv, metrics.json, table3.csv, table4.csv, confusion_matrix.png/.pdf, "
        "roc.png and calibration.png into RUN/eval-SPLIT/ (for a checkpoint: next to it, or --out).",
    )
    p.add_argument("target", type=Path, help="run folder (with run.json and best.pt), a .pt checkpoint, or (with "
                   "--external) an exported .onnx model")
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
    p.add_argument("--operating-point", metavar="RULE",
                   help=f"decide by RULE, chosen now on fp32 probabilities of the run's validation split ({FORMS}); "
                   "default: the checkpoint's rule (argmax when it has none). 'covid-cxr calibrate' stores a rule "
                   "in the checkpoint")
    p.add_argument("--allow-test-overlap", action="store_true",
                   help="with --operating-point: choose it even where the validation split shares images with test "
                   "(--protocol paper); every output then says the threshold was fitted on test images")
    p.add_argument("--prevalences", metavar="P,P,...",
                   help="state COVID-19 PPV and NPV at these prevalences (default 0.01,0.05,0.2; 5%% also works)")
    ext = p.add_argument_group("external validation")
    ext.add_argument("--external", type=Path, metavar="DATA_OR_CSV",
                     help="evaluate on another labelled set: a prepared data folder (its whole manifest), a folder "
                     "with one sub-folder per class, or a CSV with path,label[,patient_id,source] columns")
    ext.add_argument("--name", help="name of the external set (default: its folder's name; a CSV's file name where "
                     "it says more than 'labels'); output goes to RUN/external-NAME/ (for a model file of the run "
                     "other than best.pt: RUN/external-NAME-FILE/). An evaluation of another set under that name is "
                     "replaced only when --name is given")
    ext.add_argument("--workers", type=int, default=2, help="for --external: threads decoding images (default 2)")
    add_metric_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from covid_cxr.evaluate.run import evaluate_run  # the evaluation library: only now
    from covid_cxr.inference.settings import InferenceSettings
    from covid_cxr.stats import DEFAULT_PREVALENCES, parse_prevalences

    check_metric_options(args)
    prevalences = parse_prevalences(args.prevalences) if args.prevalences is not None else DEFAULT_PREVALENCES
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    settings = InferenceSettings(batch_size=args.batch_size, device=args.device, precision=args.precision,
                                 backend=args.backend)
    if args.external is None:
        for flag in ("name",):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} applies to --external; add --external DATA_OR_CSV")
        if args.allow_test_overlap and args.operating_point is None:
            raise ValueError("--allow-test-overlap applies to --operating-point (or 'covid-cxr calibrate'); "
                             "add --operating-point RULE or drop it")
        result = evaluate_run(
            args.target, settings, data=args.data, fold=args.fold, split=args.split, out_dir=args.out,
            prevalence=args.prevalence, prevalence_class=args.prevalence_class, n_boot=args.bootstrap,
            seed=args.seed, progress=not args.no_progress, compile=args.compile,
            operating_point=args.operating_point, allow_test_overlap=args.allow_test_overlap, prevalences=prevalences,
        )
        title = f"{result.info['network']} fold {result.info['fold']} {result.info['split']}"
    else:
        result = _external(args, settings, prevalences)
        title = f"{result.info['network']} on {result.info['name']}"
        own = result.info.get("own_images") or {}
        if own.get("images"):
            title += f" [bold red](NOT EXTERNAL: {own['images']} of its images are the model's own)[/]"
    console = Console()
    info = result.info
    console.print(f"{title}: {info['images']} images in {info['seconds']:.1f} s "
                  f"({info['images_per_second']:.1f} images/s; {info['runtime']})")
    print_metrics(result.metrics, console)
    print_decision(result.metrics["decision"], console)
    for warning in info.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")
    if info.get("kind") == "external":
        _print_comparison(result, console)
    console.print(f"wrote {result.out_dir}")
    return 0


def _external(args: argparse.Namespace, settings: InferenceSettings, prevalences: tuple[float, ...]
              ) -> EvaluationResult:
    from covid_cxr.evaluate.external import evaluate_external

    for flag, default in (("data", None), ("fold", None), ("operating_point", None), ("allow_test_overlap", False)):
        if getattr(args, flag) != default:
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to --external: the model is evaluated on the "
                             "whole external set with its own operating point ('covid-cxr calibrate' sets one)")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1; got {args.workers}")
    return evaluate_external(args.target, args.external, settings, name=args.name, out_dir=args.out,
                             prevalence=args.prevalence, prevalence_class=args.prevalence_class,
                             prevalences=prevalences, n_boot=args.bootstrap, seed=args.seed, workers=args.workers,
                             progress=not args.no_progress)


def print_decision(decision: dict[str, Any], console: Console) -> None:
    """The operating point and sensitivity, specificity, PPV, NPV at it (95% Wilson CIs, adjusted for patients where
    one has several images), and at other prevalences."""
    from covid_cxr.operating_point import OperatingPoint

    op = OperatingPoint.from_dict(decision["operating_point"])
    console.print(f"operating point: {op.describe()}")
    if op.chosen_on():
        console.print(f"  {op.chosen_on()}")
    parts = []
    for key in ("sensitivity", "specificity", "ppv", "npv"):
        v = decision[key]
        parts.append(f"{key if len(key) > 3 else key.upper()} " + (
            "n/a" if v is None or v != v else
            f"{v:.1f}% [{decision[key + '_ci_low']:.1f}, {decision[key + '_ci_high']:.1f}] "
            f"({decision[key + '_k']}/{decision[key + '_n']}{_patients(decision, key)})"))
    console.print(f"  {op.positive_class} vs rest: " + "; ".join(parts))
    for at in decision["at_prevalence"]:
        # Each value with its interval, or n/a where it is undefined (a model that never says "not COVID-19" has no
        # NPV): never a NaN, and no interval around a value that is not there.
        values = [f"{key.upper()} " + ("n/a" if fmt.missing(at[key]) else
                                       f"{at[key]:.2f}% [{at[key + '_ci_low']:.2f}, {at[key + '_ci_high']:.2f}]")
                  for key in ("ppv", "npv")]
        if not all(v.endswith("n/a") for v in values):
            console.print(f"  at prevalence {100 * at['prevalence']:g}%: {', '.join(values)}")


def _patients(decision: dict[str, Any], key: str) -> str:
    """``, 22 patients`` where a figure's images come from fewer patients (its interval then allows for them)."""
    patients = decision.get(f"{key}_patients")
    return f", {patients} patients" if patients is not None and patients < decision[f"{key}_n"] else ""


def _print_comparison(result: EvaluationResult, console: Console) -> None:
    """Internal beside external, when the run has an internal test evaluation of the same model file and rule."""
    from rich.table import Table

    from covid_cxr.report.report import load_evaluation
    from covid_cxr.report.sections import comparison_table

    internal_dir = result.info.get("internal")
    if not internal_dir:
        console.print(f"no drop: {result.info.get('internal_missing', 'no internal test evaluation to compare with')}")
        return
    internal = load_evaluation(Path(internal_dir), n_boot=0)  # its AUC intervals are evaluate's, from metrics.json
    ext = load_evaluation(result.out_dir, n_boot=0)
    # One confusion matrix per patient where ids are known: each rate's interval allows for patients, as the report's.
    table = comparison_table((f"internal test ({Path(internal_dir).name})", internal.preds.confusion(by_patient=True),
                              internal.metrics),
                             (f"external: {result.info['name']}", ext.preds.confusion(by_patient=True),
                              result.metrics))
    rich = Table(title="internal vs external: % [95% CI; Wilson, adjusted for patients where a cell names them] (k/n)")
    for h in table.headers:
        rich.add_column(h, justify="right")
    for row in table.rows:
        rich.add_row(*row)
    console.print(rich)
