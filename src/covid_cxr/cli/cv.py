"""``covid-cxr cv DATA --network NAME --folds 1-5``: every fold in turn, each evaluated, then one report.

Each fold is an independent ``train_fold`` job (the same one ``covid-cxr train --fold K`` runs) into
the fixed folder ``RUNS/NETWORK-foldK``, so folds can equally be launched on separate machines and
reported together with ``covid-cxr report``, and running the same ``cv`` again continues where the last
one stopped: a finished fold trained with the same settings is skipped (evaluated if it was not), an
unfinished one is resumed, and a fold folder trained with other settings is refused before anything trains.

Under ``torchrun`` every process trains; only the main one (``RANK`` 0) evaluates and writes the report.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from covid_cxr.cli.train import add_train_options, config_from_args
from covid_cxr.config import TrainConfig
from covid_cxr.errors import ConfigError, DataError

# Settings that say how a run is executed, not what it trains: they may change between a run and its resume.
RUN_ONLY = frozenset({"device", "precision", "channels_last", "compile", "workers", "prefetch", "val_batch_size",
                      "deterministic", "out", "name", "fold"})
TRAIN, RESUME, DONE = "train", "resume", "done"


@dataclass(frozen=True)
class FoldPlan:
    """What ``cv`` does with one fold: train it anew, resume its folder, or take it as finished."""

    fold: int
    run_dir: Path
    action: str

    @property
    def evaluated(self) -> bool:
        return (self.run_dir / "eval-test" / "predictions.csv").is_file()


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


def fold_dir(config: TrainConfig, fold: int) -> Path:
    """RUNS/NETWORK-foldK: the one folder ``cv`` trains fold ``fold`` into."""
    return Path(config.out) / f"{config.network}-fold{fold}"


def settings_differ(wanted: TrainConfig, saved: TrainConfig) -> list[str]:
    """The training settings (not how the run is executed) in which ``saved`` differs from ``wanted``."""
    a, b = wanted.to_dict(), saved.to_dict()
    return [f"{k} ({b.get(k)!r} there, {a[k]!r} asked)" for k in a if k not in RUN_ONLY and a[k] != b.get(k)]


def plan_fold(base: TrainConfig, fold: int, split_hash: str) -> FoldPlan:
    """Train, resume or skip fold ``fold``; a folder trained with other settings or splits is refused."""
    # the library is loaded by the verb, not by --help
    from covid_cxr.runs.folder import RunFolder
    from covid_cxr.train.runner import resume_config

    run_dir = fold_dir(base, fold)
    folder = RunFolder(run_dir)
    if not folder.exists():
        return FoldPlan(fold, run_dir, TRAIN)
    wanted = replace(base, fold=fold)
    differ = settings_differ(wanted, resume_config(run_dir, base.network))
    trained_on = folder.info().split_hash
    if trained_on and trained_on != split_hash:
        differ.append(f"fold {fold} splits ({trained_on[:12]} there, {split_hash[:12]} in {base.data}: prepared "
                      "again since)")
    if differ:
        raise ConfigError(f"{run_dir} holds fold {fold} trained with other settings: {'; '.join(differ)}. "
                          f"Give another --out to train these settings anew, or delete {run_dir} to replace it "
                          "(or pass the settings it has to continue it)")
    return FoldPlan(fold, run_dir, DONE if folder.info().status == "finished" else RESUME)


def resolved_base(args: argparse.Namespace, image_size: int | None) -> TrainConfig:
    """The settings every fold trains with, resolved as its run folder will record them (data path, size, batch)."""
    base = config_from_args(args, data=str(args.data.resolve()))
    return base.resolved(image_size=image_size) if image_size else base


def check_options(args: argparse.Namespace, folds: list[int], num_folds: int, data: Path) -> None:
    """Refuse a fold out of range or a bad evaluation setting before any fold trains."""
    outside = [k for k in folds if k > num_folds]
    if outside:
        raise ConfigError(f"--folds {args.folds}: fold {outside[0]} is out of range: {data} was prepared with folds "
                          f"1-{num_folds}; give folds between 1 and {num_folds}")
    if args.eval_batch_size < 1:
        raise ConfigError(f"--eval-batch-size must be >= 1; got {args.eval_batch_size}")


def earlier_folds(base: TrainConfig, num_folds: int, asked: list[int], hashes: dict[int, str]
                  ) -> tuple[list[FoldPlan], list[str]]:  # fmt: skip
    """Fold folders of this network under RUNS that were not asked for but belong in the report: finished and
    evaluated with the same settings. Also a note for each one left out, saying why."""
    plans, notes = [], []
    for k in range(1, num_folds + 1):
        if k in asked or not fold_dir(base, k).exists():
            continue
        try:
            plan = plan_fold(base, k, hashes[k])
        except (ConfigError, DataError) as exc:
            notes.append(f"left out fold {k}: {exc}")
            continue
        if plan.action != DONE or not plan.evaluated:
            why = "not finished" if plan.action != DONE else f"not evaluated ('covid-cxr evaluate {plan.run_dir}')"
            notes.append(f"left out fold {k} ({plan.run_dir}): {why}")
            continue
        plans.append(plan)
    return plans, notes


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
    """Plan every fold (refusing bad options and foreign fold folders), then train, evaluate and report."""
    # the library is loaded by the verb, not by --help
    from covid_cxr.data.prepared import PreparedData
    from covid_cxr.train.distributed import launched_as_main

    folds = parse_folds(args.folds)
    prepared = PreparedData(args.data)
    check_options(args, folds, prepared.num_folds, args.data)
    base = resolved_base(args, prepared.image_size)
    hashes = {k: prepared.fold(k).split_hash for k in range(1, prepared.num_folds + 1)}
    plans = [plan_fold(base, k, hashes[k]) for k in folds]  # every rank decides before any of them writes
    earlier, notes = earlier_folds(base, prepared.num_folds, folds, hashes) if not args.no_eval else ([], [])
    main = launched_as_main()
    done: list[FoldPlan] = []
    for i, plan in enumerate(plans, start=1):
        if main:
            print(f"== fold {plan.fold} ({i} of {len(plans)}): {_doing(plan)} ==")
        try:
            _run_fold(plan, base, args, main)
        except Exception:
            if main:
                _stop_report(done, earlier, notes, base, args, plan)
            raise
        done.append(plan)
    if main:
        if not args.no_eval:
            _report(done, earlier, notes, base)
        print("runs: " + " ".join(str(p.run_dir) for p in done))
    return 0


def _doing(plan: FoldPlan) -> str:
    return {TRAIN: f"training into {plan.run_dir}", RESUME: f"resuming {plan.run_dir}",
            DONE: f"finished earlier in {plan.run_dir}"}[plan.action]


def _run_fold(plan: FoldPlan, base: TrainConfig, args: argparse.Namespace, main: bool) -> None:
    """Train (or resume) the fold on every rank; evaluate it on the main one when it changed or was never evaluated."""
    # the library is loaded by the verb, not by --help
    from covid_cxr.evaluate.run import evaluate_run
    from covid_cxr.inference.settings import InferenceSettings
    from covid_cxr.train.runner import train_fold

    if plan.action == TRAIN:
        train_fold(replace(base, fold=plan.fold, name=plan.run_dir.name))
    elif plan.action == RESUME:
        train_fold(replace(base, fold=plan.fold), resume=plan.run_dir)
    if args.no_eval or not main:
        return
    if plan.action == DONE and plan.evaluated:
        print(f"fold {plan.fold}: evaluated earlier -> {plan.run_dir / 'eval-test'}")
        return
    how = InferenceSettings(batch_size=args.eval_batch_size, device=base.device, precision=base.precision)
    result = evaluate_run(plan.run_dir, how)
    print(f"fold {plan.fold}: test accuracy {float(result.metrics['accuracy']):.2f}% -> {result.out_dir}")


def _report(done: list[FoldPlan], earlier: list[FoldPlan], notes: list[str], base: TrainConfig) -> Path | None:
    """The report over the folds run now and the finished ones found; None when no fold is evaluated."""
    # the library is loaded by the verb, not by --help
    from covid_cxr.report.report import write_report

    members = sorted([p for p in done if p.evaluated] + earlier, key=lambda p: p.fold)
    if not members:
        return None
    asked = [p for p in done if p.evaluated]
    found = f"; not asked for, found finished and evaluated with the same settings: {_folds(earlier)}."
    said = [f"Fold{'s' if len(members) > 1 else ''} {_folds(members)} of {base.network} in {base.out}. Asked for: "
            f"{_folds(asked)} (trained or resumed by this run: {_folds([p for p in asked if p.action != DONE])})"
            + (found if earlier else "."), *notes]  # fmt: skip
    html = write_report([p.run_dir for p in members], Path(base.out) / f"{base.network}-cv-report", remarks=said)
    for line in said:
        print(line)
    print(f"report: {html}")
    return html


def _folds(plans: list[FoldPlan]) -> str:
    return ", ".join(str(p.fold) for p in plans) or "none"


def _stop_report(done: list[FoldPlan], earlier: list[FoldPlan], notes: list[str], base: TrainConfig,
                 args: argparse.Namespace, failed: FoldPlan) -> None:  # fmt: skip
    """After fold ``failed`` raised: the report of the folds finished so far, and how to continue."""
    stopped = [f"fold {failed.fold} failed ({failed.run_dir}); the folds after it did not run"]
    try:
        html = None if args.no_eval else _report(done, earlier, [*notes, *stopped], base)
    except Exception as exc:  # noqa: BLE001 - the fold's error is the one raised; the report's is said
        print(f"covid-cxr cv: the report of the folds finished so far failed too: {exc}", file=sys.stderr)
        html = None
    print(f"covid-cxr cv: {stopped[0]}" + (f"; report of the folds finished so far: {html}" if html else "")
          + ". Re-run the same command to continue: finished folds are skipped, an unfinished one resumes from its "
          "last epoch.", file=sys.stderr)
