"""A run stopped between saving best.pt and last.pt, then looked at and resumed: everything that names the run's
best epoch (the resumed run's bookkeeping, run.json, last.pt, MODEL_CARD.md, evaluate's record) names the epoch
best.pt holds.

The stopped folder is made from real files of real runs (2 phases x 1 epoch, deterministic): a run stopped as its
second epoch starts (last.pt, run.json and log.csv of epoch 1), and beside its last.pt the best.pt that epoch 2 of
an uninterrupted run writes (the same checkpoint as its last.pt without the training state). That is the folder
``kill -9`` leaves after ``_save`` wrote best.pt for an improved epoch 2 and before it wrote last.pt.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from covid_cxr.config import TrainConfig
from covid_cxr.evaluate.run import evaluate_run
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.runs.checkpoint import checkpoint_meta, load_checkpoint, save_checkpoint
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
