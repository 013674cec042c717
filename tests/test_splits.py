"""Folds are patient-disjoint partitions, phases follow the paper, the authors' files are reproduced exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covid_cxr.data.author_splits import read_author_splits
from covid_cxr.data.manifest import combine
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.sources import read_covid_chestxray, read_rsna
from covid_cxr.data.splits import Fold, SplitPlan, SplitSettings, check_disjoint, core_mask, make_folds
from covid_cxr.errors import ConfigError, DataError


def _rows(source: str, label: str, patients: int, per_patient: tuple[int, int], rng: np.random.Generator) -> list[dict]:
    rows = []
    for p in range(patients):
        pid = f"{source}-{label}-{p}"
        for i in range(int(rng.integers(per_patient[0], per_patient[1] + 1))):
            rows.append({"image_id": f"{source}/{label}{p}_{i}", "path": f"/x/{pid}_{i}.png", "label": label,
                         "patient_id": pid, "source": source, "view": "PA"})
    return rows


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    """Many images per patient in the core and in a folder pool, one per patient in RSNA."""
    rng = np.random.default_rng(0)
    rows = (_rows("covid-chestxray", "covid", 40, (1, 6), rng) + _rows("covid-chestxray", "pneumonia", 9, (1, 4), rng)
            + _rows("rsna", "normal", 400, (1, 1), rng) + _rows("rsna", "pneumonia", 300, (1, 1), rng)
            + _rows("folder", "normal", 30, (2, 5), rng) + _rows("folder", "covid", 6, (2, 3), rng))
    return combine([pd.DataFrame(rows)])


def _patients(manifest: pd.DataFrame, ids: object) -> set[str]:
    return set(manifest.set_index("image_id").loc[list(ids), "patient_id"])


@pytest.mark.parametrize("protocol", ["strict", "paper"])
def test_folds_are_patient_disjoint_partitions(manifest: pd.DataFrame, protocol: str) -> None:
    plan = make_folds(manifest, SplitSettings(folds=5, phases=4, seed=1, protocol=protocol))
    core = manifest[core_mask(manifest)]
    core_tests = []
    for fold in plan.folds:
        train, val, test = _patients(manifest, fold.train), _patients(manifest, fold.val), _patients(manifest, fold.test)
        assert not train & test and not train & val
        if protocol == "strict":
            assert not val & test
            assert fold.train | set(fold.val) | set(fold.test) == set(manifest["image_id"])
            assert not fold.train & set(fold.val)
        else:  # the authors' s_test: drawn from test, holding every test COVID-19 image
            assert set(fold.val) <= set(fold.test)
            test_covid = set(manifest[manifest["image_id"].isin(fold.test) & (manifest["label"] == "covid")]["image_id"])
            assert test_covid <= set(fold.val)
        core_train = set(core["image_id"]) & fold.train
        pools = [set(p) - core_train for p in fold.phases]
        for p in fold.phases:  # every phase repeats all training core images
            assert core_train <= set(p)
        assert sum(len(p) for p in pools) == len(set().union(*pools))  # no pool image in two phases
        assert all(len(p) > 0 for p in pools)
        core_tests.append(_patients(manifest, set(fold.test) & set(core["image_id"])))
        labels = manifest.set_index("image_id").loc[fold.val, "label"]
        assert {"covid", "normal", "pneumonia"} <= set(labels)
    # The core test sets partition the core patients: each patient is tested in exactly one fold.
    assert sum(len(t) for t in core_tests) == len(set().union(*core_tests)) == core["patient_id"].nunique()
    assert any("smaller than the paper" in n for n in plan.notes)


def test_seeded(manifest: pd.DataFrame) -> None:
    a = make_folds(manifest, SplitSettings(seed=3))
    b = make_folds(manifest, SplitSettings(seed=3))
    c = make_folds(manifest, SplitSettings(seed=4))
    assert [f.test for f in a.folds] == [f.test for f in b.folds]
    assert [f.phases for f in a.folds] == [f.phases for f in b.folds]
    assert [sorted(f.test) for f in a.folds] != [sorted(f.test) for f in c.folds]


def test_leaking_splits_are_refused(manifest: pd.DataFrame) -> None:
    plan = make_folds(manifest, SplitSettings(folds=3, phases=2))
    fold = plan.folds[0]
    by_patient = manifest.groupby("patient_id")["image_id"].apply(list)
    multi = next(ids for ids in by_patient if len(ids) > 1 and ids[0] in fold.test)
    leaky = Fold(fold=1, phases=[fold.phases[0] + [multi[0]], fold.phases[1]], val=fold.val,
                 test=[i for i in fold.test if i != multi[0]])
    with pytest.raises(DataError, match="patients in both test and training"):
        check_disjoint(SplitPlan(folds=[leaky], protocol="strict", origin="test"), manifest)
    with pytest.raises(ConfigError, match="protocol"):
        SplitSettings(protocol="lenient")
    few = manifest[(manifest["label"] != "covid") | manifest["patient_id"].isin(["covid-chestxray-covid-0"])]
    with pytest.raises(DataError, match="cannot fill 5 folds"):
        make_folds(few, SplitSettings())


@pytest.fixture(scope="module")
def real_manifest(fixtures_dir: Path) -> pd.DataFrame:
    cxr, _ = read_covid_chestxray(fixtures_dir / "covid_chestxray" / "metadata_2020-04-08.csv")
    rsna, _ = read_rsna(fixtures_dir / "rsna")
    return combine([cxr, rsna])


@pytest.mark.fixtures
def test_generated_folds_on_real_metadata_follow_the_paper(real_manifest: pd.DataFrame) -> None:
    plan = make_folds(real_manifest, SplitSettings())
    label = real_manifest.set_index("image_id")["label"]
    source = real_manifest.set_index("image_id")["source"]
    assert plan.notes == []  # full-size pools: the paper's quotas, unscaled
    for fold in plan.folds:
        for phase in fold.phases:
            rsna = [i for i in phase if source[i] == "rsna"]
            counts = label[rsna].value_counts()
            assert counts["normal"] == 250 and counts["pneumonia"] == 200
        assert 33 <= (label[fold.test] == "covid").sum() <= 39  # a fifth of 180, by patient


@pytest.mark.fixtures
def test_authors_phase_files_reproduced_exactly(fixtures_dir: Path, tmp_path: Path) -> None:
    splits = fixtures_dir / "mr7495_splits"
    out = tmp_path / "data"
    prepare_dataset(PrepareSettings(out=out, covid_chestxray=fixtures_dir / "covid_chestxray" / "metadata_2020-04-08.csv",
                                    rsna=fixtures_dir / "rsna", splits_from=splits, labels_only=True, protocol="paper"),
                    progress=False)
    data = PreparedData(out)
    assert (data.num_folds, data.num_phases, data.protocol) == (5, 8, "paper")
    everything = set(pd.read_csv(splits / "All.csv")["filename"])
    for k in range(1, 6):
        fold = data.fold(k)
        assert len(fold.phases) == 8
        in_phases = set()
        for p, phase in enumerate(fold.phases, start=1):
            theirs = pd.read_csv(splits / f"fold{k}" / f"train{p}.csv")["filename"]
            ours = phase["image_id"].str.split("/", n=1).str[1]
            assert sorted(ours) == sorted(t.rsplit(".", 1)[0] for t in theirs)
            in_phases |= set(theirs)
        theirs_test = sorted(t.rsplit(".", 1)[0] for t in everything - in_phases)
        assert sorted(fold.test["image_id"].str.split("/", n=1).str[1]) == theirs_test
        assert set(fold.val["image_id"]) <= set(fold.test["image_id"])
    summary = data.summary
    assert summary["selection_on_test"] is True and summary["folds"][0]["test"]["images"] == 11302


@pytest.mark.fixtures
def test_authors_splits_under_strict_move_validation_out_of_test(real_manifest: pd.DataFrame, fixtures_dir: Path) -> None:
    plan = read_author_splits(fixtures_dir / "mr7495_splits", real_manifest, SplitSettings(protocol="strict"))
    for fold in plan.folds:
        assert not set(fold.val) & set(fold.test) and len(fold.val) > 600
        assert len(fold.test) + len(fold.val) == 11302 or len(fold.test) + len(fold.val) == 11301
