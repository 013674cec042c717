"""Rewrites of exported ONNX graphs that change how a network runs, never what it computes.

- :func:`~covid_cxr.inference.onnx_graph.fold_pads_into_pools` (applied at every export, so it lives
  with the exporter in :mod:`covid_cxr.inference.onnx_graph`) merges Keras' ``-inf`` pads into the
  max-pools' own pads.
- :func:`batchnorm_as_depthwise_conv` (applied before int8 quantization): ResNet50V2's
  pre-activation BatchNorms follow an addition, not a convolution, so the exporter cannot fold them
  and ONNX Runtime's quantizer has no int8 BatchNorm: each became an fp32 island (dequantize,
  normalise, quantize, plus layout transposes around it). In inference a BatchNorm is a per-channel
  affine map, i.e. a 1x1 depthwise convolution with weight ``gamma / sqrt(var + eps)`` and bias
  ``beta - mean * weight``; per-channel int8 weights hold a single value per channel exactly (as
  +-127, or +-64 in the 7-bit range), so the
  quantized graph stays int8 end to end. Measured on the concatenated network (benchmarks/RESULTS.md).
- :func:`give_relus_their_own_input`: in the QOperator format ONNX Runtime's quantizer deletes each
  ReLU that follows a quantized op and lets the op's 8-bit output stand for the ReLU's, relying on the
  calibrated range of that tensor to start at 0. That holds only when the ReLU is the tensor's one
  reader: Xception's residual sums feed both the next block's ReLU and the shortcut, their range is
  negative too, and the deleted ReLUs let negative values through (measured on a trained concat
  network: int8 accuracy 55% against 90% in fp32). Giving each such ReLU its own copy of the sum
  (a cheap elementwise op) restores the ReLU; where the producer is not cheap to repeat, the ReLU is
  named so that it stays fp32.
- :func:`unshare_pad_constants`: ONNX Runtime's quantizer rewrites a ``Pad``'s constant in place,
  which breaks a second ``Pad`` reading the same initializer; each gets its own copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from covid_cxr.inference.onnx_graph import (
    drop_unused_initializers,
    graph_constants,
    node_attribute,
    tensor_readers,
)


def batchnorm_as_depthwise_conv(model: Any) -> int:
    """Replace each inference ``BatchNormalization`` on an NCHW tensor by the equivalent 1x1 depthwise ``Conv``."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = graph_constants(graph)
    replaced = 0
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "BatchNormalization" or len([o for o in node.output if o]) != 1:
            continue
        if node_attribute(node, "training_mode", 0):
            continue
        x, scale, bias, mean, var = node.input[:5]
        if not all(name in constants for name in (scale, bias, mean, var)):
            continue
        eps = float(node_attribute(node, "epsilon", 1e-5))
        gamma, beta, mu, sigma2 = (constants[n].astype(np.float64) for n in (scale, bias, mean, var))
        weight = gamma / np.sqrt(sigma2 + eps)
        shift = beta - mu * weight
        channels = weight.shape[0]
        w_name, b_name = f"{node.name or node.output[0]}_dw_weight", f"{node.name or node.output[0]}_dw_bias"
        graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32).reshape(channels, 1, 1, 1), w_name))
        graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32), b_name))
        conv = helper.make_node("Conv", [x, w_name, b_name], [node.output[0]], name=f"{node.name}_as_depthwise_conv",
                                group=channels, kernel_shape=[1, 1])
        position = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(position, conv)
        replaced += 1
    drop_unused_initializers(model)
    return replaced


CHEAP_TO_REPEAT = ("Add", "Sub", "Mul")


def give_relus_their_own_input(model: Any) -> list[str]:
    """Give every ``Relu`` whose input has other readers a private copy of it; returns the ReLUs that must stay fp32.

    The copy is a clone of the producing node when that is an elementwise op of :data:`CHEAP_TO_REPEAT`;
    otherwise the ReLU's name is returned for the caller to keep out of quantization.
    """
    import copy

    graph = model.graph
    readers = tensor_readers(graph)
    producers = {out: node for node in graph.node for out in node.output}
    keep = []
    for relu in [n for n in graph.node if n.op_type == "Relu"]:
        source = relu.input[0]
        if len(readers.get(source, [])) < 2:
            continue
        producer = producers.get(source)
        if producer is None or producer.op_type not in CHEAP_TO_REPEAT or len(producer.output) != 1:
            keep.append(relu.name)
            continue
        twin = copy.deepcopy(producer)
        twin.name = f"{producer.name or source}_for_{relu.name or relu.output[0]}"
        twin.output[0] = f"{source}_for_{relu.name or relu.output[0]}"
        graph.node.insert(list(graph.node).index(relu), twin)
        relu.input[0] = twin.output[0]
    return keep


def unshare_pad_constants(model: Any) -> int:
    """Give every ``Pad`` its own copy of a fill-value initializer that another node also reads."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    readers = tensor_readers(graph)
    copies = 0
    for node in graph.node:
        if node.op_type != "Pad" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        if len(readers.get(node.input[2], [])) < 2:
            continue
        name = f"{node.input[2]}_for_{node.name or node.output[0]}"
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[node.input[2]]), name))
        readers[node.input[2]].remove(node)
        node.input[2] = name
        copies += 1
    return copies
