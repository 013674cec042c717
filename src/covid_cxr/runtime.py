"""Where and how tensors run: device, precision and memory format, chosen once.

Training, evaluation, prediction and serving all ask :func:`choose_runtime`, so "auto" means
the same thing everywhere: the GPU when there is one; bf16 autocast where the hardware does
bf16 natively (CUDA cards that support it, CPUs with AVX512-BF16 or AMX); channels_last for
convolutions. Every command prints :meth:`Runtime.describe` so a user sees what was chosen.
Choosing a runtime also applies the process-level speed settings once (allocator, thread
pools: :mod:`covid_cxr.perf`), and ``describe`` names them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from covid_cxr.choices import PRECISIONS
from covid_cxr.errors import ConfigError
from covid_cxr.perf import SpeedSettings, apply_speed_settings

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) that still include native bf16 dot products.
_ONEDNN_BF16_ISAS = frozenset({"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                               "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                               "AVX10_2_512_AMX_2", "ALL", "DEFAULT", ""})


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(f for line in lines if line.startswith("flags") for f in line.partition(":")[2].split())


def bf16_capped_by_env() -> str | None:
    """The environment variable that limits this process below bf16 instructions, if one does.

    ``ONEDNN_MAX_CPU_ISA`` (convolutions, matmuls) or ``ATEN_CPU_CAPABILITY`` (the other kernels) set to
    an older instruction set makes the CPU behave as one without bf16: bf16 would then be emulated.
    """
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        isa = os.environ.get(name, "").strip().upper()
        if isa not in _ONEDNN_BF16_ISAS:
            return f"{name}={isa}"
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        return f"ATEN_CPU_CAPABILITY={torch.backends.cpu.get_cpu_capability().lower()}"
    return None


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16) and no ISA cap forbids it."""
    if not _cpu_flags() & {"avx512_bf16", "amx_bf16"} or bf16_capped_by_env() is not None:
        return False
    return _onednn_supports_bf16()


def _onednn_supports_bf16() -> bool:
    """oneDNN's own word on bf16 (it reads the CPU itself), where this torch has the check; else True."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else True


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    speed: SpeedSettings | None = None

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Autocast context for the forward pass (a no-op in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        memory = "channels_last" if self.channels_last else "contiguous"
        text = f"device={self.device} precision={self.precision} memory={memory}"
        return text if self.speed is None else f"{text} {self.speed.describe()}"


def choose_runtime(device: str = "auto", precision: str = "auto", channels_last: bool | None = None) -> Runtime:
    """Resolve user choices ("auto" or explicit) into a :class:`Runtime`; refuse impossible ones."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise ConfigError("fp16 is for GPUs; on the CPU use bf16 (native on AVX512-BF16/AMX CPUs) or fp32")
    if channels_last is None:
        channels_last = True
    return Runtime(device=dev, precision=precision, channels_last=channels_last, speed=apply_speed_settings())
