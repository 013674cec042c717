"""Decoding any chest X-ray file to one grayscale uint8 image.

The format is decided by the bytes, never by the file name: a DICOM file carries ``DICM`` at
offset 128 or, as older PACS exports write it, is a bare dataset without preamble and file meta
(read with ``force=True``; its transfer syntax is the encoding it was read in, implicit or explicit
VR little endian); everything else goes to Pillow. A multi-frame object (a DICOM cine, a multi-page
TIFF, an animated PNG or GIF) is refused with its frame count: a classifier of single radiographs
must not silently take one frame; a phone's MPO JPEG is its first picture.

DICOM pixels pass through the modality LUT (rescale slope/intercept) and the first VOI LUT or
window the header gives (what the modality meant to show), are stretched to 0-255 when deeper
than 8 bits, and are inverted where the header means the smallest value to show white, so that bone is
always bright: MONOCHROME1, or MONOCHROME2 with Presentation LUT Shape (2050,0020) INVERSE; MONOCHROME1
with INVERSE, the pair the DX IOD requires, is inverted once. A Presentation LUT Sequence (2050,0010) is
not applied: it belongs to presentation-state and print objects, not to CR/DX images (which define only
the shape), a table in an image file cannot say whether it already holds MONOCHROME1's inversion, and
dcmtk's renderer reads only the shape from an image file too. Colour (RGB, YBR, palette) becomes
luma. Compressed pixel data decodes through the plugins the package depends on: GDCM (python-gdcm)
for JPEG Lossless (process 14 and its SV1 form, what CR and DX write most), CharLS (pyjpegls) for
JPEG-LS, Pillow for JPEG baseline and extended at 8 bits and JPEG 2000 (GDCM where Pillow lacks a
codec), pydicom itself for RLE and deflated datasets; what none of them decodes (HTJ2K, 12-bit JPEG
extended) is refused before decoding, with what to install or how to convert the file. Pillow
images are turned upright by their EXIF orientation (phone photographs of films); 16-bit and float
data are stretched min-max, so that 12-bit data in 16 bits fills the range as full 16-bit data
does; CMYK, palette, 1-bit and alpha images become luma.

Sizes are checked from the header before any pixel is decoded, so a decompression bomb costs
nothing: pixels for every format, and for DICOM also the bytes they decode to (samples and bit depth).
Header values no decoder can follow, and rescale or window values that are not finite numbers, are
refused by name. :func:`decode_radiograph` also refuses images too small to be a radiograph, and
blank ones (every pixel the same value).
"""

from __future__ import annotations

import io
import logging
import math
import re
import stat
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.datadict import dictionary_description
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    get_decoder,
)
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGTransferSyntaxes,
    MediaStorageDirectoryStorage,
)

from covid_cxr.choices import RESIZE_METHODS
from covid_cxr.data.names import holds_windows_absolute
from covid_cxr.errors import ImageDecodeError

MAX_PIXELS = 50_000_000
"""Largest image (width x height x frames) we decode; real radiographs are under 20 megapixels."""

MAX_FILE_BYTES = 512 * 1024 * 1024
"""Largest file we read at all."""

MIN_SIDE = 32
"""Smallest side of an image taken as a radiograph; anything smaller is an icon or a thumbnail, not an X-ray."""

APPLEDOUBLE_MAGIC = b"\x00\x05\x16\x07"
"""How a macOS AppleDouble file (``._name``, resource data beside a file in archives made on macOS) starts."""

BYTES_PER_PIXEL = 2
"""DICOM pixel data may decode to at most this many bytes a pixel of the pixel limit (rows x columns x samples x
bytes a sample): a 16-bit grayscale radiograph as large as the limit allows fits, an 8-bit RGB one two thirds
that size (a 4280 x 4280 16-bit detector image takes 37 MB of the 100 MB, a 3000 x 3000 RGB scan 27 MB)."""

# Pillow's own guard would only warn below twice its limit; ours refuses first, from the header.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# The decoders warn of what they meet in a file (pydicom quotes header values) on stderr, naming no file, and so
# into a server's log; pydicom logs them too. warnings.catch_warnings cannot keep them out: it swaps the
# process-wide filter list, so threads decoding at once (predict, serve) undo each other's filters. Hence filters
# for these libraries' warnings only, made sure of by every decode (not set on import, as torchxrayvision does:
# a program that imports this module and decodes nothing keeps its warnings; and a caller's catch_warnings,
# pytest's for one, drops them): whatever they warn of, this
# module decodes the file or refuses it by name, and no log of ours holds DICOM header content. numpy's
# floating-point warnings are kept off with np.errstate, which is thread-safe.
_QUIET: tuple[tuple[type[Warning], str], ...] = (
    (Image.DecompressionBombWarning, ""),  # refused from the header, below
    (UserWarning, r"PIL\."),
    (Warning, r"pydicom\."),
)


def _quiet_decoders() -> None:
    """Install the filters of :data:`_QUIET` where missing, and keep pydicom's log to what stops a process."""
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    for category, module in _QUIET:
        if ("ignore", None, category, re.compile(module) if module else None, 0) not in warnings.filters:
            warnings.filterwarnings("ignore", category=category, module=module)


Source = str | Path | bytes

# Malformed files make pydicom and Pillow raise many kinds of errors; every one of them means
# "this file cannot be decoded" and becomes an ImageDecodeError naming the file. (pydicom raises
# NotImplementedError for a transfer syntax it has no decoder for, e.g. JPEG 2000 without a plugin.)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, KeyError, IndexError, TypeError,
                  NotImplementedError, RuntimeError, AttributeError, InvalidDicomError,
                  Image.DecompressionBombError)
# What else a corrupt DICOM makes pydicom raise: a value whose length is no multiple of its type's size
# (BytesLengthException), a length field pointing past the file (struct.error), an absurd number (ArithmeticError).
# pydicom converts header elements lazily, on first access, so these come from any header access, not only dcmread.
_DICOM_ERRORS = (*_DECODE_ERRORS, BytesLengthException, struct.error, ArithmeticError)
_REEXPORT = "copy the original file again, or re-export the image from the PACS"


def _not_found(path: Path) -> str:
    """Why ``path`` cannot be opened, when it does not exist; a Windows absolute path says what to list instead."""
    if path.is_symlink():
        return "a broken symbolic link"
    if holds_windows_absolute(path):
        return ("file not found: a Windows absolute path (C:\\..., \\\\server\\...) names no file on this system; "
                "the CSV that lists it holds Windows absolute paths: list the images by their paths relative to "
                "the CSV (images\\covid\\a.png or images/covid/a.png), with the images copied beside it")
    return "file not found"


def read_file(path: Path, label: str) -> bytes:
    """The bytes of an image file; :class:`ImageDecodeError` for a missing file, a folder, anything that is not a
    regular file (a pipe would block the read forever) or a file over :data:`MAX_FILE_BYTES`."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageDecodeError(label, _not_found(path)) from None
    except OSError as exc:
        raise ImageDecodeError(label, f"cannot read the file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError(label, "is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError(label, "is not a regular file (a pipe, socket or device), not an image file")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageDecodeError(label, f"file of {st.st_size} bytes is larger than the {MAX_FILE_BYTES}-byte limit")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(label, f"cannot read the file ({exc.strerror or exc})") from None


def _read(source: Source, name: str | None) -> tuple[bytes, str]:
    """The file's bytes and the name used in error messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "<uploaded bytes>"
    path = Path(source)
    label = name or str(path)
    return read_file(path, label), label


# Groups a bare (preamble-less, meta-less) dataset starts with: its first element is the lowest
# tag present, and every image object holds group 0028 (image pixel module).
_FIRST_GROUPS = frozenset({0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028})
_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB",
                  b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM",
                  b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"})


def is_dicom(data: bytes) -> bool:
    """True when the bytes are a DICOM file: ``DICM`` at 128, or a bare dataset without preamble and meta.

    A bare dataset starts with a little-endian tag of a usual first group, followed by an explicit
    VR or an implicit 4-byte length that fits the file; no image format Pillow reads starts so.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    if len(data) < 8:
        return False
    group, element = int.from_bytes(data[0:2], "little"), int.from_bytes(data[2:4], "little")
    if group not in _FIRST_GROUPS or element >= 0x1000:
        return False
    return data[4:6] in _VRS or int.from_bytes(data[4:8], "little") < len(data)


def _too_large(label: str, size: str, limit: int) -> ImageDecodeError:
    return ImageDecodeError(
        label, f"image of {size} pixels exceeds the limit of {limit} pixels (a radiograph has under 20 million); "
        "shrink it, e.g. to 4096 pixels on its longer side (a file that claims such a size may also be a "
        "decompression bomb)")


def _check_pixels(label: str, width: int, height: int, frames: int, limit: int) -> None:
    """Refuse, from the header, an empty image or one of more than ``limit`` pixels."""
    if width <= 0 or height <= 0:
        raise ImageDecodeError(label, f"image header gives an empty size {width}x{height}")
    total = int(width) * int(height) * max(int(frames), 1)
    if total > limit:
        raise _too_large(label, f"{width}x{height}" + (f"x{frames} frames" if frames > 1 else ""), limit)


def _check_bytes(label: str, width: int, height: int, samples: int, allocated: int, limit: int) -> None:
    """Refuse, from the header, DICOM pixel data decoding to more than :data:`BYTES_PER_PIXEL` bytes a pixel of
    ``limit``: 3 samples of 32 bits make a 9 MB file under the pixel limit cost a gigabyte to decode."""
    per_sample = -(-allocated // 8)
    total, budget = width * height * samples * per_sample, BYTES_PER_PIXEL * limit
    if total > budget:
        raise ImageDecodeError(
            label, f"DICOM pixel data of {width}x{height} pixels x {samples} samples x {per_sample} bytes "
            f"({total} bytes decoded) exceeds the limit of {budget} bytes ({BYTES_PER_PIXEL} bytes a pixel of the "
            f"{limit}-pixel limit, what a 16-bit grayscale radiograph takes); save it as 8 or 16-bit grayscale, or "
            "shrink it (a file that claims such a size may also be a decompression bomb)")


def to_uint8(values: np.ndarray, *, stretch: bool) -> np.ndarray:
    """Map an array of finite numbers to uint8: as is when it already is 8-bit data, else stretched min-max to
    0-255 (a constant array to zeros)."""
    if not stretch and values.dtype == np.uint8:
        return values
    lo, hi = float(values.min()), float(values.max())
    if not math.isfinite(hi - lo):
        raise ValueError(f"pixel values from {lo} to {hi} are not all finite numbers")
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    # float32 halves the memory of the stretch; values beyond its range (a rescale by 1e300) stay float64.
    wide = max(-lo, hi) > float(np.finfo(np.float32).max)
    v = values.astype(np.float64 if wide else np.float32, copy=False)
    return np.clip((v - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def _to_gray(arr: np.ndarray, label: str) -> np.ndarray:
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if rgb.dtype != np.uint8:
            rgb = to_uint8(rgb, stretch=True)
        return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        return arr[..., 0]
    raise ImageDecodeError(label, f"unsupported pixel layout of shape {arr.shape}")


def _set_transfer_syntax(ds: pydicom.Dataset, label: str) -> None:
    """A dataset read without file meta: record the encoding it was read in, so its pixels can be decoded."""
    if "TransferSyntaxUID" in ds.file_meta:
        return
    if ds["PixelData"].is_undefined_length:
        raise ImageDecodeError(label, "DICOM without file meta holds compressed pixel data whose transfer syntax it "
                               "does not record; re-export it with its file meta (as a DICOM Part 10 file)")
    implicit, little = ds.original_encoding
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


# pydicom tries a syntax's plugins in its own order, GDCM first. On a JPEG-LS stream whose size differs from the
# header's Rows x Columns, GDCM (python-gdcm 3.2.6) throws a C++ exception nothing catches and the whole process
# aborts, taking every other file of a run with it; CharLS (pyjpegls) and Pillow raise Python errors instead. So
# GDCM decodes only what no other declared plugin can (JPEG Lossless, where it is pydicom's choice): JPEG-LS goes
# to CharLS alone, JPEG and JPEG 2000 to Pillow, and to GDCM only where Pillow lacks the codec. Each syntax's
# plugins by preference; the first installed one decodes, alone (a stream it fails on is refused, not retried).
_PLUGINS: dict[str, tuple[str, ...]] = {
    JPEGLSLossless: ("pyjpegls",), JPEGLSNearLossless: ("pyjpegls",),
    JPEGBaseline8Bit: ("pillow", "gdcm"), JPEGExtended12Bit: ("pillow", "gdcm"),
    JPEG2000Lossless: ("pillow", "gdcm"), JPEG2000: ("pillow", "gdcm"),
}  # fmt: skip
_SET_UP = "python-gdcm and pyjpegls, which covid-cxr's set-up installs"


def _check_decoder(ds: pydicom.Dataset, label: str) -> str:
    """The plugin to decode with ("" for pydicom's choice); refuses, before decoding, pixel data compressed in a
    way no installed plugin decodes, naming what to install or how to convert the file."""
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageDecodeError(label, f"DICOM transfer syntax {syntax} ({syntax.name}) is one pydicom cannot decode; "
                               "convert the file to uncompressed DICOM (e.g. gdcmconv --raw, or dcmdjpeg)") from None
    if syntax == JPEGExtended12Bit and _bits_stored(ds) != 8:
        if "pylibjpeg" in decoder.available_plugins:
            return "pylibjpeg"
        # pydicom's GDCM and Pillow plugins refuse this precision; only pylibjpeg-libjpeg (GPLv3) decodes it.
        raise ImageDecodeError(label, f"DICOM pixel data is compressed as {syntax.name} at {_bits_stored(ds)} bits, "
                               "which no installed decoder reads (GDCM and Pillow decode it at 8 bits only); convert "
                               "the file to uncompressed DICOM with DCMTK (dcmdjpeg in.dcm out.dcm)")
    wanted = _PLUGINS.get(syntax, ())
    usable = [plugin for plugin in wanted if plugin in decoder.available_plugins]
    if wanted and not usable:
        raise ImageDecodeError(label, f"DICOM pixel data is compressed as {syntax.name} and its decoder "
                               f"({' or '.join(wanted)}) is not installed; install it with pip "
                               f"({' or '.join('python-gdcm' if p == 'gdcm' else p for p in wanted)}), as covid-cxr's "
                               "set-up does")
    if not decoder.is_available:
        raise _no_decoder(syntax, decoder.missing_dependencies, label)
    plugin = usable[0] if usable else ""
    if syntax in JPEGTransferSyntaxes and (plugin == "gdcm" or not plugin and "gdcm" in decoder.available_plugins):
        _check_gdcm_jpeg(ds, syntax, label)
    return plugin


def _check_gdcm_jpeg(ds: pydicom.Dataset, syntax: UID, label: str) -> None:
    """Refuse, before decoding, a JPEG (ISO 10918: baseline, extended, lossless) header on which GDCM would abort.

    GDCM's JPEG codec (python-gdcm 3.2.6) has an 8-bit codec that needs Bits Stored 8, and 12 and 16-bit ones;
    given Bits Allocated 32 or 64, or fewer than 8 bits stored in 8, it throws a C++ exception nothing catches
    and the process aborts (SIGABRT), taking every other file of a run with it, whatever the stream holds. What
    modalities write, 8 bits in 8 and 1 to 16 bits in 16, decodes.
    """
    allocated = _header_int(ds, "BitsAllocated", 8)
    stored = _header_int(ds, "BitsStored", allocated)
    if allocated == 16 or (allocated == 8 and stored == 8):
        return
    held = f"Bits Allocated {allocated}" + (f" and Bits Stored {stored}" if allocated == 8 else "")
    raise ImageDecodeError(label, f"DICOM pixel data compressed as {syntax.name} ({syntax}) with {held}: its "
                           "decoder (GDCM) gives 8 bits stored in 8 allocated, or up to 16 in 16; re-export the "
                           "image from the PACS, or convert it to uncompressed DICOM with DCMTK (dcmdjpeg in.dcm "
                           "out.dcm)")


def _bits_stored(ds: pydicom.Dataset) -> int:
    """Bits Stored (0028,0101), 8 where the header leaves it out."""
    return int(ds.get("BitsStored", 8) or 8)


def _header_int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    """An integer header element, ``default`` where absent or empty (a value that is no integer raises)."""
    value = ds.get(keyword)
    return default if value is None or value == "" else int(value)


# What pydicom's decoders accept (PS3.3 C.7.6.3: the defined terms; HSV, ARGB and CMYK retired).
_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                          "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "HSV", "ARGB", "CMYK"})


def _pixel_layout(ds: pydicom.Dataset, label: str) -> tuple[int, int]:
    """Samples per pixel and Bits Allocated, from the header; a value no decoder follows is refused as a header
    fault (not as a truncated file), before anything is decoded. Absent elements are left to pydicom to name."""
    try:
        samples = _header_int(ds, "SamplesPerPixel", 1)
        allocated = _header_int(ds, "BitsAllocated", 8)
        stored = _header_int(ds, "BitsStored", allocated)
        signed = _header_int(ds, "PixelRepresentation", 0)
    except (TypeError, ValueError):
        raise ImageDecodeError(label, "DICOM Samples per Pixel, Bits Allocated, Bits Stored or Pixel Representation "
                               f"is not a number; {_REEXPORT}") from None
    photometric = ds.get("PhotometricInterpretation")
    checks = (
        (allocated == 1 or allocated in range(8, 65, 8), f"Bits Allocated {allocated}",
         "1, or a multiple of 8 up to 64"),
        (1 <= stored <= allocated, f"Bits Stored {stored}", f"from 1 to Bits Allocated, {allocated}"),
        (samples in (1, 3), f"Samples per Pixel {samples}", "1, grayscale, or 3, colour"),
        (signed in (0, 1), f"Pixel Representation {signed}", "0, unsigned, or 1, signed"),
        (photometric is None or str(photometric) in _PHOTOMETRIC, f"Photometric Interpretation {photometric!r}",
         "one of DICOM's terms, in capitals: MONOCHROME2, MONOCHROME1, RGB, YBR_FULL, PALETTE COLOR, ..."),
    )
    for valid, given, wanted in checks:
        if not valid:  # the writer's fault or a damaged header, not a truncated file
            raise ImageDecodeError(label, f"invalid DICOM header value: {given} (must be {wanted}); {_REEXPORT}")
    return samples, allocated


def _no_decoder(syntax: UID, missing: list[str], label: str) -> ImageDecodeError:
    """A transfer syntax whose decoders are all missing: what pydicom says each of them needs."""
    needs = "; ".join(missing)
    if any(need.startswith("gdcm ") for need in missing):
        needs += "; gdcm's package is python-gdcm"
    return ImageDecodeError(label, f"DICOM pixel data is compressed as {syntax.name} ({syntax}) and no decoder for "
                            f"it is installed ({_SET_UP}, decode JPEG, JPEG Lossless, JPEG-LS and JPEG 2000); "
                            f"install one with pip ({needs}), or convert the file to uncompressed DICOM")


def _shown_inverted(ds: pydicom.Dataset, photometric: str) -> bool:
    """Whether a grayscale DICOM means its smallest value to show white (so it is inverted to put bone bright).

    MONOCHROME1 says so itself. Presentation LUT Shape (2050,0020) INVERSE says so of MONOCHROME2 pixels, as some
    CR and DX writers store them; beside MONOCHROME1 it is the companion the DX IOD requires, the same inversion
    named twice, not a second one. IDENTITY beside MONOCHROME1 contradicts the DX IOD: the photometric
    interpretation, required of every image, wins, as archives that distrust a writer's shape do.
    """
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def _header_number(ds: pydicom.Dataset, keyword: str, default: float, label: str) -> float:
    """The (first) value of a numeric header element, ``default`` where absent or empty; refused, naming the
    element, where it is not a finite number (NaN or infinity would turn every pixel into NaN)."""
    value = ds.get(keyword)
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return default
    number = float(value)
    if not math.isfinite(number):
        raise ImageDecodeError(label, f"{dictionary_description(keyword)} is not a finite number ({value}); "
                               "re-export the image from the PACS")
    return number


def _finite(values: np.ndarray, applied: str, label: str) -> np.ndarray:
    """``values``, refused where the header elements ``applied`` to the pixels took them past finite numbers."""
    if values.dtype.kind == "f" and not math.isfinite(float(values.max()) - float(values.min())):
        raise ImageDecodeError(label, f"{applied} overflow: the pixel values they give are not all finite numbers; "
                               "re-export the image from the PACS")
    return values


def _dicom_gray(ds: pydicom.Dataset, arr: np.ndarray, photometric: str, label: str) -> np.ndarray:
    """Decoded DICOM pixels as a grayscale uint8 image with bone bright, as the header says to show them."""
    if photometric.startswith("MONOCHROME"):
        slope = _header_number(ds, "RescaleSlope", 1.0, label)
        intercept = _header_number(ds, "RescaleIntercept", 0.0, label)
        if slope == 0:
            raise ImageDecodeError(label, "Rescale Slope is 0, which makes every pixel one value; re-export the "
                                   "image from the PACS")
        has_modality = "ModalityLUTSequence" in ds or slope != 1 or intercept != 0
        has_voi = "WindowCenter" in ds or "VOILUTSequence" in ds
        if "WindowCenter" in ds and "VOILUTSequence" not in ds:  # the window pydicom applies (its first values)
            _header_number(ds, "WindowCenter", 0.0, label)
            _header_number(ds, "WindowWidth", 1.0, label)
        deep = int(ds.get("BitsStored", 8) or 8) > 8 or arr.dtype != np.uint8
        with np.errstate(all="ignore"):  # values gone past finite numbers are refused by name, not warned of
            values = apply_modality_lut(arr, ds) if has_modality else arr
            _finite(values, f"Rescale Slope {slope:g} and Rescale Intercept {intercept:g}", label)
            if has_voi:
                values = _finite(apply_voi_lut(values, ds, index=0), "the window or VOI LUT", label)
        img = to_uint8(values, stretch=has_modality or has_voi or deep)
        return 255 - img if _shown_inverted(ds, photometric) else img
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype == np.uint16:  # 16-bit palette entries span 0-65535
            arr = (arr >> 8).astype(np.uint8)
    # pydicom converts YBR to RGB on decode.
    img = _to_gray(arr, label)
    return to_uint8(img, stretch=img.dtype != np.uint8)


def _decode_dicom(data: bytes, label: str, limit: int) -> tuple[np.ndarray, dict[str, str]]:
    """The image and header facts of a DICOM file; any failure to read its header or pixels is an
    :class:`ImageDecodeError` naming the file, whichever element of a corrupt header pydicom trips on."""
    try:
        return _dicom_image(data, label, limit)
    except ImageDecodeError:
        raise
    except _DICOM_ERRORS as exc:
        raise ImageDecodeError(label, f"corrupt DICOM header: an element cannot be read ({_why(exc)}); "
                               f"{_REEXPORT}") from None


def _why(exc: Exception) -> str:
    """What pydicom said, without its advice to programmers (a ``pydicom.config`` switch that hides the damage)."""
    return f"{type(exc).__name__}: {str(exc).split(' To replace this error with a warning')[0]}"


def _plugin_reason(exc: Exception) -> str:
    """pydicom's reason on one line (it lists each plugin's on a line of its own), without an object's repr
    (``<_io.BytesIO object at 0x...>``) and with what GDCM's empty answer means."""
    reason = re.sub(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>", "", " ".join(str(exc).split()))
    return reason.replace("'NoneType' object has no attribute 'encode'", "no picture decoded from the stream")


def _read_dataset(data: bytes, label: str) -> pydicom.Dataset:
    """The dataset of a DICOM file that holds pixel data; a DICOMDIR, or a file without pixels, refused."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except _DICOM_ERRORS as exc:
        raise ImageDecodeError(label, f"unreadable DICOM header ({_why(exc)}); {_REEXPORT}") from None
    if ds.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        raise ImageDecodeError(label, "a DICOMDIR, the index of a DICOM media set, not an image; give the image "
                               "files it lists (they lie in the folders beside it)")
    if "PixelData" in ds:
        return ds
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise ImageDecodeError(label, "DICOM Float Pixel Data (a parametric map's values) is not supported: a "
                               "radiograph stores integer Pixel Data; export the image as an ordinary DICOM image")
    raise ImageDecodeError(label, "DICOM file holds no pixel data: the file is truncated or is not an image object")


def _check_dicom_size(ds: pydicom.Dataset, label: str, limit: int) -> None:
    """Refuse, from the header, a multi-frame image, or one over ``limit`` pixels or its byte budget."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise ImageDecodeError(label, f"DICOM Rows {ds.get('Rows')!r}, Columns {ds.get('Columns')!r} or "
                               f"NumberOfFrames {ds.get('NumberOfFrames')!r} is not a number") from None
    if frames > 1:
        raise ImageDecodeError(label, f"multi-frame DICOM ({frames} frames): the classifier takes one radiograph; "
                               "export the frame to classify as its own file")
    _check_pixels(label, cols, rows, frames, limit)
    _check_bytes(label, cols, rows, *_pixel_layout(ds, label), limit)


def _dicom_image(data: bytes, label: str, limit: int) -> tuple[np.ndarray, dict[str, str]]:
    """:func:`_decode_dicom`'s steps, each failure it foresees with its own reason."""
    ds = _read_dataset(data, label)
    _check_dicom_size(ds, label, limit)
    _set_transfer_syntax(ds, label)
    plugin = _check_decoder(ds, label)
    try:
        if plugin:
            ds.pixel_array_options(decoding_plugin=plugin)
        arr = ds.pixel_array
    except _DICOM_ERRORS as exc:
        raise ImageDecodeError(label, f"DICOM pixel data cannot be decoded ({_plugin_reason(exc)}): the file may be "
                               f"truncated, or its header may not describe its pixels; {_REEXPORT}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    info = {"view": str(ds.get("ViewPosition", "") or ""), "photometric": photometric}
    try:
        img = _dicom_gray(ds, arr, photometric, label)
    except ImageDecodeError:
        raise
    except _DICOM_ERRORS as exc:
        raise ImageDecodeError(label, f"DICOM header values (rescale, window, LUT) do not fit its pixels ({exc}); "
                               "re-export the image from the PACS") from None
    return np.ascontiguousarray(img), info


def _pillow_gray(im: Image.Image, label: str) -> np.ndarray:
    """A loaded Pillow image as grayscale uint8: deep data (16-bit, float) stretched min-max, colour to luma."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im)
        if mode == "F" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ImageDecodeError(label, f"floating-point image with {bad} of its {arr.size} pixels not a finite "
                                   "number (NaN or infinity); save it with every pixel a number, e.g. as a 16-bit PNG")
        if mode == "I" and arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0:
            return arr.astype(np.uint8)
        return to_uint8(arr, stretch=True)
    if mode == "CMYK":  # a print-ready JPEG: Pillow takes Adobe's inverted CMYK to RGB, then luma
        im = im.convert("RGB")
    if im.mode in ("RGB", "RGBA"):
        return _to_gray(np.asarray(im), label)
    return np.asarray(im.convert("L"))


def _decode_pillow(data: bytes, label: str, limit: int) -> np.ndarray:
    if data.startswith(APPLEDOUBLE_MAGIC):
        raise ImageDecodeError(label, "a macOS AppleDouble file (the resource data macOS keeps beside a file as "
                               "._name), not an image; leave it out, the image is the file without ._")
    try:
        im = Image.open(io.BytesIO(data))
        with im:
            _check_pixels(label, im.width, im.height, 1, limit)
            frames = getattr(im, "n_frames", 1)
            if frames > 1 and im.format != "MPO":  # MPO: a phone's JPEG, its first image the photograph
                raise ImageDecodeError(label, f"{im.format} image of {frames} pages or frames: the classifier takes "
                                       "one radiograph; save the page to classify as its own file")
            im.load()
            return _pillow_gray(ImageOps.exif_transpose(im), label)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError:
        raise _too_large(label, f"more than {2 * MAX_PIXELS}", limit) from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(label, _unidentified(data)) from None
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(label, f"image cannot be decoded, the file may be truncated or corrupt ({exc})"
                               ) from None


# JPEG's frame headers (SOF0-SOF15, less DHT, JPG and DAC, which share the range): each gives the sample precision.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_precision(data: bytes) -> int | None:
    """The sample precision (bits) of a JPEG's first frame header; None where the markers before it do not parse."""
    pos = 2  # past the start-of-image marker
    while pos + 5 <= len(data) and data[pos] == 0xFF:
        if data[pos + 1] in _JPEG_SOF:
            return data[pos + 4]
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _unidentified(data: bytes) -> str:
    """Why Pillow found no image in ``data``, told apart where the signature says what the file is."""
    if data.startswith(b"\xff\xd8\xff") and (_jpeg_precision(data) or 8) != 8:
        return (f"a {_jpeg_precision(data)}-bit JPEG, which is not supported (only 8-bit JPEG is); convert it to a "
                "16-bit PNG")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ("a PNG file whose header (its IHDR chunk) is damaged or describes no image Pillow reads; copy the "
                "original file again, or save the image again as PNG")
    return "not an image: neither DICOM nor a format Pillow reads (PNG, JPEG, ...)"


def decode_image_info(source: Source, *, name: str | None = None, max_pixels: int = MAX_PIXELS
                      ) -> tuple[np.ndarray, dict[str, str]]:
    """Like :func:`decode_image`, also returning header facts (``view``, ``format``) when known.

    ``max_pixels``: refuse, from the header, images larger than this (never above :data:`MAX_PIXELS`).
    """
    data, label = _read(source, name)
    limit = min(int(max_pixels), MAX_PIXELS)
    _quiet_decoders()
    if not data:
        raise ImageDecodeError(label, "file is empty")
    if is_dicom(data):
        img, info = _decode_dicom(data, label, limit)
        info["format"] = "DICOM"
    else:
        img, info = _decode_pillow(data, label, limit), {"format": "image"}
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ImageDecodeError(label, f"decoded to an unexpected array {img.dtype} {img.shape}")
    return img, info


def decode_radiograph(source: Source, *, name: str | None = None, max_pixels: int = MAX_PIXELS
                      ) -> tuple[np.ndarray, dict[str, str]]:
    """:func:`decode_image_info` for what a classifier is fed: an image under :data:`MIN_SIDE` pixels a side (an
    icon, a thumbnail) is refused rather than blown up to a meaningless picture, and so is a blank one, whatever
    its format, rather than given a class. (A mask, read by :func:`decode_image`, may be blank.)"""
    data, label = _read(source, name)
    img, info = decode_image_info(data, name=label, max_pixels=max_pixels)
    if min(img.shape) < MIN_SIDE:
        raise ImageDecodeError(label, f"image of {img.shape[1]}x{img.shape[0]} pixels is too small to be a "
                               f"radiograph (at least {MIN_SIDE} pixels a side); give the full-size image, not an "
                               "icon or thumbnail")
    if img.min() == img.max():  # an empty export, or a header (rescale, window) that left no picture
        raise ImageDecodeError(label, f"blank image: every pixel is {int(img.flat[0])}, so there is no picture to "
                               "classify; give the radiograph itself, or re-export it")
    return img, info


def decode_image(source: Source, *, name: str | None = None) -> np.ndarray:
    """Decode a PNG/JPEG/DICOM file (path or bytes) to a grayscale uint8 array (H, W).

    ``name`` is what error messages call the input (useful for uploaded bytes). Raises
    :class:`ImageDecodeError` for a missing, corrupt, truncated, non-image or oversized input.
    """
    return decode_image_info(source, name=name)[0]


def resize_gray(img: np.ndarray, size: int, method: str = "area") -> np.ndarray:
    """Resize to (size, size) without keeping the aspect ratio, as the paper, by ``method`` (:data:`RESIZE_METHODS`).

    Shrinking a 1000-3000 px radiograph to 300 px is where the methods differ: a model sees
    best what it was trained or evaluated on, so the method travels with the checkpoint.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {', '.join(RESIZE_METHODS)}; got {method!r}")
    if img.ndim != 2:
        raise ValueError(f"expected a grayscale (H, W) image, got shape {img.shape}")
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.shape == (size, size):
        return img
    if method == "nearest":
        return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.NEAREST))
    shrinking = img.shape[0] * img.shape[1] > size * size
    interp = cv2.INTER_AREA if method == "area" and shrinking else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def load_image(source: Source, image_size: int, *, name: str | None = None, resize: str = "area") -> np.ndarray:
    """Decode a radiograph (:func:`decode_radiograph`) and resize by ``resize``: what inference feeds the networks."""
    return resize_gray(decode_radiograph(source, name=name)[0], image_size, resize)
