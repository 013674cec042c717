"""The CPU's instruction ceilings (fp32, bf16, int8 multiply-adds per second), measured, not looked up.

"% of the bf16 ceiling" needs a ceiling. Data-sheet arithmetic (cores x clock x vector width x units)
depends on facts a VM hides (the real clock, whether 512-bit instructions are split in two, how many
units take them), so we measure it: ``peak.c`` runs independent chains of the widest multiply-add of
each format (``vfmadd`` fp32, ``vdpbf16ps`` bf16, ``vpdpbusd`` int8) on every physical core, which is
limited only by how many such instructions the cores retire per cycle. The best of ``--repeats`` runs
is the ceiling (other work on the machine can only lower a run). Needs gcc; without it the caller gets
an empty result and says so.

    python -m benchmarks.peak
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("peak.c")


def measure_ceilings(repeats: int = 3, threads: int | None = None) -> dict[str, Any]:
    """``{"gflops": {"fp32": ..., "bf16": ..., "int8": ...}, "threads": n, "runs": [...]}``, or ``{"error": why}``."""
    from covid_cxr.cpus import physical_cores

    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return {"error": "no C compiler (gcc) to build benchmarks/peak.c"}
    threads = threads or physical_cores()
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "peak"
        built = subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", str(SOURCE), "-o", str(binary)],
                               capture_output=True, text=True, check=False)
        if built.returncode != 0:
            return {"error": f"could not build {SOURCE.name}: {built.stderr.strip()[-300:]}"}
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_PROC_BIND": "spread"}
        runs: list[dict[str, float]] = []
        for _ in range(repeats):
            done = subprocess.run([str(binary)], capture_output=True, text=True, env=env, check=True)
            runs.append({line.split()[0]: float(line.split()[1]) for line in done.stdout.splitlines() if line.strip()})
    best = {fmt: max(run.get(fmt, 0.0) for run in runs) for fmt in runs[0]} if runs else {}
    return {"gflops": best, "threads": threads, "runs": runs,
            "method": "independent vfmadd/vdpbf16ps/vpdpbusd chains on every physical core (benchmarks/peak.c); best run"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure_ceilings(args.repeats), indent=1))


if __name__ == "__main__":
    main()
