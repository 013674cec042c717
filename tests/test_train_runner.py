"""The phased runner on a tiny prepared synthetic set: run folder, phase order, resume after kill -9,
clear errors. The real Xception at 71 px keeps it small; the torchrun test is in test_train_distributed."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from covid_cxr.cli import main as cli_main
from covid_cxr.config import TrainConfig, load_config, make_config
from covid_cxr.errors import ConfigError, DataError
from covid_cxr.runs.checkpoint import load_checkpoint
from covid_cxr.train.run_log import LOG_COLUMNS
from covid_cxr.train.runner import ids_sha1, train_fold

pytestmark = pytest.mark.slow

TRAIN_ARGS = ["--network", "xception", "--preset", "cpu", "--fold", "1", "--image-size", "71", "--epochs-per-phase",
              "2", "--batch-size", "3", "--precision", "fp32", "--deterministic", "--seed", "11"]  # fmt: skip


def tiny_prepared(root: Path, *, phases: int = 2) -> Path:
    """Smallest synthetic set that fills 2 folds of ``phases`` phases (13-16 training images a phase; fold 1's phases differ:
    with fewer normal images every training image is in every phase, and a phase could not be told from another)."""
    from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
    from covid_cxr.data.splits import SplitSettings
    from covid_cxr.synth import make_synthetic

    synth = make_synthetic(root / "synthetic", seed=0, n_covid=10, n_pneumonia=14, n_normal=14, size=64, workers=1)
    data = root / "data"
    prepare_dataset(PrepareSettings(out=data, covid_chestxray=synth.covid_chestxray, rsna=synth.rsna, image_size=71,
                                    split=SplitSettings(folds=2, phases=phases, seed=0)), progress=False)  # fmt: skip
    return data


def config_for(data: Path, out: Path, name: str):  # noqa: ANN201 - a TrainConfig
    return make_config("cpu", data=str(data), network="xception", fold=1, image_size=71, epochs_per_phase=2,
                       batch_size=3, precision="fp32", deterministic=True, seed=11, out=str(out), name=name)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def straight(data: Path) -> Path:
    """An uninterrupted run: 2 phases x 2 epochs."""
    return train_fold(config_for(data, data.parent / "runs", "straight"), live=False)


def _log(run: Path) -> list[dict[str, str]]:
    with (run / "log.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_run_folder_log_and_phases(data: Path, straight: Path) -> None:
    from covid_cxr.data.prepared import PreparedData

    rows = _log(straight)
    assert list(rows[0]) == list(LOG_COLUMNS)
    assert [(r["phase"], r["epoch"]) for r in rows] == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    fold = PreparedData(data).fold(1)
    for r in rows:  # each epoch trained on exactly its prepared phase file
        phase = fold.phases[int(r["phase"]) - 1]
        assert r["phase_ids_sha1"] == ids_sha1(phase["image_id"]) and int(r["phase_images"]) == len(phase)
    assert rows[0]["phase_ids_sha1"] != rows[2]["phase_ids_sha1"]

    info = json.loads((straight / "run.json").read_text())
    assert info["status"] == "finished" and info["network"] == "xception" and info["fold"] == 1
    assert info["data"] == str(data.resolve()) and info["split_hash"] == fold.split_hash
    accs = [float(r["val_accuracy"]) for r in rows]
    assert info["best_epoch"] == accs.index(max(accs)) + 1 and info["best_val_accuracy"] == pytest.approx(max(accs), abs=1e-6)

    config = load_config(straight / "config.yaml")
    assert config.image_size == 71 and config.batch_size == 3 and config.name == "straight"
    assert "runtime:" in (straight / "config.yaml").read_text()
    for name, path in fold.paths.items():
        assert (straight / "splits" / path.name).read_bytes() == path.read_bytes(), name
    assert any((straight / "tb").iterdir())

    best = load_checkpoint(straight / "best.pt")
    assert best.meta["global_epoch"] == info["best_epoch"] and best.train_state is None
    assert best.preprocessing.image_size == 71 and best.preprocessing.scaling == "unit"
    last = load_checkpoint(straight / "last.pt")
    assert last.train_state["epochs_done"] == 4 and "augment" in last.train_state["rng"]
    assert best.build_model().num_classes == 3
    assert not list(straight.glob(".*.tmp"))


def test_resume_after_kill_matches_uninterrupted(data: Path, straight: Path) -> None:
    """kill -9 inside the second epoch of phase 1, resume, and end with the uninterrupted run's weights."""
    out = data.parent / "runs"
    run = out / "killed"
    cmd = [sys.executable, "-m", "covid_cxr", "train", str(data), *TRAIN_ARGS, "--out", str(out), "--name", "killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not (run / "last.pt").exists():  # epoch 1 finished and saved
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"training subprocess ended early: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            time.sleep(0.05)
        # Into epoch 2 by half of epoch 1's compute time (at most 0.5 s): a fixed sleep could outlast the
        # remaining epochs on a fast machine (a GPU), and the kill would then find the run finished.
        time.sleep(min(0.5, 0.5 * float(_log(run)[0]["seconds"])))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_state = load_checkpoint(run / "last.pt").train_state
    assert killed_state is not None and killed_state["epochs_done"] < 4
    assert json.loads((run / "run.json").read_text())["status"] == "running"

    assert cli_main(["train", "--resume", str(run)]) == 0

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(run / "last.pt")
    assert a.model_state.keys() == b.model_state.keys()
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
    assert a.train_state["best_epoch"] == b.train_state["best_epoch"]
    steps_a = a.train_state["optimizer"]["state"]
    steps_b = b.train_state["optimizer"]["state"]
    assert all(torch.equal(steps_a[k]["exp_avg_sq"], steps_b[k]["exp_avg_sq"]) for k in steps_a)
    same = ["phase", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "phase_ids_sha1"]
    assert [{k: r[k] for k in same} for r in _log(straight)] == [{k: r[k] for k in same} for r in _log(run)]


def test_clear_errors(data: Path, straight: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = config_for(data, tmp_path, "x")
    with pytest.raises(DataError, match="is not a prepared dataset"):
        train_fold(replace(base, data=str(tmp_path)))
    with pytest.raises(DataError, match=r"fold 3 is out of range: .* folds 1-2"):
        train_fold(replace(base, fold=3))
    with pytest.raises(DataError, match="no image cache of 96 px"):
        train_fold(replace(base, image_size=96))
    with pytest.raises(DataError, match=r"no image cache of 96 px .*\(the cpu preset trains at 96 px"):
        train_fold(make_config("cpu", data=str(data), network="xception", out=str(tmp_path)))  # no size given
    with pytest.raises(ConfigError, match="is a xception run; it cannot be resumed as concat"):
        train_fold(replace(base, network="concat"), resume=straight)
    with pytest.raises(FileExistsError, match="already holds a run; continue it with --resume"):
        train_fold(replace(base, out=str(straight.parent), name="straight"))
    assert cli_main(["train", str(data), "--network", "xception", "--image-size", "64"]) == 2
    assert cli_main(["train", "--resume", str(straight), "--network", "resnet50v2"]) == 2
    # Other settings asked of a resumed run were dropped without a word: refused, each named with the run's own.
    assert cli_main(["train", "--resume", str(straight), "--epochs-per-phase", "5", "--lr", "0.5", "--fold", "2"]) == 2
    assert cli_main(["train", "--resume", str(straight), "--epochs-per-phase", "2", "--fold", "1"]) == 0  # its own
    err = capsys.readouterr().err
    assert ("keeps the settings it was started with; asked for --epochs-per-phase 5 (the run has 2), --lr 0.5 (the "
            "run has 0.0001), --fold 2 (the run has 1)") in err
    assert not (tmp_path / "x").exists()  # nothing written for a refused run
    assert pd.read_csv(straight / "log.csv").shape[0] == 4  # and the refused resume left the run alone
    assert not torch.are_deterministic_algorithms_enabled()  # the deterministic runs restored the global flag


def test_a_settings_warning_is_printed_and_recorded_in_the_run(data: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """What the settings warn about (e.g. ImageNet weights fed another scaling) reaches stderr and run.json."""
    message = "xception's ImageNet weights expect scaling 'symmetric' but the settings say 'unit'"
    monkeypatch.setattr(TrainConfig, "scaling_warning", lambda self: message)
    run = train_fold(replace(config_for(data, tmp_path, "warned"), epochs_per_phase=1), live=False)
    said = capsys.readouterr()
    assert f"warning: {message}" in said.err
    # The best validation accuracy as a count of the validation split's images, with its interval (not "0.4444").
    best = json.loads((run / "run.json").read_text())["best_val_accuracy"]
    n = len(pd.read_csv(data / "splits" / "fold1" / "val.csv"))
    shown = re.search(r"finished: best validation accuracy (\d+\.\d)% \(95% CI [\d.]+-[\d.]+%\), (\d+)/(\d+) "
                      r"at epoch \d+", said.out + said.err)
    assert shown is not None and int(shown[3]) == n and int(shown[2]) == round(best * n)
    assert shown[1] == f"{100 * round(best * n) / n:.1f}"
    assert json.loads((run / "run.json").read_text())["warnings"] == [message]


def test_a_run_without_warnings_records_none(straight: Path) -> None:
    assert "warnings" not in json.loads((straight / "run.json").read_text())


def test_an_interrupted_run_says_stopped_and_how_to_go_on(data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C left run.json saying "running" and evaluate pointing at a last.pt that an interrupt in the first
    epoch never wrote; now the run says "stopped", evaluate says how to continue it, and --resume finishes it."""
    from covid_cxr.errors import CheckpointError
    from covid_cxr.runs.resolve import resolve_target

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("covid_cxr.train.runner.train_one_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_fold(config_for(data, tmp_path, "stopped"), live=False)
    run = tmp_path / "stopped"
    assert json.loads((run / "run.json").read_text())["status"] == "stopped"
    assert not (run / "last.pt").exists()
    with pytest.raises(CheckpointError, match=rf"status 'stopped'\): it has not finished an epoch; continue it with "
                                              rf"'covid-cxr train --resume {run}'"):
        resolve_target(run, None, None, "test", None)
    monkeypatch.undo()
    assert train_fold(config_for(data, tmp_path, "x"), resume=run, live=False) == run
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_sigterm_ends_a_run_as_stopped_with_the_signals_status(data: Path, tmp_path: Path) -> None:
    """timeout, docker stop and batch schedulers send SIGTERM: the run said "running" ever after, as if alive."""
    run = tmp_path / "terminated"
    cmd = [sys.executable, "-m", "covid_cxr", "train", str(data), *TRAIN_ARGS, "--out", str(tmp_path), "--name",
           "terminated"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not (run / "run.json").exists() or not (run / "log.csv").exists():  # training has begun
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"training ended early: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    info = json.loads((run / "run.json").read_text())
    if info["status"] == "finished":
        pytest.skip("the run finished before SIGTERM reached it (a very fast machine)")
    assert rc == 128 + signal.SIGTERM and info["status"] == "stopped"
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert "training stopped (" in err and f"continue it with 'covid-cxr train --resume {run}'" in err, err[-2000:]
