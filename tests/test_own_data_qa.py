"""QA s14 (own data): a labels table or class-folder tree as a hospital exports it is read for what it says.

Column names in any spelling (``Patient ID``), Excel's ``sep=`` line, a file listed twice by two paths or through a
link, one patient id under two sources, and a labels table that is not named ``*.csv``. Files are real (PNGs
written here); ``prepare`` runs for real with ``--labels-only``.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from covid_cxr.cli import main
from covid_cxr.data.sources import parse_folder_spec, read_folder
from covid_cxr.errors import DataError


def _png(path: Path, value: int = 60) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((40, 40), value, np.uint8))
    return path


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    """Four PNGs in ``tmp_path/img``: a.png .. d.png, each with other pixels."""
    for n, name in enumerate("abcd"):
        _png(tmp_path / "img" / f"{name}.png", 30 + 40 * n)
    return tmp_path / "img"


# F1: column names in any spelling; clashes refused; columns not used are named.

@pytest.mark.parametrize("header", ["Patient ID", "PatientID", "patient-id", " PATIENT_ID ", "Patient_Id"])
def test_a_patient_id_column_in_any_spelling_gives_the_patients(images: Path, header: str) -> None:
    (images / "labels.csv").write_text(f"path,label,{header}\na.png,covid,p1\nb.png,covid,p1\nc.png,normal,p2\n")
    frame, notes = read_folder(images / "labels.csv")
    assert frame.sort_values("path")["patient_id"].tolist() == ["p1", "p1", "p2"]
    assert "no patient ids given" not in notes[0] and "columns not used" not in notes[0]


def test_view_position_and_file_name_are_their_columns(images: Path) -> None:
    (images / "labels.csv").write_text("File Name,LABEL,View Position\na.png,covid,PA\nb.png,normal,AP\n")
    frame, notes = read_folder(images / "labels.csv")
    assert frame.sort_values("path")[["label", "view"]].values.tolist() == [["covid", "PA"], ["normal", "AP"]]
    assert "columns not used" not in notes[0]


@pytest.mark.parametrize(("header", "named"), [
    ("path,label,patient_id,Patient ID", "'patient_id' and 'Patient ID'"),
    ("path,label,PatientID,patient-id", "'PatientID' and 'patient-id'"),
    ("path,label,view,ViewPosition", "'view' and 'ViewPosition'"),
    ("path,label,label", "'label' and 'label'"),
])
def test_two_columns_that_read_as_one_are_refused_naming_both(images: Path, header: str, named: str) -> None:
    width = len(header.split(","))
    (images / "labels.csv").write_text(f"{header}\n" + ",".join(["a.png", "covid", "p1", "p2"][:width]) + "\n")
    with pytest.raises(DataError, match=f"labels.csv has the columns {named}, which both read as '"):
        read_folder(images / "labels.csv")


def test_columns_not_used_are_named_in_the_note(images: Path) -> None:
    (images / "labels.csv").write_text("path;label;Age;Comment;\na.png;covid;40;x;\nb.png;normal;41;y;\n")
    _, notes = read_folder(images / "labels.csv")
    assert notes[0].endswith("columns not used: Age, Comment")  # the empty column of the closing ';' is no column
    (images / "labels.csv").write_text("path,label,patient_id\na.png,covid,p1\n")
    _, notes = read_folder(images / "labels.csv")
    assert "columns not used" not in notes[0]


def test_prepare_keeps_each_patient_on_one_side_with_a_spaced_header(tmp_path: Path) -> None:
    """QA's c3: ``Patient ID`` was ignored, every image its own patient, and patients split across test and train."""
    rows = ["path,label,Patient ID"]
    for p in range(12):
        rows += [f"p{p}_{i}.png,{('covid', 'pneumonia', 'normal')[p % 3]},P{p}" for i in range(3)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["prepare", "--folder", str(tmp_path / "in"), "--out", str(out), "--protocol", "kfold",
                 "--folds", "3", "--labels-only", "--quiet"]) == 0
    manifest = pd.read_csv(out / "manifest.csv")
    real = manifest["path"].map(lambda p: Path(p).name.split("_")[0].upper())
    assert (manifest["patient_id"] == real).all()
    for k in (1, 2, 3):
        test = manifest["image_id"].isin(pd.read_csv(out / "splits" / f"fold{k}" / "test.csv")["image_id"])
        assert not set(real[test]) & set(real[~test]), k


# F7: Excel's sep= line.

@pytest.mark.parametrize("sep", [";", "|", "\t"])
def test_an_excel_sep_line_names_the_separator(images: Path, sep: str) -> None:
    text = f"sep={sep}\r\nPath{sep}Label{sep}Patient_ID\r\na.png{sep}covid{sep}p1\r\nb.png{sep}normal{sep}p2\r\n"
    (images / "labels.csv").write_text(text, newline="")
    frame, _ = read_folder(images / "labels.csv")
    assert frame.sort_values("path")[["label", "patient_id"]].values.tolist() == [["covid", "p1"], ["normal", "p2"]]


def test_after_a_sep_line_rows_and_lines_are_numbered_as_before(images: Path) -> None:
    (images / "labels.csv").write_text("sep=;\npath;label\na.png;flu\n")
    with pytest.raises(DataError, match=r"labels.csv row 2"):  # the spreadsheet's row: Excel hides the sep= line
        read_folder(images / "labels.csv")
    (images / "labels.csv").write_text("sep=;\npath;label\na.png;covid\nb.png;normal;extra\n")
    with pytest.raises(DataError, match=r"labels.csv line 4 has 3 fields"):  # the file's line
        read_folder(images / "labels.csv")


# F3: a file is known by its real path.

def test_one_file_listed_by_two_paths_is_read_once(images: Path) -> None:
    os.symlink(images / "b.png", images / "link_b.png")
    (images / "labels.csv").write_text(f"path,label\na.png,covid\n{images / 'a.png'}, COVID-19\nb.png,normal\n"
                                       "./img/../link_b.png,normal\nc.png,normal\n")
    frame, notes = read_folder(images / "labels.csv")
    assert sorted(frame["path"]) == [str(images / n) for n in ("a.png", "b.png", "c.png")]
    assert any("rows 3, 5 repeat an earlier row (2 of them by another path or a link) and are read once" in n
               for n in notes), notes


def test_one_file_listed_by_two_paths_with_two_labels_is_refused(images: Path) -> None:
    (images / "labels.csv").write_text(f"path,label\na.png,normal\nb.png,normal\n{images / 'a.png'},covid\n")
    with pytest.raises(DataError, match=rf"labels.csv: a.png is listed in rows 2, 4 \(as {images / 'a.png'}: the "
                                        r"same file\) with different labels or other fields; keep one row per image"):
        read_folder(images / "labels.csv")
    os.symlink(images / "b.png", images / "link_b.png")
    (images / "labels.csv").write_text("path,label\nb.png,normal\nlink_b.png,pneumonia\n")
    with pytest.raises(DataError, match=r"b.png is listed in rows 2, 3 \(as link_b.png: the same file\)"):
        read_folder(images / "labels.csv")


def test_a_path_through_dot_dot_is_recorded_folded(images: Path) -> None:
    (images.parent / "meta").mkdir()
    (images.parent / "meta" / "labels.csv").write_text("path,label\n../img/a.png,covid\n")
    frame, _ = read_folder(images.parent / "meta" / "labels.csv")
    assert frame["path"].tolist() == [str(images / "a.png")]


def test_file_links_in_a_class_tree_read_no_image_twice(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    covid = _png(tree / "COVID-19" / "study 1" / "c.png", 50)
    normal = _png(tree / "normal" / "n.png", 90)
    outside = _png(tmp_path / "outside" / "o.png", 120)
    _png(tree / "Pneumonia" / "p.png", 150)
    os.symlink(covid, tree / "Pneumonia" / "cross.png")  # another class's image: not read as pneumonia
    os.symlink(normal, tree / "normal" / "a_same.png")  # sorts first; the file itself is kept
    os.symlink(outside, tree / "Pneumonia" / "o1.png")  # class folders are read in sorted order: this one first
    os.symlink(outside, tree / "normal" / "o2.png")  # the outside file, read once already
    frame, notes = read_folder(tree)
    got = dict(zip(frame["path"].map(lambda p: Path(p).relative_to(tree.resolve()).as_posix()), frame["label"]))
    assert got == {"COVID-19/study 1/c.png": "covid", "Pneumonia/p.png": "pneumonia", "normal/n.png": "normal",
                   "Pneumonia/o1.png": "pneumonia"}
    assert any(n.startswith("skipped 1 links to an image in another class folder, not read") and "cross.png" in n
               for n in notes), notes
    assert any(n.startswith("skipped 2 links to an image read already") and "a_same.png" in n and "o2.png" in n
               for n in notes), notes


# F4: one patient id under several sources of one CSV.

def test_a_patient_id_under_two_sources_is_noted_and_kept_apart(images: Path) -> None:
    (images / "labels.csv").write_text("path,label,patient_id,source\na.png,covid,p1,ward-A\nb.png,covid,p1,ward-B\n"
                                       "c.png,normal,p2,ward-A\nd.png,normal,p2,ward-A\n")
    frame, notes = read_folder(images / "labels.csv")
    assert sorted(zip(frame["source"], frame["patient_id"])) == [("ward-A", "p1"), ("ward-A", "p2"),
                                                                 ("ward-A", "p2"), ("ward-B", "p1")]
    shared = [n for n in notes if "patient ids appear under more than one source" in n]
    assert len(shared) == 1 and shared[0].startswith(f"{images / 'labels.csv'}: 1 patient ids appear")
    assert "'p1' under ward-A, ward-B" in shared[0] and "kept as different patients" in shared[0]
    assert f"--folder NAME={images / 'labels.csv'}" in shared[0]
    frame, notes = read_folder(images / "labels.csv", "hosp")  # one name: one source, one patient p1
    assert set(frame["source"]) == {"hosp"} and not any("more than one source" in n for n in notes)


# F5: a labels table of any name; an image, a workbook, a name with '/'.

@pytest.mark.parametrize("name", ["export.tsv", "labels.txt", "Labels.CSV", "labels"])
def test_a_labels_table_of_any_name_is_read(images: Path, name: str) -> None:
    (images / name).write_text("Filename\tLabel\tpatient_id\na.png\tcovid\tp1\nb.png\tnormal\tp2\n")
    frame, notes = read_folder(images / name)
    assert sorted(frame["label"]) == ["covid", "normal"] and notes[0].startswith(f"{images / name}: 2 images")


def test_prepare_reads_a_tsv_given_as_folder(tmp_path: Path) -> None:
    rows = "".join(f"{n}.png\t{('covid', 'pneumonia', 'normal')[n % 3]}\tP{n}\n" for n in range(15))
    (tmp_path / "export.tsv").write_text("path\tlabel\tpatient_id\n" + rows)
    assert main(["prepare", "--folder", str(tmp_path / "export.tsv"), "--out", str(tmp_path / "out"), "--protocol",
                 "kfold", "--folds", "2", "--labels-only", "--quiet"]) == 0
    assert len(pd.read_csv(tmp_path / "out" / "manifest.csv")) == 15


def test_an_image_given_as_folder_is_named_an_image(images: Path) -> None:
    with pytest.raises(DataError, match=r"a.png is an image, not a folder or a labels table: give the folder that "
                                        "holds it"):
        read_folder(images / "a.png")
    (images / "a.png").rename(images / "1.2.840.113619.2.55")  # no image suffix: known by its bytes
    with pytest.raises(DataError, match=r"1.2.840.113619.2.55 is an image, not a folder or a labels table"):
        read_folder(images / "1.2.840.113619.2.55")


def test_a_workbook_given_as_folder_is_asked_for_as_csv(images: Path) -> None:
    (images / "labels.xlsx").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(DataError, match=r"labels.xlsx is a spreadsheet workbook, not a labels table: save it as CSV"):
        read_folder(images / "labels.xlsx")


def test_a_folder_holding_a_table_of_another_name_says_how_to_read_it(tmp_path: Path) -> None:
    root = tmp_path / "export"
    _png(root / "a.png")
    (root / "Labels.CSV").write_text("path,label\na.png,covid\n")
    with pytest.raises(DataError, match=rf"holds no images in class sub-folders; .*; it holds Labels.CSV: only a file "
                                        rf"named exactly labels.csv is looked for; .*--folder {root / 'Labels.CSV'}"):
        read_folder(root)
    _png(root / "images" / "b.png")
    (root / "labels.tsv").write_text("path\tlabel\nimages/b.png\tcovid\n")
    with pytest.raises(DataError, match=rf"unknown class label 'images'.*it holds Labels.CSV, labels.tsv: .*"
                                        rf"--folder {root / 'Labels.CSV'}"):
        read_folder(root)
    assert len(read_folder(root / "labels.tsv")[0]) == 1


def test_a_source_name_with_a_slash_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "tree"
    _png(tree / "covid" / "a.png")
    with pytest.raises(DataError, match=rf"--folder Hosp/B={tree}: a source name cannot contain '/' \('Hosp/B'\).*"
                                        rf"e.g. --folder Hosp-B={tree}$"):
        parse_folder_spec(f"Hosp/B={tree}")
    assert parse_folder_spec(f"Hosp-B={tree}") == ("Hosp-B", tree)
    assert parse_folder_spec(f"{tmp_path}/a=b") == (None, tmp_path / "a=b")  # neither there: a path, 'not found'
    assert main(["prepare", "--folder", f"Hosp/B={tree}", "--out", str(tmp_path / "out"), "--labels-only"]) == 2
    assert "a source name cannot contain '/'" in capsys.readouterr().err
