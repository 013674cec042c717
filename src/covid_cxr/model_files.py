"""What a model file is, by its first bytes: the words a user gets for a file that is not what a command takes.

Below every package that reads model files (``models`` for Keras files, ``runs`` for checkpoints, ``inference``
for ONNX), so that each says the same of the same file.
"""

from __future__ import annotations

from pathlib import Path

FORMAT = "covid-cxr-checkpoint"  # the "format" key of a covid-cxr checkpoint's dict

ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"  # Keras .h5/.hdf5 files (the authors' models)
PICKLE_MAGIC = b"\x80"  # a pickle: torch.save's legacy format, or a pickled model
ONNX_MAGIC = b"\x08"  # an ONNX ModelProto starts with its ir_version (field 1, a varint)


def file_kind(path: Path) -> str:
    """What a model file is by its first bytes (raises OSError when it cannot be read), for the words a user gets:

    ``zip`` (``torch.save``: a checkpoint), ``empty``, ``hdf5`` (Keras), ``pickle`` (``torch.save``'s legacy
    format, or a pickled model), ``onnx`` (a protobuf's first field, or the suffix) or ``other``. One decision
    for the words after a failed ``torch.load`` (``runs.checkpoint.unreadable``), before a backend is chosen
    (``inference.backends.model_file_kind``) and for a file given to ``import-keras``.
    """
    with open(path, "rb") as fh:
        head = fh.read(len(HDF5_MAGIC))
    if not head:
        return "empty"
    for kind, magic in (("zip", ZIP_MAGIC), ("hdf5", HDF5_MAGIC), ("pickle", PICKLE_MAGIC)):
        if head.startswith(magic):
            return kind
    return "onnx" if head.startswith(ONNX_MAGIC) or path.suffix.lower() == ".onnx" else "other"


def not_a_model(path: Path, kind: str | None) -> str | None:
    """What to tell a user who gave a command that takes a covid-cxr model an empty file or a Keras one; None for
    other kinds, which each caller words for what it takes."""
    if kind == "empty":
        return f"{path}: empty file (0 bytes), likely an interrupted copy or download; copy the model file again"
    if kind == "hdf5":
        return (f"{path}: a Keras HDF5 model, not a covid-cxr checkpoint; convert it first with 'covid-cxr "
                f"import-keras {path} --out model.pt', then give model.pt")
    return None
