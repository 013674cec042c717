"""``covid-cxr cv``: fixed fold folders that a re-run skips or resumes, checks before any training, a report over
every finished fold (also after a fold fails), and evaluation and report on the main process only.

One module fixture runs the verb several times over one RUNS folder, as a user would after a failure, and
records what each invocation left; the tests read that record. The last test calls the library,
:func:`covid_cxr.pipeline.cv.run_cv`, with no command line. Tiny data: 2 folds, 2 phases, 1 epoch a phase.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from covid_cxr import fmt
from covid_cxr.cli import main
from covid_cxr.config import make_config
from covid_cxr.errors import ConfigError
from covid_cxr.pipeline.cv import DONE, TRAIN, run_cv
from covid_cxr.runs.folder import RunFolder
from covid_cxr.train import runner
from covid_cxr.train.augment import Augmenter
from tests.test_train_runner import tiny_prepared

pytestmark = pytest.mark.slow


def _cv(data: Path, runs: Path, *extra: str) -> dict[str, Any]:
    """``covid-cxr cv`` with tiny settings; its exit status, stdout and stderr."""
    argv = ["cv", str(data), "--network", "xception", "--preset", "cpu", "--epochs-per-phase", "1", "--image-size",
            "71", "--batch-size", "3", "--precision", "fp32", "--seed", "11", "--workers", "0", "--out", str(runs),
            *extra]  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    raised: Exception | None = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except Exception as exc:  # noqa: BLE001 - what the command line leaves to Python (a traceback): recorded
            rc, raised = 1, exc
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "raised": raised}


def _state(runs: Path) -> dict[str, Any]:
    """What a cv invocation leaves: the folders, each fold's weights and evaluation stamps, the report's folds."""
    summary = runs / "xception-cv-report" / "summary.json"
    state: dict[str, Any] = {"folders": sorted(p.name for p in runs.iterdir()) if runs.is_dir() else [],
                             "report": json.loads(summary.read_text())["xception-test"]["folds"]
                             if summary.is_file() else None}  # fmt: skip
    for k in (1, 2):
        run = runs / f"xception-fold{k}"
        if RunFolder(run).exists():
            preds = run / "eval-test" / "predictions.csv"
            state[k] = {"best": (run / "best.pt").stat().st_mtime_ns, "info": RunFolder(run).info(),
                        "log_rows": len((run / "log.csv").read_text().splitlines()) - 1,
                        "eval": preds.stat().st_mtime_ns if preds.is_file() else None}  # fmt: skip
    return state


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny prepared folder every test here trains from (each into its own RUNS folder)."""
    return tiny_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def record(data: Path) -> dict[str, Any]:
    """The invocations, in order, over one RUNS folder (and a second, empty one for the refusals)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("COVID_CXR_BACKEND", "torch")  # evaluate with the network itself: no ONNX export (10 s) a fold
        return _invocations(data)


def _invocations(data: Path) -> dict[str, Any]:
    """The record of :func:`record`."""
    runs, empty = data.parent / "runs", data.parent / "untouched"
    seen: dict[str, Any] = {}
    seen["bad_fold"] = _cv(data, empty, "--folds", "1,3")
    seen["bad_batch"] = _cv(data, empty, "--folds", "1", "--eval-batch-size", "0")
    seen["empty"] = _state(empty)
    with pytest.MonkeyPatch.context() as patch:  # a second process of a torchrun job: it trains, nothing else
        patch.setenv("RANK", "1")
        seen["rank1"] = _cv(data, runs, "--folds", "1")
    seen["after_rank1"] = _state(runs)

    seed_epoch = runner.seed_epoch

    def fail_in_second_epoch(seed: int, global_epoch: int, augmenter: Augmenter) -> None:
        if global_epoch == 1:
            raise RuntimeError("disk full (simulated)")
        seed_epoch(seed, global_epoch, augmenter)

    with pytest.MonkeyPatch.context() as patch:  # fold 1 is finished: fold 2 is the only one that trains
        patch.setattr(runner, "seed_epoch", fail_in_second_epoch)
        seen["failed"] = _cv(data, runs, "--folds", "1-2")
    seen["after_failed"] = _state(runs)
    seen["again"] = _cv(data, runs, "--folds", "1-2")  # the same command, as the failure message says
    seen["after_again"] = _state(runs)
    seen["fold2_only"] = _cv(data, runs, "--folds", "2")
    seen["after_fold2_only"] = _state(runs)
    report = runs / "xception-cv-report" / "report.md"
    seen["report_md"] = report.read_text() if report.is_file() else ""
    seen["other_settings"] = _cv(data, runs, "--folds", "2", "--epochs-per-phase", "2")
    seen["after_other_settings"] = _state(runs)
    (runs / "xception-fold1" / "eval-test" / "metrics.json").unlink()  # an evaluation stopped part-way
    seen["evaluation_stopped"] = _cv(data, runs, "--folds", "1-2")
    seen["metrics_again"] = (runs / "xception-fold1" / "eval-test" / "metrics.json").is_file()
    return seen


def test_bad_folds_and_evaluation_settings_are_refused_before_any_fold_trains(record: dict[str, Any]) -> None:
    assert record["bad_fold"]["rc"] == 2
    assert "fold 3 is out of range" in record["bad_fold"]["err"]
    assert "prepared with folds 1-2; give folds between 1 and 2" in record["bad_fold"]["err"]
    assert record["bad_batch"]["rc"] == 2 and "--eval-batch-size must be >= 1" in record["bad_batch"]["err"]
    assert record["empty"]["folders"] == []  # fold 1 was not trained first


def test_only_the_main_process_evaluates_and_reports(record: dict[str, Any]) -> None:
    assert record["rank1"]["rc"] == 0
    fold1 = record["after_rank1"][1]
    assert fold1["info"].status == "finished"  # rank 1 trains like every rank ...
    assert fold1["eval"] is None and record["after_rank1"]["report"] is None  # ... but leaves both to rank 0
    assert record["after_rank1"]["folders"] == ["xception-fold1"]


def test_a_failed_fold_stops_cv_after_reporting_the_finished_ones(record: dict[str, Any]) -> None:
    failed, state = record["failed"], record["after_failed"]
    assert isinstance(failed["raised"], RuntimeError) and "disk full (simulated)" in str(failed["raised"])
    assert "fold 2 failed" in failed["err"] and "Re-run the same command to continue" in failed["err"]
    assert state["report"] == [1]  # the report of the fold finished so far
    assert state[1]["best"] == record["after_rank1"][1]["best"]  # fold 1 was finished: not trained again ...
    assert state[1]["eval"] is not None  # ... only evaluated, as it never was
    assert state[2]["info"].status == "stopped" and state[2]["log_rows"] == 1  # one epoch done before the failure


def test_running_cv_again_skips_finished_folds_and_resumes_the_unfinished_one(record: dict[str, Any]) -> None:
    before, after = record["after_failed"], record["after_again"]
    assert record["again"]["rc"] == 0
    assert after["folders"] == ["xception-cv-report", "xception-fold1", "xception-fold2"]  # no NETWORK-foldK-2
    assert after[1]["best"] == before[1]["best"] and after[1]["eval"] == before[1]["eval"]  # fold 1 untouched
    assert after[2]["info"].status == "finished" and after[2]["log_rows"] == 2  # fold 2 went on to its 2nd epoch
    assert after[2]["info"].started == before[2]["info"].started  # in the same run, resumed
    assert after["report"] == [1, 2]


def test_the_report_covers_finished_folds_of_earlier_invocations_and_says_so(record: dict[str, Any]) -> None:
    assert record["fold2_only"]["rc"] == 0
    after, before = record["after_fold2_only"], record["after_again"]
    assert after[2]["best"] == before[2]["best"] and after[2]["eval"] == before[2]["eval"]  # nothing to do
    assert after["report"] == [1, 2]  # not fold 2 alone
    assert ("Asked for: 2 (trained or resumed by this run: none); not asked for, found finished and evaluated with "
            "the same settings: 1." in record["report_md"])


def test_a_fold_folder_trained_with_other_settings_is_refused_with_the_way_out(record: dict[str, Any]) -> None:
    refused = record["other_settings"]
    assert refused["rc"] == 2
    assert "xception-fold2 holds fold 2 trained with other settings: epochs_per_phase (1 there, 2 asked)" in refused[
        "err"]
    assert "another --out" in refused["err"] and "delete" in refused["err"]
    assert record["after_other_settings"][2] == record["after_fold2_only"][2]  # nothing trained or evaluated


def test_run_cv_from_python_trains_evaluates_and_reports_then_skips_what_is_done(
        data: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The library call, no argparse: refusals before anything is made, one fold trained, evaluated and reported;
    the same call again trains and evaluates nothing."""
    monkeypatch.setenv("COVID_CXR_BACKEND", "torch")  # as in record: no ONNX export
    monkeypatch.delenv("RANK", raising=False)
    runs = data.parent / "library-runs"
    base = make_config("cpu", data=str(data), network="xception", epochs_per_phase=1, image_size=71, batch_size=3,
                       precision="fp32", seed=11, workers=0, out=str(runs))  # fmt: skip
    with pytest.raises(ConfigError, match="fold 3 is out of range: .* prepared with folds 1-2"):
        run_cv(base, [1, 3])
    with pytest.raises(ConfigError, match="eval_batch_size must be >= 1"):
        run_cv(base, [1], eval_batch_size=0)
    assert not runs.exists()

    said: list[str] = []
    first = run_cv(base, [1], say=said.append)
    fold1 = runs / "xception-fold1"
    assert [(p.fold, p.action) for p in first.plans] == [(1, TRAIN)] and first.run_dirs == (fold1,)
    assert RunFolder(fold1).info().status == "finished"
    assert first.report is not None and first.report.is_file() and first.report.parent == runs / "xception-cv-report"
    assert json.loads((first.report.parent / "summary.json").read_text())["xception-test"]["folds"] == [1]
    assert said[0] == f"== fold 1 (1 of 1): training into {fold1} ==" and said[-1] == f"runs: {fold1}"
    m = json.loads((fold1 / "eval-test" / "metrics.json").read_text())
    shown = fmt.with_ci(m["accuracy"], m["accuracy_ci_low"], m["accuracy_ci_high"])
    assert f"fold 1: test accuracy {shown} on {m['n']} images -> {fold1 / 'eval-test'}" in said and "(95% CI " in shown
    stamps = [(fold1 / name).stat().st_mtime_ns for name in ("best.pt", "eval-test/predictions.csv")]

    said.clear()
    second = run_cv(base, [1], say=said.append)
    assert [(p.fold, p.action) for p in second.plans] == [(1, DONE)] and second.run_dirs == (fold1,)
    assert [(fold1 / name).stat().st_mtime_ns for name in ("best.pt", "eval-test/predictions.csv")] == stamps
    assert f"fold 1: evaluated earlier -> {fold1 / 'eval-test'}" in said
    assert second.report == first.report and second.earlier == () and second.notes == ()


def test_a_fold_whose_evaluation_was_stopped_part_way_is_evaluated_again(record: dict[str, Any]) -> None:
    """evaluate writes metrics.json last; cv took predictions.csv alone for an evaluated fold, skipped it, and then
    stopped at the report, which refuses an evaluation without metrics.json."""
    assert record["evaluation_stopped"]["rc"] == 0, record["evaluation_stopped"]["err"]
    assert record["metrics_again"]
