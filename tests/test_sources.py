"""Source adapters on the real metadata (Table 1 of the paper) and on small files made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covid_cxr.data.manifest import COLUMNS, combine, table1
from covid_cxr.data.sources import read_covid_chestxray, read_folder, read_rsna
from covid_cxr.errors import DataError



@pytest.fixture(scope="module")
def real_manifest(fixtures_dir: Path) -> pd.DataFrame:
    cxr, _ = read_covid_chestxray(fixtures_dir / "covid_chestxray" / "metadata_2020-04-08.csv")
    rsna, _ = read_rsna(fixtures_dir / "rsna")
    return combine([cxr, rsna])


@pytest.mark.fixtures
def test_real_counts_are_table1(real_manifest: pd.DataFrame) -> None:
    t = table1(real_manifest)
    cxr = real_manifest[real_manifest["source"] == "covid-chestxray"]
    assert t.loc["covid-chestxray", "covid"] == 180
    assert cxr.loc[cxr["label"] == "covid", "patient_id"].nunique() == 118
    assert t.loc["covid-chestxray", "pneumonia"] == 42
    assert t.loc["rsna", "normal"] == 8851 and t.loc["rsna", "pneumonia"] == 6012
    assert t.loc["total", "covid"] == 180 and t.loc["total", "pneumonia"] == 6054  # the paper's Table 1
    assert list(real_manifest.columns) == list(COLUMNS) and real_manifest["image_id"].is_unique
    rsna = real_manifest[real_manifest["source"] == "rsna"]
    assert (rsna["patient_id"] == rsna["image_id"].str.removeprefix("rsna/")).all()
    assert real_manifest["image_id"].str.fullmatch(r"(cxr|rsna)/[A-Za-z0-9._-]+").all()


@pytest.mark.fixtures
def test_later_metadata_versions_parse_with_the_same_mapping(fixtures_dir: Path) -> None:
    folder = fixtures_dir / "covid_chestxray"
    june, _ = read_covid_chestxray(folder / "metadata_2020-06-22.csv")
    latest, _ = read_covid_chestxray(folder / "metadata_latest_first_rows.csv")
    raw = pd.read_csv(folder / "metadata_latest_first_rows.csv", dtype=str)
    assert raw["finding"].str.contains("/").any()  # hierarchical spelling
    assert (june["label"] == "covid").sum() > 300 and len(latest) > 50
    both = june.merge(latest, on="image_id", suffixes=("_flat", "_hier"))
    assert len(both) > 40 and (both["label_flat"] == both["label_hier"]).all()
    assert june["image_id"].is_unique  # files listed on two rows are kept once


def test_covid_chestxray_keeps_only_xray_frontal_class_rows(tmp_path: Path) -> None:
    meta = pd.DataFrame({
        "patientid": ["1", "1", "2", "3", "4", "5", "5"],
        "finding": ["COVID-19", "COVID-19", "Pneumonia/Fungal/Pneumocystis", "Legionella", "COVID-19, ARDS", "SARS", "SARS"],
        "view": ["PA", "L", "AP Supine", "PA", "AP semi erect", "Axial", "AP"],
        "modality": ["X-ray", "X-ray", "X-ray", "X-ray", "X-ray", "CT", "X-ray"],
        "folder": "images", "filename": ["a.jpg", "b.jpg", "c.png", "d.png", "e.jpeg", "f.png", "g.jpg"],
    })
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    frame, notes = read_covid_chestxray(tmp_path)
    assert frame.set_index("image_id")["label"].to_dict() == {"cxr/a": "covid", "cxr/c": "pneumonia",
                                                              "cxr/e": "covid", "cxr/g": "pneumonia"}
    assert frame.set_index("image_id").loc["cxr/c", "path"] == str(tmp_path.resolve() / "images" / "c.png")
    assert "1 non-X-ray" in notes[0] and "1 X-rays of other views" in notes[0]
    meta.drop(columns="view").to_csv(tmp_path / "metadata.csv", index=False)
    with pytest.raises(DataError, match=r"metadata.csv lacks the column\(s\) view"):
        read_covid_chestxray(tmp_path)


def test_rsna_errors_name_the_file(tmp_path: Path) -> None:
    pd.DataFrame({"patientId": ["p1", "p2"], "Target": [0, 1], "x": ["", "3"]}).to_csv(
        tmp_path / "stage_2_train_labels.csv", index=False)
    with pytest.raises(DataError, match="stage_2_detailed_class_info.csv not found; download"):
        read_rsna(tmp_path)
    pd.DataFrame({"patientId": ["p1", "p2"], "class": ["Normal", "Mild Haze"]}).to_csv(
        tmp_path / "stage_2_detailed_class_info.csv", index=False)
    with pytest.raises(DataError, match="stage_2_detailed_class_info.csv: unknown class value.*Mild Haze"):
        read_rsna(tmp_path)
    pd.DataFrame({"patientId": ["p1", "p2"], "class": ["Normal", "Lung Opacity"]}).to_csv(
        tmp_path / "stage_2_detailed_class_info.csv", index=False)
    frame, _ = read_rsna(tmp_path)
    assert frame.set_index("patient_id")["label"].to_dict() == {"p1": "normal", "p2": "pneumonia"}


def test_folder_tree_and_csv(tmp_path: Path) -> None:
    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    for cls, n in (("COVID-19", 2), ("normal", 3)):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(n):
            img.save(tmp_path / "tree" / cls / f"im {i}.png")
    frame, notes = read_folder(tmp_path / "tree")
    assert frame["label"].value_counts().to_dict() == {"normal": 3, "covid": 2}
    assert "own patient" in notes[0] and frame["image_id"].str.fullmatch(r"folder/[A-Za-z0-9._-]+").all()
    (tmp_path / "tree" / "flu").mkdir()
    with pytest.raises(DataError, match="unknown class label 'flu'"):
        read_folder(tmp_path / "tree")
    csv = tmp_path / "tree" / "labels.csv"
    pd.DataFrame({"path": ["normal/im 0.png", "COVID-19/im 1.png"], "label": ["No Finding", "COVID-19"],
                  "patient_id": ["p9", "p9"]}).to_csv(csv, index=False)
    frame, _ = read_folder(tmp_path / "tree")
    assert frame["patient_id"].tolist() == ["p9", "p9"] and set(frame["label"]) == {"normal", "covid"}
    pd.DataFrame({"path": ["a.png"], "label": ["influenza"]}).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"labels.csv row 2"):
        read_folder(tmp_path / "tree")
