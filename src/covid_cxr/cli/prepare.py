"""``covid-cxr prepare``: datasets -> manifest, patient folds with training phases, image cache."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from covid_cxr.cli import seed
from covid_cxr.config import PROTOCOLS
from covid_cxr.labels import CLASSES, DISPLAY_NAMES
from covid_cxr.networks import PAPER_IMAGE_SIZE

if TYPE_CHECKING:
    from rich.console import Console

    from covid_cxr.data.prepare import PrepareReport


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        description="Read the datasets in their public layouts, write DATA/manifest.csv, "
        "DATA/splits/fold*/phase*.csv, val.csv, test.csv and summary.json, and decode every image once into "
        "a memory-mapped cache. Nothing is written when any input is bad.",
    )
    p.add_argument("--covid-chestxray", type=Path, metavar="DIR",
                   help="covid-chestxray-dataset folder (metadata.csv + images/) or its metadata CSV")
    p.add_argument("--rsna", type=Path, metavar="DIR", help="RSNA Pneumonia Detection Challenge folder")
    p.add_argument("--folder", action="append", metavar="[NAME=]DIR",
                   help="your own images: one sub-folder per class, or a labels table (DIR/labels.csv, or the "
                   "table's own path: .csv, .tsv, .txt) with path,label[,patient_id,view,source]; NAME names the source in Table 1, the splits and the audits (e.g. nih=DIR, "
                   "hospital-b=DIR; default: the CSV's source column, else 'folder'); repeat for several folders")
    p.add_argument("--covidx", nargs="+", metavar="FILE", help="COVID-Net's COVIDx split files (train_COVIDx9A.txt "
                   "test_COVIDx9A.txt, or their folder); its test file stays the test split")
    p.add_argument("--covidx-images", type=Path, metavar="DIR", help="the COVIDx images (train/ and test/ folders)")
    p.add_argument("--out", type=Path, required=True, metavar="DATA", help="folder to write")
    p.add_argument("--protocol", choices=PROTOCOLS, default="strict",
                   help="'strict' (default): the paper's phases, validation from the training side, patient-disjoint "
                   "from test; 'paper': the same phases, the authors' s_test drawn from test (selects on test data); "
                   "'kfold': stratified group k-fold, all other training images in one phase (your own data)")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--phases", type=int, default=8, help="training phases per fold (default 8)")
    p.add_argument("--seed", type=seed, default=0, help="split seed (default 0)")
    p.add_argument("--splits-from", type=Path, metavar="DIR",
                   help="reproduce the authors' splits from their files (All.csv, foldK/trainP.csv)")
    p.add_argument("--labels-only", action="store_true",
                   help="manifest and splits from the metadata alone; no images read")
    p.add_argument("--image-size", type=int, default=PAPER_IMAGE_SIZE, metavar="PX",
                   help=f"cache image size (default {PAPER_IMAGE_SIZE}, as the paper)")
    p.add_argument("--skip-bad", action="store_true", help="leave out images that cannot be decoded (listed) instead of failing")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="decoding processes (default: all CPUs, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def print_report(report: PrepareReport, console: Console) -> None:
    """Table 1 (images per source and class), the notes, and per-fold sizes."""
    from rich.table import Table

    table = Table(title="Table 1: images per source and class")
    table.add_column("source")
    for c in CLASSES:
        table.add_column(DISPLAY_NAMES[c], justify="right")
    table.add_column("total", justify="right")
    for source, row in report.table1.iterrows():
        table.add_row(str(source), *(str(int(row[c])) for c in CLASSES), str(int(row["total"])))
    console.print(table)
    folds = Table(title="Folds (images: covid/pneumonia/normal)")
    for col in ("fold", "phase 1", "distinct training", "validation", "test"):
        folds.add_column(col, justify="right")
    fmt = lambda d: f"{d['images']} ({d['covid']}/{d['pneumonia']}/{d['normal']})"  # noqa: E731
    for f in report.fold_summary:
        folds.add_row(str(f["fold"]), fmt(f["phase1"]), fmt(f["train_distinct"]), fmt(f["val"]), fmt(f["test"]))
    console.print(folds)
    for note in report.notes:  # one line each, unwrapped, so that the paths in them can be copied
        console.print(note if note.startswith("warning: ") else f"note: {note}", markup=False, soft_wrap=True)
    for f in report.skipped:
        console.print(f"skipped: {f['path']}: {f['reason']}", markup=False, soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from covid_cxr.data.prepare import (  # pandas, OpenCV, pydicom: only now
        PrepareSettings,
        prepare_dataset,
    )
    from covid_cxr.data.splits import SplitSettings

    settings = PrepareSettings(
        out=args.out, covid_chestxray=args.covid_chestxray, rsna=args.rsna, folder=tuple(args.folder or ()),
        covidx=tuple(args.covidx) if args.covidx else None, covidx_images=args.covidx_images,
        split=SplitSettings(folds=args.folds, phases=args.phases, seed=args.seed, protocol=args.protocol),
        splits_from=args.splits_from,
        labels_only=args.labels_only, image_size=args.image_size, skip_bad=args.skip_bad, workers=args.workers,
    )
    report = prepare_dataset(settings, progress=not args.quiet)
    console = Console()
    print_report(report, console)
    if report.images_decoded and report.decode_seconds > 0:
        rate = report.images_decoded / report.decode_seconds
        console.print(f"decoded {report.images_decoded} images in {report.decode_seconds:.1f} s ({rate:.0f} images/s)")
    elif report.cache_reused:
        console.print("image cache reused: inputs and settings unchanged")
    console.print(f"wrote {report.out}")
    return 0
