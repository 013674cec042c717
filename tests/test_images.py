"""Image decoding: formats decided by content, DICOM photometry, and every bad input refused clearly."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from covid_cxr.data.images import (
    MAX_PIXELS,
    RESIZE_METHODS,
    decode_image,
    is_dicom,
    load_image,
    resize_gray,
)
from covid_cxr.errors import ConfigError, ImageDecodeError
from covid_cxr.preprocess import Preprocessing
from covid_cxr.synth.dicom import write_dicom
from covid_cxr.synth.render import render_chest


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    return render_chest(np.random.default_rng(3), 128, "pneumonia").image


def _png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.fixtures
def test_real_rsna_dicom_decodes_to_1024(fixtures_dir: Path) -> None:
    path = next((fixtures_dir / "rsna").glob("*.dcm"))
    img = decode_image(path)
    assert img.shape == (1024, 1024) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, pydicom.dcmread(path).pixel_array)  # 8-bit MONOCHROME2: untouched
    assert 20 < img.mean() < 235 and img.std() > 20


def test_png_jpeg_gray_rgb_rgba_16bit(chest: np.ndarray) -> None:
    rgb = np.repeat(chest[..., None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full(chest.shape + (1,), 255, np.uint8)], axis=2)
    for data in (_png_bytes(chest), _png_bytes(rgb), _png_bytes(rgba)):
        np.testing.assert_array_equal(decode_image(data), chest)
    deep = chest.astype(np.uint16) * 200  # a 16-bit PNG that does not use the full range
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.dtype == np.uint8 and out.max() == 255 and out.min() == 0
    assert np.corrcoef(out.ravel(), chest.ravel())[0, 1] > 0.999
    buf = io.BytesIO()
    Image.fromarray(chest).save(buf, format="JPEG", quality=95)
    assert np.abs(decode_image(buf.getvalue()).astype(int) - chest).mean() < 3


def test_format_is_decided_by_content_not_name(tmp_path: Path, chest: np.ndarray) -> None:
    dicom_named_png = tmp_path / "scan.png"
    write_dicom(dicom_named_png, chest)
    png_named_dcm = tmp_path / "scan.dcm"
    png_named_dcm.write_bytes(_png_bytes(chest))
    assert is_dicom(dicom_named_png.read_bytes()) and not is_dicom(png_named_dcm.read_bytes())
    assert np.abs(decode_image(dicom_named_png).astype(int) - chest).mean() < 3
    np.testing.assert_array_equal(decode_image(png_named_dcm), chest)


@pytest.mark.parametrize("storage", ["mono1", "16bit", "nopreamble"])
def test_dicom_variants_keep_polarity(tmp_path: Path, chest: np.ndarray, storage: str) -> None:
    reference, variant = tmp_path / "ref.dcm", tmp_path / f"{storage}.dcm"
    write_dicom(reference, chest, storage="jpeg")
    write_dicom(variant, chest, storage=storage)
    raw = variant.read_bytes()
    if storage == "mono1":
        assert pydicom.dcmread(variant).PhotometricInterpretation == "MONOCHROME1"
        stored = pydicom.dcmread(variant).pixel_array
        assert np.corrcoef(stored.ravel(), chest.ravel())[0, 1] < -0.9  # stored inverted ...
    if storage == "nopreamble":
        assert raw[128:132] != b"DICM"
    a, b = decode_image(reference).astype(float), decode_image(variant).astype(float)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98  # ... decoded with the same polarity
    assert abs(a.mean() - b.mean()) < 12


def test_resize_and_load(tmp_path: Path, chest: np.ndarray) -> None:
    wide = np.tile(chest, (1, 2))
    out = resize_gray(wide, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert resize_gray(chest[:40, :40], 100).shape == (100, 100)
    path = tmp_path / "x.png"
    path.write_bytes(_png_bytes(chest))
    assert load_image(path, 72).shape == (72, 72)
    with pytest.raises(ValueError):
        resize_gray(np.zeros((4, 4, 3), np.uint8), 8)


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the data stays tiny): a decompression bomb's signature."""
    data = bytearray(_png_bytes(np.zeros((1, 1), np.uint8)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_bad_inputs_raise_clear_errors(tmp_path: Path, chest: np.ndarray) -> None:
    good = tmp_path / "good.dcm"
    write_dicom(good, chest, storage="16bit")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n" * 20)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_with_size(20000, 20000))
    big = tmp_path / "big.png"  # over our limit but under Pillow's own error threshold
    big.write_bytes(_png_with_size(8000, 8000))
    cases = {truncated: "truncated", text: "not an image", empty: "empty", bomb: str(MAX_PIXELS), big: str(MAX_PIXELS),
             tmp_path / "absent.png": "not found", tmp_path: "folder"}
    for path, words in cases.items():
        with pytest.raises(ImageDecodeError) as err:
            decode_image(path)
        assert str(path) in str(err.value) and words in str(err.value), str(err.value)
    with pytest.raises(ImageDecodeError, match="upload.png"):
        decode_image(b"\x89PNG\r\n\x1a\n broken", name="upload.png")


def test_dicom_bomb_refused_from_header(tmp_path: Path, chest: np.ndarray) -> None:
    path = tmp_path / "big.dcm"
    write_dicom(path, chest, storage="16bit")
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(path)
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(path)


def write_raw_dicom(path: Path, img: np.ndarray, *, frames: int = 1, first_group: str = "0008") -> None:
    """A bare DICOM dataset as older PACS exports write it: no preamble, no file meta, implicit VR little endian.

    ``img`` is (H, W) uint8, or (frames, H, W) for a multi-frame object; ``first_group`` "0010" starts
    the file with the patient module instead of the SOP common module.
    """
    ds = Dataset()
    if first_group == "0008":
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # computed radiography
        ds.Modality = "CR"
    ds.PatientID = "raw"
    ds.Rows, ds.Columns = img.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(img, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)


@pytest.mark.parametrize("first_group", ["0008", "0010"])
def test_dicom_without_preamble_or_meta_is_read(tmp_path: Path, chest: np.ndarray, first_group: str) -> None:
    path = tmp_path / "raw"
    write_raw_dicom(path, chest, first_group=first_group)
    data = path.read_bytes()
    assert data[128:132] != b"DICM" and is_dicom(data)
    np.testing.assert_array_equal(decode_image(path), chest)  # uncompressed 8-bit: exactly the pixels


def test_multi_frame_dicom_is_refused_with_its_frame_count(tmp_path: Path, chest: np.ndarray) -> None:
    path = tmp_path / "cine.dcm"
    write_raw_dicom(path, np.stack([chest, 255 - chest, chest]), frames=3)
    with pytest.raises(ImageDecodeError, match="multi-frame DICOM [(]3 frames[)]") as err:
        decode_image(path)
    assert str(path) in str(err.value)


def test_resize_methods_are_what_they_claim(chest: np.ndarray) -> None:
    big = cv2.resize(chest, (1000, 900), interpolation=cv2.INTER_CUBIC)
    area = cv2.resize(big, (300, 300), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(resize_gray(big, 300, "area"), area)
    np.testing.assert_array_equal(resize_gray(big, 300, "bilinear"), cv2.resize(big, (300, 300)))  # cv2's default
    np.testing.assert_array_equal(resize_gray(big, 300, "nearest"),
                                  np.asarray(Image.fromarray(big).resize((300, 300), Image.Resampling.NEAREST)))
    np.testing.assert_array_equal(resize_gray(chest, 300), resize_gray(chest, 300, "bilinear"))  # enlarging: linear
    with pytest.raises(ValueError, match="area, bilinear, nearest"):
        resize_gray(chest, 64, "bicubic")


def test_only_the_area_filter_averages_when_shrinking() -> None:
    """A 1-pixel stripe pattern shrunk 1024 -> 300: the area filter gives its mean, the others alias."""
    stripes = np.tile(np.array([0, 255], np.uint8), (1024, 512))
    area = resize_gray(stripes, 300, "area").astype(float)
    assert abs(area.mean() - 127.5) < 2 and area.std() < 20
    for method in ("bilinear", "nearest"):
        assert resize_gray(stripes, 300, method).astype(float).std() > 60, method


def test_preprocessing_records_the_resize_method() -> None:
    assert Preprocessing().resize == "area" and set(RESIZE_METHODS) == {"area", "bilinear", "nearest"}
    old = {"image_size": 300, "scaling": "unit", "channels": 3}  # a checkpoint written before the field
    assert Preprocessing.from_dict(old).resize == "area"
    pre = Preprocessing(resize="bilinear")
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    with pytest.raises(ConfigError, match="resize must be one of"):
        Preprocessing(resize="lanczos")
