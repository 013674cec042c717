"""Keras weights -> our PyTorch networks (:mod:`covid_cxr.runs.keras_import` makes a checkpoint of one).

Every weight-holding module of our networks carries its Keras layer name (``keras_name``; see
:mod:`covid_cxr.models.layers`). Named layers are matched by name. Layers Keras names
automatically (Xception's shortcut convs and BatchNorms, the head's conv and dense) get a
different number in every Keras session, so they are matched by kind and shape instead (each is
unique within our networks), in file order where shapes tie. Nothing is copied until every
module has found its weights and every shape fits, so a failed import changes nothing.

Kernel layouts: Keras conv kernels are (kh, kw, in, out) -> PyTorch (out, in, kh, kw); depthwise
(kh, kw, in, 1) -> (in, 1, kh, kw); dense (in, out) -> (out, in). The dense input is the
channels-last flatten, which our head reproduces, so no reordering is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covid_cxr.errors import CheckpointError, ConfigError
from covid_cxr.labels import CLASSES, KERAS_AUTHORS_ORDER, check_classes
from covid_cxr.models.concat import BACKBONES, HEAD_CHANNELS
from covid_cxr.models.keras_reader import KerasLayer, KerasWeights, read_keras_weights
from covid_cxr.models.layers import SeparableConv2d
from covid_cxr.models.registry import backbones_of, build_model, list_models
from covid_cxr.networks import MIN_IMAGE_SIZE, PAPER_IMAGE_SIZE

# A layer name that only one backbone has: how a file tells which backbone it holds.
SIGNATURE_LAYERS: dict[str, str] = {"xception": "block1_conv1", "resnet50v2": "conv1_conv"}


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
    if kind != layer.kind:
        return f"is a {layer.kind} layer, the network has a {kind} there"
    if kind == "sepconv":
        if "bias" in w:
            return "has a bias; Keras' Xception separable convs have none"
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
    size, num_classes = _head_shape(network, files[0], paths[0], whole, image_size)
    class_keys = check_classes(classes if classes is not None else (KERAS_AUTHORS_ORDER if whole else CLASSES))
    if len(class_keys) != num_classes:
        raise ConfigError(
            f"{paths[0]}: the model has {num_classes} output units but {len(class_keys)} classes were given"
        )
    model = build_model(network, num_classes=num_classes, image_size=size)
    if whole:
        load_keras_layers(model, files[0].layers, source=str(paths[0]))
    else:
        for f in files:
            load_keras_layers(model.backbones[backbones_in(f)[0]], f.layers, source=str(f.path))
    return KerasModel(network, model, class_keys, size, whole, tuple(paths), tuple(f.file_format for f in files))


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
    """Input size and number of outputs: a whole model's Dense layer tells both (the size when not given)."""
    size = image_size or first.input_size or PAPER_IMAGE_SIZE
    if not whole:
        return size, 3
    dense = _dense_layers(first)
    if len(dense) != 1:
        raise CheckpointError(f"{path}: expected one Dense layer in the head, found {len(dense)}")
    flat, num_classes = dense[0].weights["kernel"].shape
    side = int(round((flat / HEAD_CHANNELS) ** 0.5))
    if image_size is None and side * side * HEAD_CHANNELS == flat:
        size = _size_for_side(network, side, preferred=size)
    return size, num_classes


def _size_for_side(network: str, side: int, *, preferred: int) -> int:
    """An input size whose feature map has ``side`` (the preferred one if it does)."""
    for candidate in (preferred, PAPER_IMAGE_SIZE, 299, *range(MIN_IMAGE_SIZE, 2049)):
        if all(BACKBONES[b].feature_size(candidate) == side for b in backbones_of(network)):
            return candidate
    raise CheckpointError(f"no input size gives a {side}x{side} map for {network}; pass --image-size")
