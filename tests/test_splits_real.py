"""Splits on real archives: patients with several studies and different findings stay on one side.

Real X-rays (``real_cxr``: NIH ChestX-ray14 with six patients holding a normal and a pneumonia image,
Hannover COVID-19 patients with up to 18 images) and the real covid-chestxray metadata (patients with
COVID-19 and normal images). Skipped with a reason where the fixtures are absent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covid_cxr.cli import main
from covid_cxr.data.manifest import combine
from covid_cxr.data.phases import paper_shares
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.sources import read_covid_chestxray, read_folder, read_rsna
from covid_cxr.data.splits import (
    PROTOCOLS,
    Fold,
    SplitPlan,
    SplitSettings,
    check_disjoint,
    make_folds,
)
from covid_cxr.errors import DataError

pytestmark = pytest.mark.fixtures
TWO_LABELS = {"nih-1504", "nih-2846", "nih-2993", "nih-3053", "nih-3392", "nih-3510"}


@pytest.fixture(scope="module")
def real_cxr(fixtures_dir: Path) -> Path:
    return fixtures_dir / "real_cxr"


@pytest.fixture(scope="module")
def xrays(real_cxr: Path) -> pd.DataFrame:
    frame, _ = read_folder(real_cxr)
    return frame


def _sides(fold: Fold, patient: pd.Series) -> dict[str, set[str]]:
    return {"training": set(patient[list(fold.train)]), "validation": set(patient[fold.val]),
            "test": set(patient[fold.test])}


def test_the_real_fixture_has_patients_with_two_labels(xrays: pd.DataFrame) -> None:
    labels = xrays.groupby("patient_id")["label"].nunique()
    assert set(labels[labels > 1].index) == TWO_LABELS and xrays["patient_id"].nunique() == 108


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_real_patient_is_on_one_side_of_every_split(xrays: pd.DataFrame, protocol: str, seed: int) -> None:
    plan = make_folds(xrays, SplitSettings(protocol=protocol, seed=seed))
    patient = xrays.set_index("image_id")["patient_id"]
    tested: list[str] = []
    for fold in plan.folds:
        sides = _sides(fold, patient)
        assert not sides["training"] & sides["test"] and not sides["training"] & sides["validation"]
        if protocol != "paper":  # paper: validation is drawn from test by design
            assert not sides["validation"] & sides["test"]
            assert sum(len(s) for s in sides.values()) == 108  # each patient on exactly one side
        tested += sides["test"] if protocol == "kfold" else []
    if protocol == "kfold":
        assert sorted(tested) == sorted(xrays["patient_id"].unique())  # tested in exactly one fold each


def test_the_leak_check_refuses_a_patient_cut_by_class(xrays: pd.DataFrame) -> None:
    """Cutting by class (the old splitter) puts a patient's normal and pneumonia images on two sides."""
    plan = make_folds(xrays, SplitSettings(seed=0))
    fold = plan.folds[0]
    label = xrays.set_index("image_id")["label"]
    patient = xrays.set_index("image_id")["patient_id"]
    moved = {i for i in xrays["image_id"] if patient[i] in TWO_LABELS and label[i] == "pneumonia"}
    in_test = moved & set(fold.test)
    phases = [[i for i in p if i not in moved] + (sorted(in_test) if n == 0 else []) for n, p in enumerate(fold.phases)]
    test = [i for i in fold.test if i not in moved] + sorted(moved & fold.train)
    leaky = Fold(fold=1, phases=phases, val=[i for i in fold.val if i not in moved] + [], test=test)
    cut = sorted({patient[i] for i in moved if i not in set(fold.val)})
    with pytest.raises(DataError, match="refusing to write splits that leak patients") as err:
        check_disjoint(SplitPlan(folds=[leaky], protocol="strict", origin="test"), xrays)
    assert f"{len(cut)} patients in both test and training" in str(err.value)
    assert any(p in str(err.value) for p in cut)


def test_prepare_on_real_xrays(real_cxr: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's first step on real images: prepare succeeds, says how the phases were balanced, and
    every patient is on one side of every split in every fold of what it wrote."""
    out = tmp_path / "data"
    assert main(["prepare", "--folder", str(real_cxr), "--out", str(out), "--image-size", "72", "--workers", "1",
                 "--quiet"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "phases (fold 1-5)" in printed and "Why:" in printed and "the paper's 23.5 : 37.0 : 39.5 %" in printed
    data = PreparedData(out)
    assert len(data.cache()) == 219
    for k in range(1, data.num_folds + 1):
        fold = data.fold(k)
        train = set(pd.concat(fold.phases)["patient_id"])
        val, test = set(fold.val["patient_id"]), set(fold.test["patient_id"])
        assert not train & val and not train & test and not val & test
        assert len(train) + len(val) + len(test) == 108
    balance = json.loads((out / "splits" / "summary.json").read_text())["phase_balance"]
    want = paper_shares(["covid", "pneumonia", "normal"])
    for info in balance:
        assert all(abs(info["shares"][c] - want[c]) <= 0.03 for c in want), info


def test_covid_chestxray_patients_with_covid_and_normal_images(fixtures_dir: Path, xrays: pd.DataFrame) -> None:
    """covid-chestxray of June 2020 (9 patients with COVID-19 and normal images, up to 8 images a patient)
    beside the NIH images as the pool: every patient whole, the phases in the paper's shares."""
    cxr, _ = read_covid_chestxray(fixtures_dir / "covid_chestxray" / "metadata_2020-06-22.csv")
    nih = xrays[xrays["patient_id"].str.startswith("nih-")]
    manifest = combine([cxr, nih])
    mixed = set(cxr.groupby("patient_id")["label"].nunique().loc[lambda n: n > 1].index)
    assert len(mixed) == 9
    patient = manifest.set_index("image_id")["patient_id"]
    want = paper_shares(["covid", "pneumonia", "normal"])
    for protocol in PROTOCOLS:
        plan = make_folds(manifest, SplitSettings(protocol=protocol, seed=5))
        for fold in plan.folds:
            sides = _sides(fold, patient)
            assert not sides["training"] & (sides["test"] | sides["validation"])
            assert all(sum(p in s for s in sides.values()) == 1 for p in mixed) or protocol == "paper"
            if protocol == "kfold":
                continue
            labels = manifest.set_index("image_id").loc[fold.phases[0], "label"].value_counts(normalize=True)
            assert all(abs(labels.get(c, 0) - want[c]) <= 0.03 for c in want), labels.to_dict()


def test_phases_on_a_tenth_of_the_papers_rsna_pool(fixtures_dir: Path) -> None:
    """The issue's shape on the real metadata: every covid-chestxray image, a tenth of RSNA (was 71% COVID-19)."""
    cxr, _ = read_covid_chestxray(fixtures_dir / "covid_chestxray" / "metadata_2020-04-08.csv")
    rsna, _ = read_rsna(fixtures_dir / "rsna")
    manifest = combine([cxr, rsna.sample(frac=0.1, random_state=np.random.default_rng(0).integers(1 << 31))])
    want = paper_shares(["covid", "pneumonia", "normal"])
    labels = manifest.set_index("image_id")["label"]
    for protocol in ("strict", "paper"):
        plan = make_folds(manifest, SplitSettings(protocol=protocol))
        for fold in plan.folds:
            for phase in fold.phases:
                got = labels[phase].value_counts(normalize=True)
                assert all(abs(got[c] - want[c]) <= 0.03 for c in want), (protocol, fold.fold, got.to_dict())


def test_a_study_filed_under_two_patients_stays_on_one_side(real_cxr: Path, tmp_path: Path) -> None:
    """40 real NIH files copied under new patient ids (a study exported twice): prepare merges each copy's patient
    with the original's, so no file's bytes are on the training side and the test side of any fold."""
    labels = pd.read_csv(real_cxr / "labels.csv", dtype=str).drop(columns=["license"])
    labels["path"] = [str(real_cxr / p) for p in labels["path"]]
    originals = labels[labels["source"].str.startswith("NIH")].head(40)
    (tmp_path / "copies").mkdir()
    copies = originals.assign(path=[str(tmp_path / "copies" / f"again_{k}.png") for k in range(len(originals))],
                              patient_id=[f"other-{k}" for k in range(len(originals))])
    for src, dst in zip(originals["path"], copies["path"]):
        shutil.copy(src, dst)
    pd.concat([labels, copies], ignore_index=True).to_csv(tmp_path / "labels.csv", index=False)
    report = prepare_dataset(PrepareSettings(out=tmp_path / "data", folder=str(tmp_path / "labels.csv"), image_size=71,
                                             workers=1, split=SplitSettings(folds=5, phases=2, seed=0)),
                             progress=False)  # fmt: skip
    assert len(report.duplicates) == 40
    merged = originals["patient_id"].nunique()
    assert f"{merged + 40} patients merged into {merged} groups" in " ".join(report.notes)
    data = PreparedData(tmp_path / "data")
    digest = {i: hashlib.sha256(Path(p).read_bytes()).hexdigest() for i, p in zip(data.manifest["image_id"],
                                                                                 data.manifest["path"])}
    for k in range(1, 6):
        fold = data.fold(k)
        training = {digest[i] for f in [*fold.phases, fold.val] for i in f["image_id"]}
        assert training.isdisjoint(digest[i] for i in fold.test["image_id"]), f"fold {k}"
