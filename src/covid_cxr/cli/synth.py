"""``covid-cxr synth --out DIR``: synthetic covid-chestxray-dataset and RSNA folders in the real layouts."""

from __future__ import annotations

import argparse
from pathlib import Path

from covid_cxr.cli import seed
from covid_cxr.config import SHORTCUTS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        description="Write DIR/covid-chestxray-dataset (metadata.csv + images/) and DIR/rsna (the stage-2 CSVs + "
        "DICOMs) with synthetic radiographs whose classes a CNN can learn, including the layouts' quirks "
        "(excluded views and findings, multi-box patients, 16-bit and MONOCHROME1 DICOMs). Deterministic for a seed.",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write (created)")
    p.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    p.add_argument("--covid", type=int, default=300, metavar="N", help="COVID-19 images (default 300)")
    p.add_argument("--pneumonia", type=int, default=800, metavar="N",
                   help="pneumonia images, ~8%% in covid-chestxray, the rest RSNA (default 800)")
    p.add_argument("--normal", type=int, default=900, metavar="N", help="normal (RSNA) images (default 900)")
    p.add_argument("--size", type=int, default=1024, metavar="PX", help="RSNA DICOM size in pixels (default 1024, as RSNA)")
    p.add_argument("--hierarchical", action="store_true",
                   help="write findings in the newer spelling (Pneumonia/Viral/COVID-19)")
    p.add_argument("--shortcut", choices=SHORTCUTS,
                   help="add a source shortcut: 'marker' puts a bright corner marker on every covid-chestxray image")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="processes (default: all CPUs, at most 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from covid_cxr.synth import (
        make_synthetic,  # numpy, OpenCV, pydicom: only when writing
    )

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder")
    summary = make_synthetic(args.out, seed=args.seed, n_covid=args.covid, n_pneumonia=args.pneumonia,
                             n_normal=args.normal, size=args.size, hierarchical=args.hierarchical,
                             shortcut=args.shortcut, workers=args.workers or None)
    console = Console()
    console.print(f"wrote {summary.files} images in {summary.seconds:.1f} s under {summary.out}")
    for source, counts in summary.counts.items():
        kept = ", ".join(f"{n} {c}" for c, n in counts.items())
        console.print(f"  {source}: {kept}; {summary.excluded_rows[source]} rows a reader must leave out")
    console.print(f"next: covid-cxr prepare --covid-chestxray {summary.covid_chestxray} --rsna {summary.rsna} "
                  f"--out {summary.out / 'prepared'}")
    return 0
