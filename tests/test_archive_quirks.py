"""Two things other archives write that were read wrongly: a DICOM's Presentation LUT Shape, and Windows paths in lists.

Every file is real: DICOMs written with pydicom as CR/DX writers write them, PNGs with Pillow, CSVs and split files
as text a Windows tool saves, and ``prepare`` runs for real.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from covid_cxr.data.images import decode_image, load_image
from covid_cxr.synth.render import render_chest

SIZE = 71


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
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.ViewPosition = "DX", "quirk", "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = int(elements.pop("BitsStored", ds.BitsAllocated))
    ds.HighBit = ds.BitsStored - 1
    if shape is not None:
        ds.PresentationLUTShape = shape
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)
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
    path = _dx(tmp_path / "cr.dcm", stored, photometric, shape, BitsStored=12, WindowCenter=2048, WindowWidth=4096)
    img = decode_image(path)
    assert np.corrcoef(img.astype(float).ravel(), chest.astype(float).ravel())[0, 1] > 0.99
    assert np.abs(img.astype(int) - chest).mean() < 4


def test_the_lut_shape_reaches_what_the_model_is_fed(tmp_path: Path) -> None:
    """``load_image`` (predict, evaluate, serve) feeds the network the picture the header means, as from a PNG of it."""
    shown = np.kron(_pattern(), np.ones((2, 2), dtype=np.uint8))
    Image.fromarray(shown).save(tmp_path / "shown.png")
    path = _dx(tmp_path / "dx.dcm", 255 - shown, "MONOCHROME2", "INVERSE")
    assert np.array_equal(load_image(path, SIZE), load_image(tmp_path / "shown.png", SIZE))
