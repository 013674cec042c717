"""A run stopped between saving best.pt and last.pt, then looked at and resumed: everything that names the run's
best epoch (the resumed run's bookkeeping, run.json, last.pt, MODEL_CARD.md, evaluate's record) names the epoch
best.pt holds.

The stopped folder is made from real files of real runs (2 phases x 1 epoch, deterministic): a run stopped as its
second epoch starts (last.pt, run.json and log.csv of epoch 1), and beside its last.pt the best.pt that epoch 2 of
an uninterrupted run writes (the same checkpoint as its last.pt without the training state). That is the folder
``kill -9`` leaves after ``_save`` wrote best.pt for an improved epoch 2 and before it wrote last.pt.

Then the run folder's lock (``covid_cxr.runs.lock``): a run that a live process trains is not trained or calibrated
by another, read with a note, and free again once that process is gone; a result's hash is the file it read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from covid_cxr.config import TrainConfig
from covid_cxr.errors import DataError
from covid_cxr.evaluate.run import calibrate, evaluate_run
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.operating_point import OperatingPoint
from covid_cxr.runs.checkpoint import checkpoint_meta, load_checkpoint, load_checkpoint_sha256, save_checkpoint
from covid_cxr.runs.lock import LOCK_NAME, RunBusyError, being_trained, hold_run
from covid_cxr.runs.model_card import build_card, facts_from_checkpoint
from covid_cxr.train import runner
from covid_cxr.train.augment import Augmenter
from tests.test_train_runner import config_for, tiny_prepared

pytestmark = pytest.mark.slow


class Stopped(BaseException):
    """Raised where the simulated kill stops a run (a BaseException: nothing in the run catches it)."""


def _config(data: Path, out: Path, name: str) -> TrainConfig:
    return replace(config_for(data, out, name), epochs_per_phase=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def straight(data: Path) -> Path:
    """An uninterrupted run of 2 epochs: its last.pt is the model epoch 2 saves."""
    return runner.train_fold(_config(data, data.parent / "runs", "straight"), live=False)


@pytest.fixture()
def stopped(data: Path, straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder a kill between best.pt and last.pt of epoch 2 leaves (see the module docstring)."""
    seed_epoch = runner.seed_epoch

    def stop_at_epoch_2(seed: int, global_epoch: int, augmenter: Augmenter) -> None:
        if global_epoch == 1:
            raise Stopped
        seed_epoch(seed, global_epoch, augmenter)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "seed_epoch", stop_at_epoch_2)
        with pytest.raises(Stopped):
            runner.train_fold(_config(data, tmp_path, "stopped"), live=False)
    run = tmp_path / "stopped"
    epoch_2 = load_checkpoint(straight / "last.pt")
    save_checkpoint(replace(epoch_2, train_state=None, meta={**epoch_2.meta, "run": run.name}), run / "best.pt")
    return run


def test_a_best_pt_newer_than_last_pt_is_the_best_everywhere(data: Path, straight: Path, stopped: Path,
                                                              tmp_path: Path) -> None:  # fmt: skip
    held = checkpoint_meta(stopped / "best.pt")
    recorded = json.loads((stopped / "run.json").read_text())
    assert held["global_epoch"] == 2 and recorded["epochs_done"] == 1 and recorded["best_epoch"] == 1
    assert load_checkpoint(stopped / "last.pt").train_state["best_epoch"] == 1
    best_bytes = (stopped / "best.pt").read_bytes()

    # Looked at before it is resumed: the card and evaluate name the epoch the file holds, not run.json's.
    card = build_card(facts_from_checkpoint(stopped / "best.pt"), stopped)
    assert re.search(r"checkpoint of epoch 2\b", card)
    how = InferenceSettings(batch_size=16, device="cpu", precision="fp32", backend="torch")
    evaluated = evaluate_run(stopped, how, n_boot=0, out_dir=tmp_path / "eval", progress=False)
    assert evaluated.info["checkpoint_epoch"] == 2

    # Resumed: best.pt is the best so far, and the run says so. Epoch 2 is trained again, bit for bit as before, so
    # it scores what best.pt recorded, which does not beat it: best.pt stays as it was and the record names epoch 2
    # (before the fix the record kept epoch 1 whenever the retrained epoch 2 did not beat epoch 1).
    said = io.StringIO()
    runner.train_fold(_config(data, tmp_path, "stopped"), resume=stopped, stream=said, live=False)
    assert (stopped / "best.pt").read_bytes() == best_bytes
    final = json.loads((stopped / "run.json").read_text())
    assert final["status"] == "finished"
    assert (final["best_epoch"], final["best_val_accuracy"]) == (2, held["val_accuracy"])
    assert "best.pt holds epoch 2 " in said.getvalue() and "last.pt ends at epoch 1" in said.getvalue()
    last = load_checkpoint(stopped / "last.pt").train_state
    assert (last["best_epoch"], last["best_val_accuracy"]) == (2, held["val_accuracy"])
    assert "checkpoint of epoch 2, best validation accuracy" in (stopped / "MODEL_CARD.md").read_text()
    a, b = load_checkpoint(straight / "last.pt").model_state, load_checkpoint(stopped / "last.pt").model_state
    assert all(torch.equal(a[k], b[k]) for k in a)  # and the resumed run ended as the uninterrupted one


def test_a_best_pt_the_run_recorded_is_not_taken_again(data: Path, straight: Path, tmp_path: Path) -> None:
    """A folder whose best.pt is no newer than last.pt resumes on last.pt's bookkeeping, saying nothing."""
    run = shutil.copytree(straight, tmp_path / "straight")
    info = json.loads((run / "run.json").read_text())
    info["status"] = "running"  # stopped after its last epoch, before it was marked finished
    (run / "run.json").write_text(json.dumps(info))
    said = io.StringIO()
    runner.train_fold(_config(data, tmp_path, "straight"), resume=run, stream=said, live=False)
    assert "best.pt holds epoch" not in said.getvalue()
    final = json.loads((run / "run.json").read_text())
    assert final["status"] == "finished" and final["best_epoch"] == info["best_epoch"]
    assert checkpoint_meta(run / "best.pt")["global_epoch"] == info["best_epoch"]


# -- the run folder's lock: one process trains or rewrites a run at a time ---------------------------------------

_HOLDER = """
import sys
from covid_cxr.runs.lock import hold_run
with hold_run(sys.argv[1], "holding it", "wait"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills the process)
"""


@contextlib.contextmanager
def held_by_another_process(run: Path) -> Iterator[subprocess.Popen[str]]:
    """``run``'s lock held by a live process, as a ``covid-cxr train`` of it holds it (by the same code)."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def _unfinished_copy(straight: Path, where: Path) -> Path:
    """A copy of the finished run whose run.json says it is still running (resuming it finishes it, training
    nothing)."""
    run = shutil.copytree(straight, where)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    return run


def _with_rule(path: Path) -> None:
    """Give the checkpoint a threshold rule as ``calibrate`` stores one (the tiny validation split holds no COVID-19
    image to choose one on)."""
    ckpt = load_checkpoint(path)
    ckpt.operating_point = OperatingPoint(rule="sensitivity", target=0.9, threshold=0.3).to_dict()
    save_checkpoint(ckpt, path)


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != LOCK_NAME}


FP32 = InferenceSettings(batch_size=16, device="cpu", precision="fp32", backend="torch")


def test_a_run_being_trained_is_neither_trained_nor_calibrated_again(data: Path, straight: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = _unfinished_copy(straight, tmp_path / "run")
    _with_rule(run / "best.pt")
    before = _files(run)
    with held_by_another_process(run):
        assert being_trained(run)
        # A second training of it (`train --resume` while it trains) is refused before it writes anything.
        with pytest.raises(RunBusyError, match=r"being trained by another process.*wait for it to end"):
            runner.train_fold(_config(data, tmp_path, "run"), resume=run, live=False)
        # calibrate would rewrite best.pt under it: refused, and says how to get a calibrated copy instead.
        with pytest.raises(RunBusyError, match=r"rewriting best\.pt in it.*--out"):
            calibrate(run, "argmax", FP32, progress=False)
        assert _files(run) == before
        # ... which is allowed, as is evaluating it, with a word that best.pt may still change.
        calibrate(run, "argmax", FP32, out=tmp_path / "calibrated.pt", progress=False)
        assert load_checkpoint(tmp_path / "calibrated.pt").operating_point is None
        capsys.readouterr()
        evaluate_run(run, FP32, n_boot=0, out_dir=tmp_path / "eval", progress=False)
        assert capsys.readouterr().err.count("still being trained") == 1  # once, though the target resolves twice
        assert _files(run) == before
    # The process is gone (killed: the operating system released its lock): everything goes ahead.
    assert not being_trained(run)
    capsys.readouterr()
    evaluate_run(run, FP32, n_boot=0, out_dir=tmp_path / "eval2", progress=False)
    assert "still being trained" not in capsys.readouterr().err
    calibrate(run, "argmax", FP32, progress=False)
    assert load_checkpoint(run / "best.pt").operating_point is None  # rewritten in place
    runner.train_fold(_config(data, tmp_path, "run"), resume=run, live=False)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_training_holds_its_run_folder_for_as_long_as_it_trains(data: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run, seen = tmp_path / "new", []
    seed_epoch = runner.seed_epoch

    def look_from_outside(seed: int, global_epoch: int, augmenter: Augmenter) -> None:
        # Another process's view while this one trains (this process does not block on its own lock).
        check = "import sys; from covid_cxr.runs.lock import being_trained; print(being_trained(sys.argv[1]))"
        seen.append(subprocess.run([sys.executable, "-c", check, str(run)], capture_output=True, text=True,
                                   check=True).stdout.strip())  # fmt: skip
        seed_epoch(seed, global_epoch, augmenter)

    monkeypatch.setattr(runner, "seed_epoch", look_from_outside)
    runner.train_fold(_config(data, tmp_path, "new"), live=False)
    assert seen == ["True", "True"]
    assert not being_trained(run)
    # A new run that fails before it starts leaves nothing behind, not even its lock file or an empty folder.
    def fail(self: runner.Trainer, last: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(runner.Trainer, "_build", fail)
    with pytest.raises(RuntimeError, match="boom"):
        runner.train_fold(_config(data, tmp_path, "failed"), live=False)
    assert not (tmp_path / "failed").exists()
    # A folder of other files under that name is not trained into (its best.pt and log.csv were overwritten).
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "log.csv").write_text("precious log\n")
    with pytest.raises(FileExistsError, match="holds files that are not a covid-cxr run"):
        runner.train_fold(_config(data, tmp_path, "foreign"), live=False)
    assert [p.name for p in foreign.iterdir()] == ["log.csv"] and (foreign / "log.csv").read_text() == "precious log\n"
    # Nor the RUNS folders it made to hold it (a refused `train --out RUNS` left an empty RUNS); others stay.
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        runner.train_fold(_config(data, tmp_path / "kept" / "runs" / "of-today", "failed"), live=False)
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_a_checkpoint_replaced_while_it_is_read_keeps_its_own_hash(straight: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A result names the file it evaluated by sha256: the hash and the weights come from one open file, even when
    training replaces best.pt (by a rename) between the two reads."""
    path, newer = tmp_path / "best.pt", tmp_path / "newer.pt"
    shutil.copy(straight / "best.pt", path)
    first = path.read_bytes()
    ckpt = load_checkpoint(path)
    save_checkpoint(replace(ckpt, meta={**ckpt.meta, "global_epoch": 99}), newer)
    load = torch.load

    def replaced_first(f: object, *args: object, **kwargs: object) -> object:
        os.replace(newer, path)  # what save_checkpoint does to best.pt, just before the weights are read
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", replaced_first)
    read, sha256 = load_checkpoint_sha256(path)
    assert sha256 == hashlib.sha256(first).hexdigest()
    assert read.meta["global_epoch"] == ckpt.meta["global_epoch"] != 99


def test_a_better_epoch_over_a_calibrated_best_pt_drops_the_rule_with_a_warning(data: Path, straight: Path,
                                                                                 tmp_path: Path) -> None:  # fmt: skip
    """A run stopped after epoch 1 and given a decision rule, then resumed: the threshold was chosen on epoch 1's outputs,
    so the better epoch 2 is saved without it, and the run says to calibrate again."""
    run = _unfinished_copy(straight, tmp_path / "run")
    last = load_checkpoint(run / "last.pt")
    # Stopped after epoch 1 (its record set low, so that epoch 2 is sure to beat it).
    state = {**last.train_state, "epochs_done": 1, "log_rows": 1, "best_epoch": 1, "best_val_accuracy": -1.0}
    save_checkpoint(replace(last, train_state=state, meta={**last.meta, "global_epoch": 1}), run / "last.pt")
    save_checkpoint(replace(last, meta={**last.meta, "global_epoch": 1}), run / "best.pt")
    _with_rule(run / "best.pt")
    said = io.StringIO()
    runner.train_fold(_config(data, tmp_path, "run"), resume=run, stream=said, live=False)
    assert checkpoint_meta(run / "best.pt")["global_epoch"] == 2
    assert load_checkpoint(run / "best.pt").operating_point is None
    assert "decision rule sensitivity=0.9, calibrated for the weights of epoch 1" in said.getvalue()
    assert any("calibrate" in w for w in json.loads((run / "run.json").read_text())["warnings"])


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    def no_locks(self: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(FileLock, "acquire", no_locks)
    ran = []
    with hold_run(tmp_path / "run", "training it", "wait"):
        ran.append(True)
    err = capsys.readouterr().err
    assert ran == [True] and "cannot lock files" in err and "No locks available" in err


def test_a_missing_flock_is_a_file_system_without_locks_not_a_lock_left_held(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """flock failing with ENOSYS (some network mounts): filelock would fall back to a lock that is the file's
    existence, which a killed training would leave held for ever; we go on without a lock instead, and the
    run is neither refused afterwards nor reported as being trained."""
    import fcntl

    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import errno, fcntl, sys, time\n"
         "def no_flock(fd, op): raise OSError(errno.ENOSYS, 'Function not implemented')\n"
         "fcntl.flock = no_flock\n"
         "from covid_cxr.runs.lock import hold_run\n"
         f"with hold_run({str(run)!r}, 'training it', 'wait'):\n"
         "    print('held', flush=True); time.sleep(600)\n"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    finally:
        holder.kill()  # as kill -9 ends a training
        holder.wait()
    assert "cannot lock files" in holder.stderr.read()
    monkeypatch.setattr(fcntl, "flock", no_flock)
    assert not being_trained(run)
    with hold_run(run, "training it again", "wait"):
        pass
    err = capsys.readouterr().err
    assert "cannot lock files" in err and "Function not implemented" in err


def test_a_lock_that_cannot_be_created_for_another_reason_is_a_clear_error(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a file system without locks is gone on without one; anything else (here a folder we may not write)
    stops with the lock file and the fix named, before anything is written."""
    def denied(self: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(FileLock, "acquire", denied)
    ran = []
    with pytest.raises(DataError, match=r"\.train\.lock: cannot create the run folder's lock .*make .* writable"):
        with hold_run(tmp_path / "run", "training it", "wait"):
            ran.append(True)
    assert ran == []
