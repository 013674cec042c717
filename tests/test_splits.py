"""Folds are patient-disjoint partitions, phases follow the paper, the authors' files are reproduced exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covid_cxr.data.author_splits import read_author_splits
from covid_cxr.data.manifest import combine
from covid_cxr.data.phases import PAPER_PHASE, paper_shares, plan_phase
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.sources import read_covid_chestxray, read_rsna
from covid_cxr.data.splits import (
    PROTOCOLS,
    Fold,
    SplitPlan,
    SplitSettings,
    check_disjoint,
    check_filled,
    core_mask,
    identical_across,
    make_folds,
    merge_identical,
    take_patients,
)
from covid_cxr.errors import ConfigError, DataError


def _rows(source: str, label: str, patients: int, per_patient: tuple[int, int], rng: np.random.Generator,
          also: str | None = None) -> list[dict]:
    """``patients`` patients of ``source`` with 1..n ``label`` images each (and 1-2 ``also`` images)."""
    rows = []
    for p in range(patients):
        pid = f"{source}-{label}{'-' + also if also else ''}-{p}"
        labels = [label] * int(rng.integers(per_patient[0], per_patient[1] + 1))
        labels += [also] * int(rng.integers(1, 3)) if also else []
        for i, lab in enumerate(labels):
            rows.append({"image_id": f"{source}/{pid}_{i}", "path": f"/x/{pid}_{i}.png", "label": lab,
                         "patient_id": pid, "source": source, "view": "PA"})
    return rows


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    """Many images per patient in the core and in a folder pool, one per patient in RSNA, and patients with
    images of two classes (COVID-19 + normal or pneumonia in the core, pneumonia + normal in the pool, as in NIH)."""
    rng = np.random.default_rng(0)
    rows = (_rows("covid-chestxray", "covid", 40, (1, 6), rng) + _rows("covid-chestxray", "pneumonia", 9, (1, 4), rng)
            + _rows("covid-chestxray", "covid", 4, (1, 3), rng, also="normal")
            + _rows("covid-chestxray", "covid", 3, (1, 2), rng, also="pneumonia")
            + _rows("rsna", "normal", 400, (1, 1), rng) + _rows("rsna", "pneumonia", 300, (1, 1), rng)
            + _rows("folder", "normal", 30, (2, 5), rng) + _rows("folder", "covid", 6, (2, 3), rng)
            + _rows("folder", "pneumonia", 12, (1, 2), rng, also="normal"))
    return combine([pd.DataFrame(rows)])


def _patients(manifest: pd.DataFrame, ids: object) -> set[str]:
    return set(manifest.set_index("image_id").loc[list(ids), "patient_id"])


def _shares(manifest: pd.DataFrame, ids: list[str]) -> dict[str, float]:
    counts = manifest.set_index("image_id").loc[ids, "label"].value_counts(normalize=True)
    return {c: float(counts.get(c, 0.0)) for c in ("covid", "pneumonia", "normal")}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_patient_is_on_one_side_of_every_fold(manifest: pd.DataFrame, protocol: str) -> None:
    plan = make_folds(manifest, SplitSettings(folds=5, phases=4, seed=1, protocol=protocol))
    core = manifest[core_mask(manifest)]
    mixed = manifest.groupby("patient_id")["label"].nunique().loc[lambda n: n > 1].index
    assert len(mixed) == 19
    everything = set(manifest["image_id"])
    tested = []
    for fold in plan.folds:
        train, val = _patients(manifest, fold.train), _patients(manifest, fold.val)
        test = _patients(manifest, fold.test)
        assert not train & test and not train & val
        assert set(mixed) <= train | val | test
        if protocol == "paper":  # the authors' s_test: drawn from test, holding every test COVID-19 image
            assert set(fold.val) <= set(fold.test)
            is_test = manifest["image_id"].isin(fold.test)
            assert set(manifest.loc[is_test & (manifest["label"] == "covid"), "image_id"]) <= set(fold.val)
        else:  # a partition: every image on exactly one side
            assert not val & test
            assert fold.train | set(fold.val) | set(fold.test) == everything
            assert len(fold.train) + len(fold.val) + len(fold.test) == len(everything)
        assert len(fold.phases) == (1 if protocol == "kfold" else 4)
        for phase in fold.phases:
            assert set(manifest.set_index("image_id").loc[phase, "label"]) == {"covid", "pneumonia", "normal"}
        assert {"covid", "normal", "pneumonia"} <= set(manifest.set_index("image_id").loc[fold.val, "label"])
        scope = manifest if protocol == "kfold" else core
        tested.append(_patients(manifest, set(fold.test) & set(scope["image_id"])))
    # The test sets partition the core patients (every patient under kfold): each is tested in exactly one fold.
    scope = manifest if protocol == "kfold" else core
    assert sum(len(t) for t in tested) == len(set().union(*tested)) == scope["patient_id"].nunique()


def test_folds_are_stratified_and_balanced_by_images(manifest: pd.DataFrame) -> None:
    """Under kfold each fold's test set is one StratifiedGroupKFold fold: every class spread evenly by
    images, to within the largest patient of that class."""
    plan = make_folds(manifest, SplitSettings(folds=5, protocol="kfold", seed=2))
    for cls in ("covid", "pneumonia", "normal"):
        rows = manifest[manifest["label"] == cls]
        largest = rows.groupby("patient_id").size().max()
        per_fold = [int(rows["image_id"].isin(f.test).sum()) for f in plan.folds]
        assert sum(per_fold) == len(rows)
        assert max(per_fold) - min(per_fold) <= largest, (cls, per_fold)


def test_take_patients_takes_whole_patients_rarest_class_first() -> None:
    rows = [{"image_id": f"{p}-{i}", "patient_id": p, "source": "nih", "label": lab} for p, labels in
            {"a": "pn", "b": "pnn", "c": "n", "d": "nn", "e": "p", "f": "nnnnnnnnnn"}.items()
            for i, lab in enumerate({"p": "pneumonia", "n": "normal"}[x] for x in labels)]
    frame = pd.DataFrame(rows)
    for seed in range(5):
        (part,), rest = take_patients(frame, [{"pneumonia": 2, "normal": 3}], np.random.default_rng(seed))
        taken = frame[frame["image_id"].isin(part)]
        assert set(part) | set(rest) == set(frame["image_id"]) and not set(part) & set(rest)
        assert set(taken["patient_id"]).isdisjoint(frame.loc[frame["image_id"].isin(rest), "patient_id"])
        assert (taken["label"] == "pneumonia").sum() >= 2  # the pneumonia patients first, with their normal images
        assert abs((taken["label"] == "normal").sum() - 3) <= 1  # as near the quota as whole patients allow

        assert "f" not in set(taken["patient_id"])


def _icu_shaped(covid_patients: int, films: int) -> pd.DataFrame:
    """COVID-19 patients with ``films`` daily films each (as in intensive care), one-image pneumonia and normal."""
    rows = [("covid", f"c{p}") for p in range(covid_patients) for _ in range(films)]
    rows += [("pneumonia", f"p{i}") for i in range(40)] + [("normal", f"n{i}") for i in range(40)]
    return pd.DataFrame([{"image_id": f"x/{i}", "path": f"/x/{i}.png", "label": label, "patient_id": pid,
                          "source": "folder", "view": "AP"} for i, (label, pid) in enumerate(rows)])


def test_a_class_of_many_image_patients_still_gets_a_validation_patient() -> None:
    """A quota of 1 COVID-19 image and patients of 12 films each: "take a patient only if it gets closer to the quota"
    alone took none, so validation held no COVID-19 image, every fold, under strict and kfold alike."""
    frame = _icu_shaped(6, 12)
    for seed in range(3):
        (part,), rest = take_patients(frame, [{"covid": 1, "normal": 4}], np.random.default_rng(seed))
        taken = frame[frame["image_id"].isin(part)]
        covid = taken[taken["label"] == "covid"]
        assert len(covid) == 12 and covid["patient_id"].nunique() == 1
        assert (taken["label"] == "normal").sum() == 4
    # The smallest patient, and never the class's last one: with one patient, the rest keeps it.
    sizes = _icu_shaped(1, 12).assign(patient_id=lambda f: np.where(f.index < 5, "small", f["patient_id"]))
    (part,), _ = take_patients(sizes[sizes["label"] == "covid"], [{"covid": 1}], np.random.default_rng(0))
    assert set(sizes.loc[sizes["image_id"].isin(part), "patient_id"]) == {"small"}
    (part,), rest = take_patients(_icu_shaped(1, 12), [{"covid": 1}], np.random.default_rng(0))
    assert part == [] and len(rest) == 92
    for protocol in ("strict", "kfold"):
        plan = make_folds(_icu_shaped(6, 12), SplitSettings(folds=3, protocol=protocol, seed=0))
        labels = _icu_shaped(6, 12).set_index("image_id")["label"]
        assert all(set(labels[fold.val]) == {"covid", "pneumonia", "normal"} for fold in plan.folds)
        assert not any("validation holds no" in note for note in plan.notes)


def test_a_class_keeps_its_last_patient_only_where_training_has_it_from_nowhere_else() -> None:
    """covid-chestxray's one normal patient may go to validation (RSNA's pool gives training its normal images), so
    the paper's generated folds stay as they were; a class the rest has no other patient of keeps its last one."""
    frame = pd.DataFrame([{"image_id": f"x/{i}", "label": label, "patient_id": f"p{i}", "source": "covid-chestxray"}
                          for i, label in enumerate(["covid"] * 9 + ["normal"])])
    for keep, taken in (((), True), ({"normal"}, False)):
        (part,), rest = take_patients(frame, [{"covid": 1, "normal": 1}], np.random.default_rng(0), keep_one=keep)
        assert ("x/9" in part) is taken and ("x/9" in rest) is not taken


def test_a_class_validation_cannot_hold_is_named() -> None:
    """Two COVID-19 patients in two folds: each fold's training side has one, which training keeps."""
    plan = make_folds(_icu_shaped(2, 3), SplitSettings(folds=2, protocol="kfold", seed=0))
    (note,) = [n for n in plan.notes if "validation holds no" in n]
    assert note.startswith("warning: folds 1, 2: validation holds no COVID-19 image, though training does")
    assert "without that class, and calibrate cannot choose a threshold for it; add patients" in note


def _paper_shaped(covid_patients: int, rsna: tuple[int, int], seed: int = 0) -> pd.DataFrame:
    """covid-chestxray-like core (1-4 images a COVID-19 patient, 42:180 pneumonia) and one-image RSNA patients."""
    rng = np.random.default_rng(seed)
    rows = (_rows("covid-chestxray", "covid", covid_patients, (1, 2), rng)
            + _rows("covid-chestxray", "pneumonia", max(3, covid_patients // 5), (1, 2), rng)
            + _rows("rsna", "normal", rsna[0], (1, 1), rng) + _rows("rsna", "pneumonia", rsna[1], (1, 1), rng))
    return combine([pd.DataFrame(rows)])


@pytest.mark.parametrize("protocol", ["strict", "paper"])
@pytest.mark.parametrize("shape", ["a tenth of everything", "all COVID-19, a tenth of RSNA"])
def test_phases_keep_the_papers_class_shares_on_a_tenth_of_the_pool(protocol: str, shape: str) -> None:
    """The issue's case: quotas that shrank with the pool while every COVID-19 image stayed gave phases of
    71% COVID-19. Every phase now holds the paper's 149 : 234 : 250 shares to within 3 points."""
    covid_patients = 12 if shape.startswith("a tenth") else 120
    m = _paper_shaped(covid_patients, (885, 601))
    plan = make_folds(m, SplitSettings(protocol=protocol, seed=3))
    want = paper_shares(["covid", "pneumonia", "normal"])
    for fold in plan.folds:
        for phase in fold.phases:
            got = _shares(m, phase)
            assert all(abs(got[c] - want[c]) <= 0.03 for c in want), (fold.fold, got)
    assert all(i["rule"] == "paper-proportions" for i in plan.phase_info)
    assert any("the paper's proportions" in n and "would not fit the pools" in n for n in plan.notes)


def test_a_scarce_class_limits_the_phases_and_says_so() -> None:
    """Too few pneumonia images to balance every COVID-19 image: all pneumonia images in every phase, the
    COVID-19 images in turn (each in some phase), shares still the paper's."""
    m = _paper_shaped(60, (900, 30))
    plan = make_folds(m, SplitSettings(seed=1))
    labels = m.set_index("image_id")["label"]
    want = paper_shares(["covid", "pneumonia", "normal"])
    for fold, info in zip(plan.folds, plan.phase_info):
        assert info["rule"] == "class-limited" and info["limited_by"] == "pneumonia"
        train_pn = {i for i in fold.train if labels[i] == "pneumonia"}
        train_covid = {i for i in fold.train if labels[i] == "covid"}
        assert all(train_pn <= set(p) for p in fold.phases)
        assert all(0 < len(train_covid & set(p)) < len(train_covid) for p in fold.phases)
        assert all(abs(_shares(m, p)[c] - want[c]) <= 0.03 for p in fold.phases for c in want)
    assert any("Pneumonia images limit them" in n for n in plan.notes)


def test_plan_phase_keeps_the_papers_quotas_on_the_papers_numbers() -> None:
    quota = plan_phase({"covid": 149, "pneumonia": 34}, {"normal": 8851, "pneumonia": 6012}, 8)
    assert quota.rule == "paper-quotas" and quota.pool == {"covid": 0, "pneumonia": 200, "normal": 250}
    assert quota.total() == PAPER_PHASE
    # The same core beside a pool too small for 8 x 250 normal images: the paper's proportions instead.
    small = plan_phase({"covid": 149, "pneumonia": 34}, {"normal": 1000, "pneumonia": 6012}, 8)
    assert small.rule == "paper-proportions" and small.total() == PAPER_PHASE
    with pytest.raises(DataError, match="no COVID-19 image"):
        plan_phase({"pneumonia": 34}, {"normal": 1000}, 8)


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
    with pytest.raises(DataError, match="1 COVID-19 patients cannot fill 5 folds; add data$"):
        make_folds(few, SplitSettings())
    none = manifest[manifest["label"] != "covid"]  # without COVID-19 only kfold can test: the message says so
    with pytest.raises(DataError, match=r"0 COVID-19 patients cannot fill 2 folds; add data, or for data without "
                                        r"COVID-19 images give --protocol kfold"):
        make_folds(none, SplitSettings(folds=2))
    assert make_folds(none, SplitSettings(folds=2, protocol="kfold")).folds


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
    assert all(i["rule"] == "paper-quotas" for i in plan.phase_info)  # full-size pools: the paper's quotas
    assert len(plan.notes) == 1 and "the paper's quotas, 250 normal + 200 pneumonia" in plan.notes[0]
    for fold in plan.folds:
        rsna_seen: set[str] = set()
        for phase in fold.phases:
            rsna = [i for i in phase if source[i] == "rsna"]
            counts = label[rsna].value_counts()
            assert counts["normal"] == 250 and counts["pneumonia"] == 200
            assert rsna_seen.isdisjoint(rsna)  # each RSNA image in one phase only
            rsna_seen |= set(rsna)
            assert {i for i in fold.train if source[i] != "rsna"} <= set(phase)  # every core image in every phase
        assert 33 <= (label[fold.test] == "covid").sum() <= 39  # a fifth of 180, by patient


@pytest.mark.fixtures
def test_authors_phase_files_reproduced_exactly(fixtures_dir: Path, tmp_path: Path) -> None:
    splits = fixtures_dir / "mr7495_splits"
    out = tmp_path / "data"
    prepare_dataset(PrepareSettings(out=out, covid_chestxray=fixtures_dir / "covid_chestxray" / "metadata_2020-04-08.csv",
                                    rsna=fixtures_dir / "rsna", splits_from=splits, labels_only=True, split=SplitSettings(protocol="paper")),
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
    with pytest.raises(ConfigError, match="--protocol kfold"):
        read_author_splits(fixtures_dir / "mr7495_splits", real_manifest, SplitSettings(protocol="kfold"))


def _numbered_patients(source: str, prefix: str, n: int, labels: tuple[str, ...]) -> pd.DataFrame:
    """``n`` patients with the ids 1..n (as covid-chestxray's metadata and NIH's Patient ID both number them)."""
    return pd.DataFrame([{"image_id": f"{prefix}/{p}", "path": f"/x/{prefix}{p}.png", "label": labels[p % len(labels)],
                          "patient_id": str(p), "source": source, "view": "PA"} for p in range(1, n + 1)])


def test_patients_of_different_sources_with_the_same_id_are_different_patients() -> None:
    m = combine([_numbered_patients("covid-chestxray", "cxr", 10, ("covid",)),
                 _numbered_patients("nih", "nih", 60, ("normal", "pneumonia"))])
    core = core_mask(m)
    assert core[m["source"] == "covid-chestxray"].all() and not core[m["source"] == "nih"].any()
    plan = make_folds(m, SplitSettings(folds=2, phases=4, seed=0))
    for fold, info in zip(plan.folds, plan.phase_info):  # the phases' core: covid-chestxray's images only
        assert sum(info["core_available"].values()) == len({i for i in fold.train if i.startswith("cxr/")})
    apart = Fold(fold=1, phases=[["cxr/3"]], val=[], test=["nih/3"])  # two patients numbered 3: no leak
    check_disjoint(SplitPlan(folds=[apart], protocol="strict", origin="test"), m)
    two = pd.concat([m, m[m["image_id"] == "nih/3"].assign(image_id="nih/3b", path="/x/nih3b.png")], ignore_index=True)
    split = Fold(fold=1, phases=[["nih/3"]], val=[], test=["nih/3b"])  # one patient on two sides
    with pytest.raises(DataError, match=r"1 patients in both test and training \(e.g. nih:3\)"):
        check_disjoint(SplitPlan(folds=[split], protocol="strict", origin="test"), two)


def test_patients_sharing_a_file_are_merged_and_kept_on_one_side() -> None:
    m = combine([_numbered_patients("nih", "nih", 40, ("normal", "pneumonia")),
                 _numbered_patients("covid-chestxray", "cxr", 10, ("covid",))])
    digests = {i: f"sha-{i}" for i in m["image_id"]}
    digests.update({"nih/5": "sha-x", "nih/6": "sha-x"})  # one study filed under patients 5 and 6
    digests.update({"nih/7": "sha-y", "nih/8": "sha-y", "cxr/2": "sha-y"})  # and one under three patients
    groups = merge_identical(m, digests).set_axis(m["image_id"])
    assert groups["nih/5"] == groups["nih/6"] != groups["nih/7"]
    assert groups["nih/7"] == groups["nih/8"] == groups["cxr/2"] == "covid-chestxray:2"
    assert groups.nunique() == 50 - 3
    for seed in range(4):
        plan = make_folds(m, SplitSettings(folds=2, phases=2, seed=seed), digests)
        assert "5 patients merged into 2 groups because they share byte-identical images" in " ".join(plan.notes)
        for fold in plan.folds:
            for pair in (("nih/5", "nih/6"), ("nih/7", "nih/8"), ("nih/7", "cxr/2")):
                assert (pair[0] in fold.test) == (pair[1] in fold.test), (seed, fold.fold, pair)
            core = set(fold.phases[0]) & set(fold.phases[1])  # the core is in every phase: nih/7 joined it
            assert {"nih/7", "nih/8"} <= core or {"nih/7", "nih/8"} <= set(fold.test) | set(fold.val)
    leaky = SplitPlan(folds=[Fold(fold=1, phases=[["nih/5"]], val=[], test=["nih/6"])], protocol="strict",
                      origin="test")
    check_disjoint(leaky, m)  # two patients: only their bytes give them away
    with pytest.raises(DataError, match=r"1 byte-identical files in both test and training \(e.g. nih/5 = nih/6\)"):
        check_disjoint(leaky, m, digests)


def test_identical_files_across_given_splits_are_named() -> None:
    m = combine([_numbered_patients("nih", "nih", 6, ("normal", "pneumonia"))])
    digests = {i: f"sha-{i}" for i in m["image_id"]} | {"nih/2": "sha-x", "nih/4": "sha-x"}
    given = SplitPlan(folds=[Fold(fold=1, phases=[["nih/1", "nih/2"]], val=["nih/3"], test=["nih/4", "nih/5"])],
                      protocol="strict", origin="/the/authors/splits")
    found = "fold 1: 1 byte-identical files in both test and training (e.g. nih/2 = nih/4)"
    assert identical_across(given, m, digests) == [found]
    assert identical_across(given, m, {i: f"sha-{i}" for i in m["image_id"]}) == []


def test_validation_never_takes_a_class_from_training() -> None:
    """Seven one-image patients in two folds: validation once took the training side's every patient of a class (its
    only COVID-19 patient, say); it now leaves each class one patient to train on, and the fold that cannot fill
    validation is refused as too little data."""
    labels = ["covid", "covid", "pneumonia", "pneumonia", "normal", "normal", "normal"]
    manifest = pd.DataFrame({"image_id": [f"x/{i}" for i in range(7)], "patient_id": [str(i) for i in range(7)],
                             "source": "folder", "label": labels, "view": ""})
    by_id = manifest.set_index("image_id")["label"]
    for protocol in ("kfold", "strict"):
        plan = make_folds(manifest, SplitSettings(folds=2, protocol=protocol, seed=0))
        for fold in plan.folds:
            side = set(by_id[list(fold.train | set(fold.val))])
            assert set(by_id[list(fold.train)]) == side  # validation took no class's last patient
        note = next(n for n in plan.notes if "validation holds no COVID-19 or Pneumonia image" in n)
        assert note.startswith("warning: folds 1, 2: ") and "without those classes" in note
        with pytest.raises(DataError, match=r"empty split \(fold 1: validation.*7 images of 7 patients"):
            check_filled(plan, manifest)
