"""int8 that gives the same answer on every x86 CPU: the int16 pair-sum bound, and the uint8 form of the weights.

ONNX Runtime multiplies uint8 activations by int8 weights. With VNNI (``vpdpbusd``, AMX) the
products of four pairs add straight into int32. Without it (AVX2, and AVX-512 before VNNI) its u8 x
s8 kernels use ``vpmaddubsw``, which adds the products of two neighbouring pairs into a *saturating
int16*, and only then widen: with full 8-bit weights one pair sum reaches 2 x 255 x 127 = 64770 and
is clipped to 32767, silently. On a Zen 2 that cost a trained demo model a fifth of its agreement
with fp32. Activations are the raw uint8 codes (0..255 whatever their zero point: ONNX Runtime
subtracts zero points afterwards, in int32).

Two ways out, both here:

- 7-bit weights ([-64, 64], ONNX Runtime's ``reduce_range``) bound every pair sum by 2 x 255 x 64 =
  32640: :func:`pair_sum_bound` proves that of a graph from its integers alone. It costs the weights
  a bit: -2.9 points of accuracy on a weakly trained demo model (``benchmarks/RESULTS.md``).
- Full 8-bit weights, which a CPU without VNNI runs in their **uint8 form** (:func:`unsigned_weights`):
  each code q becomes q + 128 and its zero point 0 becomes 128, the same values, and ONNX Runtime
  multiplies u8 x u8 in kernels that widen both operands to int16 before multiplying and add in
  int32, so no sum saturates. The integers, hence the probabilities, are then those of a VNNI CPU:
  bit for bit on ONNX Runtime's AVX2 kernels (checked under QEMU's Zen 2 CPU model). On VNNI CPUs the
  int8 form stays, on their fast u8 x s8 kernels (the uint8 form runs 2.9x slower there).

:func:`cpu_features` names the CPU (the flags that decide the kernels); :func:`runs_unsigned` says
whether this one needs the uint8 form.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covid_cxr.errors import ConfigError
from covid_cxr.inference.onnx_graph import graph_constants

INT16_MAX = 32767
ACTIVATION_MAX = 255  # a uint8 code; an int8 activation is offset by 128 into the same range on x86
UNSIGNED_OFFSET = 128  # int8 code + 128 = its uint8 code; zero point 0 -> 128
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                  "amx_int8", "avx512_fp16")
WEIGHTS_ENV = "COVID_CXR_INT8_WEIGHTS"  # auto (default) | uint8 | int8: which form an int8 model's weights run in
WEIGHT_FORMS = ("auto", "uint8", "int8")

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
# Where the weight and its zero point sit, for the products whose weight :func:`unsigned_weights` can convert.
WEIGHT_INPUTS: dict[str, tuple[int, int]] = {
    "QLinearConv": (3, 5),
    "QLinearMatMul": (3, 5),
    "QGemm": (3, 5),
    "MatMulInteger": (1, 3),
    "ConvInteger": (1, 3),
    "DequantizeLinear": (0, 2),  # QDQ: a constant weight's DequantizeLinear (scale at 1)
}


@dataclass(frozen=True)
class PairSum:
    """The largest int16 pair sum one integer product can reach, and why."""

    node: str
    op_type: str
    activation_max: int
    weight_max: int
    unsigned: bool = False  # u8 x u8: run by kernels that widen before multiplying, never by vpmaddubsw

    @property
    def bound(self) -> int:
        return 2 * self.activation_max * self.weight_max

    @property
    def can_saturate(self) -> bool:
        return not self.unsigned and self.bound > INT16_MAX


def _operand(name: str, constants: dict[str, np.ndarray], dequantized: dict[str, str]) -> tuple[int, bool]:
    """Largest |code| an operand can hold (its values when constant, directly or through DequantizeLinear, else
    255), and whether it is a constant of uint8 codes."""
    source = dequantized.get(name, name)
    value = constants.get(source)
    if value is None or value.dtype.kind not in "iu":
        return ACTIVATION_MAX, False
    return (int(np.abs(value.astype(np.int64)).max()) if value.size else 0), value.dtype == np.uint8


def pair_sum_bound(model: Any) -> list[PairSum]:
    """Every integer product of ``model`` (an ONNX ModelProto) with the largest int16 pair sum it can reach.

    A constant operand (a weight) counts with its largest stored code; any other operand with 255,
    whatever its type or zero point. The graph cannot saturate ``vpmaddubsw`` when every product with
    an int8 weight is bounded by 32767 (products with uint8 weights never run there). In the QDQ format
    the products are the fp32 ``Conv``/``MatMul``/``Gemm`` nodes whose weight comes from a constant
    through ``DequantizeLinear`` (ONNX Runtime fuses them into integer ops).
    """
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
        (a, _), (b, b_u8) = (_operand(node.input[i], constants, dequantized) for i in pair)
        # The second of each pair is the weight: a uint8 weight means ONNX Runtime's u8 x u8 kernels, which widen first.
        found.append(PairSum(node.name or node.output[0], node.op_type, max(a, b), min(a, b), unsigned=b_u8))
    return found


def saturating_products(model: Any) -> list[PairSum]:
    """The integer products of ``model`` whose int16 pair sums can exceed 32767 (none for a saturation-free graph)."""
    return [p for p in pair_sum_bound(model) if p.can_saturate]


def unsigned_weights(model: Any) -> int:
    """Rewrite ``model`` (in place) so that every constant int8 weight of a product is held as uint8; returns how many.

    Each code q becomes q + 128 and its zero point z (0 for our symmetric weights) z + 128: the weight's
    values scale x (q - z) are unchanged, and ONNX Runtime runs u8 x u8 products without int16
    saturation. Weights shared by several nodes are converted once; a weight that is not a constant
    int8 tensor (none in our exports) is left as it is, and :func:`saturating_products` still names it.
    """
    from onnx import numpy_helper

    graph = model.graph
    constants = graph_constants(graph)
    products = {node.input[1] for node in graph.node if node.op_type in FLOAT_PRODUCTS and len(node.input) > 1}
    taken = {init.name for init in graph.initializer} | {t for node in graph.node for t in (*node.input, *node.output)}
    twins: dict[str, str] = {}  # an int8 initializer (or an absent zero point's stand-in) -> its uint8 twin
    weights: set[str] = set()
    for node in graph.node:
        if node.op_type not in WEIGHT_INPUTS:
            continue
        w_at, zp_at = WEIGHT_INPUTS[node.op_type]
        if node.op_type == "DequantizeLinear" and node.output[0] not in products:
            continue  # an activation's DequantizeLinear, or a bias: not a product's weight
        weight = node.input[w_at] if len(node.input) > w_at else ""
        if weight not in constants or constants[weight].dtype != np.int8:
            continue
        zero = node.input[zp_at] if len(node.input) > zp_at and node.input[zp_at] else None
        zero_value = constants.get(zero) if zero is not None else _default_zero_point(node, constants)
        if zero_value is None or zero_value.dtype != np.int8:
            continue
        zero_key = zero or f"{weight}_zero_point"
        for key, value in ((weight, constants[weight]), (zero_key, zero_value)):
            if key not in twins:
                twins[key] = _unused_name(f"{key}_uint8", taken)
                shifted = (value.astype(np.int16) + UNSIGNED_OFFSET).astype(np.uint8)
                graph.initializer.append(numpy_helper.from_array(shifted, twins[key]))
        node.input[w_at] = twins[weight]
        while len(node.input) <= zp_at:
            node.input.append("")
        node.input[zp_at] = twins[zero_key]
        weights.add(weight)
    return len(weights)  # the int8 originals stay in the file; ONNX Runtime drops unused initializers when it loads


def _unused_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_2``, ``name_3``, ... : the first no tensor of the graph has; reserved once returned."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


def _default_zero_point(node: Any, constants: dict[str, np.ndarray]) -> np.ndarray | None:
    """The zero point an absent input stands for: 0 of the weight's type, shaped like the scale (a scalar for
    MatMulInteger/ConvInteger)."""
    if node.op_type != "DequantizeLinear":
        return np.zeros((), np.int8)
    scale = constants.get(node.input[1]) if len(node.input) > 1 else None
    return None if scale is None else np.zeros(scale.shape, np.int8)


def weight_form() -> str:
    """``COVID_CXR_INT8_WEIGHTS`` (auto, uint8 or int8), checked."""
    value = os.environ.get(WEIGHTS_ENV, "auto").strip().lower() or "auto"
    if value not in WEIGHT_FORMS:
        raise ConfigError(f"{WEIGHTS_ENV} must be one of {', '.join(WEIGHT_FORMS)}; got {value!r}")
    return value


def lacks_vnni(cpu: dict[str, Any] | None = None) -> bool:
    """An x86 CPU not known to have VNNI: ONNX Runtime's u8 x s8 kernels there add pairs in saturating int16."""
    cpu = cpu_features() if cpu is None else cpu
    return is_x86(str(cpu.get("machine", ""))) and cpu.get("vnni") is not True


def runs_unsigned(cpu: dict[str, Any] | None = None) -> bool:
    """Whether int8 weights run in their uint8 form here: on an x86 CPU not known to have VNNI.

    ``COVID_CXR_INT8_WEIGHTS=uint8`` forces the uint8 form (exact everywhere, slower on VNNI CPUs; also for
    emulators such as QEMU's user mode, whose ``/proc/cpuinfo`` is the host's); ``int8`` forces the int8 form
    (for measuring what saturation does: wrong answers without VNNI).
    """
    form = weight_form()
    return lacks_vnni(cpu) if form == "auto" else form == "uint8"


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


def is_x86(machine: str) -> bool:
    return machine.lower() in ("x86_64", "amd64", "i386", "i686", "x86")


@dataclass(frozen=True)
class Int8Form:
    """How an int8 model's weights run in this process (see :func:`open_form`)."""

    unsigned: int  # weight tensors converted to their uint8 form
    saturating: int  # products that can still saturate int16 sums on this CPU
    forced: str | None = None  # the COVID_CXR_INT8_WEIGHTS value that decided it, if set


def reads_graph(cpu: dict[str, Any]) -> bool:
    """Whether an int8 model's graph must be read on ``cpu``: to convert its weights, or to warn that they saturate."""
    return runs_unsigned(cpu) or (weight_form() == "int8" and lacks_vnni(cpu))


def open_form(model: Any, cpu: dict[str, Any]) -> Int8Form | None:
    """Put the int8 ``model`` (ModelProto, rewritten in place) in the form ``cpu`` runs exactly, and say what was done.

    ``None``: nothing to do or to say (a CPU with VNNI or outside x86, or a graph with nothing that can saturate).
    """
    if not reads_graph(cpu):
        return None
    saturating = len(saturating_products(model))
    if not saturating:
        return None
    form = weight_form()
    forced = None if form == "auto" else form
    if form == "int8":
        return Int8Form(0, saturating, forced)
    converted = unsigned_weights(model)
    return Int8Form(converted, len(saturating_products(model)), forced)
