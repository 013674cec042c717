"""Two things other archives write that were read wrongly: a DICOM's Presentation LUT Shape, and Windows paths in lists.

Every file is real: DICOMs written with pydicom as CR/DX writers write them, PNGs with Pillow, CSVs and split files
as text a Windows tool saves, and ``prepare`` runs for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import DigitalXRayImageStorageForPresentation

from covid_cxr.cli import main
from covid_cxr.data.images import decode_image, load_image
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.sources import read_covid_chestxray, read_covidx, read_folder
from covid_cxr.errors import ImageDecodeError
from covid_cxr.synth.render import render_chest
from tests.test_odd_inputs import dicom_file

SIZE = 71
PER_CLASS = 4


# ---------------------------------------------------------------------------------------------- DICOM polarity


def _pattern() -> np.ndarray:
    """A known radiograph-like pattern as it must decode, bone bright: dark lungs, a bright spine down the middle
    and bright ribs across; not square, so that a transposition would show too."""
    img = np.full((64, 80), 40, dtype=np.uint8)
    img[:, 36:44] = 230  # spine
    img[8::12, :] = 200  # ribs
    img[:, :4] = 10  # air beside the body
    return img


def _dx(path: Path, stored: np.ndarray, photometric: str, shape: str | None, **elements: object) -> Path:
    """An uncompressed DX image (For Presentation) as a CR/DX writer stores it; ``shape`` is its Presentation LUT
    Shape (2050,0020), or None for a writer that leaves it out."""
    if shape is not None:
        elements["PresentationLUTShape"] = shape
    dicom_file(path, stored, photometric=photometric, sop_class=DigitalXRayImageStorageForPresentation,
               modality="DX", PatientID="quirk", ViewPosition="PA", **elements)  # fmt: skip
    return path


# (photometric, Presentation LUT Shape, whether the stored pixels are the negative of what is shown)
POLARITIES = [
    ("MONOCHROME2", None, False),
    ("MONOCHROME2", "IDENTITY", False),
    ("MONOCHROME2", "INVERSE", True),  # some CR/DX writers: "show these pixels inverted"
    ("MONOCHROME1", None, True),
    ("MONOCHROME1", "INVERSE", True),  # the pair the DX IOD requires: one inversion, named twice
    ("MONOCHROME1", "IDENTITY", True),  # contradicts the DX IOD; the photometric interpretation wins
]


@pytest.mark.parametrize(("photometric", "shape", "negative"), POLARITIES)
def test_each_photometric_and_lut_shape_decodes_with_bone_bright(tmp_path: Path, photometric: str,
                                                                 shape: str | None, negative: bool) -> None:
    shown = _pattern()
    path = _dx(tmp_path / "dx.dcm", 255 - shown if negative else shown, photometric, shape)
    img = decode_image(path)
    assert np.array_equal(img, shown), f"{photometric} + {shape}: decoded {'inverted' if img[0, 40] < 128 else 'other'}"
    assert img[:, 36:44].mean() > 200 and img[1:8, 8:30].mean() < 60  # spine bright, lungs dark


@pytest.mark.parametrize(("photometric", "shape", "negative"), [p for p in POLARITIES if p[2]])
def test_a_windowed_12_bit_negative_decodes_with_bone_bright(tmp_path: Path, photometric: str, shape: str | None,
                                                             negative: bool) -> None:
    """12 bits stored in 16 with a window, as CR plates write them: the inversion follows the window and stretch."""
    chest = render_chest(np.random.default_rng(5), 96, "pneumonia").image[:, :88]
    stored = (4095 - chest.astype(np.uint16) * 16).astype(np.uint16)
    path = _dx(tmp_path / "cr.dcm", stored, photometric, shape, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    img = decode_image(path)
    assert np.corrcoef(img.astype(float).ravel(), chest.astype(float).ravel())[0, 1] > 0.99
    assert np.abs(img.astype(int) - chest).mean() < 4


def test_the_lut_shape_reaches_what_the_model_is_fed(tmp_path: Path) -> None:
    """``load_image`` (predict, evaluate, serve) feeds the network the picture the header means, as from a PNG of it."""
    shown = np.kron(_pattern(), np.ones((2, 2), dtype=np.uint8))
    Image.fromarray(shown).save(tmp_path / "shown.png")
    path = _dx(tmp_path / "dx.dcm", 255 - shown, "MONOCHROME2", "INVERSE")
    assert np.array_equal(load_image(path, SIZE), load_image(tmp_path / "shown.png", SIZE))


# ---------------------------------------------------------------------------------------------- Windows paths


def _png(path: Path, rng: np.random.Generator, label: str = "normal") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_chest(rng, 96, label).image).save(path)
    return path


@pytest.fixture()
def hospital(tmp_path: Path) -> Path:
    """A folder copied from a Windows share: :data:`PER_CLASS` images of each class in class folders below
    ``images`` (enough for two folds, even with two of them left out)."""
    rng = np.random.default_rng(8)
    root = tmp_path / "hospital"
    for label in ("covid", "pneumonia", "normal"):
        for k in range(PER_CLASS):
            _png(root / "images" / label / f"{label}-{k}.png", rng, label)
    return root


def _rows(separator: str) -> list[str]:
    """``path,label,patient_id`` rows naming the hospital's images with ``separator`` between folders."""
    rows = ["path,label,patient_id"]
    for label in ("covid", "pneumonia", "normal"):
        rows += [separator.join(("images", label, f"{label}-{k}.png")) + f",{label},{label}-p{k}"
                 for k in range(PER_CLASS)]
    return rows


def test_a_labels_csv_written_on_windows_finds_its_images_with_the_same_ids(hospital: Path) -> None:
    csv = hospital / "labels.csv"
    csv.write_text("\n".join(_rows("/")) + "\n")
    slash, _ = read_folder(csv)
    rows = _rows("\\")
    rows[1] = ".\\" + rows[1]  # .\images\covid\covid-0.png
    rows.append(rows[2].replace("images\\", "images\\.\\", 1))  # the same file again, spelled another way: read once
    csv.write_bytes(("\r\n".join(rows) + "\r\n").encode("cp1252"))
    back, notes = read_folder(csv)
    assert len(back) == 12 and all(Path(p).is_file() for p in back["path"]), list(back["path"])
    assert back[["image_id", "path", "label", "patient_id"]].equals(slash[["image_id", "path", "label", "patient_id"]])
    assert any("repeat an earlier row" in n for n in notes)


def test_a_file_whose_linux_name_holds_a_backslash_is_kept(hospital: Path) -> None:
    """``x\\y.png`` is a legal Linux name: when that file exists it is the one listed, even beside ``x/y.png``."""
    rng = np.random.default_rng(9)
    literal = _png(hospital / "odd\\name.png", rng)
    _png(hospital / "odd" / "name.png", rng, "covid")
    csv = hospital / "labels.csv"
    csv.write_text("path,label\nodd\\name.png,normal\nimages\\covid\\covid-0.png,covid\n")
    frame, _ = read_folder(csv)
    assert sorted(frame["path"]) == sorted([str(literal), str(hospital / "images" / "covid" / "covid-0.png")])


def test_prepare_reads_a_windows_labels_csv(hospital: Path, tmp_path: Path) -> None:
    csv = hospital / "labels.csv"
    csv.write_text("\n".join(_rows("\\")) + "\n")
    argv = ["prepare", "--folder", f"hospital-b={csv}", "--out", str(tmp_path / "data"), "--protocol", "kfold",
            "--folds", "2", "--image-size", str(SIZE), "--workers", "1", "--quiet"]
    assert main(argv) == 0
    data = PreparedData(tmp_path / "data")
    assert len(data.manifest) == 12 and len(data.cache()) == 12
    assert set(data.manifest["image_id"]) == {f"hospital-b/images_{lab}_{lab}-{k}" for lab in
                                              ("covid", "pneumonia", "normal") for k in range(PER_CLASS)}


def test_windows_absolute_paths_are_refused_with_the_fix_and_the_rest_is_kept(hospital: Path, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture[str]
                                                                              ) -> None:
    csv = hospital / "labels.csv"
    rows = _rows("\\")
    rows[1] = "C:\\Users\\radiology\\export\\covid-0.png,covid,covid-p0"
    rows[1 + PER_CLASS] = "\\\\pacs-share\\cxr\\pneumonia-0.png,pneumonia,pneumonia-p0"
    csv.write_text("\n".join(rows) + "\n")
    frame, notes = read_folder(csv)
    assert any(f"{csv}: 2 files are listed by Windows absolute paths" in n and "relative to labels.csv" in n
               for n in notes), notes
    absolute = frame.loc[frame["image_id"].str.contains("Users|pacs", regex=True), "path"]
    assert len(absolute) == 2
    for path in absolute:
        with pytest.raises(ImageDecodeError, match="CSV that lists it holds Windows absolute paths: list the images "
                                                   "by their paths relative to the CSV"):
            load_image(path, SIZE)
    argv = ["prepare", "--folder", str(csv), "--out", str(tmp_path / "data"), "--protocol", "kfold", "--folds", "2",
            "--image-size", str(SIZE), "--workers", "1", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "2 images cannot be used" in err and err.count("the CSV that lists it holds Windows absolute paths") == 2
    assert main([*argv, "--skip-bad"]) == 0  # the ten images it can find are prepared
    prepared = json.loads((tmp_path / "data" / "prepare.json").read_text())
    assert len(PreparedData(tmp_path / "data").manifest) == 10
    assert all("relative to the CSV" in s["reason"] for s in prepared["skipped"]), prepared["skipped"]


def test_a_covidx_split_file_written_on_windows_finds_its_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    images = tmp_path / "images"
    lines = []
    for label, name in (("COVID-19", "a.png"), ("pneumonia", "b.png"), ("normal", "c.png")):
        _png(images / "train" / "sirm" / name, rng)
        lines.append(f"p-{name} sirm\\{name} {label} sirm")
    _png(images / "test" / "d.png", rng)
    (tmp_path / "train_COVIDx9A.txt").write_text("\r\n".join(lines) + "\r\n")
    (tmp_path / "test_COVIDx9A.txt").write_text("p-d .\\d.png normal sirm\r\n")
    frame, notes = read_covidx([tmp_path / "train_COVIDx9A.txt", tmp_path / "test_COVIDx9A.txt"], images)
    assert not any("not under" in n for n in notes), notes
    assert sorted(frame["path"]) == sorted(str(p) for p in [*(images / "train" / "sirm").iterdir(),
                                                            images / "test" / "d.png"])
    assert sorted(frame["image_id"]) == ["covidx/d", "covidx/sirm_a", "covidx/sirm_b", "covidx/sirm_c"]


def test_covid_chestxray_metadata_written_on_windows_finds_its_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    _png(tmp_path / "images" / "2020" / "a.png", rng, "covid")
    _png(tmp_path / "extra" / "b.png", rng, "covid")
    (tmp_path / "metadata.csv").write_text(
        "patientid,finding,view,modality,folder,filename\n"
        "1,COVID-19,PA,X-ray,images,2020\\a.png\n"
        "2,COVID-19,AP,X-ray,.\\extra,b.png\n")
    frame, _ = read_covid_chestxray(tmp_path)
    assert sorted(frame["path"]) == [str(tmp_path / "extra" / "b.png"), str(tmp_path / "images" / "2020" / "a.png")]
    assert sorted(frame["image_id"]) == ["cxr/2020_a", "cxr/b"]
