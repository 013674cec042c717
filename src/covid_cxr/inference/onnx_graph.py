"""The ONNX graph rewrite the fp32 export applies, and the graph helpers the int8 rewrites share.

:func:`fold_pads_into_pools`: Keras' stride-2 "same" max-pool pads with ``-inf`` before pooling
(``Pad`` then ``MaxPool``). ONNX ``MaxPool`` has its own ``pads`` whose cells never win the max, which
is exactly a ``-inf`` pad, so the pair becomes one node. The result is bit-identical, one full-size
copy of the activations per pool lighter, and quantizable: a tensor holding ``-inf`` has no 8-bit
scale, so an unfolded pad kept its pool in fp32. The int8 rewrites live in :mod:`covid_cxr.deploy.graph`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import helper, numpy_helper


def graph_constants(graph: Any) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node outputs of ``graph``, by name."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def tensor_readers(graph: Any) -> dict[str, list[Any]]:
    """The nodes reading each tensor, by tensor name."""
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def node_attribute(node: Any, name: str, default: Any = None) -> Any:
    """A node attribute's value, or ``default`` when the node does not set it."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def is_minus_inf_pad(node: Any, constants: dict[str, np.ndarray]) -> bool:
    """A constant-mode ``Pad`` whose fill value is ``-inf``."""
    if node.op_type != "Pad" or node_attribute(node, "mode", b"constant") != b"constant" or len(node.input) < 3:
        return False
    value = constants.get(node.input[2])
    return value is not None and bool(np.all(np.isneginf(value)))


def fold_pads_into_pools(model: Any) -> int:
    """Merge every ``-inf`` ``Pad`` that feeds only unpadded 2-D ``MaxPool`` nodes into their ``pads``.

    Returns the number of pads removed. Pads of the batch or channel axes, pads read by anything
    else, and pads whose output is a graph output are left alone.
    """
    graph = model.graph
    constants = graph_constants(graph)
    readers = tensor_readers(graph)
    outputs = {out.name for out in graph.output}
    folded = []
    for node in graph.node:
        if not is_minus_inf_pad(node, constants):
            continue
        pads = constants.get(node.input[1])
        users = readers.get(node.output[0], [])
        if pads is None or pads.shape != (8,) or np.any(pads < 0) or pads[[0, 1, 4, 5]].any():
            continue
        if not users or node.output[0] in outputs or (len(node.input) > 3 and node.input[3]):
            continue  # unused, a graph output, or padding chosen axes (opset 18 "axes" input): leave it
        if any(u.op_type != "MaxPool" or any(node_attribute(u, "pads", [0, 0, 0, 0])) or
               node_attribute(u, "auto_pad", b"NOTSET") != b"NOTSET" for u in users):
            continue
        top, left, bottom, right = (int(pads[i]) for i in (2, 3, 6, 7))
        for user in users:
            attrs = [a for a in user.attribute if a.name != "pads"]
            del user.attribute[:]
            user.attribute.extend(attrs)
            user.attribute.append(helper.make_attribute("pads", [top, left, bottom, right]))
            user.input[0] = node.input[0]
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    drop_unused_initializers(model)
    return len(folded)


def drop_unused_initializers(model: Any) -> None:
    """Remove the initializers no node or graph output reads any more (after a rewrite)."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
