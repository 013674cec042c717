"""int8 that gives the same answer on every x86 CPU: the int16 pair-sum bound, and the CPU a model was checked on.

ONNX Runtime multiplies uint8 activations by int8 weights. With VNNI (``vpdpbusd``) the products
of four pairs add straight into int32. Without it (AVX2, and AVX-512 before VNNI) the kernels use
``vpmaddubsw``, which adds the products of two neighbouring pairs into a *saturating int16*, and
only then widen: with full 8-bit weights one pair sum reaches 2 x 255 x 128 = 65280 and is clipped
to 32767, silently. On a Zen 2 that cost the trained demo model a fifth of its agreement with fp32.
Activations are the raw uint8 codes (0..255 whatever their zero point: ONNX Runtime subtracts zero
points afterwards, in int32), so the only lever is the weights: 7-bit weights in [-64, 64]
(ONNX Runtime's ``reduce_range``) bound every pair sum by 2 x 255 x 64 = 32640 <= 32767, and the
int32 results, hence the predictions, are then the same on every CPU.

:func:`pair_sum_bound` proves that for a quantized graph, from its integers alone;
:func:`cpu_features` names the CPU a model was checked on; :func:`print_int8_record` tells the user
of ``predict`` / ``serve`` what they loaded, and warns about older exports with 8-bit weights on a
CPU without VNNI.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

INT16_MAX = 32767
ACTIVATION_MAX = 255  # a uint8 code; an int8 activation is offset by 128 into the same range on x86
WEIGHT_RANGE = (-64, 64)  # ONNX Runtime's reduced (7-bit) int8 range
WEIGHT_SCHEME = "int8 per-channel, 7-bit range [-64, 64]: saturation-free on AVX2 and VNNI"
FULL_RANGE_SCHEME = "int8 per-channel, full 8-bit range: saturates on CPUs without VNNI"
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                  "amx_int8", "avx512_fp16")

# Integer products ONNX Runtime can run with u8 x s8 kernels: op type -> (input index pairs multiplied together).
INTEGER_PRODUCTS: dict[str, tuple[int, int]] = {
    "QLinearConv": (0, 3),  # x, w (depthwise ones included)
    "QLinearMatMul": (0, 3),  # a, b
    "QGemm": (0, 3),  # com.microsoft: a, b
    "MatMulInteger": (0, 1),
    "ConvInteger": (0, 1),
    "MatMulIntegerToFloat": (0, 1),  # com.microsoft
    "DynamicQuantizeMatMul": (0, 1),  # com.microsoft: a is quantized to uint8 at run time
}
FLOAT_PRODUCTS = ("Conv", "MatMul", "Gemm", "ConvTranspose")  # QDQ format: fused with DequantizeLinear'd weights


@dataclass(frozen=True)
class PairSum:
    """The largest int16 pair sum one integer product can reach, and why."""

    node: str
    op_type: str
    activation_max: int
    weight_max: int

    @property
    def bound(self) -> int:
        return 2 * self.activation_max * self.weight_max


def _magnitude(name: str, constants: dict[str, np.ndarray], dequantized: dict[str, str]) -> int:
    """Largest |code| an operand can hold: its values when constant (directly or through DequantizeLinear), else 255."""
    source = dequantized.get(name, name)
    value = constants.get(source)
    if value is None or value.dtype.kind not in "iu":
        return ACTIVATION_MAX
    return int(np.abs(value.astype(np.int64)).max()) if value.size else 0


def pair_sum_bound(model: Any) -> list[PairSum]:
    """Every integer product of ``model`` (an ONNX ModelProto) with the largest int16 pair sum it can reach.

    A constant operand (a weight) counts with its largest stored code; any other operand with 255,
    whatever its type or zero point. The graph cannot saturate ``vpmaddubsw`` when every bound is at
    most 32767. In the QDQ format the products are the fp32 ``Conv``/``MatMul``/``Gemm`` nodes whose
    weight comes from a constant through ``DequantizeLinear`` (ONNX Runtime fuses them into integer ops).
    """
    from covid_cxr.inference.onnx_graph import graph_constants

    graph = model.graph
    constants = graph_constants(graph)
    dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    found = []
    for node in graph.node:
        if node.op_type in INTEGER_PRODUCTS:
            pair = INTEGER_PRODUCTS[node.op_type]
        elif node.op_type in FLOAT_PRODUCTS and len(node.input) > 1 and node.input[1] in dequantized:
            pair = (0, 1)
        else:
            continue
        a, b = (_magnitude(node.input[i], constants, dequantized) for i in pair)
        found.append(PairSum(node.name or node.output[0], node.op_type, max(a, b), min(a, b)))
    return found


def saturating_products(model: Any) -> list[PairSum]:
    """The integer products of ``model`` whose int16 pair sums can exceed 32767 (none for a saturation-free graph)."""
    return [p for p in pair_sum_bound(model) if p.bound > INT16_MAX]


def cpu_features() -> dict[str, Any]:
    """The CPU this process runs on: vendor and model name, and the SIMD flags that decide int8 and bf16 kernels."""
    info: dict[str, Any] = {"machine": platform.machine()}
    cpuinfo = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if not key and fields:
                break  # the first processor's block is enough
            fields.setdefault(key, value.strip())
    if "flags" in fields:
        flags = set(fields["flags"].split())
        info["vendor"] = fields.get("vendor_id", "")
        info["model"] = fields.get("model name", "")
        info["flags"] = [f for f in REPORTED_FLAGS if f in flags]
        info["vnni"] = any(f in flags for f in VNNI_FLAGS)
        return info
    import torch

    info["model"] = platform.processor() or platform.machine()
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["vnni"] = None  # not known without /proc/cpuinfo
    return info


def describe_cpu(cpu: dict[str, Any]) -> str:
    """One phrase: model name and flags."""
    name = cpu.get("model") or cpu.get("machine") or "unknown CPU"
    flags = cpu.get("flags")
    extra = " ".join(flags) if flags else cpu.get("torch_cpu_capability", "")
    return f"{name} ({extra or 'no AVX2'})"


def _is_x86(machine: str) -> bool:
    return machine.lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def int8_record_lines(record: dict[str, Any], where: str, cpu: dict[str, Any] | None = None) -> list[str]:
    """What an int8 model's ``covid_cxr.quantization`` record says, and a warning when this CPU may saturate it."""
    cpu = cpu_features() if cpu is None else cpu
    saturation_free = bool(record.get("saturation_free"))
    scheme = record.get("weight_scheme") or f"{record.get('weights', 'int8')}, full 8-bit range"
    line = f"int8: {record.get('format', 'qoperator')}, uint8 activations, {scheme}"
    check = record.get("check") or {}
    if check:
        line += f"; checked on {check.get('images', '?')} {check.get('source', 'images')}: agreement with fp32 " \
                f"{check.get('agreement_pct', '?')}%"
        rule = check.get("decision_rule")
        line += f" decided by {rule}" if rule else " (decision rule not recorded)"
        if "argmax_agreement_pct" in check:
            line += f" ({check['argmax_agreement_pct']}% by argmax)"
        if "accuracy_difference_pp" in check:
            line += f", accuracy {check['accuracy_difference_pp']:+.2f} pp"
    checked_on = record.get("checked_on")
    line += f"; checked on CPU {describe_cpu(checked_on)}" if checked_on else "; checking CPU not recorded"
    lines = [line]
    if not saturation_free and _is_x86(str(cpu.get("machine", ""))) and cpu.get("vnni") is not True:
        lacks = "has no VNNI" if cpu.get("vnni") is False else "may lack VNNI (no /proc/cpuinfo to tell)"
        lines.append(
            f"warning: {where} has full 8-bit int8 weights, and this CPU ({describe_cpu(cpu)}) {lacks}: ONNX Runtime's "
            "int8 kernels here add pairs of products in saturating int16, so predictions can differ from fp32 far "
            "more than the check above says. Re-export it with this version of covid-cxr "
            "('covid-cxr export CHECKPOINT --int8' writes 7-bit weights that cannot saturate), or use the fp32 model"
        )
    return lines


def print_int8_record(predictor: Any, path: str | Path, file: IO[str] | None = None) -> None:
    """Print the int8 record of an ONNX predictor loaded from ``path`` (and any saturation warning) to stderr.

    Prints nothing for a model without one (fp32 ONNX, PyTorch checkpoints).
    """
    metadata = getattr(predictor, "metadata", None) or {}
    raw = metadata.get("quantization")
    if raw is None:
        return
    try:
        record = json.loads(raw)
    except ValueError:
        record = {}
    for line in int8_record_lines(record if isinstance(record, dict) else {}, str(path)):
        print(line, file=file or sys.stderr)
