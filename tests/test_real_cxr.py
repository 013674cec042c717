"""The real path on real X-rays: ``fixtures/real_cxr`` (219 PNGs, 108 patients, NIH and Hannover).

prepare (named sources, patients grouped) -> a few training steps at 71 px -> evaluate ->
predict -> report, the decode parity of one image between the cache and ``predict`` on its file,
and the audits that must see this set's confound. Properties only: a few training steps learn
little, and what they learn differs across CPUs. Skipped with a reason where the fixtures are
absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from covid_cxr.cli import main
from covid_cxr.labels import CLASSES

SIZE = 71  # the smallest input the networks take: fast on two cores
NIH, MHH = "NIH ChestX-ray14", "Hannover Medical School (MHH)"
pytestmark = [pytest.mark.fixtures, pytest.mark.slow]


@pytest.fixture(scope="module")
def real(fixtures_dir: Path) -> Path:
    root = fixtures_dir / "real_cxr"
    if not (root / "labels.csv").is_file():
        pytest.skip(f"{root}/labels.csv not found: the real X-ray fixture is part of ../shared/fixtures")
    return root


@pytest.fixture(scope="module")
def labels(real: Path) -> pd.DataFrame:
    return pd.read_csv(real / "labels.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def data(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture prepared as a user would: its labels.csv names each row's source."""
    out = tmp_path_factory.mktemp("real") / "data"
    # Needs the patient-grouped splitter (branch 'splits'): before it, the six NIH patients with both a
    # normal and a pneumonia image make the leak check refuse the full fixture.
    assert main(["prepare", "--folder", str(real), "--out", str(out), "--image-size", str(SIZE), "--folds", "3",
                 "--phases", "2", "--workers", "1", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def run(data: Path) -> Path:
    """A few training steps of the real network on fold 1 (not a model: a run folder to evaluate)."""
    runs = data.parent / "runs"
    assert main(["train", str(data), "--network", "xception", "--preset", "cpu", "--fold", "1", "--image-size",
                 str(SIZE), "--epochs-per-phase", "1", "--batch-size", "8", "--precision", "fp32", "--device", "cpu",
                 "--seed", "0", "--out", str(runs), "--name", "xception-fold1"]) == 0
    return runs / "xception-fold1"


@pytest.fixture(scope="module")
def evaluated(run: Path) -> Path:
    assert main(["evaluate", str(run), "--device", "cpu", "--precision", "fp32", "--compile", "off",
                 "--no-progress", "--bootstrap", "20"]) == 0
    return run / "eval-test"


def test_prepare_names_the_sources_and_keeps_patients_together(data: Path, labels: pd.DataFrame) -> None:
    from covid_cxr.data.prepared import PreparedData

    prepared = PreparedData(data)
    m = prepared.manifest
    assert len(m) == len(labels) and set(m["source"]) == {NIH, MHH}
    expected = labels.groupby(["source", "label"]).size()
    table1 = json.loads((data / "prepare.json").read_text())["table1"]
    for (source, label), n in expected.items():
        assert table1[source][label] == n  # Table 1 by the names the CSV gave
    assert m["image_id"].str.startswith(("nih_chestx-ray14/", "hannover_medical_school_mhh/")).all()
    patient = dict(zip(m["image_id"], m["patient_id"]))
    for k in range(1, prepared.num_folds + 1):
        fold = prepared.fold(k)
        sides = {"train": {i for p in fold.phases for i in p["image_id"]}, "val": set(fold.val["image_id"]),
                 "test": set(fold.test["image_id"])}
        assert set.union(*sides.values()) == set(m["image_id"])  # every image somewhere
        patients = {name: {patient[i] for i in ids} for name, ids in sides.items()}
        assert not patients["train"] & patients["test"] and not patients["train"] & patients["val"]
        assert not patients["val"] & patients["test"]  # every patient on one side, whatever its labels
        for split in (*fold.phases, fold.val, fold.test):
            assert set(split["source"]) <= {NIH, MHH}  # the splits carry the names too
    two_label = labels.groupby("patient_id")["label"].nunique()
    assert (two_label > 1).sum() == 6  # ...including the six patients with a normal and a pneumonia image


def test_train_evaluate_predict_report(run: Path, evaluated: Path, data: Path, real: Path, tmp_path: Path) -> None:
    from covid_cxr.data.prepared import PreparedData

    preds = pd.read_csv(evaluated / "predictions.csv", dtype={"image_id": str})
    test = PreparedData(data).fold(1).test
    assert preds["image_id"].tolist() == test["image_id"].tolist()
    probs = preds[[f"p_{c}" for c in CLASSES]]
    assert probs.notna().all().all() and ((probs.sum(axis=1) - 1).abs() < 1e-4).all()
    assert set(preds["source"]) <= {NIH, MHH} and set(preds["pred"]) <= set(CLASSES)
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["n"] == len(test) and metrics["covid_n"] == int((test["label"] == "covid").sum())
    paths = pd.read_csv(real / "labels.csv")["path"]
    files = [real / p for p in paths.iloc[[0, len(paths) // 2, -1]]]
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run / "best.pt"), *map(str, files), "--out", str(out), "--device", "cpu",
                 "--precision", "fp32", "--compile", "off"]) == 0
    assert len(pd.read_csv(out)) == 3
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--bootstrap", "20"]) == 0
    assert (tmp_path / "report" / "report.html").stat().st_size > 0


def test_one_image_same_probabilities_through_cache_and_predict(run: Path, evaluated: Path, data: Path,
                                                                tmp_path: Path) -> None:
    """prepare -> cache -> evaluate and ``predict`` on the file decode the same pixels, so agree."""
    from covid_cxr.data.prepared import PreparedData

    manifest = PreparedData(data).manifest.set_index("image_id")
    preds = pd.read_csv(evaluated / "predictions.csv", dtype={"image_id": str}).set_index("image_id")
    picked = [preds.index[0], preds.index[len(preds) // 2]]  # one of each source when sorted by source
    out = tmp_path / "one.csv"
    assert main(["predict", str(run / "best.pt"), *(manifest.loc[i, "path"] for i in picked), "--out", str(out),
                 "--device", "cpu", "--precision", "fp32", "--compile", "off"]) == 0
    direct = pd.read_csv(out)
    assert len(direct) == len(picked)
    for row, image_id in zip(direct.itertuples(), picked):
        for c in CLASSES:
            assert getattr(row, f"p_{c}") == pytest.approx(preds.loc[image_id, f"p_{c}"], abs=1e-4), (image_id, c)


def test_source_audit_names_the_confound(data: Path) -> None:
    assert main(["audit", "source", str(data), "--fold", "1", "--probes", "stats", "--device", "cpu"]) == 0
    result = json.loads((data / "audit" / "fold1" / "source.json").read_text())
    m = result["metrics"]
    assert m["confounded_classes"] == {"covid": MHH, "normal": NIH, "pneumonia": NIH}
    assert result["flags"][0]["code"] == "class-from-one-source"  # first: the strongest confound
    assert MHH in result["flags"][0]["message"] and "no other class" in result["flags"][0]["message"]
    assert m["n_scored"] == m["n_images"] == len(pd.read_csv(data / "manifest.csv"))  # every image scored
    print(f"real fixture, stats probe, NIH vs Hannover: AUC {m['overall']['auc']}")
    assert m["overall"]["auc"]["value"] >= 0.9  # measured 1.000: two hospitals' pixels differ grossly


def test_cross_source_on_a_separately_named_folder(run: Path, data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """COVID-19 test images of fold 1, given again as another named collection, are evaluated beside in-source."""
    import shutil

    from covid_cxr.data.prepared import PreparedData

    test = PreparedData(data).fold(1).test
    manifest = PreparedData(data).manifest.set_index("image_id")
    covid = test[test["label"] == "covid"]["image_id"].iloc[:5]
    (tmp_path / "other" / "covid").mkdir(parents=True)
    for image_id in covid:
        shutil.copy(manifest.loc[image_id, "path"], tmp_path / "other" / "covid")
    # The model's own COVID-19 source is not unseen for it: refused, with the way forward.
    assert main(["audit", "cross-source", str(run), "--source", MHH, "--device", "cpu"]) == 2
    assert "--source-data NAME=DIR" in capsys.readouterr().err
    assert main(["audit", "cross-source", str(run), "--source-data", f"hospital-b={tmp_path / 'other'}",
                 "--device", "cpu", "--precision", "fp32", "--out", str(tmp_path / "audit")]) == 0
    m = json.loads((tmp_path / "audit" / "cross_source.json").read_text())["metrics"]
    assert m["source"] == "hospital-b" and m["unseen_source"]["n"] == 5
    assert m["in_source"]["sources"] == [MHH] and m["in_source"]["n"] == len(test[test["label"] == "covid"])
    assert 0.0 <= m["unseen_source"]["recall"]["value"] <= 1.0
