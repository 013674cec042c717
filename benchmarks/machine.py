"""What the numbers were measured on: CPU model and flags, cores, memory, load, library versions."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16",
                     "amx_int8", "amx_tile")


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def describe_machine(keras_versions: dict[str, str] | None = None) -> dict[str, Any]:
    """A JSON-able description; library versions are read without importing torch into the caller."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    versions = subprocess.run(
        ["python", "-c", "import torch, onnxruntime, numpy; print(torch.__version__, onnxruntime.__version__, "
         "numpy.__version__, torch.backends.mkldnn.is_available())"],
        capture_output=True, text=True, check=False,
    ).stdout.split()
    from covid_cxr.cpus import physical_cores

    return {
        "cpu_model": info.get("model name", platform.processor()),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "flags": sorted(f for f in INTERESTING_FLAGS if f in flags),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": versions[0] if versions else None,
        "onnxruntime": versions[1] if len(versions) > 1 else None,
        "numpy": versions[2] if len(versions) > 2 else None,
        "onednn": versions[3] if len(versions) > 3 else None,
        "keras_side": keras_versions or {},
        "transparent_hugepages": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
    }


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None
