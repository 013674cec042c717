"""Process-level speed settings: threads and allocator are applied, reported, and actually change behaviour.

Each case runs in a fresh interpreter, because the settings are process-wide and applied once.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from covid_cxr.cpus import cgroup_cpu_limit, physical_cores, usable_cpus
from covid_cxr.perf import SpeedSettings

JEMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
)

_PROBE = r"""
import json, resource, sys
import torch
from covid_cxr.runtime import choose_runtime
rt = choose_runtime("cpu", "fp32")
faults = []
for _ in range(8):
    # A network step in miniature: large activations (above glibc's largest mmap threshold, 32 MiB)
    # alive together with small tensors that outlive them, then freed.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(mib << 20, dtype=torch.uint8) for mib in (48, 96, 64, 128)]
    small = [torch.ones(10) for _ in range(3)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"describe": rt.describe(), "threads": torch.get_num_threads(), "faults": faults}))
"""


def _fresh_faults_floor(nbytes: int) -> int:
    """The fewest page faults ``nbytes`` of fresh memory can take here: one per page, or one per huge page
    where transparent huge pages are always on (x86 has 4 KiB pages, some arm64 kernels 64 KiB)."""
    page = os.sysconf("SC_PAGE_SIZE")
    thp = Path("/sys/kernel/mm/transparent_hugepage")
    if (thp / "enabled").is_file() and "[always]" in (thp / "enabled").read_text():
        page = max(page, int((thp / "hpage_pmd_size").read_text()))
    return nbytes // page


def _probe(**env: str) -> dict:
    return _cached_probe(tuple(sorted(env.items())))


@functools.cache
def _cached_probe(env_items: tuple[tuple[str, str], ...]) -> dict:
    env = dict(env_items)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("COVID_CXR_") and k != "LD_PRELOAD"}
    full_env.update(env)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=full_env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_default_tunes_glibc_and_sizes_threads_to_physical_cores() -> None:
    result = _probe()
    assert "allocator=glibc-tuned" in result["describe"]
    assert result["threads"] == physical_cores()
    assert f"threads={physical_cores()}/" in result["describe"]


def test_tuned_allocator_reuses_freed_memory_instead_of_faulting_fresh_pages() -> None:
    tuned = _probe()
    system = _probe(COVID_CXR_ALLOCATOR="system")
    assert "allocator=system" in system["describe"]
    # glibc's default maps and unmaps 336 MiB of fresh blocks every step (86016 faults with 4 KiB pages).
    assert min(system["faults"][1:]) > 0.9 * _fresh_faults_floor(336 << 20)
    # Tuned: once the heap has grown to the working set (a few steps), the same memory is handed out again.
    assert sum(tuned["faults"][1:]) < 0.3 * sum(system["faults"][1:])
    assert tuned["faults"][-1] < 0.1 * system["faults"][-1] or tuned["faults"][-2] < 0.1 * system["faults"][-2]


def test_thread_override_and_bad_values() -> None:
    assert _probe(COVID_CXR_THREADS="1")["threads"] == 1
    # torchrun's ranks on one machine share its cores (each took them all: ten times slower on 2 cores) ...
    assert _probe(LOCAL_WORLD_SIZE="2")["threads"] == max(1, physical_cores() // 2)
    assert _probe(LOCAL_WORLD_SIZE=str(physical_cores() + 1))["threads"] == 1  # ... at least one thread each
    assert _probe(LOCAL_WORLD_SIZE="2", COVID_CXR_THREADS="3")["threads"] == 3  # the override still wins
    for env in ({"COVID_CXR_THREADS": "zero"}, {"COVID_CXR_ALLOCATOR": "magic"}):
        full_env = {**os.environ, **env}
        done = subprocess.run(
            [sys.executable, "-c", "from covid_cxr.runtime import choose_runtime; choose_runtime('cpu')"],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode != 0
        assert "ConfigError" in done.stderr and next(iter(env)) in done.stderr


@pytest.mark.parametrize("path", [p for p in JEMALLOC_CANDIDATES if Path(p).exists()][:1] or [None])
def test_preloaded_jemalloc_is_detected_and_left_alone(path: str | None) -> None:
    if path is None:
        pytest.skip("libjemalloc.so.2 is not installed (apt-get install libjemalloc2)")
    result = _probe(LD_PRELOAD=path)
    assert "allocator=jemalloc (preloaded)" in result["describe"]


def test_a_mapped_file_whose_path_is_not_utf8_does_not_stop_the_allocator_check(tmp_path: Path) -> None:
    """A memory-mapped image cache under a non-UTF-8 folder name appears in /proc/self/maps: train read that
    listing as UTF-8 and stopped with a decoding error naming no file."""
    import mmap

    from covid_cxr.perf import _PRELOADED, preloaded_allocator

    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc/self/maps on this system")
    folder = os.path.join(os.fsencode(tmp_path), b"prepared-\xff")
    os.mkdir(folder)
    with open(os.path.join(folder, b"images.npy"), "w+b") as f:
        f.write(b"\0" * 4096)
        f.flush()
        with mmap.mmap(f.fileno(), 4096):
            assert b"prepared-\xff" in Path("/proc/self/maps").read_bytes()
            assert preloaded_allocator() in (None, *_PRELOADED)


def _cgroup_tree(root: Path, files: dict[str, str]) -> Path:
    """A cgroup file tree as a container sees it at /sys/fs/cgroup (real files, read by the real reader)."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.mark.parametrize(("files", "limit"), [
    ({"cpu.max": "max 100000"}, None),  # cgroup v2, no quota
    ({"cpu.max": "200000 100000"}, 2.0),  # docker --cpus=2
    ({"cpu.max": "150000 100000"}, 1.5),
    ({"cpu.max": "50000 100000"}, 0.5),  # a Kubernetes limit of 500m
    ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3.0),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ({}, None),  # no cgroup files at all (macOS, Windows, a bare host)
])
def test_cgroup_quota_is_read_from_v1_and_v2_files(tmp_path: Path, files: dict[str, str], limit: float | None) -> None:
    root = _cgroup_tree(tmp_path / "cgroup", files)
    assert cgroup_cpu_limit(root) == limit
    unlimited = physical_cores(tmp_path / "none")
    expected = unlimited if limit is None else max(1, min(unlimited, math.ceil(limit)))
    assert physical_cores(root) == expected


def test_a_quota_below_the_cores_caps_the_threads(tmp_path: Path) -> None:
    half = _cgroup_tree(tmp_path / "half", {"cpu.max": "50000 100000"})
    assert physical_cores(half) == 1  # never below one thread
    many = _cgroup_tree(tmp_path / "many", {"cpu.max": f"{1000 * 100000} 100000"})
    assert physical_cores(many) == physical_cores(tmp_path / "none")  # a quota above the cores changes nothing
    assert "(cgroup CPU limit 1.5)" in SpeedSettings("system", 2, 2, cpu_limit=1.5).describe()
    # The decoding pools (prepare's cache, the synthetic writer) are capped by the same quota.
    assert usable_cpus(half) == 1 and usable_cpus(many) == usable_cpus(tmp_path / "none") >= physical_cores(many)
    assert "cgroup" not in SpeedSettings("system", 2, 2).describe()
