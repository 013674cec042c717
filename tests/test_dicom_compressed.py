"""Compressed DICOMs as PACS archives export chest radiographs decode out of the box, each to the picture its
uncompressed twin decodes to.

The files are real: a real radiograph (or, without the fixtures, a rendered one) stored as a CR plate stores it,
12 bits in 16, MONOCHROME2 or MONOCHROME1, then compressed by a real encoder (GDCM, as a PACS export would do it,
or pydicom's own RLE and deflate writers) and decoded by the plugins the package depends on.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import gdcm  # after Python's zlib module (pytest's, here): python-gdcm exports its own zlib to all later libraries
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from covid_cxr.data.images import decode_image
from covid_cxr.errors import ImageDecodeError
from covid_cxr.labels import CLASSES
from covid_cxr.synth.render import render_chest
from tests.test_odd_inputs import dicom_file
from tests.test_server import tiny_checkpoint

REAL_CXR = "real_cxr/hannover/0578e08b.png"  # 512 x 419, not square: a transposition would show
SIZE = 71

Encoder = Callable[[Path, Path], None]


def _gdcm(syntax: int, codec: gdcm.ImageCodec | None = None) -> Encoder:
    """Re-encode a DICOM file with GDCM in ``syntax`` (a ``gdcm.TransferSyntax`` type), as ``gdcmconv`` does."""

    def encode(src: Path, dst: Path) -> None:
        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        assert reader.Read(), src
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(syntax))
        if codec is not None:
            change.SetUserCodec(codec)
        change.SetInput(reader.GetImage())
        assert change.Change(), f"GDCM cannot encode {src.name} in {syntax}"
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(dst))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write(), dst

    return encode


def _lossy(codec: gdcm.ImageCodec, **settings: object) -> gdcm.ImageCodec:
    """A GDCM codec set to encode with loss (each setting a ``Set...`` call)."""
    for name, value in settings.items():
        getattr(codec, f"Set{name}")(*(value if isinstance(value, tuple) else (value,)))
    return codec


def _rle(src: Path, dst: Path) -> None:
    ds = pydicom.dcmread(src)
    ds.compress(RLELossless)  # pydicom's own encoder
    ds.save_as(dst, enforce_file_format=True)


def _deflated(src: Path, dst: Path) -> None:
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian  # the whole dataset zlib-deflated on writing
    ds.save_as(dst, enforce_file_format=True)


T = gdcm.TransferSyntax
LOSSLESS: dict[UID, Encoder] = {
    JPEGLosslessSV1: _gdcm(T.JPEGLosslessProcess14_1),  # what CR and DX archives write most
    JPEGLossless: _gdcm(T.JPEGLosslessProcess14),
    JPEGLSLossless: _gdcm(T.JPEGLSLossless),
    JPEG2000Lossless: _gdcm(T.JPEG2000Lossless),
    RLELossless: _rle,
    DeflatedExplicitVRLittleEndian: _deflated,
}


@pytest.fixture(scope="module", params=["real", "rendered"])
def radiograph(request: pytest.FixtureRequest) -> np.ndarray:
    """An 8-bit chest radiograph spanning 0-255, bone bright: a real one from the fixtures, or a rendered one
    (which runs without them)."""
    if request.param == "real":
        img = cv2.imread(str(request.getfixturevalue("fixtures_dir") / REAL_CXR), cv2.IMREAD_GRAYSCALE)
        assert img is not None and img.shape == (419, 512)
    else:
        img = render_chest(np.random.default_rng(8), 320, "pneumonia").image[:, :288]
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX)


def _twelve_bits(img: np.ndarray) -> np.ndarray:
    """An 8-bit picture as a CR plate's 12 bits: smoothed on the way up, so that the low 4 bits carry picture too."""
    deep = cv2.GaussianBlur(img.astype(np.float32) * (4095 / 255), (0, 0), 0.8)
    return np.clip(np.rint(deep), 0, 4095).astype(np.uint16)


def _cr(path: Path, img: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    """An uncompressed CR image of ``img`` as the plate stores it: 12 bits in 16, negative for MONOCHROME1."""
    stored = _twelve_bits(img)
    if photometric == "MONOCHROME1":
        stored = 4095 - stored
    dicom_file(path, stored, photometric=photometric, bits_stored=12, sop_class=ComputedRadiographyImageStorage,
               ViewPosition="PA")
    return path


def _compressed(encode: Encoder, src: Path, syntax: UID) -> Path:
    """``src`` compressed in ``syntax``, checked to hold what it claims."""
    dst = src.with_name(f"{src.stem}-{syntax}.dcm")
    encode(src, dst)
    ds = pydicom.dcmread(dst)
    assert ds.file_meta.TransferSyntaxUID == syntax
    if syntax != DeflatedExplicitVRLittleEndian:
        assert ds["PixelData"].is_undefined_length  # encapsulated: compressed frames, not raw pixels
    return dst


# ---------------------------------------------------------------------------------------------- lossless


def test_the_set_up_installs_a_decoder_for_every_common_syntax() -> None:
    """The declared dependencies (python-gdcm, pyjpegls) bring what the archives' syntaxes need."""
    for syntax in (*LOSSLESS, JPEGLSNearLossless, JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit):
        assert get_decoder(syntax).is_available, syntax.name
    for syntax in (JPEGLosslessSV1, JPEGLossless, JPEG2000Lossless, JPEGBaseline8Bit):
        assert "gdcm" in get_decoder(syntax).available_plugins, syntax.name
    for syntax in (JPEGLSLossless, JPEGLSNearLossless):
        assert "pyjpegls" in get_decoder(syntax).available_plugins, syntax.name


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("syntax", list(LOSSLESS), ids=lambda uid: uid.name)
def test_a_lossless_cr_decodes_to_the_picture_of_its_uncompressed_twin(tmp_path: Path, radiograph: np.ndarray,
                                                                      syntax: UID, photometric: str) -> None:
    raw = _cr(tmp_path / "cr.dcm", radiograph, photometric)
    expected = decode_image(raw)
    assert np.corrcoef(expected.ravel(), radiograph.ravel())[0, 1] > 0.99  # bone bright, whichever photometric
    np.testing.assert_array_equal(decode_image(_compressed(LOSSLESS[syntax], raw, syntax)), expected)


# ---------------------------------------------------------------------------------------------- lossy


def _difference(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    diff = np.abs(a.astype(int) - b.astype(int))
    return int(diff.max()), float(diff.mean())


def test_near_lossless_jpeg_ls_is_off_by_at_most_one_grey_level(tmp_path: Path, radiograph: np.ndarray) -> None:
    """NEAR=2 in 12 bits moves each value by at most 2 of 4095, under one of 255 levels once stretched."""
    raw = _cr(tmp_path / "cr.dcm", radiograph, "MONOCHROME1")
    encode = _gdcm(T.JPEGLSNearLossless, _lossy(gdcm.JPEGLSCodec(), Lossless=False, LossyError=2))
    lossy = _compressed(encode, raw, JPEGLSNearLossless)
    worst, mean = _difference(decode_image(lossy), decode_image(raw))
    assert worst <= 1 and 0 < mean < 0.5  # changed (so truly lossy), and by no more than rounding


# (syntax, encoder, bits stored, most and mean grey levels off once decoded): GDCM's encoders are deterministic, and
# a misread stream (inverted, shifted, 12 bits taken as 8) is off by tens of levels on average, not by these.
LOSSY = [
    (JPEG2000, _gdcm(T.JPEG2000, _lossy(gdcm.JPEG2000Codec(), Reversible=False, Rate=(0, 5))), 12, 2, 0.3),
    (JPEGBaseline8Bit, _gdcm(T.JPEGBaselineProcess1, _lossy(gdcm.JPEGCodec(), Lossless=False, Quality=95)), 8, 14, 2.0),
    (JPEGExtended12Bit, _gdcm(T.JPEGExtendedProcess2_4, _lossy(gdcm.JPEGCodec(), Lossless=False, Quality=95)), 8, 14,
     2.0),
]


@pytest.mark.parametrize(("syntax", "encode", "bits", "worst", "mean"), LOSSY,
                         ids=["JPEG2000-12bit-5to1", "JPEGBaseline-8bit-q95", "JPEGExtended-8bit-q95"])
def test_a_lossy_image_decodes_close_to_its_uncompressed_twin(tmp_path: Path, radiograph: np.ndarray, syntax: UID,
                                                              encode: Encoder, bits: int, worst: int,
                                                              mean: float) -> None:
    if bits == 12:
        raw = _cr(tmp_path / "cr.dcm", radiograph)
    else:  # a secondary capture of a film, 8 bits
        raw = tmp_path / "sc.dcm"
        dicom_file(raw, radiograph)
    off = _difference(decode_image(_compressed(encode, raw, syntax)), decode_image(raw))
    assert off[0] <= worst and 0 < off[1] < mean, off


# ---------------------------------------------------------------------------------------------- refused


def _refused(path: Path, *words: str) -> None:
    with pytest.raises(ImageDecodeError) as err:
        decode_image(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    for word in words:
        assert word in message, message


def test_12_bit_jpeg_extended_is_refused_with_how_to_convert_it(tmp_path: Path, radiograph: np.ndarray) -> None:
    """pydicom's GDCM and Pillow plugins decode JPEG extended only at 8 bits."""
    raw = _cr(tmp_path / "cr.dcm", radiograph)
    lossy = _compressed(_gdcm(T.JPEGExtendedProcess2_4), raw, JPEGExtended12Bit)
    if "pylibjpeg" in get_decoder(JPEGExtended12Bit).available_plugins:
        assert _difference(decode_image(lossy), decode_image(raw))[1] < 2.0
    else:
        _refused(lossy, "JPEG Extended", "12 bits", "no installed decoder", "dcmdjpeg")


def test_htj2k_without_its_decoder_names_the_package(tmp_path: Path, radiograph: np.ndarray) -> None:
    """No declared plugin decodes High-Throughput JPEG 2000: refused before decoding, with what to install."""
    raw = _cr(tmp_path / "cr.dcm", radiograph)
    j2k = _compressed(LOSSLESS[JPEG2000Lossless], raw, JPEG2000Lossless)
    ds = pydicom.dcmread(j2k)
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless  # a Part 1 codestream, which HTJ2K decoders also read
    ds.save_as(j2k, enforce_file_format=True)
    if get_decoder(HTJ2KLossless).is_available:
        np.testing.assert_array_equal(decode_image(j2k), decode_image(raw))
    else:
        _refused(j2k, "High-Throughput JPEG 2000", "no decoder", "pylibjpeg-openjpeg", "uncompressed")


def _corrupt(src: Path, dst: Path, **header: int) -> Path:
    """``src`` with its first frame cut to half (no ``header``) or with header elements that contradict the stream."""
    ds = pydicom.dcmread(src)
    if header:
        for key, value in header.items():
            setattr(ds, key, value)
    else:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_a_truncated_compressed_stream_is_refused_on_one_line(tmp_path: Path, radiograph: np.ndarray) -> None:
    """Each plugin's reason on one line, for the CSV cell and the log; JPEG-LS is left to the predict test below
    (CharLS takes about 3 s to refuse a truncated stream)."""
    raw = _cr(tmp_path / "cr.dcm", radiograph)
    for syntax in (JPEGLosslessSV1, JPEG2000Lossless, RLELossless):
        cut = _corrupt(_compressed(LOSSLESS[syntax], raw, syntax), tmp_path / f"cut-{syntax}.dcm")
        _refused(cut, "cannot be decoded", "truncated", "re-export")


# ---------------------------------------------------------------------------------------------- predict


@pytest.mark.parametrize("radiograph", ["rendered"], indirect=True)  # one run: the picture matters little here
def test_predict_gives_every_compressed_file_its_row(tmp_path: Path, radiograph: np.ndarray) -> None:
    """``covid-cxr predict`` on a folder as a PACS exports it: each file its prediction, a broken one its reason.

    In a process of its own: GDCM aborts the process on a JPEG-LS stream whose size contradicts the header (an
    uncaught C++ exception), which the package avoids by decoding JPEG-LS with CharLS; were that undone, the run,
    not the test session, would die.
    """
    folder = tmp_path / "export"
    folder.mkdir()
    raw = _cr(folder / "raw.dcm", radiograph, "MONOCHROME1")
    good = [raw] + [_compressed(encode, raw, syntax) for syntax, encode in LOSSLESS.items()]
    jls = next(p for p in good if JPEGLSLossless in p.name)
    bad = _corrupt(jls, folder / "jls-wrong-size.dcm", Rows=2 * radiograph.shape[0])
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", "xception", size=SIZE)
    out = tmp_path / "rows.csv"
    done = subprocess.run([sys.executable, "-m", "covid_cxr", "predict", str(ckpt), str(folder), "--out", str(out),
                           "--batch-size", "4", "--device", "cpu", "--precision", "fp32", "--backend", "torch"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr  # 1: some input refused, the rest predicted
    table = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert sorted(table.index) == sorted(str(p) for p in [*good, bad])
    predicted = table.drop(index=str(bad))
    assert (predicted["error"] == "").all(), predicted["error"]
    assert set(predicted["class"]) <= {"covid", "pneumonia", "normal"}
    probabilities = predicted[[f"p_{c}" for c in CLASSES]].to_numpy(float)
    assert probabilities.shape == (len(good), 3)
    assert np.allclose(probabilities, probabilities[0], atol=1e-5)  # one picture, however it was stored
    assert "cannot be decoded" in table.loc[str(bad), "error"]
