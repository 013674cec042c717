"""``covid-cxr import-keras``: Keras files (the authors' models, Keras 3 files, no-top weights) -> our checkpoint."""

from __future__ import annotations

import argparse
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
    parser.add_argument("--out", type=Path, required=True, metavar="CKPT", help="checkpoint to write")
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
