"""Writing synthetic RSNA-style DICOM files with pydicom.

The challenge's files are 8-bit MONOCHROME2 secondary captures compressed as JPEG baseline;
we write the same (the JPEG stream from OpenCV, encapsulated by pydicom), and, so that readers
are tested on what other archives hold, 16-bit files with rescale and window, MONOCHROME1 files
(stored inverted) and files without the 128-byte preamble.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

STORAGES = ("jpeg", "16bit", "mono1", "nopreamble")


def write_dicom(
    path: Path,
    img: np.ndarray,
    *,
    storage: str = "jpeg",
    patient_id: str = "anonymous",
    view: str = "PA",
    sex: str = "M",
    age: int = 50,
    rng: np.random.Generator | None = None,
) -> None:
    """Write a grayscale uint8 image as a DICOM file whose decoded polarity equals ``img``'s."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}; got {storage!r}")
    rng = rng or np.random.default_rng(0)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[patient_id])
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientSex = sex
    ds.PatientAge = f"{int(age):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.SeriesDescription = f"view: {view}"
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.168, 0.168]
    if storage == "16bit":
        # 12 bits stored, Hounsfield-like rescale, and a window that spans the data.
        raw = img.astype(np.uint16) * 16 + rng.integers(0, 16, img.shape, dtype=np.uint16)
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.WindowCenter, ds.WindowWidth = 2048 - 1024, 4096
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = raw.tobytes()
    else:
        stored = 255 - img if storage == "mono1" else img
        ds.PhotometricInterpretation = "MONOCHROME1" if storage == "mono1" else "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(stored), [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise RuntimeError(f"OpenCV could not JPEG-encode the image for {path}")
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([buf.tobytes()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    if storage == "nopreamble":
        ds.save_as(path, enforce_file_format=False, implicit_vr=False, little_endian=True)
    else:
        ds.preamble = b"\0" * 128
        ds.save_as(path, enforce_file_format=True)
