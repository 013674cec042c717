"""COVIDx: COVID-Net's split files read as a source, their test set kept as the test split, patients grouped."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from covid_cxr.cli import main
from covid_cxr.data.prepare import PrepareSettings
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.sources.covidx import (
    PUBLISHED,
    covidx_plan,
    published_rows,
    read_covidx,
)
from covid_cxr.data.splits import SplitSettings
from covid_cxr.errors import ConfigError, DataError


def _files(fixtures_dir: Path, version: str) -> list[Path]:
    folder = fixtures_dir / "covidx"
    return [folder / f"train_COVIDx{version}.txt", folder / f"test_COVIDx{version}.txt"]


def _counts(manifest: pd.DataFrame, column: str, split_ids: set[str]) -> dict[str, int]:
    part = manifest[manifest["image_id"].isin(split_ids)]
    return {k: int(v) for k, v in part[column].value_counts().items()}


@pytest.mark.fixtures
def test_covidx4_counts_per_class_and_source(fixtures_dir: Path) -> None:
    files = _files(fixtures_dir, "4")
    manifest, notes = read_covidx(files, None)
    plan = covidx_plan(files, manifest, SplitSettings(phases=2))
    fold = plan.folds[0]
    test, train = set(fold.test), fold.train | set(fold.val)
    # test_COVIDx4.txt: 100 a class; 197 of its lines have no source (RSNA images named <patientId>.png, one
    # covid-chestxray SARS image); the COVID-19 images come from cohen 39, actmed 33, sirm 17, fig1 11.
    assert _counts(manifest, "label", test) == {"covid": 100, "pneumonia": 100, "normal": 100}
    assert _counts(manifest, "source", test) == {"rsna": 196, "covid-chestxray": 42, "actualmed": 33, "sirm": 17,
                                                 "figure1": 11, "covidx-unknown": 1}
    # train_COVIDx4.txt: 13898 lines, one image (000001-27.jpg, pneumonia) listed under two patients: kept once.
    assert _counts(manifest, "label", train) == {"covid": 473, "pneumonia": 5458, "normal": 7966}
    assert _counts(manifest, "source", train) == {"rsna": 13389, "covid-chestxray": 430, "actualmed": 25,
                                                  "sirm": 29, "figure1": 24}
    assert len(manifest) == 13897 + 300
    assert any("listed twice" in n and "000001-27.jpg" in n for n in notes)
    assert any("no source field" in n for n in notes)


@pytest.mark.fixtures
def test_covidx9a_counts_and_source_warning(fixtures_dir: Path) -> None:
    files = _files(fixtures_dir, "9A")
    manifest, notes = read_covidx(files, None)
    test = manifest[manifest["image_id"].isin(covidx_plan(files, manifest, SplitSettings(phases=1)).folds[0].test)]
    assert pd.crosstab(test["source"], test["label"]).to_dict() == {
        "covid": {"ricord": 200, "rsna": 0}, "normal": {"ricord": 0, "rsna": 100}, "pneumonia": {"ricord": 0, "rsna": 100}}
    counts = manifest["label"].value_counts().to_dict()
    assert counts == {"covid": 16490 + 200, "normal": 8085 + 100, "pneumonia": 5555 + 100}
    # 'rnsa' (199 lines of train_COVIDx9A.txt) is RSNA: 13389 + 199 in train, 200 in test.
    assert int((manifest["source"] == "rsna").sum()) == 13389 + 199 + 200
    assert int((manifest["source"] == "stonybrook").sum()) == 14132
    warning = [n for n in notes if n.startswith("warning:")]
    assert len(warning) == 1 and "every COVID-19 image from one group of sources" in warning[0] and "ricord" in warning[0]


@pytest.mark.fixtures
@pytest.mark.parametrize("version", ["4", "9A"])
def test_covidx_patients_stay_grouped_and_test_is_theirs(fixtures_dir: Path, version: str) -> None:
    files = _files(fixtures_dir, version)
    manifest, _ = read_covidx(files, None)
    fold = covidx_plan(files, manifest, SplitSettings(phases=3, seed=4)).folds[0]
    listed_test = {line.split()[1] for line in files[1].read_text().splitlines() if line.strip()}
    names = dict(zip(manifest["image_id"], manifest["path"].map(lambda p: Path(p).name)))
    assert {names[i] for i in fold.test} == listed_test  # as given: not re-split, nothing moved to validation
    patient = dict(zip(manifest["image_id"], manifest["patient_id"]))
    sides = {"train": {patient[i] for i in fold.train}, "val": {patient[i] for i in fold.val},
             "test": {patient[i] for i in fold.test}}
    assert not sides["train"] & sides["test"] and not sides["val"] & sides["test"] and not sides["train"] & sides["val"]
    assert fold.train | set(fold.val) | set(fold.test) == set(manifest["image_id"])
    covid_train = set(manifest.loc[manifest["label"] == "covid", "image_id"]) - set(fold.test) - set(fold.val)
    assert all(covid_train <= set(p) for p in fold.phases)  # every COVID-19 training image in every phase


def test_covidx_refuses_binary_files_and_leaks(tmp_path: Path) -> None:
    binary = tmp_path / "test_COVIDx9B.txt"
    binary.write_text("a1 a1.png positive ricord\nb2 b2.png negative rsna\n")
    with pytest.raises(DataError, match="binary COVIDx file.*every COVID-19 image from one source"):
        read_covidx([binary], None)
    (tmp_path / "train_COVIDx5.txt").write_text("p1 x.png COVID-19 cohen\np2 y.png normal rsna\n")
    (tmp_path / "test_COVIDx5.txt").write_text("p1 z.png COVID-19 cohen\np3 w.png normal rsna\n")
    manifest, _ = read_covidx([tmp_path / "train_COVIDx5.txt", tmp_path / "test_COVIDx5.txt"], None)
    with pytest.raises(DataError, match="leak patients between test.*p1"):
        covidx_plan([tmp_path / "train_COVIDx5.txt", tmp_path / "test_COVIDx5.txt"], manifest, SplitSettings(phases=1))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "test_COVIDx5.txt").write_text("p1 z.png COVID-19 cohen\np3 w.png flu rsna\n")
    with pytest.raises(DataError, match=r"test_COVIDx5.txt line 2: unknown label 'flu'"):
        read_covidx([tmp_path / "bad"], None)


def test_covidx_settings_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--covidx-images"):
        PrepareSettings(out=tmp_path / "o", covidx=("x.txt",))
    with pytest.raises(ConfigError, match="cannot be combined"):
        PrepareSettings(out=tmp_path / "o", covidx=("x.txt",), covidx_images=tmp_path, rsna=tmp_path)


def _write_covidx(root: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    """A tiny COVIDx: images in images/train and images/test, split files in labels/."""
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for split, per_class in (("train", 6), ("test", 3)):
        (root / "images" / split).mkdir(parents=True)
        for label, source in (("COVID-19", "sirm"), ("pneumonia", "rsna"), ("normal", "rsna")):
            for k in range(per_class):
                pid = f"{split}-{label}-{k // 2}"  # two images a patient
                name = f"{pid}-{k}.png"
                cv2.imwrite(str(root / "images" / split / name), rng.integers(0, 255, (40, 48), dtype=np.uint8))
                lines[split].append(f"{pid} {name} {label} {source}")
    (root / "labels").mkdir()
    for split, rows in lines.items():
        (root / "labels" / f"{split}_COVIDx9A.txt").write_text("\n".join(rows) + "\n")
    return root / "labels", root / "images"


def test_prepare_covidx_end_to_end(tmp_path: Path) -> None:
    labels, images = _write_covidx(tmp_path / "covidx", np.random.default_rng(0))
    out = tmp_path / "data"
    code = main(["prepare", "--covidx", str(labels), "--covidx-images", str(images), "--out", str(out),
                 "--phases", "2", "--image-size", "72", "--workers", "1", "--quiet"])
    assert code == 0
    data = PreparedData(out)
    assert data.num_folds == 1
    fold = data.fold(1)
    assert len(fold.test) == 9 and set(fold.test["image_id"]) == {f"covidx/test-{lab}-{k // 2}-{k}" for lab in
                                                                  ("COVID-19", "pneumonia", "normal") for k in range(3)}
    assert set(fold.test["patient_id"]).isdisjoint(set(fold.val["patient_id"]) | set(pd.concat(fold.phases)["patient_id"]))
    assert len(data.cache(72)) == 27  # every image found under images/<split>/ and decoded
    assert set(data.manifest["source"]) == {"sirm", "rsna"}
    summary = json.loads((out / "splits" / "summary.json").read_text())
    assert summary["settings"]["covidx_version"] == "9A"  # the model card finds COVID-Net's figures by this


def test_published_figures_beside_ours() -> None:
    cxr4a = next(p for p in PUBLISHED if p["model"] == "COVIDNet-CXR4-A")
    assert (cxr4a["sensitivity"]["covid"], cxr4a["ppv"]["covid"], cxr4a["per_class"]) == (95.0, 99.0, 100)
    ours = {"covid_recall": 90.0, "covid_recall_ci_low": 82.6, "covid_recall_ci_high": 94.5, "covid_precision": 97.8,
            "covid_precision_ci_low": 92.3, "covid_precision_ci_high": 99.4, "accuracy": 91.0}
    rows = published_rows(ours, "4")
    assert rows[0] == ["this model", "90.0 [82.6, 94.5]", "97.8 [92.3, 99.4]", "91.0"]
    assert rows[1][0] == "COVIDNet-CXR4-A (published)" and rows[1][1].startswith("95.0 [88.8, 97.8]")
    assert published_rows(ours, "9A") == []
