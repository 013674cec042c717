"""Timing and reporting helpers shared by the workers (standard library only: both interpreters import it)."""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

RESULT_PREFIX = "BENCH-RESULT "


def time_call(fn: Callable[[], Any], *, warmup: int, reps: int) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times timed; the median is the figure we report.

    CPU seconds per call (all threads of this process) are recorded beside wall seconds: on a
    machine shared with other work, wall time grows with the load while CPU time mostly does not.
    """
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "cpu_median_s": statistics.median(cpu)}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB.

    Not ``ru_maxrss``: Linux carries a parent's peak into a forked child and keeps it across exec,
    so every worker would report at least the orchestrator's own peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> dict[str, float]:
    """User and system CPU time of this process: system time is where page faults show up."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": usage.ru_utime, "sys_s": usage.ru_stime, "minor_faults": usage.ru_minflt}


def emit(result: dict[str, Any]) -> None:
    """Print one result line for the orchestrator (everything else a worker prints is ignored)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_results(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line[len(RESULT_PREFIX) :]) for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
