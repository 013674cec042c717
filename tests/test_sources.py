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
    pd.DataFrame({"patientId": ["p1", "p2"], "class": ["Normal", "Lung opacity"]}).to_csv(
        tmp_path / "stage_2_detailed_class_info.csv", index=False)
    with pytest.raises(DataError, match=r"'Lung opacity' \(did you mean 'Lung Opacity'\?\)"):
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


def _tree(root: Path, counts: dict[str, int]) -> Path:
    img = Image.fromarray(np.full((8, 8), 40, np.uint8))
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img.save(root / cls / f"{i}.png")
    return root


def test_folders_are_named_sources(tmp_path: Path) -> None:
    from covid_cxr.data.manifest import check_source_name
    from covid_cxr.data.sources import parse_folder_spec

    a = _tree(tmp_path / "a", {"normal": 2, "covid": 1})
    frame, notes = read_folder(a, "nih")
    assert set(frame["source"]) == {"nih"} and frame["image_id"].str.startswith("nih/").all()
    assert "as source 'nih'" in notes[0]
    unnamed, _ = read_folder(a)
    assert set(unnamed["source"]) == {"folder"} and unnamed["image_id"].str.startswith("folder/").all()  # as before
    assert parse_folder_spec(f"nih={a}") == ("nih", a) and parse_folder_spec(str(a)) == (None, a)
    odd = tmp_path / "x=y"  # an existing path holding '=' is a path, not NAME=DIR
    odd.mkdir()
    assert parse_folder_spec(str(odd)) == (None, odd)
    with pytest.raises(DataError, match="both named 'folder'.*--folder nih=DIR"):
        combine([unnamed, read_folder(_tree(tmp_path / "b", {"normal": 1}))[0]])
    for bad, why in (("total", "reserved"), ("  ", "empty"), ("a\tb", "control"), ("x" * 65, "longer")):
        with pytest.raises(DataError, match=why):
            check_source_name(bad, where="--folder")


def test_labels_csv_source_column_names_each_row(tmp_path: Path) -> None:
    a = _tree(tmp_path, {"normal": 2, "covid": 2})
    pd.DataFrame({"path": ["normal/0.png", "normal/1.png", "covid/0.png", "covid/1.png"],
                  "label": ["normal", "normal", "covid", "covid"], "patient_id": ["n1", "n1", "c1", "c2"],
                  "source": ["NIH ChestX-ray14", "NIH ChestX-ray14", "Hannover (MHH)", ""]}).to_csv(a / "labels.csv",
                                                                                                     index=False)
    frame, notes = read_folder(a)
    assert frame.set_index("patient_id")["source"].to_dict() == {"n1": "NIH ChestX-ray14", "c1": "Hannover (MHH)",
                                                                 "c2": "folder"}
    assert {i.split("/")[0] for i in frame["image_id"]} == {"nih_chestx-ray14", "hannover_mhh", "folder"}
    t = table1(frame)
    assert t.loc["NIH ChestX-ray14", "normal"] == 2 and t.loc["Hannover (MHH)", "covid"] == 1
    assert any("source column" in n for n in notes)
    named, notes = read_folder(a, "hospital-b")  # a name given on the command line wins, and says so
    assert set(named["source"]) == {"hospital-b"} and any("ignored" in n for n in notes)


def test_prepare_reads_several_named_folders(tmp_path: Path) -> None:
    from covid_cxr.data.prepare import PrepareSettings, read_sources

    a = _tree(tmp_path / "a", {"normal": 2})
    b = _tree(tmp_path / "b", {"normal": 1, "pneumonia": 1})
    settings = PrepareSettings(out=tmp_path / "out", folder=(f"nih={a}", f"hospital-b={b}"), labels_only=True)
    assert settings.to_dict()["folder"] == (f"nih={a}", f"hospital-b={b}")  # recorded in prepare.json
    manifest, _ = read_sources(settings)
    assert manifest.groupby("source").size().to_dict() == {"hospital-b": 2, "nih": 2}
    assert PrepareSettings(out=tmp_path / "out", folder=a).folder == (str(a),)  # one path, as before
    with pytest.raises(DataError, match="both named 'nih'"):
        read_sources(PrepareSettings(out=tmp_path / "out", folder=(f"nih={a}", f"nih={b}")))
