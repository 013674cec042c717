"""Preparing again into a prepared folder keeps what others wrote there: the caches evaluate built (any size and
resize method still valid), the data audits' results; and refuses a folder holding files prepare did not write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from covid_cxr.data.cache import ensure_cache
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.splits import SplitSettings
from covid_cxr.errors import DataError
from covid_cxr.synth import make_synthetic
from covid_cxr.synth.layouts import SynthSummary

SIZE = 72


def _settings(synth: SynthSummary, out: Path, size: int, seed: int = 0) -> PrepareSettings:
    return PrepareSettings(out=out, covid_chestxray=synth.covid_chestxray, rsna=synth.rsna, image_size=size,
                           workers=1, split=SplitSettings(folds=2, phases=2, seed=seed))


def test_preparing_again_keeps_valid_caches_and_audits(tmp_path: Path) -> None:
    synth = make_synthetic(tmp_path / "raw", seed=0, n_covid=10, n_pneumonia=14, n_normal=12, size=64, workers=1)
    data = tmp_path / "data"
    prepare_dataset(_settings(synth, data, SIZE), progress=False)
    prepared = PreparedData(data)
    ensure_cache(data / "cache", prepared.manifest, SIZE, "bilinear", workers=1, progress=False)  # as evaluate does
    bilinear = np.array(prepared.cache(SIZE, "bilinear").images)
    result = data / "audit" / "fold1" / "source.json"
    result.parent.mkdir(parents=True)
    result.write_text(json.dumps({"audit": "source", "auc": 0.99}))

    report = prepare_dataset(_settings(synth, data, 80, seed=1), progress=False)  # another size, other folds
    again = PreparedData(data)
    assert sorted(p.name for p in (data / "cache").iterdir()) == ["size72", "size72-bilinear", "size80"]
    assert np.array_equal(np.array(again.cache(SIZE, "bilinear").images), bilinear)
    assert json.loads(result.read_text()) == {"audit": "source", "auc": 0.99}
    assert not any("audit" in n for n in report.notes)  # the same images: the audit still holds

    (data / "cache" / "size72-bilinear" / "meta.json").write_text(json.dumps({"image_size": SIZE, "key": "old"}))
    prepare_dataset(_settings(synth, data, SIZE), progress=False)
    assert sorted(p.name for p in (data / "cache").iterdir()) == ["size72", "size80"]  # stale: left out


def test_a_prepared_folder_with_other_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    synth = make_synthetic(tmp_path / "raw", seed=0, n_covid=10, n_pneumonia=14, n_normal=12, size=64, workers=1)
    data = tmp_path / "data"
    prepare_dataset(_settings(synth, data, SIZE), progress=False)
    (data / "my-notes.txt").write_text("which seed did I use?")
    before = sorted(p.relative_to(data).as_posix() for p in data.rglob("*"))
    with pytest.raises(DataError, match=r"holds my-notes.txt, which 'covid-cxr prepare' did not write .* move them"):
        prepare_dataset(_settings(synth, data, SIZE, seed=1), progress=False)
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) == before
    assert not list(tmp_path.glob(".data.*"))
