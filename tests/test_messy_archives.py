"""Users' archives as QA found them: header case, source spellings, trailing separators, link loops, copies under two
labels, other image formats, folds too small to fill, --out inside the input, names that are not UTF-8, empty
patient ids, and prepare stopped by Ctrl-C or killed.

Every input is made here: small PNGs of noise (each image its own bytes unless a copy is meant), CSVs written as the
spreadsheet or the shell would write them, and ``prepare`` runs for real (``--labels-only`` where images need not
be decoded).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covid_cxr.cli import main
from covid_cxr.data.cache import _results
from covid_cxr.data.images import decode_image
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset, read_sources
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.sources import read_folder
from covid_cxr.data.splits import SplitSettings, patient_key
from covid_cxr.errors import DataError

SIZE = 71


def _png(path: Path, seed: int, side: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)).save(path)
    return path


def _tree(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    for k, (cls, n) in enumerate(counts.items()):
        for i in range(n):
            _png(root / cls / f"{cls}-{i}.png", seed=1000 * seed + 100 * k + i)
    return root


def _kfold(out: Path, folder: str | Path, folds: int = 2, **kw: object) -> PrepareSettings:
    return PrepareSettings(out=out, folder=str(folder), split=SplitSettings(folds=folds, phases=1, protocol="kfold"),
                           image_size=SIZE, workers=1, **kw)  # type: ignore[arg-type]


def _sides(data: PreparedData, fold: int) -> dict[str, set[str]]:
    f = data.fold(fold)
    return {"train": set(pd.concat(f.phases)["image_id"]), "val": set(f.val["image_id"]),
            "test": set(f.test["image_id"])}


# ---------------------------------------------------------------------------------------------- label CSVs


def test_optional_columns_match_in_any_case(tmp_path: Path) -> None:
    """``Patient_ID``, ``View``, `` Source `` are the columns they name: patients stay whole, not one per image."""
    _tree(tmp_path, {"normal": 3})
    (tmp_path / "labels.csv").write_text(
        "Path,LABEL,Patient_ID,View, Source ,license\n"
        "normal/normal-0.png,normal,nih-1,AP,NIH ChestX-ray14,CC\n"
        "normal/normal-1.png,normal,nih-1,PA,NIH ChestX-ray14,CC\n"
        "normal/normal-2.png,normal,nih-2,AP,NIH ChestX-ray14,CC\n")
    frame, notes = read_folder(tmp_path)
    assert frame["patient_id"].tolist() == ["nih-1", "nih-1", "nih-2"]
    assert frame["view"].tolist() == ["AP", "PA", "AP"] and set(frame["source"]) == {"NIH ChestX-ray14"}
    assert not any("own patient" in n for n in notes), notes


def test_source_names_differing_in_case_or_spacing_are_one_source(tmp_path: Path) -> None:
    _tree(tmp_path, {"normal": 3, "pneumonia": 1})
    (tmp_path / "labels.csv").write_text(
        "path,label,patient_id,source\n"
        "normal/normal-0.png,normal,nih-1504,NIH ChestX-ray14\n"
        "normal/normal-1.png,normal,nih-1504,nih chestx-ray14\n"
        "normal/normal-2.png,normal,nih-1504, NIH  ChestX-ray14 \n"
        "pneumonia/pneumonia-0.png,pneumonia,nih-1504,nih chestx-ray14\n")
    frame, notes = read_folder(tmp_path)
    assert set(frame["source"]) == {"NIH ChestX-ray14"}  # the first spelling
    assert patient_key(frame).nunique() == 1  # one patient, so one side of every fold
    merged = [n for n in notes if "differ only in case or spacing" in n]
    assert merged and "'nih chestx-ray14' read as 'NIH ChestX-ray14'" in merged[0], notes


def test_two_datasets_named_alike_but_for_case_are_refused(tmp_path: Path) -> None:
    a, b = _tree(tmp_path / "a", {"normal": 1}), _tree(tmp_path / "b", {"normal": 1}, seed=1)
    with pytest.raises(DataError, match="named 'NIH' and 'nih'.*differ only in case"):
        read_sources(PrepareSettings(out=tmp_path / "out", folder=(f"NIH={a}", f"nih={b}"), labels_only=True))


def test_a_separator_closing_every_row_is_read(tmp_path: Path) -> None:
    """A spreadsheet's export with one empty field more than the header on each row: read, not a traceback, and a
    bad row still named by its number. A field more that is not empty is refused, naming the line."""
    _tree(tmp_path, {"covid": 2})
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,patient_id,view\r\ncovid/covid-0.png,covid,p1,PA,\r\ncovid/covid-1.png,covid,p2,AP,\r\n")
    frame, _ = read_folder(csv)
    assert frame[["label", "patient_id", "view"]].values.tolist() == [["covid", "p1", "PA"], ["covid", "p2", "AP"]]
    csv.write_text("path,label,patient_id,view\ncovid/covid-0.png,covid,p1,PA,\ncovid/covid-1.png,flu,p2,AP,\n")
    with pytest.raises(DataError, match=r"labels.csv row 3"):
        read_folder(csv)
    csv.write_text("path,label\ncovid/covid-0.png,covid\ncovid/covid,1.png,covid\n")  # an unquoted comma in a name
    with pytest.raises(DataError, match=r"labels.csv line 3 has 3 fields where the header has 2 .*double quotes"):
        read_folder(csv)


def test_empty_patient_ids_are_counted_in_a_note(tmp_path: Path) -> None:
    _tree(tmp_path, {"normal": 4})
    rows = ["path,label,patient_id"]
    rows += [f"normal/normal-{i}.png,normal,{p}" for i, p in enumerate(["p1", "", "p1", " "])]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    frame, notes = read_folder(tmp_path)
    assert frame["patient_id"].tolist()[::2] == ["p1", "p1"] and frame["patient_id"].nunique() == 3
    assert any("labels.csv: 2 rows have an empty patient_id (rows 3, 5)" in n and "fill in" in n for n in notes), notes


def _non_utf8_name(folder: Path, raw: bytes) -> Path:
    path = folder / os.fsdecode(raw)
    try:
        _png(path, seed=7)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not take file names that are not UTF-8")
    return path


def test_a_name_that_is_not_utf8_in_a_cp1252_csv_is_found(tmp_path: Path) -> None:
    """The CSV holds the file's own bytes (ff fe), so it is not UTF-8 and reads as cp1252 ('ÿþ'): the file is found by
    those bytes. A name found neither way is reported with its bytes, not as a name that prints like another."""
    odd = _non_utf8_name(tmp_path, b"\xff\xfe.png")
    for i in range(3):
        _png(tmp_path / f"c{i}.png", seed=i)
    (tmp_path / "labels.csv").write_bytes(b"path,label\n\xff\xfe.png,covid\nc0.png,covid\nc1.png,covid\nc2.png,covid\n")
    frame, _ = read_folder(tmp_path)
    assert str(odd) in set(frame["path"]) and decode_image(odd).shape == (40, 40)
    (tmp_path / "labels.csv").write_bytes(b"path,label\n\xfe\xff.png,covid\nc0.png,covid\nc1.png,covid\n")
    looked_for = r"file not found \(the name looked for is the bytes b'\\xc3\\xbe\\xc3\\xbf\.png'\)"
    with pytest.raises(DataError, match=looked_for):
        prepare_dataset(_kfold(tmp_path.parent / "out", tmp_path), progress=False)


# ---------------------------------------------------------------------------------------------- class-folder trees


def test_a_link_to_the_tree_or_another_class_folder_relabels_nothing(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", {"covid": 2, "normal": 3, "pneumonia": 2})
    (root / "covid" / "loop").symlink_to("..")  # ln -s .. covid/loop
    (root / "normal" / "pn").symlink_to("../pneumonia")  # into another class folder
    (root / "covid-19").symlink_to("covid")  # a second way into a class folder
    (root / "covid" / "self").symlink_to(".")
    frame, notes = read_folder(root)
    assert frame["label"].value_counts().to_dict() == {"normal": 3, "covid": 2, "pneumonia": 2}
    assert frame["path"].is_unique and len(frame) == 7
    other = [n for n in notes if "another class folder" in n]
    assert other and "covid/loop" in other[0] and "normal/pn" in other[0], notes
    assert any("already read" in n and "tree/covid-19" in n and "covid/self" in n for n in notes), notes


def test_files_of_other_formats_in_class_folders_are_read_or_noted(tmp_path: Path) -> None:
    """GIF, WebP and JPEG 2000 are images the decoder reads: taken. Anything else is counted by suffix in a note."""
    root = _tree(tmp_path / "tree", {"covid": 1})
    gray = Image.open(root / "covid" / "covid-0.png")
    for name in ("a.gif", "b.webp", "c.jp2", "d.GIF"):
        gray.save(root / "covid" / name, **({"lossless": True} if name.endswith("webp") else {}))
    for name in ("notes.txt", "scan.heic", "more.txt"):
        (root / "covid" / name).write_bytes(b"not read")
    frame, notes = read_folder(root)
    assert sorted(Path(p).name for p in frame["path"]) == ["a.gif", "b.webp", "c.jp2", "covid-0.png", "d.GIF"]
    for path in frame["path"]:
        assert np.array_equal(decode_image(path), np.asarray(gray)), path
    note = [n for n in notes if "not read, for their suffix" in n]
    assert note and "3 files" in note[0] and "(2 .txt, 1 .heic)" in note[0] and "covid/notes.txt" in note[0], notes
    assert ".webp" in note[0] and "convert" in note[0]


def test_files_skipped_as_bad_are_no_copies_of_each_other(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two empty files in two class folders are byte-identical, but --skip-bad leaves both out: no warning that one
    of their labels is wrong, no group of copies; and a warning prints as one, not as "note: warning:"."""
    root = _tree(tmp_path / "tree", {"covid": 4, "normal": 4, "pneumonia": 4})
    (root / "covid" / "empty.png").touch()
    (root / "normal" / "empty.png").touch()
    report = prepare_dataset(_kfold(tmp_path / "data", root, skip_bad=True), progress=False)
    assert sorted(Path(f["path"]).parent.name for f in report.skipped) == ["covid", "normal"]
    assert report.duplicates == [] and not any("byte-identical" in n for n in report.notes), report.notes
    (root / "normal" / "copy_of_covid-0.png").write_bytes((root / "covid" / "covid-0.png").read_bytes())
    assert main(["prepare", "--folder", str(root), "--out", str(tmp_path / "data2"), "--protocol", "kfold",
                 "--folds", "2", "--phases", "1", "--image-size", str(SIZE), "--skip-bad", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "\nwarning: 1 groups of byte-identical files have different labels" in out and "note: warning" not in out


def test_byte_identical_files_with_two_labels_are_named_and_kept_together(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", {"covid": 4, "normal": 4, "pneumonia": 4})
    (root / "normal" / "copy_of_covid-0.png").write_bytes((root / "covid" / "covid-0.png").read_bytes())
    report = prepare_dataset(_kfold(tmp_path / "data", root), progress=False)
    warning = [n for n in report.notes if n.startswith("warning:") and "different labels" in n]
    assert warning, report.notes
    copies = f"{root / 'covid' / 'covid-0.png'} (covid) = {root / 'normal' / 'copy_of_covid-0.png'} (normal)"
    assert copies in warning[0]
    assert "delete the wrong copy or correct its label" in warning[0]
    data = PreparedData(tmp_path / "data")
    pair = {"folder/covid_covid-0", "folder/normal_copy_of_covid-0"}
    for k in (1, 2):
        assert [side for side, ids in _sides(data, k).items() if ids & pair] in (["train"], ["val"], ["test"])
        assert any(pair <= ids for ids in _sides(data, k).values())


def test_folds_with_an_empty_split_are_refused(tmp_path: Path) -> None:
    """Two patients of each of two classes in 2 folds: each fold's training side keeps its one patient of each class
    for training, so validation is left empty; and QA's one-class set is refused for what it is."""
    rows = ["path,label,patient_id"]
    for patient, n, label in (("nih-1504", 3, "normal"), ("nih-2993", 1, "normal"), ("mhh-1", 2, "covid"),
                              ("mhh-2", 1, "covid")):
        rows += [f"{patient}-{i}.png,{label},{patient}" for i in range(n)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare_dataset(_kfold(out, tmp_path / "in", labels_only=True), progress=False)
    message = str(err.value)
    assert "refusing to write folds with an empty split (fold 1: validation; fold 2: validation)" in message
    assert "7 images of 4 patients (3 COVID-19, 4 Normal)" in message and "single class" not in message
    assert "add images of more patients" in message and "--folds" not in message  # 2 folds: none fewer to give
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    rows = ["path,label,patient_id"]
    for patient, n in (("nih-1504", 3), ("nih-2993", 1), ("nih-3392", 3), ("nih-3510", 3)):
        rows += [f"{patient}-{i}.png,normal,{patient}" for i in range(n)]
    (tmp_path / "in" / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"^all 10 images are Normal: a single class cannot train a classifier; add "
                                        r"images of the other classes$"):
        prepare_dataset(_kfold(out, tmp_path / "in", labels_only=True), progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_out_inside_a_class_folder_tree_is_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", {"covid": 6, "normal": 6})
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(DataError, match=r"is in the folder .*tree, whose sub-folders are read as classes.*read "
                                        r"prepared as a class folder; give an --out outside it, e.g. .*tree-prepared"):
        prepare_dataset(_kfold(root / "prepared", root, labels_only=True), progress=False)
    assert sorted(p.name for p in root.iterdir()) == before


# ---------------------------------------------------------------------------------------------- stopped and killed


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    """A tree that folds fine: six patients of each class."""
    return _tree(tmp_path / "tree", {"covid": 6, "normal": 6, "pneumonia": 6})


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture()
def live_pid() -> Iterator[int]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


def test_leftovers_of_killed_prepares_are_cleared_and_live_ones_kept(small: Path, tmp_path: Path,
                                                                     live_pid: int) -> None:
    out = tmp_path / "data"
    prepare_dataset(_kfold(out, small, labels_only=True), progress=False)
    dead = _dead_pid()
    for name in (f".data.tmp-{dead}", f".data.old-{dead}", f".data.tmp-{live_pid}", f".other.tmp-{dead}"):
        (tmp_path / name / "cache").mkdir(parents=True)
    report = prepare_dataset(_kfold(out, small, labels_only=True), progress=False)
    assert sorted(p.name for p in tmp_path.glob(".*")) == [f".data.tmp-{live_pid}", f".other.tmp-{dead}"]
    deleted = [n for n in report.notes if n.startswith("deleted ") and f"(process {dead})" in n]
    assert len(deleted) == 2, report.notes
    # Killed between its two renames: no OUT, the earlier one set aside. It is put back, so what it held is kept.
    (out / "audit").mkdir()
    (out / "audit" / "source.json").write_text('{"auc": 0.5}')
    out.rename(tmp_path / f".data.old-{dead}")
    report = prepare_dataset(_kfold(out, small, labels_only=True), progress=False)
    assert json.loads((out / "audit" / "source.json").read_text()) == {"auc": 0.5}
    assert any(n.startswith(f"put the prepared folder .data.old-{dead}") for n in report.notes), report.notes
    assert not (tmp_path / f".data.old-{dead}").exists()


@pytest.mark.parametrize("at", ["set aside", "put in place"])
def test_ctrl_c_during_the_swap_finishes_it(small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           at: str) -> None:
    """A Ctrl-C as the earlier folder is set aside, or as the new one is renamed into place, waits for the swap:
    OUT is the new folder, nothing is left beside it, and prepare ends normally, saying so."""
    out = tmp_path / "data"
    prepare_dataset(_kfold(out, small, labels_only=True), progress=False)
    rename = Path.rename

    def interrupted_rename(self: Path, target: Path) -> Path:
        if (self == out) if at == "set aside" else self.name.startswith(".data.tmp-"):
            os.kill(os.getpid(), signal.SIGINT)
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_rename)
    settings = PrepareSettings(out=out, folder=str(small), labels_only=True,
                               split=SplitSettings(folds=3, phases=1, protocol="kfold"))
    # Python's own Ctrl-C handler, as a command line has it (a pytest-xdist worker ignores SIGINT: the signal
    # would then prove nothing); the one before is put back after.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        report = prepare_dataset(settings, progress=False)
    except KeyboardInterrupt:
        pytest.fail(f"Ctrl-C as the folder was being {at} stopped the swap half-way")
    finally:
        held = signal.signal(signal.SIGINT, before)
    assert held is signal.default_int_handler  # the swap put the handler back
    assert any("Ctrl-C came while" in n and "is complete" in n for n in report.notes), report.notes
    assert PreparedData(out).num_folds == 3  # the new folder, not the earlier one (2 folds)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "tree"]


def test_decoding_workers_leave_ctrl_c_to_the_main_process(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C reaches every process of the terminal's group; a worker must neither die of it nor print a traceback."""
    paths = [_png(tmp_path / f"{i}.png", seed=i, side=64) for i in range(96)]
    jobs = [(p.stem, str(p), 32, "area") for p in paths]
    results = _results(jobs, workers=2)
    first = next(results)
    workers = multiprocessing.active_children()
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.3)
    assert all(w.is_alive() for w in workers)
    rest = list(results)
    assert [r[0] for r in [first, *rest]] == [p.stem for p in paths] and all(r[1] is not None for r in rest)
    assert "KeyboardInterrupt" not in capfd.readouterr().err
