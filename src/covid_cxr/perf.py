"""Process-level speed settings: the memory allocator and the thread pools, chosen once at start-up.

Why this exists: on Linux, glibc's ``malloc`` serves every block above its mmap threshold (at most
32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` on free. A convolutional network at
batch 20 allocates and frees hundreds of activation buffers of tens to hundreds of MiB per step, so
every step touches fresh zero pages: measured here (2-core AMD EPYC, concat network, batch 20) that
cost 20-40% of the CPU time in page faults, and it swung from run to run. Telling glibc to keep
freed memory in its heap (``mallopt``: no mmap for large blocks, a high trim threshold) makes the
buffers reusable and the page faults disappear; ``benchmarks/RESULTS.md`` has the figures.

jemalloc or tcmalloc do the same job when they are preloaded (``LD_PRELOAD``, which must be set
before the process starts); :func:`apply_speed_settings` notices them and leaves them alone. The
choice is the ``COVID_CXR_ALLOCATOR`` environment variable:

- ``auto`` (default): a preloaded jemalloc/tcmalloc if there is one, else glibc tuned with the
  ``mallopt`` settings of :data:`GLIBC_TUNING`;
- ``system``: leave the allocator exactly as the platform set it up.

Threads: PyTorch's intra-op pool is sized to the physical cores this process may run on (hyper-
threads share one core's vector units and only add contention to convolution kernels); the
inter-op pool gets one thread per physical core too but never more than 4, since our graphs are
sequential. Both are capped by the container's CPU quota (``docker --cpus``, a Kubernetes CPU limit:
the cgroup's ``cpu.max``), rounded up: affinity still lists every core of a 64-core host there, and 32
threads on a 2-CPU quota spend their time throttled. Under torchrun the ranks on one machine share its cores
(``LOCAL_WORLD_SIZE``), at least one thread each. ``COVID_CXR_THREADS`` overrides the intra-op count.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from covid_cxr.cpus import affinity_cores, cgroup_cpu_limit, physical_cores
from covid_cxr.errors import ConfigError

ALLOCATOR_CHOICES = ("auto", "system")

# glibc mallopt parameter numbers (malloc.h) and the values we set.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
GLIBC_TUNING: dict[str, tuple[int, int]] = {
    # name: (mallopt parameter, value)
    "mmap_max": (M_MMAP_MAX, 0),  # large blocks come from the heap, so freed ones are reused
    "trim_threshold": (M_TRIM_THRESHOLD, 1 << 30),  # keep up to 1 GiB of free heap instead of returning it
    "top_pad": (M_TOP_PAD, 64 << 20),  # grow the heap 64 MiB at a time: fewer brk calls
}

_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")


@dataclass(frozen=True)
class SpeedSettings:
    """What :func:`apply_speed_settings` chose for this process."""

    allocator: str
    threads: int
    interop_threads: int
    cpu_limit: float | None = None  # the cgroup CPU quota when it capped the thread count

    def describe(self) -> str:
        capped = "" if self.cpu_limit is None else f" (cgroup CPU limit {self.cpu_limit:g})"
        return f"allocator={self.allocator} threads={self.threads}/{self.interop_threads}{capped}"


_applied: SpeedSettings | None = None


def preloaded_allocator() -> str | None:
    """The name of a replacement malloc mapped into this process (jemalloc, tcmalloc...), if any."""
    try:
        maps = Path("/proc/self/maps").read_bytes()  # bytes: mapped files' paths need not be valid UTF-8
    except OSError:
        return None
    for name in _PRELOADED:
        if f"lib{name}".encode() in maps:
            return name
    return None


def tune_glibc_malloc() -> bool:
    """Apply :data:`GLIBC_TUNING` with ``mallopt``; False where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in GLIBC_TUNING.values())


def _choose_allocator(choice: str) -> str:
    if choice not in ALLOCATOR_CHOICES:
        raise ConfigError(
            f"COVID_CXR_ALLOCATOR must be one of {', '.join(ALLOCATOR_CHOICES)}; got {choice!r} "
            "(to use jemalloc, preload it: LD_PRELOAD=/path/to/libjemalloc.so.2)"
        )
    if choice == "system":
        return "system"
    preloaded = preloaded_allocator()
    if preloaded is not None:
        return f"{preloaded} (preloaded)"
    return "glibc-tuned" if tune_glibc_malloc() else "system"


def _thread_count() -> tuple[int, float | None]:
    """Intra-op threads, and the cgroup CPU quota when it is what capped them."""
    raw = os.environ.get("COVID_CXR_THREADS", "").strip()
    if not raw:
        limit = cgroup_cpu_limit()
        share = physical_cores() // _local_processes()  # torchrun's ranks on this machine share its cores
        return max(1, share), limit if limit is not None and math.ceil(limit) < affinity_cores() else None
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"COVID_CXR_THREADS must be a whole number >= 1; got {raw!r}")
    return count, None


def _local_processes() -> int:
    """How many processes torchrun started on this machine (``LOCAL_WORLD_SIZE``; 1 outside torchrun).

    Each rank sized its pool to every core: two ranks on 2 cores ran 4 spinning threads and trained about ten
    times slower (2.5 against 26.6 images/s, one epoch at 72 px) than with one thread each.
    """
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def apply_speed_settings() -> SpeedSettings:
    """Set the allocator and thread pools for this process, once; later calls return the first result.

    Call it at start-up, before the first large tensor (``choose_runtime`` does). Settings come
    from ``COVID_CXR_ALLOCATOR`` and ``COVID_CXR_THREADS`` (see the module docstring).
    """
    global _applied
    if _applied is not None:
        return _applied
    allocator = _choose_allocator(os.environ.get("COVID_CXR_ALLOCATOR", "auto").strip().lower() or "auto")
    threads, cpu_limit = _thread_count()
    torch.set_num_threads(threads)
    interop = min(threads, 4)
    try:
        torch.set_num_interop_threads(interop)
    except RuntimeError:
        # The inter-op pool can be sized only before its first use; keep what it already has.
        interop = torch.get_num_interop_threads()
    _applied = SpeedSettings(allocator=allocator, threads=threads, interop_threads=interop, cpu_limit=cpu_limit)
    return _applied
