"""Resuming a run after its prepared data was prepared again (other splits) is refused, and nothing of the run
changes: its earlier epochs trained on the old phases, some of which may be test images under the new splits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.splits import SplitSettings
from covid_cxr.errors import DataError
from covid_cxr.runs.checkpoint import load_checkpoint
from covid_cxr.synth import make_synthetic
from covid_cxr.synth.layouts import SynthSummary
from covid_cxr.train.runner import train_fold
from tests.test_train_runner import config_for

pytestmark = pytest.mark.slow


def _prepare(root: Path, synth: SynthSummary, seed: int) -> None:
    prepare_dataset(PrepareSettings(out=root, covid_chestxray=synth.covid_chestxray, rsna=synth.rsna, image_size=71,
                                    split=SplitSettings(folds=2, phases=2, seed=seed)), progress=False)  # fmt: skip


def test_resume_on_changed_splits_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    synth = make_synthetic(tmp_path / "synthetic", seed=0, n_covid=10, n_pneumonia=14, n_normal=12, size=64, workers=1)
    _prepare(data, synth, seed=0)
    old_hash = PreparedData(data).fold(1).split_hash
    config = replace(config_for(data, tmp_path / "runs", "r"), epochs_per_phase=1)
    run = train_fold(config, live=False)
    info = json.loads((run / "run.json").read_text())
    info["status"] = "running"  # killed after its last epoch, before it was marked finished
    (run / "run.json").write_text(json.dumps(info))
    before = {p.name: p.read_bytes() for p in [run / "run.json", *sorted((run / "splits").iterdir())]}

    _prepare(data, synth, seed=1)  # the same data, other folds
    new_hash = PreparedData(data).fold(1).split_hash
    assert new_hash != old_hash
    with pytest.raises(DataError, match=rf"cannot resume.*{old_hash[:12]}.*run\.json.*{new_hash[:12]}.*--resume"):
        train_fold(config, resume=run, live=False)
    assert {p.name: p.read_bytes() for p in [run / "run.json", *sorted((run / "splits").iterdir())]} == before

    # A run.json without the hash (an older run) is still caught by last.pt's record of what it trained on.
    del info["split_hash"]
    (run / "run.json").write_text(json.dumps(info))
    assert load_checkpoint(run / "last.pt").meta["split_hash"] == old_hash
    with pytest.raises(DataError, match=rf"{old_hash[:12]} \(.*last\.pt\)"):
        train_fold(config, resume=run, live=False)

    # Prepared again as it was, the run resumes, and run.json keeps the hash it trained on.
    _prepare(data, synth, seed=0)
    info["split_hash"] = old_hash
    (run / "run.json").write_text(json.dumps(info))
    train_fold(config, resume=run, live=False)
    assert json.loads((run / "run.json").read_text())["split_hash"] == old_hash


def test_a_run_resumed_in_another_precision_says_so_and_keeps_the_record(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    synth = make_synthetic(tmp_path / "synthetic", seed=0, n_covid=10, n_pneumonia=14, n_normal=12, size=64, workers=1)
    _prepare(data, synth, seed=0)
    config = replace(config_for(data, tmp_path / "runs", "r"), epochs_per_phase=1, precision="fp32")
    run = train_fold(config, live=False)
    info = json.loads((run / "run.json").read_text())
    assert "precision=fp32" in info["runtime"] and not info.get("warnings")
    # As if its first epochs had run in bf16 on another CPU, and it was killed before it was marked finished.
    info.update(status="running", runtime=info["runtime"].replace("precision=fp32", "precision=bf16"),
                warnings=["an earlier warning"], world_size=2)  # ... and in two torchrun processes
    (run / "run.json").write_text(json.dumps(info))
    capsys.readouterr()
    train_fold(config, resume=run, live=False)
    err = capsys.readouterr().err
    assert "warning: resumed in fp32" in err and "the epochs before ran in bf16" in err
    warnings = json.loads((run / "run.json").read_text())["warnings"]
    assert warnings[0] == "an earlier warning" and "the epochs before ran in bf16" in warnings[1]
    assert "warning: resumed in 1 process(es), but the epochs before ran in 2" in err
    assert "torchrun --nproc_per_node 2" in err and "the epochs before ran in 2" in warnings[2]
