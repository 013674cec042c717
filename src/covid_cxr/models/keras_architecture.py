"""Keras' own backbones, layer by layer, and the check that a Keras file's backbones are them.

Weight names and shapes cannot tell a stride, a padding, a dilation, a BatchNorm epsilon, an
activation or a skip connection apart, and each changes every output. So a model config (where the
file has one) is compared, layer by layer, with ``keras_backbones.json``: Xception and ResNet50V2 as
``keras.applications`` builds them (``include_top=False``). For every layer the reference holds its
class, the settings that change its outputs (:data:`SETTINGS`) and the layers it reads, in order.
``python -m benchmarks.keras_reference`` writes it from the installed Keras (Keras is a test-only
dependency, so the package ships the file), and a test regenerates it and compares.

Layers ``keras.applications`` names must carry that name in the file (the weights are matched by
it). Layers Keras names itself (the input, Xception's shortcut convs, BatchNorms and Adds,
ResNet50V2's shortcut max-pools) are numbered per Keras session, so their names differ between
files (``conv2d_3`` in one, ``conv2d_7`` in another): the reference calls them ``Class#k`` and they
are matched by what they read. Walking the reference in graph order pairs every layer with the
file's, so a layer that reads another one (a skip connection moved, a ReLU dropped or added) is
found where it first differs. Settings that leave outputs alone (names, trainable, dtype policy,
initialisers, regularisers, BatchNorm momentum) and the input size are not compared.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from covid_cxr.errors import CheckpointError
from covid_cxr.models.keras_reader import KerasGraph, KerasNode, KerasWeights, snake_case

REFERENCE_FILE = Path(__file__).with_name("keras_backbones.json")
# The layer each backbone's map comes out of, and the keras.applications function that builds it.
OUTPUT_LAYERS: dict[str, str] = {"xception": "block14_sepconv2_act", "resnet50v2": "post_relu"}
APPLICATIONS: dict[str, str] = {"xception": "Xception", "resnet50v2": "ResNet50V2"}

_CONV = ("kernel_size", "strides", "padding", "dilation_rate", "use_bias", "activation", "data_format")
_POOL = ("pool_size", "strides", "padding", "data_format")
# Per layer class, the settings that change its outputs. A class not listed here is in neither backbone.
SETTINGS: dict[str, tuple[str, ...]] = {
    "InputLayer": (),  # its size may differ: the network takes any size from its minimum up
    "Conv2D": ("filters", *_CONV, "groups"),
    "SeparableConv2D": ("filters", *_CONV, "depth_multiplier"),
    "DepthwiseConv2D": (*_CONV, "depth_multiplier"),
    "BatchNormalization": ("epsilon", "center", "scale", "axis"),
    "Activation": ("activation",),
    "MaxPooling2D": _POOL,
    "AveragePooling2D": _POOL,
    "ZeroPadding2D": ("padding", "data_format"),
    "Add": (),
    "Concatenate": ("axis",),
}
# Settings an older Keras did not record, with the value it worked with (Keras 2.3's Conv2D has no groups).
UNRECORDED: dict[str, object] = {"groups": 1}
RANK = 4  # every backbone layer works on (batch, height, width, channels): how a negative axis reads
FIX = (
    "only Keras' own backbones import (keras.applications Xception and ResNet50V2, include_top=False, unchanged), "
    "as no other architecture gives the file's outputs in these networks; build the Keras model on them, or "
    "train one here (covid-cxr train)"
)


MISSING = object()  # a setting the file's config does not record


@dataclass(frozen=True)
class ReferenceLayer:
    """One layer of a Keras backbone: its name (``Class#k`` where Keras names it), class, settings and inputs."""

    id: str
    class_name: str
    settings: dict[str, Any]
    inbound: tuple[str, ...]

    @property
    def named(self) -> bool:
        """Whether ``keras.applications`` names the layer (the file must use that name)."""
        return "#" not in self.id


@dataclass(frozen=True)
class Backbone:
    """A Keras backbone as ``keras.applications`` builds it: layers in graph order, ending at ``output``."""

    application: str
    output: str
    layers: tuple[ReferenceLayer, ...]


@cache
def reference() -> dict[str, Backbone]:
    """The shipped reference, by backbone (``xception``, ``resnet50v2``)."""
    try:
        data = json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{REFERENCE_FILE}: unreadable ({exc}); reinstall covid-cxr") from exc
    return {
        name: Backbone(entry["application"], entry["output"], tuple(
            ReferenceLayer(layer["id"], layer["class"], layer["settings"], tuple(layer["inbound"]))
            for layer in entry["layers"]
        ))
        for name, entry in data["backbones"].items()
    }  # fmt: skip


def setting(node: KerasNode, key: str) -> Any:
    """``node``'s setting ``key`` in one form, however the Keras version wrote it (:data:`MISSING` if it did not)."""
    if key not in node.config:
        return UNRECORDED.get(key, MISSING)
    value = _plain(node.config[key])
    if key == "activation":
        if isinstance(value, dict):  # a function serialised as a record: its name is the config
            value = value.get("config")
        return "linear" if value is None else value
    if key == "axis" and node.class_name == "BatchNormalization":
        axes = [a % RANK if isinstance(a, int) else a for a in (value if isinstance(value, list) else [value])]
        return axes[0] if len(axes) == 1 else axes  # -1, 3 and [3] are one axis
    if key == "strides" and value is None and "pool_size" in node.config:
        return _plain(node.config["pool_size"])  # a pool's strides default to its size
    return value


def _plain(value: Any) -> Any:
    """Tuples as lists, as JSON holds them (a config from Keras in memory has tuples)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same(found: Any, expected: Any) -> bool:
    """Equal; floats to float32's precision (an epsilon may have passed through float32)."""
    if isinstance(found, list) and isinstance(expected, list):
        return len(found) == len(expected) and all(map(_same, found, expected))
    if isinstance(found, float) or isinstance(expected, float):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (found, expected))
        return numbers and math.isclose(found, expected, rel_tol=1e-6)
    return type(found) is type(expected) and found == expected


def describe_backbone(graph: KerasGraph, output: str, application: str) -> dict[str, Any]:
    """The reference entry of the backbone in ``graph`` whose map comes out of ``output`` (the generator's)."""
    wanted = graph.ancestors(output) | {output}
    ids: dict[str, str] = {}
    counts: Counter[str] = Counter()
    layers = []
    for name, node in graph.layers.items():
        if name not in wanted:
            continue
        if node.class_name not in SETTINGS:
            raise ValueError(f"layer {name!r} is a {node.class_name}, which SETTINGS lacks: add its settings there")
        auto = re.fullmatch(rf"(?:{snake_case(node.class_name)}|input)(?:_\d+)?", name)
        ids[name] = f"{node.class_name}#{counts[node.class_name]}" if auto else name
        counts[node.class_name] += bool(auto)
        settings = {key: setting(node, key) for key in SETTINGS[node.class_name]}
        layers.append({"id": ids[name], "class": node.class_name, "settings": settings,
                       "inbound": [ids[i] for i in node.inbound]})  # fmt: skip
    return {"application": application, "output": output, "layers": layers}


def backbone_difference(graph: KerasGraph, backbone: str) -> str | None:
    """Where the backbone in ``graph`` first differs from Keras' own, and how; ``None`` where it does not."""
    ref = reference()[backbone]
    if ref.output in graph.layers:
        return _walk(graph, ref)
    for node in graph.layers.values():  # a backbone model nested in the file's model
        if node.inner is not None and ref.output in node.inner.layers:
            fed = [graph.layers[name].class_name if name in graph.layers else "" for name in node.inbound]
            if fed != ["InputLayer"]:
                return (f"layer {node.name!r} ({node.class_name}), Keras' {ref.application}, reads "
                        f"{list(node.inbound)} where the network feeds it the model's input")  # fmt: skip
            return _walk(node.inner, ref)
    return f"the model config has no layer {ref.output!r}, where Keras' {ref.application} ends"


def _walk(graph: KerasGraph, ref: Backbone) -> str | None:
    """Pair the reference's layers, in graph order, with the file's; the first layer that differs, and how."""
    readers: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for name, node in graph.layers.items():
        readers[node.inbound].append(name)
    scope = graph.ancestors(ref.output)  # where the backbone's input must be
    named = {layer.id for layer in ref.layers if layer.named}
    paired: dict[str, str] = {}  # reference id -> the file's layer name
    for layer in ref.layers:
        inbound = tuple(paired[i] for i in layer.inbound)
        if layer.named:
            node = graph.layers.get(layer.id)
            if node is None:
                return (f"the model config has no layer {layer.id!r} ({layer.class_name} reading {list(inbound)}), "
                        f"which Keras' {ref.application} has")
        else:
            taken = set(paired.values())
            fits = [name for name in readers.get(inbound, []) if name not in taken and name not in named
                    and graph.layers[name].class_name == layer.class_name and (inbound or name in scope)]
            if not fits:
                return _misfit(graph, ref, layer, inbound, taken | named)
            node = graph.layers[fits[0]]
        problem = _compare(node, layer, inbound, ref.application)
        if problem is not None:
            return f"layer {node.name!r} ({node.class_name}) {problem}"
        paired[layer.id] = node.name
    return None


def _compare(node: KerasNode, layer: ReferenceLayer, inbound: tuple[str, ...], application: str) -> str | None:
    """How the file's ``node`` differs from the reference ``layer`` (whose inputs are the file's ``inbound``)."""
    if node.class_name != layer.class_name:
        return f"is a {node.class_name} where Keras' {application} has a {layer.class_name}"
    if node.inbound != inbound:
        return f"reads {list(node.inbound)} where Keras' {application} reads {list(inbound)}"
    for key, expected in layer.settings.items():
        found = setting(node, key)
        if found is MISSING:
            return f"records no {key} where Keras' {application} has {key}={expected!r}"
        if not _same(found, expected):
            return f"has {key}={found!r} where Keras' {application} has {key}={expected!r}"
    return None


def _misfit(graph: KerasGraph, ref: Backbone, layer: ReferenceLayer, inbound: tuple[str, ...], taken: set[str]) -> str:
    """Why no layer of the file stands where Keras names ``layer`` itself: the file's layer nearest that place."""
    near = [node for name, node in graph.layers.items()
            if name not in taken and set(node.inbound) & set(inbound)]  # fmt: skip
    near.sort(key=lambda node: node.class_name != layer.class_name)  # one of the same class first
    if near:
        return f"layer {near[0].name!r} ({near[0].class_name}) " + (
            _compare(near[0], layer, inbound, ref.application)
            or f"stands where Keras' {ref.application} has an unnamed {layer.class_name}"
        )
    return (f"the model config has no {layer.class_name} reading {list(inbound)}, "
            f"which Keras' {ref.application} has there")  # fmt: skip


def check_backbones(weights: KerasWeights, backbones: Sequence[str]) -> bool:
    """Whether the file's model config was checked (``False``: it has none); raise where a backbone is not Keras' own.

    The :class:`CheckpointError` names the file, the layer, the setting, what the file has and what
    Keras' backbone has there.
    """
    if weights.graph is None:
        return False
    for backbone in backbones:
        difference = backbone_difference(weights.graph, backbone)
        if difference is not None:
            raise CheckpointError(f"{weights.path}: {difference}; {FIX}")
    return True
