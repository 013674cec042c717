"""How fast ``synth`` writes and ``prepare`` decodes the default synthetic set (~2000 images).

Run: ``python benchmarks/prepare_speed.py [--workers N] [--size 1024] [--image-size 300]``.
Prints one Markdown table row for ``benchmarks/RESULTS.md``: wall seconds and CPU seconds (all
processes) of synth, of prepare with a fresh cache (images/s), and of prepare again (cache reused),
with the load average, since the numbers depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import tempfile
import time
from pathlib import Path

from covid_cxr.cpus import usable_cpus
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.synth import make_synthetic


def cpu_seconds() -> float:
    """User + system seconds of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=0, help="processes (default: all CPUs, at most 8)")
    parser.add_argument("--size", type=int, default=1024, help="synthetic RSNA DICOM size (default 1024)")
    parser.add_argument("--image-size", type=int, default=300, help="cache image size (default 300)")
    args = parser.parse_args()
    workers = args.workers or min(8, usable_cpus())
    with tempfile.TemporaryDirectory(prefix="covid-cxr-bench-") as tmp:
        root = Path(tmp)
        synth, synth_wall, synth_cpu = timed(make_synthetic, root / "raw", seed=0, size=args.size, workers=workers)
        settings = PrepareSettings(out=root / "data", covid_chestxray=synth.covid_chestxray, rsna=synth.rsna,
                                   image_size=args.image_size, workers=workers)
        report, prep_wall, prep_cpu = timed(prepare_dataset, settings, progress=False)
        again, again_wall, _ = timed(prepare_dataset, settings, progress=False)
        n = report.images_decoded
        load = os.getloadavg()[0]
    print(f"| {dt.date.today()} | {usable_cpus()} CPUs, load {load:.1f} | {workers} | "
          f"{synth.files} files ({args.size} px DICOMs): {synth_wall:.1f} s wall, {synth_cpu:.1f} s CPU | "
          f"{n} images to {args.image_size} px: {prep_wall:.1f} s wall ({n / prep_wall:.0f} images/s), "
          f"{prep_cpu:.1f} s CPU ({n / prep_cpu:.0f} images per CPU-second) | "
          f"{again_wall:.1f} s (reused: {again.cache_reused}) |")


if __name__ == "__main__":
    main()
