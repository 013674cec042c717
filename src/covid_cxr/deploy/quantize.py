"""int8 ONNX models for CPUs with VNNI: static quantization calibrated on real X-ray images.

Static (not dynamic) quantization, because a convolutional network spends its time in Conv and
the activation ranges must then be known in advance: we run calibration images through the fp32
graph, record each tensor's range (min/max), and write a graph whose convolutions run in int8.
Activations are unsigned 8-bit and weights signed, per output channel: u8 x s8 is the operand
pair of the VNNI dot-product instruction (``vpdpbusd``). The weights use all 8 bits: CPUs without
VNNI (AVX2, early AVX-512) add two u8 x s8 products in a saturating int16, which full 8-bit weights
overflow (a trained model's agreement with fp32 fell from 98% to 78% on a Zen 2), so there the
predictor runs them in their uint8 form, the same values in kernels that cannot saturate
(:mod:`covid_cxr.inference.int8`). ``seven_bit_weights=True`` writes ONNX Runtime's ``reduce_range``
weights instead ([-64, 64], saturation-free in every kernel, checked before the file is written), which
cost 2.9 points on a weakly trained demo model; the record names the scheme.

Two graph formats hold the same numbers: ``qoperator`` (fused QLinearConv nodes) and ``qdq``
(QuantizeLinear/DequantizeLinear pairs around fp32 ops, which ONNX Runtime fuses when it loads the
model). Which one runs faster is measured in ``benchmarks/`` (RESULTS.md); the default is the one
that won there. The softmax that produces ``probabilities`` stays in fp32. Before calibration the
graph is rewritten so that nothing else has to (:func:`prepare_for_int8`): on the concatenated network
the earlier graph kept 17 BatchNorms and 5 pads in fp32, and those islands with their conversions and
layout transposes took a third of the int8 run time.

The result keeps the source model's covid-cxr metadata (classes, preprocessing), so
:class:`covid_cxr.inference.onnx_model.OnnxPredictor` loads it like any exported model, and records how it
was quantized under ``covid_cxr.quantization``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covid_cxr.atomic import atomic_path
from covid_cxr.config import DEFAULT_QUANT_FORMAT, MIN_CALIBRATION_IMAGES, QUANT_FORMATS
from covid_cxr.deploy.graph import (
    batchnorm_as_depthwise_conv,
    give_relus_their_own_input,
    unshare_pad_constants,
)
from covid_cxr.deploy.saturation import (
    SEVEN_BIT_RANGE,
    SEVEN_BIT_SCHEME,
    WEIGHT_RANGE,
    WEIGHT_SCHEME,
)
from covid_cxr.errors import CheckpointError, ConfigError
from covid_cxr.inference.int8 import INT16_MAX, PairSum, pair_sum_bound
from covid_cxr.inference.onnx_graph import (
    fold_pads_into_pools,
    graph_constants,
    is_minus_inf_pad,
)
from covid_cxr.inference.protocol import check_batch
from covid_cxr.preprocess import Preprocessing, to_model_input

META_KEY = "covid_cxr.quantization"


class _ImageReader:
    """Feeds uint8 calibration images to the calibrator as the graph's float input, a batch at a time.

    ONNX Runtime's calibrator keeps every intermediate tensor of every batch it is fed before it
    reduces them to ranges (about 300 MB per 300x300 image for the concatenated network), so the
    reader is "strided" (``__len__`` + ``set_range``, in batches): the calibrator reduces after each
    batch and merges the ranges, and memory stays at one batch whatever the number of images.
    """

    def __init__(self, images: np.ndarray, pre: Preprocessing, input_name: str, batch_size: int) -> None:
        self.images = images
        self.pre = pre
        self.input_name = input_name
        self.batch_size = batch_size
        self.batches = -(-len(images) // batch_size)
        self.set_range(0, self.batches)

    def __len__(self) -> int:
        return self.batches

    def set_range(self, start_index: int, end_index: int) -> None:
        self.next_batch, self.end_batch = start_index, min(end_index, self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.next_batch >= self.end_batch:
            return None
        start = self.next_batch * self.batch_size
        batch = torch.from_numpy(np.ascontiguousarray(self.images[start : start + self.batch_size]))
        self.next_batch += 1
        return {self.input_name: to_model_input(batch, self.pre).numpy()}


def prepare_for_int8(model: Any) -> list[str]:
    """Rewrite ``model`` in place so that it quantizes end to end; returns the nodes that must stay fp32.

    The rewrites (:mod:`covid_cxr.deploy.graph`) change no output: ``-inf`` pads merge into their
    max-pools (older exports still carry them), standalone BatchNorms become 1x1 depthwise convs, pads
    get their own fill constants, and ReLUs that share their input get their own copy of it (or stay
    fp32). What stays fp32: the softmax (its output is the probabilities), such ReLUs, and any
    ``-inf`` pad that could not be merged together with what reads it (no 8-bit scale covers ``-inf``).
    """
    fold_pads_into_pools(model)
    batchnorm_as_depthwise_conv(model)
    unshare_pad_constants(model)
    keep = give_relus_their_own_input(model)
    constants = graph_constants(model.graph)
    infinite_outputs: set[str] = set()
    for node in model.graph.node:
        if is_minus_inf_pad(node, constants):
            keep.append(node.name)
            infinite_outputs.update(node.output)
        elif node.op_type == "Softmax" or infinite_outputs.intersection(node.input):
            keep.append(node.name)
    return keep


def quantize_onnx(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    calibration_images: np.ndarray,
    *,
    quant_format: str = DEFAULT_QUANT_FORMAT,
    per_channel: bool = True,
    batch_size: int = 8,
    seven_bit_weights: bool = False,
) -> Path:
    """Write an int8 version of the covid-cxr ONNX model ``source`` to ``out``; returns ``out``.

    ``calibration_images``: uint8 (N, S, S) at the model's input size, drawn from the data the model
    will see (training images of every class); a few dozen to a few hundred are enough.
    ``seven_bit_weights=True`` writes 7-bit weights (ONNX Runtime's ``reduce_range``), which no CPU's
    kernels can saturate even in their int8 form, at some cost in accuracy: for measuring.
    """
    import onnx
    from google.protobuf.message import DecodeError
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from covid_cxr.inference.onnx_model import read_metadata

    source = Path(source)
    out = Path(out)
    if quant_format not in QUANT_FORMATS:
        raise ConfigError(f"quantization format must be one of {', '.join(QUANT_FORMATS)}; got {quant_format!r}")
    if batch_size < 1:
        raise ConfigError(f"calibration batch size must be >= 1; got {batch_size}")
    if not source.is_file():
        raise CheckpointError(f"{source}: no such ONNX file; export one with 'covid-cxr export CHECKPOINT --format onnx'")
    try:
        model = onnx.load(os.fspath(source))
    except (OSError, ValueError, DecodeError) as exc:
        raise CheckpointError(f"{source}: not a readable ONNX model ({exc})") from exc
    metadata = {p.key: p.value for p in model.metadata_props}
    _, _, pre, _ = read_metadata(metadata, where=str(source))
    check_batch(calibration_images, pre.image_size)
    if len(calibration_images) < MIN_CALIBRATION_IMAGES:
        raise ConfigError(
            f"quantization needs at least {MIN_CALIBRATION_IMAGES} calibration images to estimate activation "
            f"ranges; got {len(calibration_images)}"
        )
    keep_fp32 = prepare_for_int8(model)
    input_name = model.graph.input[0].name

    class Reader(_ImageReader, CalibrationDataReader):
        pass

    reader = Reader(calibration_images, pre, input_name, batch_size)
    with atomic_path(out) as tmp:
        quantize_static(
            model,
            tmp,
            reader,
            quant_format=QuantFormat.QOperator if quant_format == "qoperator" else QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,  # u8 activations x s8 weights: VNNI's operand pair
            weight_type=QuantType.QInt8,
            reduce_range=seven_bit_weights,  # 7-bit weights: int16 pair sums cannot saturate even as int8
            per_channel=per_channel,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=keep_fp32,
            # Ranges are reduced after every batch and merged, so calibration memory does not grow with N.
            extra_options={"CalibStridedMinMax": 1, "WeightSymmetric": True, "ActivationSymmetric": False},
        )
        quantized = onnx.load(tmp)
        products = pair_sum_bound(quantized)
        if seven_bit_weights:
            _refuse_saturation(products)
        del quantized.metadata_props[:]
        for key, value in metadata.items():
            entry = quantized.metadata_props.add()
            entry.key, entry.value = key, value
        entry = quantized.metadata_props.add()
        entry.key = META_KEY
        entry.value = json.dumps(
            {
                "format": quant_format,
                "activations": "uint8",
                "weights": "int8 per-channel" if per_channel else "int8 per-tensor",
                **_weight_record(products, per_channel, seven_bit_weights),
                "calibration_images": int(len(calibration_images)),
                "method": "minmax",
            },
            sort_keys=True,
        )
        onnx.save(quantized, tmp)
    return out


def _refuse_saturation(products: list[PairSum]) -> None:
    """Refuse a graph whose integer products could saturate (an ONNX Runtime that ignored ``reduce_range``)."""
    over = [p for p in products if p.can_saturate]
    if over:
        worst = max(over, key=lambda p: p.bound)
        raise RuntimeError(
            f"the int8 graph could saturate int16 pair sums on CPUs without VNNI: {len(over)} of {len(products)} "
            f"integer products exceed {INT16_MAX} (worst {worst.op_type} {worst.node}: 2 x {worst.activation_max} x "
            f"{worst.weight_max} = {worst.bound}); this ONNX Runtime did not keep the weights to 7 bits"
        )


def _weight_record(products: list[PairSum], per_channel: bool, seven_bit: bool) -> dict[str, Any]:
    """The weight scheme and its int16 pair-sum bound, as stored in the model's quantization record."""
    bound = max((p.bound for p in products), default=0)
    granularity = "per-channel" if per_channel else "per-tensor"
    scheme = SEVEN_BIT_SCHEME if seven_bit else WEIGHT_SCHEME
    return {"weight_range": list(SEVEN_BIT_RANGE if seven_bit else WEIGHT_RANGE),
            "weight_scheme": scheme.replace("per-channel", granularity),
            # In the int8 form (what VNNI CPUs run); CPUs without VNNI run the uint8 form, which cannot saturate.
            "saturation_free": bound <= INT16_MAX, "max_int16_pair_sum": bound,
            "uint8_form_without_vnni": not seven_bit}
