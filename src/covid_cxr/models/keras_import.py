"""Keras weights -> our PyTorch networks (:mod:`covid_cxr.runs.keras_import` makes a checkpoint of one).

Every weight-holding module of our networks carries its Keras layer name (``keras_name``; see
:mod:`covid_cxr.models.layers`). Named layers are matched by name. Layers Keras names
automatically (Xception's shortcut convs and BatchNorms, the head's conv and dense) get a
different number in every Keras session, so they are matched by kind and shape instead (each is
unique within our networks), in file order where shapes tie. Nothing is copied until every
module has found its weights and every shape fits, so a failed import changes nothing.

Names and shapes cannot tell a stride, a padding, an epsilon, an activation or a skip connection
apart, so a file's model config (where it has one: legacy whole-model ``.h5``/``.hdf5``, ``.keras``)
is checked before any weight is read, in two parts:

* the backbones, layer by layer, against Keras' own (``keras.applications`` Xception and
  ResNet50V2, include_top=False; :mod:`covid_cxr.models.keras_architecture`): every layer's class,
  the settings that change its outputs and the layers it reads;
* the head: the Concatenate must read the backbones' maps, the head must be Conv2D 1024 1x1
  (linear, with bias) -> Flatten -> Dense softmax (Dropouts anywhere between). Names and shapes
  alone cannot tell the concatenation order (4096 channels fit either), so it is read from the
  config: the authors (and we) concatenate Xception first; a file with ResNet50V2 first imports
  with the head conv's input channels reordered to ours.

Any other difference is refused, naming the file, the layer and the setting. A weights-only file
(``.weights.h5``, the Keras ImageNet files) records no architecture: it imports unchecked, and the
result says so.

Kernel layouts: Keras conv kernels are (kh, kw, in, out) -> PyTorch (out, in, kh, kw); depthwise
(kh, kw, in, 1) -> (in, 1, kh, kw); dense (in, out) -> (out, in). The dense input is the
channels-last flatten, which our head reproduces, so no reordering is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covid_cxr.errors import CheckpointError, ConfigError
from covid_cxr.labels import CLASSES, KERAS_AUTHORS_ORDER, check_classes
from covid_cxr.models.concat import BACKBONES, HEAD_CHANNELS
from covid_cxr.models.keras_architecture import OUTPUT_LAYERS, check_backbones
from covid_cxr.models.keras_reader import (
    KerasGraph,
    KerasLayer,
    KerasNode,
    KerasWeights,
    read_keras_weights,
)
from covid_cxr.models.layers import SeparableConv2d
from covid_cxr.models.registry import backbones_of, build_model, list_models
from covid_cxr.networks import MIN_IMAGE_SIZE, PAPER_IMAGE_SIZE

# A layer name that only one backbone has: how a file tells which backbone it holds.
SIGNATURE_LAYERS: dict[str, str] = {"xception": "block1_conv1", "resnet50v2": "conv1_conv"}
HEAD_KERAS = "Conv2D 1024 1x1 (linear, with bias) -> Flatten -> Dropout -> Dense (softmax)"
# Settings of the head's Keras layers that change its outputs, with the values the network has.
HEAD_SETTINGS: dict[str, dict[str, object]] = {
    "Conv2D": {"filters": HEAD_CHANNELS, "kernel_size": [1, 1], "strides": [1, 1], "dilation_rate": [1, 1],
               "groups": 1, "activation": "linear", "use_bias": True, "data_format": "channels_last"},
    "Flatten": {"data_format": "channels_last"},
    "Dense": {"activation": "softmax", "use_bias": True},
}  # fmt: skip


def _module_kind(module: nn.Module) -> str:
    if isinstance(module, SeparableConv2d):
        return "sepconv"
    if isinstance(module, nn.BatchNorm2d):
        return "bn"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "dense"
    raise TypeError(f"no Keras counterpart for {type(module).__name__}")


def _convert(module: nn.Module, layer: KerasLayer) -> dict[str, torch.Tensor] | str:
    """PyTorch tensors for ``module`` from a Keras layer, by the module's own state names, or why not."""
    w = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in layer.weights.items()}
    kind = _module_kind(module)
    if layer.kind == "other":
        shapes = ", ".join(f"{name} {tuple(v.shape)}" for name, v in w.items())
        return (f"has weights that fit no convolution, dense or BatchNorm layer ({shapes}); the network has a {kind} "
                "there")
    if kind != layer.kind:
        return f"is a {layer.kind} layer, the network has a {kind} there"
    if kind == "sepconv":
        if "bias" in w:
            return "has a bias; Keras' Xception separable convs have none"
        if "pointwise_kernel" not in w:
            return "has a depthwise kernel but no pointwise kernel"
        flat = [f"{name} has shape {tuple(w[name].shape)}" for name in ("depthwise_kernel", "pointwise_kernel")
                if w[name].dim() != 4]
        if flat:
            return f"{'; '.join(flat)} where a separable convolution needs 4 dimensions"
        out = {
            "depthwise.weight": w["depthwise_kernel"].permute(2, 3, 0, 1),
            "pointwise.weight": w["pointwise_kernel"].permute(3, 2, 0, 1),
        }
    elif kind == "bn":
        missing = {"gamma", "beta", "moving_mean", "moving_variance"} - set(w)
        if missing:
            return f"lacks BatchNorm weights {sorted(missing)} (center/scale off?)"
        out = {
            "weight": w["gamma"],
            "bias": w["beta"],
            "running_mean": w["moving_mean"],
            "running_var": w["moving_variance"],
        }
    else:
        has_bias = getattr(module, "bias", None) is not None
        if has_bias != ("bias" in w):
            return f"{'lacks' if has_bias else 'has'} a bias, unlike the network's layer"
        out = {"weight": w["kernel"].permute(3, 2, 0, 1) if kind == "conv" else w["kernel"].T}
        if has_bias:
            out["bias"] = w["bias"]
    state = module.state_dict()
    for key, tensor in out.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            return f"{key} has shape {tuple(tensor.shape)} where the network needs {tuple(state[key].shape)}"
    return out


def load_keras_layers(model: nn.Module, layers: Sequence[KerasLayer], *, source: str) -> None:
    """Copy Keras weights into every Keras-tagged module of ``model`` (a network or one backbone).

    Raises :class:`CheckpointError` naming ``source`` when a module finds no fitting weights or
    the file holds weight layers the model lacks.
    """
    targets = [(path, m) for path, m in model.named_modules() if hasattr(m, "keras_name")]
    named = {m.keras_name for _, m in targets if m.keras_name is not None}
    by_name = {layer.name: layer for layer in layers}
    spare = [layer for layer in layers if layer.name not in named]
    updates: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
    problems: list[str] = []
    for path, module in targets:
        if module.keras_name is not None:
            layer = by_name.get(module.keras_name)
            if layer is None:
                problems.append(f"layer {module.keras_name!r} is missing")
                continue
            converted = _convert(module, layer)
            if isinstance(converted, str):
                problems.append(f"layer {layer.name!r} {converted}")
                continue
        else:
            # Auto-named in Keras: the first spare layer of the same kind whose shapes fit.
            for layer in spare:
                converted = _convert(module, layer)
                if not isinstance(converted, str):
                    spare.remove(layer)
                    break
            else:
                problems.append(f"no unnamed {_module_kind(module)} layer fits {path} ({_shape_hint(module)})")
                continue
        updates.append((module, converted))
    if spare:
        problems.append(f"layers the network does not have: {', '.join(layer.name for layer in spare[:5])}")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise CheckpointError(f"{source}: weights do not fit the network: {shown}")
    with torch.no_grad():
        for module, tensors in updates:
            state = module.state_dict()
            for key, tensor in tensors.items():
                state[key].copy_(tensor)


def _shape_hint(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"needs a {module.in_features}x{module.out_features} kernel: another input size? pass --image-size"
    if isinstance(module, nn.Conv2d):
        return f"needs {module.in_channels}->{module.out_channels} channels"
    if isinstance(module, nn.BatchNorm2d):
        return f"needs {module.num_features} channels"
    return type(module).__name__


def backbones_in(weights: KerasWeights) -> list[str]:
    """Which backbones a file holds, recognised by their layer names."""
    names = weights.names()
    return [backbone for backbone, layer in SIGNATURE_LAYERS.items() if layer in names]


def check_head(weights: KerasWeights, network: str) -> tuple[tuple[str, ...], str] | None:
    """The file's backbones in concatenation order and its head conv's name; ``None`` without a model config.

    Raises :class:`CheckpointError` naming the file and the layer where the file's model differs
    from the network's in anything but the concatenation order.
    """
    graph = weights.graph
    if graph is None:
        return None
    wanted = backbones_of(network)

    def refuse(node: KerasNode | None, problem: str) -> CheckpointError:
        where = f"layer {node.name!r} ({node.class_name}) " if node is not None else ""
        return CheckpointError(
            f"{weights.path}: {where}{problem}; network {network!r} is {' + '.join(wanted)} with the paper's head "
            f"({HEAD_KERAS}), and only that architecture imports (another --network if the backbones differ)"
        )

    denses = [node for node in graph.layers.values() if node.class_name == "Dense"]
    if len(denses) != 1:
        raise refuse(None, f"the model config has {len(denses)} Dense layers where the head has one")
    dense = denses[0]
    conv, features = _walk_head(graph, dense, refuse)
    if features.class_name == "Concatenate":
        if features.config.get("axis", -1) not in (-1, 3):
            raise refuse(features, f"joins on axis {features.config.get('axis')} where the network joins channels")
        sources = features.inbound
    else:
        sources = (features.name,)
    order = tuple(_backbone_output(graph, name) for name in sources)
    if None in order or sorted(map(str, order)) != sorted(wanted):
        expected = " and ".join(repr(OUTPUT_LAYERS[b]) for b in wanted)
        raise refuse(features, f"feeds the head conv from {list(sources)}, not from the backbone map(s) {expected}")
    used = graph.ancestors(dense.name) | {dense.name}
    extra = [node for name, node in graph.layers.items() if name not in used]
    if extra:
        raise refuse(extra[0], "does not lead to the Dense output, unlike every layer of the network")
    if dense.name not in graph.outputs:
        raise refuse(dense, "is not an output of the model (the network's output is its Dense layer)")
    return tuple(map(str, order)), conv.name


def _walk_head(graph: KerasGraph, dense: KerasNode, refuse: Callable[[KerasNode | None, str], Exception]
               ) -> tuple[KerasNode, KerasNode]:  # fmt: skip
    """From the Dense back along the head (Dropouts skipped: no-ops at inference): the conv and what it reads."""
    node, conv = dense, dense
    for expected in ("Dense", "Flatten", "Conv2D"):
        while node.class_name == "Dropout":
            node = _only_input(graph, node, refuse)
        if node.class_name != expected:
            raise refuse(node, f"stands where the head has a {expected}")
        for key, want in HEAD_SETTINGS[expected].items():
            value = node.config.get(key, want)
            value = want if value is None else (list(value) if isinstance(value, tuple) else value)
            if value != want:
                raise refuse(node, f"has {key}={value!r} where the network's {expected} has {want!r}")
        conv, node = node, _only_input(graph, node, refuse)
    while node.class_name == "Dropout":
        node = _only_input(graph, node, refuse)
    return conv, node


def _only_input(graph: KerasGraph, node: KerasNode, refuse: Callable[[KerasNode | None, str], Exception]
                ) -> KerasNode:  # fmt: skip
    """The one layer ``node`` reads (the head is a chain)."""
    if len(node.inbound) != 1 or node.inbound[0] not in graph.layers:
        raise refuse(node, f"reads {list(node.inbound)} where the head's layers each read one layer")
    return graph.layers[node.inbound[0]]


def _backbone_output(graph: KerasGraph, name: str) -> str | None:
    """The backbone whose map layer ``name`` is (a nested backbone model counts), else ``None``."""
    for backbone, layer in OUTPUT_LAYERS.items():
        if name == layer:
            return backbone
    node = graph.layers.get(name)
    if node is not None and node.inner is not None and len(node.inner.outputs) == 1:
        return _backbone_output(node.inner, node.inner.outputs[0])
    return None


def reorder_head_conv(layers: list[KerasLayer], conv: str, file_order: Sequence[str], order: Sequence[str],
                      *, source: str) -> list[KerasLayer]:  # fmt: skip
    """``layers`` with the head conv's input channels moved from the file's backbone order to ``order``."""
    starts = dict(zip(file_order, np.cumsum([0] + [BACKBONES[b].out_channels for b in file_order]).tolist()))
    index = np.concatenate([np.arange(starts[b], starts[b] + BACKBONES[b].out_channels) for b in order])
    if not any(layer.name == conv for layer in layers):
        raise CheckpointError(f"{source}: the model config's head conv {conv!r} has no weights in the file")
    out = []
    for layer in layers:
        kernel = layer.weights.get("kernel")
        if layer.name == conv and kernel is not None and kernel.ndim == 4 and kernel.shape[2] == len(index):
            layer = KerasLayer(layer.name, {**layer.weights, "kernel": kernel[:, :, index, :]})
        out.append(layer)
    return out


def _dense_layers(weights: KerasWeights) -> list[KerasLayer]:
    """The Dense layers: a whole model has its classifier; a backbone file (no top) has none."""
    return [layer for layer in weights.layers if layer.kind == "dense"]


@dataclass(frozen=True)
class KerasModel:
    """Keras file(s) read into one of our networks, with what the files say about it."""

    network: str
    model: nn.Module
    classes: tuple[str, ...]
    image_size: int
    whole: bool  # a whole model (with its head); False: backbone weights, the head freshly initialised
    paths: tuple[Path, ...]
    formats: tuple[str, ...]
    architecture: str  # whether the file's architecture was checked, and what the check changed


def load_keras_model(
    path: str | Path | Sequence[str | Path],
    network: str | None = None,
    *,
    classes: Sequence[str] | None = None,
    image_size: int | None = None,
) -> KerasModel:
    """Read Keras file(s) into our network ``network`` (inferred from the layers when ``None``).

    ``path`` is a whole Keras model (legacy ``.h5``/``.hdf5`` as the authors published theirs,
    Keras 3 ``.keras`` or ``.weights.h5``), or backbone weights without top (the Keras ImageNet
    files; ``concat`` then needs both, as a list). A whole model's classes default to the authors'
    order (:data:`~covid_cxr.labels.KERAS_AUTHORS_ORDER`); without a head, the head is freshly
    initialised and the classes default to our canonical order.
    """
    paths = [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
    if not paths:
        raise ConfigError("import_keras needs at least one Keras file")
    files = [read_keras_weights(p) for p in paths]
    network = network or _infer_network(files, paths)
    found = [b for f in files for b in backbones_in(f)]
    wanted = backbones_of(network)
    if sorted(found) != sorted(wanted):
        raise CheckpointError(
            f"{', '.join(map(str, paths))}: hold backbones {found or 'none'}, network {network!r} needs {list(wanted)} "
            "(each once); give the matching --network or one file per backbone"
        )
    whole = len(files) == 1 and bool(_dense_layers(files[0]))
    # The architecture first: a file that is not the network's is refused for that, whatever its shapes.
    layers, architecture = _checked_layers(files[0], network) if whole else ([], _checked_backbone_files(files))
    size, num_classes = _head_shape(network, files[0], paths[0], whole, image_size)
    if num_classes != len(CLASSES):  # every class list here is a permutation of the three: no other count fits
        raise CheckpointError(
            f"{paths[0]}: only 3-class models (COVID-19, pneumonia, normal: the paper's) can be imported, and this "
            f"one has {num_classes} output{'s' if num_classes != 1 else ''}"
        )
    class_keys = check_classes(classes if classes is not None else (KERAS_AUTHORS_ORDER if whole else CLASSES))
    model = build_model(network, num_classes=num_classes, image_size=size)
    if whole:
        load_keras_layers(model, layers, source=str(paths[0]))
    else:
        for f in files:
            load_keras_layers(model.backbones[backbones_in(f)[0]], f.layers, source=str(f.path))
    formats = tuple(f.file_format for f in files)
    return KerasModel(network, model, class_keys, size, whole, tuple(paths), formats, architecture)


def _checked_layers(weights: KerasWeights, network: str) -> tuple[list[KerasLayer], str]:
    """A whole model's layers ready to load (head conv reordered to our concatenation order) and what was checked."""
    ours = backbones_of(network)
    checked = check_head(weights, network) if check_backbones(weights, ours) else None
    if checked is None:
        joined = f", backbones concatenated as {', '.join(ours)}" if len(ours) > 1 else ""
        return weights.layers, (
            f"not checked: the file ({weights.file_format}) holds weights but no model config; its backbones are "
            f"taken to be Keras' own and its head the paper's{joined}"
        )
    order, conv = checked
    if order == ours:
        return weights.layers, (
            "checked: the file's model config has Keras' own backbones and the network's head and concatenation order"
        )
    layers = reorder_head_conv(weights.layers, conv, order, ours, source=str(weights.path))
    return layers, (
        f"checked: the file's model config has Keras' own backbones and the network's head; it concatenates "
        f"{', '.join(order)} (ours: {', '.join(ours)}), so its head conv's input channels were reordered to ours"
    )


def _checked_backbone_files(files: Sequence[KerasWeights]) -> str:
    """Check the backbone files that record their model (raising where one is not Keras' own); what was checked."""
    recorded = {str(f.path): check_backbones(f, backbones_in(f)) for f in files}
    checked = [path for path, ok in recorded.items() if ok]
    unchecked = [path for path, ok in recorded.items() if not ok]
    if not checked:
        return ("not checked: backbone weights only, no model config in the file(s); taken to be Keras' own "
                "backbones (no head: the head is new)")  # fmt: skip
    rest = f"; not checked: {', '.join(unchecked)} (weights only, no model config)" if unchecked else ""
    return f"checked: {', '.join(checked)} holds Keras' own backbone (no head: the head is new){rest}"


def _infer_network(files: list[KerasWeights], paths: list[Path]) -> str:
    """The network whose backbones are exactly the files' ones."""
    found = sorted({b for f in files for b in backbones_in(f)})
    matches = [n for n in list_models() if sorted(backbones_of(n)) == found]
    if not matches:
        raise ConfigError(
            f"{', '.join(map(str, paths))}: cannot tell the network (no Xception or ResNet50V2 layers); "
            "pass --network"
        )
    return matches[0]


def _head_shape(network: str, first: KerasWeights, path: Path, whole: bool, image_size: int | None
                ) -> tuple[int, int]:  # fmt: skip
    """Input size and number of outputs: a whole model's Dense layer tells both (the size when not given).

    A given size the model does not take is refused naming the model's own, read from its config where it has
    one, else from the map its Dense layer reads.
    """
    size = image_size or first.input_size or PAPER_IMAGE_SIZE
    if not whole:
        return size, 3
    dense = _dense_layers(first)
    if len(dense) != 1:
        raise CheckpointError(f"{path}: expected one Dense layer in the head, found {len(dense)}")
    flat, num_classes = dense[0].weights["kernel"].shape
    side = int(round((flat / HEAD_CHANNELS) ** 0.5))
    if side * side * HEAD_CHANNELS != flat:
        return size, num_classes  # no square map: the weights' shapes are refused when they load
    own = first.input_size if first.input_size and _map_side(network, first.input_size) == side else None
    if image_size is None:
        return own or _size_for_side(network, side, preferred=size), num_classes
    if image_size != (own or image_size) or _map_side(network, image_size) != side:
        model_size = own or _size_for_side(network, side, preferred=PAPER_IMAGE_SIZE)
        source = "its model config" if own else f"its head reads the {side}x{side} map of such inputs"
        raise CheckpointError(
            f"{path}: --image-size {image_size} does not fit the model, whose inputs are {model_size}x{model_size} "
            f"({source}); leave --image-size out (the model's own size is the default) or pass {model_size}"
        )
    return size, num_classes


def _map_side(network: str, size: int) -> int | None:
    """The side of the backbones' map at input ``size`` (``None`` when they differ)."""
    sides = {BACKBONES[b].feature_size(size) for b in backbones_of(network)}
    return sides.pop() if len(sides) == 1 else None


def _size_for_side(network: str, side: int, *, preferred: int) -> int:
    """An input size whose feature map has ``side`` (the preferred one if it does)."""
    for candidate in (preferred, PAPER_IMAGE_SIZE, 299, *range(MIN_IMAGE_SIZE, 2049)):
        if all(BACKBONES[b].feature_size(candidate) == side for b in backbones_of(network)):
            return candidate
    raise CheckpointError(f"no input size gives a {side}x{side} map for {network}; pass --image-size")
