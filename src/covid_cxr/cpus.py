"""How many CPUs this process may use: its affinity, capped by the container's CPU quota.

Light on purpose (no torch, no numpy), so that the data layer's decoding pools and the synthetic
data writer size themselves as the network's thread pools do (:mod:`covid_cxr.perf`). A container
(``docker --cpus``, a Kubernetes CPU limit) still lists every core of its host in the affinity mask;
only the cgroup's quota says how much CPU time it gets, and workers beyond it wait throttled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")  # the process's own cgroup inside a container (cgroup namespace)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota allows per period (``"200000 100000"`` -> 2.0), or None when there is no quota.

    cgroup v2 keeps it in ``cpu.max`` ("QUOTA PERIOD", QUOTA "max" when unlimited); v1 in
    ``cpu/cpu.cfs_quota_us`` (-1 when unlimited) and ``cpu/cpu.cfs_period_us``.
    """
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
    else:
        quota = _read(root / "cpu" / "cpu.cfs_quota_us") or "-1"
        period = _read(root / "cpu" / "cpu.cfs_period_us") or ""
    try:
        q, p = int(quota), int(period or 100_000)
    except ValueError:
        return None  # "max", or a file we do not understand: no quota to respect
    return q / p if q > 0 and p > 0 else None


def affinity_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    try:
        for cpu in allowed:
            topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
            cores.add((package, core))
    except OSError:
        return max(1, len(allowed))
    return max(1, len(cores))


def physical_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Physical cores this process may use: those of its CPU affinity, capped by the cgroup CPU quota (rounded up)."""
    cores = affinity_cores()
    limit = cgroup_cpu_limit(cgroup_root)
    return cores if limit is None else max(1, min(cores, math.ceil(limit)))


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Logical CPUs of this process's affinity (all of them where the platform has no affinity), capped by the quota.

    For pools of decoding workers, which gain from hyper-threads, unlike convolution kernels.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    return max(1, count if limit is None else min(count, math.ceil(limit)))
