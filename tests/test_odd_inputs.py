"""Other hospitals' files and malformed ones: each decodes to the right picture or is refused by name and reason.

Every file is real, written here with Pillow, OpenCV or pydicom as archives write them; the commands run for
real (``prepare``, ``predict``, ``evaluate --external``, the web upload). Nothing crashes a run or stops it for
the others, and nothing decodes silently to a wrong picture.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import cv2
import httpx
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.fileset import FileSet
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from covid_cxr.cli import main
from covid_cxr.data.images import (
    MAX_PIXELS,
    MIN_SIDE,
    decode_image,
    decode_radiograph,
    load_image,
)
from covid_cxr.data.manifest import combine, make_ids
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.sources import read_folder
from covid_cxr.data.sources.folder import FOLDER_NAMED_LIKE_IMAGE
from covid_cxr.errors import DataError, ImageDecodeError
from covid_cxr.inference.inputs import expand_inputs
from covid_cxr.synth.render import render_chest
from tests.test_server import png_bomb, serve, tiny_checkpoint

SIZE = 71


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    """A rendered radiograph, not square, so that a rotation or transposition shows, spanning 0-255, so that deep
    data stretched by its own range decodes to it exactly."""
    image = render_chest(np.random.default_rng(3), 128, "pneumonia").image[:, :112]
    return cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(float).ravel(), b.astype(float).ravel())[0, 1])


def _saved(path: Path, image: Image.Image, **kw: object) -> Path:
    image.save(path, **kw)
    return path


# ---------------------------------------------------------------------------------------------- images


def _odd_images(tmp: Path, chest: np.ndarray) -> dict[str, tuple[Path, np.ndarray]]:
    """name -> (file, the picture it must decode to) for every image kind another archive writes."""
    gray = Image.fromarray(chest)
    rgb = np.dstack([chest] * 3)
    out = {
        "16-bit PNG, full range": (_saved(tmp / "full16.png", Image.fromarray((chest.astype(np.uint32) * 257)
                                                                                .astype(np.uint16))), chest),
        "16-bit PNG, 12-bit data": (_saved(tmp / "twelve.png", Image.fromarray(chest.astype(np.uint16) * 16)), chest),
        "16-bit TIFF, 12-bit data": (_saved(tmp / "twelve.tif", Image.fromarray(chest.astype(np.uint16) * 16)), chest),
        "RGBA PNG": (_saved(tmp / "rgba.png", Image.fromarray(np.dstack([rgb, np.full_like(chest, 255)]), "RGBA")),
                     chest),
        "LA PNG": (_saved(tmp / "la.png", Image.fromarray(np.dstack([chest, np.full_like(chest, 255)]), "LA")), chest),
        "palette PNG": (_saved(tmp / "palette.png", gray.convert("P")), chest),
        "1-bit PNG": (_saved(tmp / "bits.png", Image.fromarray(chest > 100)), (chest > 100).astype(np.uint8) * 255),
        "CMYK JPEG": (_saved(tmp / "cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95), chest),
        "progressive JPEG": (_saved(tmp / "progressive.jpg", gray, progressive=True, quality=95), chest),
        "float TIFF": (_saved(tmp / "float.tif", Image.fromarray(chest.astype(np.float32) / 255)), chest),
        "PNG named .jpg": (_saved(tmp / "png.jpg", gray, format="PNG"), chest),
        "upper-case .PNG": (_saved(tmp / "UPPER.PNG", gray), chest),
    }
    for orientation, turn in ((6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)):
        exif = Image.Exif()
        exif[0x0112] = orientation  # a phone photo of a film: stored turned, shown upright
        out[f"EXIF orientation {orientation}"] = (_saved(tmp / f"exif{orientation}.jpg", gray.transpose(turn),
                                                         exif=exif, quality=95), chest)
    return out


def test_images_other_archives_write_decode_to_the_right_picture(tmp_path: Path, chest: np.ndarray) -> None:
    for kind, (path, expected) in _odd_images(tmp_path, chest).items():
        img = decode_image(path)
        assert img.shape == expected.shape and img.dtype == np.uint8, kind
        assert _corr(img, expected) > 0.99, kind  # upright, not inverted, not scrambled
        assert np.abs(img.astype(int) - expected).mean() < 4, kind  # and at the right brightness


def test_deep_images_are_stretched_by_their_own_range(tmp_path: Path, chest: np.ndarray) -> None:
    """12-bit data in a 16-bit PNG fills 0-255 as full-range 16-bit data does: no dark picture from /65535."""
    twelve = Image.fromarray(chest.astype(np.uint16) * 16)
    full = Image.fromarray((chest.astype(np.uint32) * 257).astype(np.uint16))
    a, b = decode_image(_saved(tmp_path / "a.png", twelve)), decode_image(_saved(tmp_path / "b.png", full))
    assert a.min() == b.min() == 0 and a.max() == b.max() == 255
    assert np.abs(a.astype(int) - b).max() <= 1


def test_a_phone_mpo_jpeg_is_its_first_picture(tmp_path: Path, chest: np.ndarray) -> None:
    path = tmp_path / "phone.jpg"
    Image.fromarray(chest).save(path, format="MPO", save_all=True, append_images=[Image.fromarray(255 - chest)])
    with Image.open(path) as written:
        assert written.format == "MPO" and written.n_frames == 2
    assert _corr(decode_image(path), chest) > 0.99


def _refused(path: Path, *words: str, radiograph: bool = False) -> str:
    with pytest.raises(ImageDecodeError) as err:
        (decode_radiograph if radiograph else decode_image)(path)
    message = str(err.value)
    assert str(path) in message, message  # the file is named ...
    for word in words:  # ... with the reason and, where there is one, the fix
        assert word in message, message
    return message


def test_images_that_cannot_be_a_radiograph_are_refused_with_the_reason(tmp_path: Path, chest: np.ndarray) -> None:
    for w, h in ((1, 1), (3, 2), (MIN_SIDE - 1, 400)):
        path = _saved(tmp_path / f"{w}x{h}.png", Image.new("L", (w, h), 90))
        assert decode_image(path).shape == (h, w)  # decodable (a mask may be tiny) ...
        _refused(path, f"{w}x{h} pixels is too small", radiograph=True)  # ... but not a radiograph
        with pytest.raises(ImageDecodeError, match="too small"):
            load_image(path, SIZE)
    nan = chest.astype(np.float32)
    nan[:5] = np.nan
    _refused(_saved(tmp_path / "nan.tif", Image.fromarray(nan)), f"{5 * chest.shape[1]} of its {chest.size} pixels")
    pages = tmp_path / "pages.tif"
    Image.fromarray(chest).save(pages, save_all=True, append_images=[Image.fromarray(255 - chest)])
    _refused(pages, "TIFF image of 2 pages", "its own file")
    animated = tmp_path / "anim.png"
    Image.fromarray(chest).save(animated, save_all=True, append_images=[Image.fromarray(255 - chest)])
    _refused(animated, "2 pages or frames")


def test_broken_and_false_files_are_refused_with_the_reason(tmp_path: Path, chest: np.ndarray) -> None:
    png, jpg = io.BytesIO(), io.BytesIO()
    Image.fromarray(chest).save(png, "PNG")
    Image.fromarray(chest).save(jpg, "JPEG", quality=95)
    cases = {
        "empty.png": (b"", "empty"),
        "cut.png": (png.getvalue()[: len(png.getvalue()) * 2 // 3], "truncated"),
        "cut.jpg": (jpg.getvalue()[: len(jpg.getvalue()) * 2 // 3], "truncated"),
        "notes.png": (b"patient,finding\nA,covid\n" * 8, "not an image"),
        "._scan.png": (b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64), "AppleDouble"),
    }
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        _refused(path, words)


def test_a_huge_image_is_refused_from_its_header_with_the_fix(tmp_path: Path) -> None:
    """12000 x 12000 is over Pillow's own bomb limit too: the message is ours, with our limit and the fix."""
    path = tmp_path / "scan.png"
    path.write_bytes(png_bomb(12000, 12000))
    message = _refused(path, f"exceeds the limit of {MAX_PIXELS} pixels", "shrink it")
    path.write_bytes(png_bomb(7500, 7500))  # under Pillow's limit, over ours: the size itself is named
    _refused(path, "7500x7500 pixels", "shrink it")
    assert "could be decompression bomb DOS attack" not in message


# ---------------------------------------------------------------------------------------------- DICOM


def dicom_file(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
               signed: bool = False, sop_class: str = SecondaryCaptureImageStorage, modality: str = "CR",
               **elements: object) -> Dataset:  # fmt: skip
    """An uncompressed DICOM Part 10 file of ``pixels`` (H, W) or (H, W, 3) of ``sop_class``, with the given
    elements (set last: they may replace any of the others)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, "odd"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def _odd_dicoms(tmp: Path, chest: np.ndarray) -> dict[str, tuple[Path, np.ndarray]]:
    """name -> (file, the picture it must decode to) for the DICOM variants of other archives."""
    twelve = chest.astype(np.uint16) * 16 + 8
    out: dict[str, tuple[Path, np.ndarray]] = {}

    def add(name: str, pixels: np.ndarray, expected: np.ndarray = chest, **kw: object) -> Path:
        path = tmp / f"{name.replace(' ', '_')}.dcm"
        dicom_file(path, pixels, **kw)
        out[name] = (path, expected)
        return path

    add("MONOCHROME1", 255 - chest, photometric="MONOCHROME1")
    add("MONOCHROME1 12-bit windowed", 4095 - twelve, photometric="MONOCHROME1", bits_stored=12,
        WindowCenter=2048, WindowWidth=4096)
    add("12 bits in 16", twelve, bits_stored=12)
    # Old CR systems keep overlays in the unused high bits: they must not take part in the picture.
    add("12 bits in 16, high bits set", twelve | np.uint16(0xF000) * (np.arange(chest.shape[0]) % 2 == 0)[:, None],
        bits_stored=12)
    add("rescale slope and intercept", twelve, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024)
    add("signed 16-bit", chest.astype(np.int16) * 16 - 2048, signed=True)
    add("signed 12 bits in 16", chest.astype(np.int16) * 16 - 2048, bits_stored=12, signed=True)
    add("window spanning the data", twelve, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    add("RGB secondary capture", np.dstack([chest] * 3), photometric="RGB")
    add("YBR_FULL", convert_color_space(np.dstack([chest] * 3), "RGB", "YBR_FULL"), photometric="YBR_FULL")
    lut = (np.arange(256, dtype=np.uint16)[::-1] * 257).tobytes()  # a palette that inverts
    palette = {f"{c}PaletteColorLookupTable{part}": value for c in ("Red", "Green", "Blue")
               for part, value in (("Descriptor", [256, 0, 16]), ("Data", lut))}
    add("PALETTE COLOR", chest, expected=255 - chest, photometric="PALETTE COLOR", **palette)
    rle = add("RLE Lossless", twelve, bits_stored=12)
    ds = pydicom.dcmread(rle)
    ds.compress(RLELossless)  # pydicom's own encoder; its own decoder reads it back
    ds.save_as(rle)
    assert pydicom.dcmread(rle).file_meta.TransferSyntaxUID == RLELossless
    return out


def test_dicoms_other_archives_write_decode_with_bone_bright(tmp_path: Path, chest: np.ndarray) -> None:
    for kind, (path, expected) in _odd_dicoms(tmp_path, chest).items():
        img = decode_image(path)
        assert img.shape == expected.shape and img.dtype == np.uint8, kind
        assert _corr(img, expected) > 0.99, kind
        assert np.abs(img.astype(int) - expected).mean() < 4, kind


def test_the_window_is_applied_before_the_stretch(tmp_path: Path, chest: np.ndarray) -> None:
    """A narrow window clips what lies outside it, as the modality meant the image to be shown."""
    twelve = chest.astype(np.uint16) * 16
    path = tmp_path / "narrow.dcm"
    dicom_file(path, twelve, bits_stored=12, WindowCenter=2048, WindowWidth=1024)
    img = decode_image(path)
    assert (img[twelve <= 1536] == 0).all() and (img[twelve >= 2560] == 255).all()
    inside = (twelve > 1700) & (twelve < 2400)
    assert _corr(img[inside], chest[inside]) > 0.99


def test_a_jpeg_2000_dicom_decodes_where_a_decoder_is_installed(tmp_path: Path, chest: np.ndarray) -> None:
    """Pillow's OpenJPEG encodes the stream; pydicom decodes it with whichever plugin is installed."""
    stream = io.BytesIO()
    Image.fromarray(chest).save(stream, "JPEG2000", irreversible=False)
    path = tmp_path / "j2k.dcm"
    ds = dicom_file(path, chest)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([stream.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(decode_image(path), chest)


def _broken_lossless_dicom(path: Path, chest: np.ndarray) -> str:
    """A JPEG Lossless (process 14 SV1) DICOM, as CR and DX modalities store them, whose stream is a header and
    zeros; returns the words of its refusal."""
    ds = dicom_file(path, chest)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return "cannot be decoded"


def test_a_broken_jpeg_lossless_stream_is_refused_and_the_process_lives(tmp_path: Path, chest: np.ndarray) -> None:
    """GDCM, JPEG Lossless's decoder, raises an error that names the file instead of taking the process down."""
    path = tmp_path / "lossless.dcm"
    _refused(path, _broken_lossless_dicom(path, chest))


def test_dicoms_that_hold_no_picture_are_refused_with_the_reason(tmp_path: Path, chest: np.ndarray) -> None:
    ds = dicom_file(tmp_path / "good.dcm", chest.astype(np.uint16) * 16, bits_stored=12)
    data = (tmp_path / "good.dcm").read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "truncated.dcm", "truncated")
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm", enforce_file_format=True)
    _refused(tmp_path / "nopixels.dcm", "no pixel data")
    listed = pydicom.dcmread(tmp_path / "good.dcm")  # what a media set's index records of each image
    listed.PatientName, listed.StudyID, listed.StudyDate, listed.StudyTime = "odd", "1", "20200401", "101500"
    listed.StudyInstanceUID, listed.SeriesInstanceUID, listed.SeriesNumber, listed.InstanceNumber = (
        generate_uid(), generate_uid(), 1, 1)
    fileset = FileSet()
    fileset.add(listed)
    fileset.write(tmp_path / "media")
    _refused(tmp_path / "media" / "DICOMDIR", "a DICOMDIR", "not an image")
    dicom_file(tmp_path / "width0.dcm", chest.astype(np.uint16) * 16, bits_stored=12, WindowCenter=2048, WindowWidth=0)
    _refused(tmp_path / "width0.dcm", "window", "re-export")
    dicom_file(tmp_path / "slope.dcm", chest.astype(np.uint16) * 16, bits_stored=12, RescaleSlope="7.125")
    data = (tmp_path / "slope.dcm").read_bytes()
    assert data.count(b"7.125") == 1
    (tmp_path / "slope.dcm").write_bytes(data.replace(b"7.125", b"x7/2y"))  # as a broken export writes it
    _refused(tmp_path / "slope.dcm", "rescale", "'x7/2y'", "re-export")


# ---------------------------------------------------------------------------------------------- label CSVs


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    """A folder of four real PNGs, one under a folder whose name holds a space and a comma, one named in Latin."""
    rng = np.random.default_rng(0)
    (tmp_path / "with space, comma").mkdir()
    for name in ("a.png", "b.png", "with space, comma/c d.png", "café.png"):
        Image.fromarray(render_chest(rng, 96, "normal").image).save(tmp_path / name)
    return tmp_path


ROWS = [("path", "label", "patient_id"), ("a.png", "COVID-19 ", "p1"), ("b.png", " Pneumonia", "p2"),
        ("with space, comma/c d.png", "NORMAL", "p3"), ("café.png", "normal", "p4")]


@pytest.mark.parametrize("variant", ["plain", "BOM", "semicolons", "tabs", "CRLF", "cp1252", "UTF-16", "header case"])
def test_label_csvs_as_spreadsheets_save_them(images: Path, variant: str) -> None:
    """Labels in any case with spaces around, a quoted name with a comma, and an é, in every way Excel saves them."""
    rows = [(" Path ", "LABEL", "patient_id"), *ROWS[1:]] if variant == "header case" else ROWS
    text = io.StringIO()
    csv.writer(text, delimiter={"semicolons": ";", "tabs": "\t"}.get(variant, ","),
               lineterminator="\r\n" if variant == "CRLF" else "\n").writerows(rows)
    encoded = {"BOM": b"\xef\xbb\xbf" + text.getvalue().encode(), "cp1252": text.getvalue().encode("cp1252"),
               "UTF-16": text.getvalue().encode("utf-16")}.get(variant, text.getvalue().encode())
    (images / "labels.csv").write_bytes(encoded)
    frame, _ = read_folder(images / "labels.csv")
    assert list(frame.sort_values("patient_id")["label"]) == ["covid", "pneumonia", "normal", "normal"]
    assert all(Path(p).is_file() for p in frame["path"]), list(frame["path"])  # every name found, é included


def test_repeated_conflicting_empty_and_header_only_csvs(images: Path) -> None:
    csv = images / "labels.csv"
    csv.write_text("path,label\na.png,covid\nb.png,normal\na.png, COVID-19\n")
    frame, notes = read_folder(csv)
    assert sorted(frame["label"]) == ["covid", "normal"] and any("rows 4 repeat an earlier row" in n for n in notes)
    csv.write_text("path,label\na.png,covid\nb.png,normal\na.png,normal\n")
    with pytest.raises(DataError, match=r"a.png is listed in rows 2, 4 with different labels"):
        read_folder(csv)
    csv.write_text("")
    with pytest.raises(DataError, match="labels.csv is empty"):
        read_folder(csv)
    csv.write_text("path,label\n")
    with pytest.raises(DataError, match="lists no images"):
        read_folder(csv)


# ---------------------------------------------------------------------------------------------- folders


def _png(path: Path, rng: np.random.Generator, label: str = "normal") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_chest(rng, 96, label).image).save(path, format="PNG")
    return path


@pytest.fixture()
def export(tmp_path: Path) -> Path:
    """A hospital export unpacked on Linux from a macOS archive: class folders, nested, with upper-case suffixes,
    DICOMs named by UID, links, hidden and AppleDouble files, a DICOMDIR, a folder named x.png."""
    rng = np.random.default_rng(4)
    root = tmp_path / "export"
    for label in ("covid", "normal"):
        _png(root / label / "a.png", rng, label)
        _png(root / label / "series 1" / "deep" / "B.PNG", rng, label)
        (root / label / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00" + bytes(80))
        (root / label / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(40))
    dicom_file(root / "normal" / "1.2.840.113619.2.55.3.4242", render_chest(rng, 96, "normal").image)
    Image.fromarray(render_chest(rng, 96, "covid").image).save(root / "covid" / "c.TIF")
    dicom_file(root / "covid" / "d.DCM", render_chest(rng, 96, "covid").image)
    (root / "covid" / "DICOMDIR").write_bytes(bytes(200))
    (root / "__MACOSX" / "covid").mkdir(parents=True)
    (root / "__MACOSX" / "covid" / "._a.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    (root / "normal" / "link.png").symlink_to(_png(tmp_path / "elsewhere" / "single.png", rng))  # a link: read
    (root / "normal" / "more").symlink_to(_png(tmp_path / "elsewhere" / "more" / "linked.png", rng).parent)  # walked
    (root / "normal" / "series 1" / "up").symlink_to(root / "normal")  # a loop: walked once
    (root / "covid" / "x.png").mkdir()  # a folder named like an image: reported
    return root


def test_a_folder_walk_takes_images_skips_what_is_never_one_and_reports_the_rest(export: Path) -> None:
    got = expand_inputs([export])
    rel = sorted(p.relative_to(export).as_posix() for p in got.files)
    assert rel == ["covid/a.png", "covid/c.TIF", "covid/d.DCM", "covid/series 1/deep/B.PNG",
                   "normal/1.2.840.113619.2.55.3.4242", "normal/a.png", "normal/link.png", "normal/more/linked.png",
                   "normal/series 1/deep/B.PNG"]
    assert got.failures == [(str(export / "covid" / "x.png"), FOLDER_NAMED_LIKE_IMAGE)]
    notes = "\n".join(got.notes)
    for words in ("2 macOS AppleDouble files", "2 hidden files", "1 __MACOSX folders", "1 DICOMDIR files",
                  "1 links to a folder already read"):
        assert words in notes, notes


def test_prepare_reads_the_same_folder_and_names_the_folder_named_like_an_image(export: Path, tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture[str]
                                                                                ) -> None:
    argv = ["prepare", "--folder", str(export), "--out", str(tmp_path / "data"), "--protocol", "kfold", "--folds",
            "2", "--image-size", str(SIZE), "--workers", "1", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{export / 'covid' / 'x.png'}: is a folder, not an image file" in err and "--skip-bad" in err
    assert not (tmp_path / "data").exists()
    assert main([*argv, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    manifest = PreparedData(tmp_path / "data").manifest
    assert len(manifest) == 9 and len(PreparedData(tmp_path / "data").cache()) == 9
    assert "skipped 2 macOS AppleDouble files" in out and "skipped 1 DICOMDIR files" in out
    assert f"skipped: {export / 'covid' / 'x.png'}: is a folder, not an image file" in out


# ---------------------------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("odd") / "tiny.pt", "xception", size=SIZE)


def _mix(root: Path, chest: np.ndarray) -> tuple[list[str], dict[str, str], list[str]]:
    """A folder of everything at once: (good names, refused name -> words of its reason, names skipped)."""
    good = {name: path for name, (path, _) in _odd_images(root / "img", chest).items()}
    good.update({name: path for name, (path, _) in _odd_dicoms(root / "dcm", chest).items()})
    dicom_file(root / "dcm" / "1.2.392.200036.9116.2.6.1.48", chest)  # named by its UID
    Image.new("L", (2, 3)).save(root / "tiny.png")
    (root / "zero.png").write_bytes(b"")
    (root / "notes.png").write_text("finding,covid\n" * 9)
    reasons = {"tiny.png": "too small", "zero.png": "empty", "notes.png": "not an image"}
    jpg = io.BytesIO()
    Image.fromarray(chest).save(jpg, "JPEG")
    (root / "cut.jpg").write_bytes(jpg.getvalue()[:600])
    reasons["cut.jpg"] = "truncated"
    Image.fromarray(chest).save(root / "pages.tif", save_all=True, append_images=[Image.fromarray(chest)])
    reasons["pages.tif"] = "2 pages"
    nan = chest.astype(np.float32)
    nan[0, 0] = np.nan
    Image.fromarray(nan).save(root / "nan.tif")
    reasons["nan.tif"] = "not a finite number"
    ds = dicom_file(root / "nopixels.dcm", chest)
    del ds.PixelData
    ds.save_as(root / "nopixels.dcm", enforce_file_format=True)
    reasons["nopixels.dcm"] = "no pixel data"
    reasons["lossless.dcm"] = _broken_lossless_dicom(root / "lossless.dcm", chest)
    (root / "x.png").mkdir()
    reasons["x.png"] = "a folder named like an image"
    (root / "gone.png").symlink_to(root / "absent.png")
    reasons["gone.png"] = "a broken symbolic link"
    (root / "loop.png").symlink_to(root / "loop.png")
    reasons["loop.png"] = "cannot be examined"
    (root / "._a.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "DICOMDIR").write_bytes(bytes(132))
    names = [p.relative_to(root).as_posix() for p in good.values()] + ["dcm/1.2.392.200036.9116.2.6.1.48"]
    return names, reasons, ["._a.png", ".DS_Store", "DICOMDIR"]


def test_predict_on_a_mix_of_everything(ckpt: Path, chest: np.ndarray, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "mix"
    (root / "img").mkdir(parents=True)
    (root / "dcm").mkdir()
    good, reasons, skipped = _mix(root, chest)
    out = tmp_path / "rows.csv"
    status = main(["predict", str(ckpt), str(root), "--out", str(out), "--batch-size", "4", "--device", "cpu",
                   "--precision", "fp32", "--backend", "torch"])
    err = capsys.readouterr().err
    assert status == 1
    table = pd.read_csv(out, keep_default_na=False)
    names = table["path"].map(lambda p: Path(p).relative_to(root).as_posix())
    ok = table["error"] == ""
    assert sorted(names[ok]) == sorted(good)  # every good file predicted
    assert set(table.loc[ok, "class"]) <= {"covid", "pneumonia", "normal"}
    got = dict(zip(names[~ok], table.loc[~ok, "error"]))
    assert got.keys() == reasons.keys()  # every bad one its row, nothing else
    for name, words in reasons.items():
        assert words in got[name], (name, got[name])
    for name in skipped:  # passed over with a note, no row
        assert str(root / name) in err and name not in set(names)
    assert f"predicted {len(good)} images" in err and f"{len(reasons)} failed" in err


def test_evaluate_external_reads_a_spreadsheet_csv(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    """A UTF-8 CSV with a byte-order mark and semicolons, labels in any case, one truncated image among them."""
    rng = np.random.default_rng(2)
    rows = ["path;label;source"]
    for i, label in enumerate(["COVID-19", "Pneumonia ", "normal", "No Finding", "covid", "normal"]):
        _png(tmp_path / "set" / f"im {i}.png", rng, "normal")
        rows.append(f"im {i}.png;{label};hospital-b")
    data = (tmp_path / "set" / "im 5.png").read_bytes()
    (tmp_path / "set" / "im 5.png").write_bytes(data[: len(data) // 2])
    csv_path = tmp_path / "set" / "labels.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode())
    out = tmp_path / "external"
    argv = ["evaluate", str(ckpt), "--external", str(csv_path), "--name", "odd", "--out", str(out), "--device", "cpu",
            "--precision", "fp32", "--backend", "torch", "--bootstrap", "20", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 5
    evaluation = metrics["evaluation"]
    assert [f["path"] for f in evaluation["failed"]] == [str(tmp_path / "set" / "im 5.png")]
    assert evaluation["sources"] == {"hospital-b": 5}


def test_the_web_upload_takes_phone_photos_and_refuses_the_rest_clearly(ckpt: Path, chest: np.ndarray,
                                                                        tmp_path: Path) -> None:
    from covid_cxr.deploy.server import create_app
    from covid_cxr.inference.backends import load_model
    from covid_cxr.inference.settings import InferenceSettings

    model = load_model(ckpt, InferenceSettings(device="cpu", precision="fp32"))
    images = _odd_images(tmp_path, chest)
    lossless = tmp_path / "lossless.dcm"
    lossless_refusal = _broken_lossless_dicom(lossless, chest)
    with serve(create_app(model.predictor, network=model.network)) as url:
        for kind in ("EXIF orientation 6", "CMYK JPEG", "16-bit PNG, 12-bit data", "LA PNG"):
            path, _ = images[kind]
            r = httpx.post(f"{url}/predict", files={"file": (path.name, path.read_bytes())}, timeout=120)
            assert r.status_code == 200, (kind, r.text)
            upright = model.predictor.predict_proba(load_image(path, SIZE)[None])[0]
            np.testing.assert_allclose([r.json()["probabilities"][c] for c in model.predictor.classes], upright,
                                       atol=1e-5)
        one = io.BytesIO()
        Image.new("L", (1, 1)).save(one, "PNG")
        refused = {"one.png": (one.getvalue(), 422, "too small"), "big.png": (png_bomb(12000, 12000), 413, "shrink"),
                   "._a.png": (b"\x00\x05\x16\x07" + bytes(60), 422, "AppleDouble"),
                   "lossless.dcm": (lossless.read_bytes(), 422, lossless_refusal)}
        for name, (data, status, words) in refused.items():
            r = httpx.post(f"{url}/predict", files={"file": (name, data)}, timeout=120)
            assert r.status_code == status and words in r.json()["detail"], (name, r.text)


def test_names_that_differ_only_in_replaced_characters_keep_their_own_ids() -> None:
    ids = make_ids("hospital-b", pd.Series(["covid/病例一.png", "covid/病例二.png", "covid/plain.png"]))
    assert ids.is_unique and ids.iloc[2] == "hospital-b/covid_plain"
    assert all(i.startswith("hospital-b/covid__png-") and len(i.rsplit("-", 1)[1]) == 8 for i in ids.iloc[:2])
    # Ids that still clash (here: two sources' parts built by hand) are refused naming both files.
    part = pd.DataFrame({"image_id": ["a/x", "a/x"], "path": ["/d/sub/x.png", "/d/sub_x.png"], "source": ["a", "a"]})
    with pytest.raises(DataError, match=r"2 images share an image id \(a/x: /d/sub/x.png and /d/sub_x.png\)"):
        combine([part])
