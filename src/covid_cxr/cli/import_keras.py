"""``covid-cxr import-keras``: Keras files (the authors' models, Keras 3 files, no-top weights) -> our checkpoint."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from covid_cxr.choices import RESIZE_METHODS
from covid_cxr.config import SCALINGS
from covid_cxr.networks import NETWORK_NAMES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``import-keras`` verb."""
    parser = subparsers.add_parser(
        "import-keras",
        help="convert a Keras model or weights file to a covid-cxr checkpoint",
        description=(
            "Convert a whole Keras model (legacy .h5/.hdf5 as the authors published theirs, Keras 3 .keras or "
            ".weights.h5) to a covid-cxr checkpoint. Keras no-top backbone weights (the ImageNet files) are "
            "accepted too: the head is then freshly initialised; 'concat' needs both backbone files."
        ),
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="Keras file(s)")
    parser.add_argument(
        "--network", choices=NETWORK_NAMES, help="network of the file (default: inferred from its layers)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="CKPT",
        help="checkpoint to write (a file there must be a covid-cxr checkpoint, which is replaced)",
    )  # fmt: skip
    parser.add_argument(
        "--classes",
        nargs=3,
        metavar="CLASS",
        help="class of each output unit, in order (default for whole models: the authors' covid normal pneumonia)",
    )
    parser.add_argument("--image-size", type=int, help="input size (default: the model's own, else 300)")
    parser.add_argument(
        "--scaling",
        choices=list(SCALINGS),
        default="unit",
        help="input scaling the model was trained with: unit = x/255 (the authors'), symmetric = [-1, 1] (ImageNet)",
    )
    parser.add_argument(
        "--resize",
        choices=list(RESIZE_METHODS),
        help="how inputs are shrunk to the model's size (default: bilinear for a whole model, as the authors' "
        "evaluation resized with cv2.resize; area, anti-aliased, for backbone weights)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert the files and write the checkpoint."""
    from covid_cxr.runs.checkpoint import (
        save_checkpoint,  # the library is loaded by the verb, not by --help
    )
    from covid_cxr.runs.keras_import import import_keras

    check_out(args.out, args.files)  # before the conversion, which takes a while and reads every weight
    ckpt = import_keras(
        args.files if len(args.files) > 1 else args.files[0],
        args.network,
        classes=args.classes,
        image_size=args.image_size,
        scaling=args.scaling,
        resize=args.resize,
    )
    path = save_checkpoint(ckpt, args.out)
    print(
        f"wrote {path}: network {ckpt.network}, classes {', '.join(ckpt.classes)}, "
        f"input {ckpt.preprocessing.image_size}px scaling {ckpt.preprocessing.scaling}, "
        f"resize {ckpt.preprocessing.resize}, "
        f"head {ckpt.meta['source']['head']}"
    )
    print(f"architecture {ckpt.meta['source']['architecture']}")
    return 0


# What an existing --out is, when it is no covid-cxr checkpoint (model_files.file_kind, keras_reader.zip_kind).
OUT_KINDS = {
    "hdf5": "an HDF5 file, such as a Keras model",
    "keras": "a Keras .keras model",
    "torch": "a PyTorch file of something else",
    "zip": "a zip archive",
    "damaged": "a damaged zip file",
    "pickle": "a Python pickle",
    "onnx": "an ONNX model",
    "other": "a file of another kind",
}


def check_out(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an ``--out`` that the checkpoint would destroy or could not be written to: one of the input files
    (under any name), an existing file other than a covid-cxr checkpoint (an earlier import's is replaced), a
    folder, a place that cannot be written."""
    from covid_cxr.data.names import display_path
    from covid_cxr.errors import ConfigError
    from covid_cxr.inference.sink import check_writable_folder, kind_of
    from covid_cxr.models.keras_reader import zip_kind
    from covid_cxr.model_files import file_kind

    shown = display_path(out)
    if out.is_dir():
        raise ConfigError(f"--out {shown}: a folder; name the checkpoint file in it, e.g. "
                          f"--out {display_path(out / 'model.pt')}")  # fmt: skip
    if os.path.lexists(out) and not out.is_file():
        raise ConfigError(f"--out {shown}: {kind_of(out)}, not a file; give a checkpoint file name (.pt)")
    if out.exists():
        for source in inputs:
            if source.exists() and os.path.samefile(out, source):
                named = "itself" if source == out else f"{display_path(source)} (under another name)"
                beside = source.with_suffix(".pt")
                example = f", e.g. --out {display_path(beside)}" if not os.path.lexists(beside) else ""
                raise ConfigError(
                    f"--out {shown} is the input file {named}, which the checkpoint would overwrite; give another "
                    f"name{example}"
                )
        kind = file_kind(out)
        kind = zip_kind(out) if kind == "zip" else kind
        if kind not in ("checkpoint", "empty"):  # an earlier import's checkpoint, or an empty file, loses nothing
            raise ConfigError(
                f"--out {shown} exists and is not a covid-cxr checkpoint ({OUT_KINDS[kind]}), which the checkpoint "
                "would overwrite; give another name, or remove the file first"
            )
    check_writable_folder(out.parent, f"--out {shown}")
