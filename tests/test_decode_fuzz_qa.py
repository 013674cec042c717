"""QA s14 (fuzz): bad input to the decoder is refused by name and reason, and costs nothing else.

A header GDCM would abort the process on is refused before decoding; rescale and window values that are not
finite numbers are refused by name, and a blank picture is never classified; DICOM pixel data is budgeted in
bytes, not pixels alone; no decoder warning reaches stderr, even from threads decoding at once; and reasons say
what is wrong (a header value, a 12-bit JPEG, Float Pixel Data), not "truncated". Every file is real, written
here with pydicom, GDCM, Pillow or OpenCV.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1

from covid_cxr.cli import main
from covid_cxr.data.images import (
    BYTES_PER_PIXEL,
    MAX_PIXELS,
    decode_image,
    decode_image_info,
    decode_radiograph,
)
from covid_cxr.errors import ImageDecodeError
from covid_cxr.synth.render import render_chest
from tests.test_dicom_compressed import LOSSLESS, T, _gdcm  # GDCM encoders, as a PACS export writes
from tests.test_odd_inputs import dicom_file
from tests.test_server import png_bomb, tiny_checkpoint

# Decodes each file named on the command line, one line each: "OK" or the reason. In a process of its own, so
# that a decoder aborting the process (GDCM's uncaught C++ exception) fails the test instead of ending pytest.
CHILD = """
import sys
from covid_cxr.data.images import decode_radiograph
from covid_cxr.errors import ImageDecodeError
for path in sys.argv[1:]:
    try:
        decode_radiograph(path)
        print("OK")
    except ImageDecodeError as exc:
        print(exc)
"""


def _decode_in_child(*paths: Path) -> tuple[list[str], str]:
    """Each file's line from :data:`CHILD`, and what the child wrote to stderr."""
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, paths)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"the decoder took the process down (exit {done.returncode}): {done.stderr[-600:]}"
    return done.stdout.splitlines(), done.stderr


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    """A rendered radiograph spanning 0-255, not square."""
    image = render_chest(np.random.default_rng(14), 128, "pneumonia").image[:, :112]
    return cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX)


def _refused(path: Path, *words: str, unwanted: tuple[str, ...] = ()) -> str:
    with pytest.raises(ImageDecodeError) as err:
        decode_radiograph(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for word in words:
        assert word in message, message
    for word in unwanted:
        assert word not in message, message
    return message


def _with(src: Path, dst: Path, **elements: object) -> Path:
    """A copy of the DICOM file ``src`` with the given header elements changed, its pixel data as is."""
    ds = pydicom.dcmread(src)
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


# ---------------------------------------------------------------------------------------------- 1: GDCM abort


@pytest.fixture(scope="module")
def lossless(tmp_path_factory: pytest.TempPathFactory, chest: np.ndarray) -> dict[str, Path]:
    """JPEG Lossless DICOMs GDCM wrote (SV1 and process 14), at 8 bits in 8, 12 in 16 and 16 in 16, with the
    uncompressed file each was made from."""
    folder = tmp_path_factory.mktemp("lossless")
    deep = chest.astype(np.uint16)
    files: dict[str, Path] = {}
    for depth, pixels, stored in (("8", chest, 8), ("12", deep * 16 + 7, 12), ("16", deep * 257, 16)):
        raw = files[f"raw{depth}"] = folder / f"raw{depth}.dcm"
        dicom_file(raw, pixels, bits_stored=stored)
        for syntax in (JPEGLosslessSV1, JPEGLossless):
            files[f"{syntax}/{depth}"] = folder / f"{syntax}-{depth}.dcm"
            LOSSLESS[syntax](raw, files[f"{syntax}/{depth}"])
            assert pydicom.dcmread(files[f"{syntax}/{depth}"]).file_meta.TransferSyntaxUID == syntax
    return files


def test_jpeg_lossless_headers_gdcm_aborts_on_are_refused_and_the_process_lives(
        tmp_path: Path, lossless: dict[str, Path]) -> None:
    """QA's finding 1: Bits Allocated 32 or 64 (or 7 bits stored in 8) made GDCM abort the whole process, and a
    predict run lost every row. Refused from the header, naming the file, the syntax and the value."""
    sv1, p14 = lossless[f"{JPEGLosslessSV1}/8"], lossless[f"{JPEGLossless}/12"]
    cases = {
        _with(sv1, tmp_path / "sv1-ba32.dcm", BitsAllocated=32): (JPEGLosslessSV1, "Bits Allocated 32"),
        _with(p14, tmp_path / "p14-ba64.dcm", BitsAllocated=64): (JPEGLossless, "Bits Allocated 64"),
        _with(sv1, tmp_path / "sv1-bs7.dcm", BitsStored=7, HighBit=6):
            (JPEGLosslessSV1, "Bits Allocated 8 and Bits Stored 7"),
    }  # fmt: skip
    good = lossless[f"{JPEGLosslessSV1}/12"]
    lines, _ = _decode_in_child(*cases, good)  # a good file after them: the run goes on
    assert len(lines) == len(cases) + 1 and lines[-1] == "OK", lines
    for line, (path, (syntax, held)) in zip(lines, cases.items()):
        assert line.startswith(f"{path}: ") and str(syntax) in line and held in line, line
        assert "8 bits stored in 8 allocated, or up to 16 in 16" in line and "dcmdjpeg" in line, line


def test_what_modalities_write_in_jpeg_lossless_still_decodes(lossless: dict[str, Path]) -> None:
    """The guard refuses nothing GDCM decodes: 8 bits in 8, 12 and 16 bits in 16, SV1 and process 14 alike,
    each to the picture of its uncompressed twin."""
    for key, path in lossless.items():
        if "/" in key:
            np.testing.assert_array_equal(decode_image(path), decode_image(lossless[f"raw{key.split('/')[1]}"]), key)


# ---------------------------------------------------------------------------------------------- 2: blank

WRITES_NAN = pytest.mark.filterwarnings("ignore:Invalid value for VR DS:UserWarning")  # pydicom, writing 'nan'


@WRITES_NAN
@pytest.mark.parametrize(("elements", "named"), [
    ({"RescaleSlope": "nan", "RescaleIntercept": "0"}, "Rescale Slope is not a finite number (nan)"),
    ({"RescaleSlope": "inf", "RescaleIntercept": "0"}, "Rescale Slope is not a finite number (inf)"),
    ({"RescaleSlope": "1", "RescaleIntercept": "-inf"}, "Rescale Intercept is not a finite number (-inf)"),
    ({"WindowCenter": "nan", "WindowWidth": "100"}, "Window Center is not a finite number (nan)"),
    ({"WindowCenter": "2048", "WindowWidth": "inf"}, "Window Width is not a finite number (inf)"),
    ({"RescaleSlope": "1e308", "RescaleIntercept": "0"}, "Rescale Slope 1e+308 and Rescale Intercept 0 overflow"),
    ({"RescaleSlope": "0", "RescaleIntercept": "0"}, "Rescale Slope is 0"),
])
def test_rescale_and_window_values_that_are_no_finite_number_are_refused_by_name(
        tmp_path: Path, chest: np.ndarray, elements: dict[str, str], named: str) -> None:
    """QA's finding 2: these decoded to an all-black picture that was then classified, with numpy's warnings (no
    file named) the only sign. Refused naming the element, and numpy warns of nothing."""
    path = tmp_path / "header.dcm"
    dicom_file(path, chest.astype(np.uint16) * 16, bits_stored=12, **elements)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", RuntimeWarning)
        _refused(path, named, "re-export")
    assert [str(w.message) for w in seen] == []


def test_a_huge_but_finite_rescale_decodes_to_the_picture(tmp_path: Path, chest: np.ndarray) -> None:
    """A slope of 1e300 keeps every value a finite number; the stretch, past float32's range, gives the picture."""
    path = tmp_path / "steep.dcm"
    dicom_file(path, chest.astype(np.uint16) * 16, bits_stored=12, RescaleSlope="1e300", RescaleIntercept="0")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", RuntimeWarning)
        img = decode_radiograph(path)[0]
    assert [str(w.message) for w in seen] == []
    assert np.abs(img.astype(int) - chest).max() <= 1


def _blank_files(folder: Path) -> dict[str, Path]:
    """One blank 64 x 64 picture in each format, and DICOMs whose header leaves no picture."""
    flat = np.full((64, 64), 90, np.uint8)
    files = {name: folder / name for name in ("blank.png", "blank.jpg", "blank.tif", "float.tif", "blank.dcm")}
    cv2.imwrite(str(files["blank.png"]), flat)
    cv2.imwrite(str(files["blank.jpg"]), flat)
    Image.fromarray(flat).save(files["blank.tif"])
    Image.fromarray(np.full((64, 64), 0.5, np.float32)).save(files["float.tif"])
    dicom_file(files["blank.dcm"], np.full((64, 64), 1000, np.uint16), bits_stored=12)
    varied = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    files["window-outside.dcm"] = folder / "window-outside.dcm"  # a window far above the data: all black
    dicom_file(files["window-outside.dcm"], varied, bits_stored=12, WindowCenter="60000", WindowWidth="10")
    return files


def test_a_blank_image_in_any_format_is_refused_not_classified(tmp_path: Path) -> None:
    """QA's finding 2: a blank 40 x 40 TIFF was classified. Refused by decode_radiograph, what every input to a
    classifier passes through; decode_image still reads it (a mask may be blank)."""
    for name, path in _blank_files(tmp_path).items():
        message = _refused(path, "blank image: every pixel is ")
        assert decode_image(path).std() == 0, name
        if name == "blank.png":
            assert "every pixel is 90," in message


def test_a_blank_upload_is_refused_through_predict(tmp_path: Path, chest: np.ndarray) -> None:
    """Through ``predict``: the blank file gets its reason, the good one its prediction."""
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "good.png"), chest)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(folder / "blank.tif")
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", size=71)
    out = tmp_path / "rows.csv"
    code = main(["predict", str(ckpt), str(folder), "--out", str(out), "--device", "cpu", "--backend", "torch"])
    rows = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert code == 1 and rows.loc[str(folder / "blank.tif"), "error"].endswith("blank image: every pixel is 0, so "
                                                                                "there is no picture to classify; "
                                                                                "give the radiograph itself, or "
                                                                                "re-export it")
    good = rows.loc[str(folder / "good.png")]
    assert good["error"] == "" and good["class"] in ("covid", "pneumonia", "normal")


# ---------------------------------------------------------------------------------------------- 3: byte budget


def _header_only(path: Path, rows: int, cols: int, samples: int, allocated: int) -> Path:
    """A DICOM whose header claims rows x cols x samples of ``allocated`` bits over a few bytes of pixel data."""
    shape = (8, 8, 3) if samples == 3 else (8, 8)
    dicom_file(path, np.zeros(shape, np.uint8), photometric="RGB" if samples == 3 else "MONOCHROME2",
               Rows=rows, Columns=cols, BitsAllocated=allocated, BitsStored=allocated, HighBit=allocated - 1)
    return path


def test_dicom_pixel_data_is_budgeted_in_bytes_from_the_header(tmp_path: Path, monkeypatch) -> None:
    """QA's finding 3: 6300 x 6300 x 3 samples of 32 bits passed the pixel limit and cost a gigabyte and 20 s.
    Refused from the header, before any decoder is chosen, with the rule, as the server's 413 needs ("exceeds the
    limit")."""
    import covid_cxr.data.images as images

    def reached(*_args: object) -> None:
        raise AssertionError("a decoder was chosen for a file its header should have refused")

    monkeypatch.setattr(images, "_check_decoder", reached)
    bomb = _header_only(tmp_path / "bomb.dcm", 6300, 6300, 3, 32)
    _refused(bomb, "6300x6300 pixels x 3 samples x 4 bytes", f"exceeds the limit of {BYTES_PER_PIXEL * MAX_PIXELS} "
             "bytes", f"{BYTES_PER_PIXEL} bytes a pixel", "decompression bomb")


def test_the_byte_budget_scales_with_the_pixel_limit(tmp_path: Path, chest: np.ndarray) -> None:
    """2 bytes a pixel of the limit: 16-bit grayscale and 8-bit RGB at half the limit pass, 16-bit RGB does not."""
    limit = 2 * chest.size
    for name, pixels, kw in (("gray16.dcm", chest.astype(np.uint16) * 257, {}),
                             ("rgb8.dcm", np.dstack([chest] * 3), {"photometric": "RGB"})):
        dicom_file(tmp_path / name, pixels, **kw)
        assert decode_image_info(tmp_path / name, max_pixels=limit)[0].shape == chest.shape, name
    dicom_file(tmp_path / "rgb16.dcm", np.dstack([chest.astype(np.uint16) * 257] * 3), photometric="RGB")
    with pytest.raises(ImageDecodeError, match=f"exceeds the limit of {2 * limit} bytes"):
        decode_image_info(tmp_path / "rgb16.dcm", max_pixels=limit)


@pytest.mark.parametrize(("rows", "cols", "samples", "allocated"), [(4280, 4280, 1, 16), (3000, 3000, 3, 8)])
def test_the_largest_real_chest_radiographs_fit_the_byte_budget(tmp_path: Path, rows: int, cols: int, samples: int,
                                                               allocated: int) -> None:
    """A 43 x 43 cm detector's 4280 x 4280 at 16 bits, and a 3000 x 3000 RGB film scan, are not refused as too
    large: the header-only file gets past the budget to the pixel data, which is short."""
    message = _refused(_header_only(tmp_path / "big.dcm", rows, cols, samples, allocated), "cannot be decoded")
    assert "exceeds the limit" not in message


# ---------------------------------------------------------------------------------------------- 5: warnings


def _invalid_uid_dicom(path: Path, chest: np.ndarray) -> Path:
    """A good picture whose SOP Class UID holds a NUL: pydicom warns of it, quoting it, when it is first read."""
    dicom_file(path, chest, ViewPosition="PA")
    data = path.read_bytes()
    uid = pydicom.uid.SecondaryCaptureImageStorage.encode()
    assert uid in data
    path.write_bytes(data.replace(uid, uid[:9] + b"\0" + uid[10:]))
    return path


def _frames_ab_dicom(path: Path, chest: np.ndarray) -> Path:
    """Number of Frames 'ab': pydicom warns of the invalid IS value, quoting it."""
    dicom_file(path, chest, NumberOfFrames="99")
    path.write_bytes(path.read_bytes().replace(b"\x28\x00\x08\x00IS\x02\x0099", b"\x28\x00\x08\x00IS\x02\x00ab"))
    return path


@WRITES_NAN
def test_no_decoder_warning_reaches_stderr(tmp_path: Path, chest: np.ndarray) -> None:
    """QA's finding 5: pydicom's warnings (quoting header values) and numpy's printed on stderr without a file
    name, and into serve's log. A fresh interpreter, as predict and serve run, prints nothing but the lines."""
    nan = tmp_path / "nan.dcm"
    dicom_file(nan, chest.astype(np.uint16) * 16, bits_stored=12, RescaleSlope="nan", RescaleIntercept="0")
    bomb = tmp_path / "huge.png"
    bomb.write_bytes(png_bomb(7200, 7200))  # over our limit, under twice Pillow's: Pillow would only warn
    uid = _invalid_uid_dicom(tmp_path / "uid.dcm", chest)
    lines, stderr = _decode_in_child(uid, _frames_ab_dicom(tmp_path / "ab.dcm", chest), nan, bomb)
    assert stderr == ""
    assert lines[0] == "OK" and "'ab'" in lines[1] and "Rescale Slope" in lines[2] and "exceeds the limit" in lines[3]


def test_threads_decoding_at_once_let_no_warning_through(tmp_path: Path, chest: np.ndarray) -> None:
    """QA's F9: warnings.catch_warnings swaps the process-wide filters, so threads decoding at once (predict,
    serve) let Pillow's DecompressionBombWarning through now and then. Eight threads, 80 decodes: none."""
    bomb = tmp_path / "huge.png"
    bomb.write_bytes(png_bomb(7200, 7200))
    uid = _invalid_uid_dicom(tmp_path / "uid.dcm", chest)

    def decode_some(_: int) -> None:
        for _ in range(5):
            for path in (bomb, uid):
                try:
                    decode_radiograph(path)
                except ImageDecodeError:
                    pass

    with warnings.catch_warnings(record=True) as seen:  # records what would reach stderr; filters as they are
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(decode_some, range(8)))
    assert [f"{w.category.__name__}: {w.message}" for w in seen] == []


# ---------------------------------------------------------------------------------------------- 6: reasons


def test_an_invalid_header_value_is_not_called_truncation(tmp_path: Path, chest: np.ndarray) -> None:
    raw = tmp_path / "raw.dcm"
    dicom_file(raw, chest)
    _refused(_with(raw, tmp_path / "ba12.dcm", BitsAllocated=12), "invalid DICOM header value: Bits Allocated 12",
             "multiple of 8", unwanted=("truncated",))
    _refused(_with(raw, tmp_path / "pi.dcm", PhotometricInterpretation="monochrome2"),
             "Photometric Interpretation 'monochrome2'", "MONOCHROME2", unwanted=("truncated",))
    _refused(_with(raw, tmp_path / "spp.dcm", SamplesPerPixel=2), "Samples per Pixel 2", unwanted=("truncated",))


def _garbage_stream(path: Path, chest: np.ndarray, syntax: pydicom.uid.UID) -> Path:
    ds = dicom_file(path, chest)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([np.random.default_rng(1).integers(0, 256, 2000, np.uint8).tobytes()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_corrupt_stream_is_told_without_an_object_repr(tmp_path: Path, chest: np.ndarray) -> None:
    """Pillow named its stream ``<_io.BytesIO object at 0x...>``; GDCM's empty answer read as a Python error."""
    _refused(_garbage_stream(tmp_path / "jpeg.dcm", chest, JPEGBaseline8Bit), "cannot be decoded",
             "pillow: cannot identify image file", unwanted=("object at 0x", "BytesIO"))
    _refused(_garbage_stream(tmp_path / "lossless.dcm", chest, JPEGLosslessSV1), "gdcm: no picture decoded",
             unwanted=("NoneType",))


def test_a_12_bit_jpeg_is_named_with_how_to_convert_it(tmp_path: Path, chest: np.ndarray) -> None:
    """A real 12-bit JPEG (GDCM's JPEG extended stream, taken out of its DICOM) was called "not an image"."""
    raw = tmp_path / "raw.dcm"
    dicom_file(raw, chest.astype(np.uint16) * 16, bits_stored=12)
    _gdcm(T.JPEGExtendedProcess2_4)(raw, tmp_path / "jpeg12.dcm")
    ds = pydicom.dcmread(tmp_path / "jpeg12.dcm")
    assert ds.file_meta.TransferSyntaxUID == JPEGExtended12Bit
    stream = next(generate_frames(ds.PixelData, number_of_frames=1))
    sof = stream.find(b"\xff\xc1")
    assert sof > 0 and stream[sof + 4] > 8  # a frame header of more than 8 bits a sample
    (tmp_path / "x.jpg").write_bytes(stream)
    _refused(tmp_path / "x.jpg", f"a {stream[sof + 4]}-bit JPEG, which is not supported", "16-bit PNG",
             unwanted=("not an image",))
    cv2.imwrite(str(tmp_path / "y.jpg"), chest)  # an 8-bit JPEG is read as ever
    assert decode_radiograph(tmp_path / "y.jpg")[0].shape == chest.shape


def test_float_pixel_data_is_named_as_not_supported(tmp_path: Path, chest: np.ndarray) -> None:
    ds = dicom_file(tmp_path / "raw.dcm", chest)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = (chest.astype(np.float32) / 255).tobytes()
    ds.save_as(tmp_path / "float.dcm", enforce_file_format=True)
    _refused(tmp_path / "float.dcm", "Float Pixel Data", "not supported", unwanted=("no pixel data", "truncated"))


def test_a_png_with_a_damaged_header_is_named_as_such(tmp_path: Path, chest: np.ndarray) -> None:
    data = bytearray(cv2.imencode(".png", chest)[1].tobytes())
    data[29] ^= 0xFF  # the IHDR chunk's checksum
    (tmp_path / "ihdr.png").write_bytes(bytes(data))
    _refused(tmp_path / "ihdr.png", "PNG file whose header (its IHDR chunk) is damaged", unwanted=("not an image",))
