"""Cross-validation as library code: every fold in turn, each evaluated, then one report over them.

Each fold is an independent ``train_fold`` job (the same one ``covid-cxr train --fold K`` runs) into
the fixed folder ``RUNS/NETWORK-foldK``, so folds can equally be launched on separate machines and
reported together with ``covid-cxr report``, and running the same cross-validation again continues where
the last one stopped: a finished fold trained with the same settings is skipped (evaluated if it was not),
an unfinished one is resumed, and a fold folder trained with other settings is refused before anything trains.

Under ``torchrun`` every process trains; only the main one (``RANK`` 0) evaluates and writes the report.
``covid-cxr cv`` is the command line over :func:`run_cv`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from covid_cxr import fmt
from covid_cxr.config import TrainConfig
from covid_cxr.data.prepared import PreparedData
from covid_cxr.errors import ConfigError, DataError
from covid_cxr.evaluate.run import METRICS, evaluate_run
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.report.report import write_report
from covid_cxr.runs.folder import RunFolder
from covid_cxr.train.distributed import launched_as_main
from covid_cxr.train.runner import resume_config, train_fold

# Settings that say how a run is executed, not what it trains: they may change between a run and its resume.
RUN_ONLY = frozenset({"device", "precision", "channels_last", "compile", "workers", "prefetch", "val_batch_size",
                      "deterministic", "out", "name", "fold"})
TRAIN, RESUME, DONE = "train", "resume", "done"

Say = Callable[[str], None]


def _to_stderr(line: str) -> None:
    """The default for :func:`run_cv`'s ``warn``: the line on standard error."""
    print(line, file=sys.stderr)


@dataclass(frozen=True)
class FoldPlan:
    """What cross-validation does with one fold: train it anew, resume its folder, or take it as finished."""

    fold: int
    run_dir: Path
    action: str

    @property
    def evaluated(self) -> bool:
        """Evaluated whole: evaluate writes metrics.json last, so a stopped evaluation is evaluated again."""
        folder = self.run_dir / "eval-test"
        return (folder / "predictions.csv").is_file() and (folder / METRICS).is_file()


@dataclass(frozen=True)
class CvResult:
    """What :func:`run_cv` did: the folds asked for (in order, each with its plan), their run folders, the folds
    found finished and evaluated in RUNS that the report also covers, the report (None when none was written: no
    evaluation, no evaluated fold, or a process other than torchrun's main one) and the notes on fold folders left
    out of it."""

    plans: tuple[FoldPlan, ...]
    run_dirs: tuple[Path, ...]
    earlier: tuple[FoldPlan, ...]
    report: Path | None
    notes: tuple[str, ...]


def fold_dir(config: TrainConfig, fold: int) -> Path:
    """RUNS/NETWORK-foldK: the one folder cross-validation trains fold ``fold`` into."""
    return Path(config.out) / f"{config.network}-fold{fold}"


def settings_differ(wanted: TrainConfig, saved: TrainConfig) -> list[str]:
    """The training settings (not how the run is executed) in which ``saved`` differs from ``wanted``."""
    a, b = wanted.to_dict(), saved.to_dict()
    return [f"{k} ({b.get(k)!r} there, {a[k]!r} asked)" for k in a if k not in RUN_ONLY and a[k] != b.get(k)]


def plan_fold(base: TrainConfig, fold: int, split_hash: str) -> FoldPlan:
    """Train, resume or skip fold ``fold``; a folder trained with other settings or splits is refused."""
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


def resolved_base(base: TrainConfig, prepared: PreparedData) -> TrainConfig:
    """The settings every fold trains with, as its run folder will record them (data path, image size, batch)."""
    base = replace(base, data=str(Path(base.data).resolve()))
    return base.resolved(image_size=prepared.image_size) if prepared.image_size else base


def check_request(folds: Sequence[int], eval_batch_size: int, prepared: PreparedData) -> None:
    """Refuse an empty or repeated fold list, a fold the prepared folder lacks, or a bad evaluation batch."""
    n = prepared.num_folds
    if not folds or len(set(folds)) != len(folds):
        raise ConfigError(f"folds must name distinct folds; got {list(folds)}")
    outside = [k for k in folds if not 1 <= k <= n]
    if outside:
        raise ConfigError(f"fold {outside[0]} is out of range: {prepared.root} was prepared with folds 1-{n}; "
                          f"give folds between 1 and {n}")
    if eval_batch_size < 1:
        raise ConfigError(f"eval_batch_size must be >= 1; got {eval_batch_size}")


def earlier_folds(base: TrainConfig, num_folds: int, asked: Sequence[int], hashes: dict[int, str]
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


def run_cv(base: TrainConfig, folds: Sequence[int], *, evaluate: bool = True, eval_batch_size: int = 64,
           say: Say = print, warn: Say = _to_stderr) -> CvResult:  # fmt: skip
    """Train folds ``folds`` of the prepared folder ``base.data`` with the settings ``base`` (each fold into
    RUNS/NETWORK-foldK, ``base.out`` being RUNS), evaluate each on its test split, and report over them.

    Every fold is planned first, so a fold out of range or a fold folder trained with other settings is refused
    before any fold trains. ``evaluate=False`` trains only. ``say`` takes the progress lines, ``warn`` what is said
    when a fold fails (the fold's exception is then raised again, after the report of the folds finished so far).
    Training and evaluation print their own progress as they do everywhere.
    """
    if not base.data:
        raise ConfigError("run_cv needs the prepared folder in base.data (covid-cxr prepare --out DATA)")
    prepared = PreparedData(base.data)
    check_request(folds, eval_batch_size, prepared)
    base = resolved_base(base, prepared)
    hashes = {k: prepared.fold(k).split_hash for k in range(1, prepared.num_folds + 1)}
    plans = [plan_fold(base, k, hashes[k]) for k in folds]  # every rank decides before any of them writes
    earlier, notes = earlier_folds(base, prepared.num_folds, folds, hashes) if evaluate else ([], [])
    main = launched_as_main()
    done: list[FoldPlan] = []
    for i, plan in enumerate(plans, start=1):
        if main:
            say(f"== fold {plan.fold} ({i} of {len(plans)}): {_doing(plan)} ==")
        try:
            _run_fold(plan, base, evaluate=evaluate and main, eval_batch_size=eval_batch_size, say=say)
        except Exception:
            if main:
                _stop_report(done, earlier, notes, base, plan, evaluate=evaluate, say=say, warn=warn)
            raise
        done.append(plan)
    report = None
    if main:
        if evaluate:
            report = _report(done, earlier, notes, base, say)
        say("runs: " + " ".join(str(p.run_dir) for p in done))
    return CvResult(plans=tuple(plans), run_dirs=tuple(p.run_dir for p in plans), earlier=tuple(earlier),
                    report=report, notes=tuple(notes))  # fmt: skip


def _doing(plan: FoldPlan) -> str:
    return {TRAIN: f"training into {plan.run_dir}", RESUME: f"resuming {plan.run_dir}",
            DONE: f"finished earlier in {plan.run_dir}"}[plan.action]


def _run_fold(plan: FoldPlan, base: TrainConfig, *, evaluate: bool, eval_batch_size: int, say: Say) -> None:
    """Train (or resume) the fold; with ``evaluate``, evaluate it when it changed or was never evaluated."""
    if plan.action == TRAIN:
        train_fold(replace(base, fold=plan.fold, name=plan.run_dir.name))
    elif plan.action == RESUME:
        train_fold(replace(base, fold=plan.fold), resume=plan.run_dir)
    if not evaluate:
        return
    if plan.action == DONE and plan.evaluated:
        say(f"fold {plan.fold}: evaluated earlier -> {plan.run_dir / 'eval-test'}")
        return
    how = InferenceSettings(batch_size=eval_batch_size, device=base.device, precision=base.precision)
    result = evaluate_run(plan.run_dir, how)
    m = result.metrics
    say(f"fold {plan.fold}: test accuracy {fmt.with_ci(m['accuracy'], m['accuracy_ci_low'], m['accuracy_ci_high'])} "
        f"on {m['n']} images -> {result.out_dir}")


def _report(done: list[FoldPlan], earlier: list[FoldPlan], notes: list[str], base: TrainConfig, say: Say
            ) -> Path | None:  # fmt: skip
    """The report over the folds run now and the finished ones found; None when no fold is evaluated."""
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
        say(line)
    say(f"report: {html}")
    return html


def _folds(plans: list[FoldPlan]) -> str:
    return ", ".join(str(p.fold) for p in plans) or "none"


def _stop_report(done: list[FoldPlan], earlier: list[FoldPlan], notes: list[str], base: TrainConfig,
                 failed: FoldPlan, *, evaluate: bool, say: Say, warn: Say) -> None:  # fmt: skip
    """After fold ``failed`` raised: the report of the folds finished so far, and how to continue."""
    stopped = [f"fold {failed.fold} failed ({failed.run_dir}); the folds after it did not run"]
    try:
        html = _report(done, earlier, [*notes, *stopped], base, say) if evaluate else None
    except Exception as exc:  # noqa: BLE001 - the fold's error is the one raised; the report's is said
        warn(f"the report of the folds finished so far failed too: {exc}")
        html = None
    warn(stopped[0] + (f"; report of the folds finished so far: {html}" if html else "")
         + ". Re-run the same command to continue: finished folds are skipped, an unfinished one resumes from its "
         "last epoch.")  # fmt: skip
