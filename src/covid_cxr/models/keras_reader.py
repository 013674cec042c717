"""Read Keras weight files into one neutral form: named layers with named arrays.

Formats (all HDF5, read with h5py; Keras itself is not needed):

* legacy HDF5 weights (Keras 1/2 ``save_weights`` and the Keras application ImageNet files):
  root attribute ``layer_names``; per layer a group with attribute ``weight_names``
  (``block1_conv1/kernel:0``...), whose arrays lie at ``<layer>/<weight name>``;
* legacy HDF5 whole models (Keras 2 ``model.save('x.h5')``, the authors' ``.hdf5`` files): the same
  under ``model_weights``, plus the architecture as JSON in the root attribute ``model_config``;
* Keras 3 ``.weights.h5``: ``layers/<class>_<k>/vars/<i>`` with positional arrays (the layer's
  name in the ``vars`` attribute ``name`` where Keras wrote it);
* Keras 3 ``.keras``: a zip holding ``config.json`` and ``model.weights.h5`` (as above).

A whole model's config (legacy ``model_config`` or ``.keras`` ``config.json``) is read into a
:class:`KerasGraph`, each layer with the layers it reads, so the importer can check the architecture
and not just the weights' names and shapes. Weights-only files have none.

A file that is something else (a covid-cxr checkpoint, an ONNX model, a folder) is refused saying what it is; a
damaged one (a name listed without its data, text where numbers belong, a config that is not a Keras model's,
NaN or infinite weights) is refused in one line naming the file and the fault, never with a traceback.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from covid_cxr.errors import CheckpointError
from covid_cxr.model_files import FORMAT as CHECKPOINT_FORMAT
from covid_cxr.model_files import file_kind

WEIGHT_ORDER: dict[str, tuple[str, ...]] = {
    # Keras 3 saves a layer's variables by position, in this order.
    "conv2d": ("kernel", "bias"),
    "separable_conv2d": ("depthwise_kernel", "pointwise_kernel", "bias"),
    "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "dense": ("kernel", "bias"),
}
KNOWN_WEIGHTS = {w for names in WEIGHT_ORDER.values() for w in names}
EXPECTED = "expected a Keras .h5/.hdf5, .weights.h5 or .keras file"
DAMAGED = "damaged or not a Keras model file"
# What a file that is no Keras model is (by model_files.file_kind and, for a zip, zip_kind), for the words.
NOT_KERAS: dict[str, str] = {
    "empty": "an empty file (0 bytes), likely an interrupted copy or download; copy the Keras model again",
    "onnx": f"an ONNX model (not Keras), which predict and serve take as it is; {EXPECTED}",
    "pickle": f"a Python pickle (PyTorch's legacy torch.save, or a pickled model), not a Keras model; {EXPECTED}",
    "checkpoint": (
        "already a covid-cxr checkpoint (no import needed): predict, evaluate, export and serve take it as it is"
    ),
    "torch": f"a PyTorch file (torch.save), not a Keras model; {EXPECTED}",
    "zip": f"a zip file but not a Keras .keras file (no config.json/model.weights.h5); {EXPECTED}",
}


@dataclass
class KerasLayer:
    """One Keras layer's weights, by canonical weight name (``kernel``, ``gamma``...)."""

    name: str
    weights: dict[str, np.ndarray]

    @property
    def kind(self) -> str:
        """``sepconv``, ``bn``, ``conv`` or ``dense``: what the weights say the layer is."""
        if "depthwise_kernel" in self.weights:
            return "sepconv"
        if "gamma" in self.weights or "moving_mean" in self.weights:
            return "bn"
        kernel = self.weights.get("kernel")
        if kernel is not None and kernel.ndim == 4:
            return "conv"
        if kernel is not None and kernel.ndim == 2:
            return "dense"
        return "other"


@dataclass(frozen=True)
class KerasNode:
    """One layer of a model config: its class, its settings and the layers it reads, in call order."""

    name: str
    class_name: str
    config: dict[str, Any]
    inbound: tuple[str, ...]
    inner: KerasGraph | None = None  # a nested model's own graph


@dataclass(frozen=True)
class KerasGraph:
    """A Keras model's layers (file order) and the layers its outputs come from."""

    layers: dict[str, KerasNode]
    outputs: tuple[str, ...]

    def ancestors(self, name: str) -> set[str]:
        """Every layer ``name`` reads from, directly or not."""
        seen: set[str] = set()
        todo = list(self.layers[name].inbound) if name in self.layers else []
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(self.layers[current].inbound if current in self.layers else ())
        return seen


def model_graph(config: dict[str, Any]) -> KerasGraph:
    """The layer graph of a model config: Keras 2 and Keras 3 node formats, functional or Sequential."""
    body = config.get("config", {})
    if isinstance(body, list):  # Keras 2.2 wrote a Sequential's config as its bare layer list
        body = {"layers": body}
    sequential = config.get("class_name") == "Sequential"
    layers: dict[str, KerasNode] = {}
    previous: tuple[str, ...] = ()
    listed = body.get("layers", [])
    if sequential and listed and listed[0].get("class_name") != "InputLayer":
        # Keras 2.2/2.3 serialised a Sequential's layers without its InputLayer; the first layer reads the model's
        # input all the same: named as Keras named it (FIRST_input).
        first = listed[0].get("name") or listed[0].get("config", {}).get("name")
        previous = (f"{first}_input",)
        layers[previous[0]] = KerasNode(previous[0], "InputLayer", {}, ())
    for layer in listed:
        if not isinstance(layer, dict) or not isinstance(layer.get("config", {}), dict):
            raise TypeError(f"a layer entry is {str(layer)[:60]!r}, not an object with an object 'config'")
        cfg = layer.get("config", {})
        name = layer.get("name") or cfg.get("name")
        inbound = previous if sequential else _tensor_sources(layer.get("inbound_nodes", []))
        inner = model_graph(layer) if "layers" in cfg else None
        layers[name] = KerasNode(name, layer.get("class_name", ""), cfg, inbound, inner)
        previous = (name,)
    outputs = body.get("output_layers", [])
    if sequential:
        named = previous
    elif outputs and isinstance(outputs[0], str):  # Keras 3 writes a single output unnested
        named = (outputs[0],)
    else:
        named = tuple(o[0] for o in outputs)
    return KerasGraph(layers, named)


def _tensor_sources(item: Any) -> tuple[str, ...]:
    """Layer names of the tensors in an ``inbound_nodes`` entry, in order.

    Keras 2 lists ``[layer, node, tensor, kwargs]``; Keras 3 nests ``__keras_tensor__`` records
    whose ``keras_history`` starts with the layer's name.
    """
    if isinstance(item, dict):
        if item.get("class_name") == "__keras_tensor__":
            return (item["config"]["keras_history"][0],)
        return tuple(name for value in item.values() for name in _tensor_sources(value))
    if isinstance(item, (list, tuple)):  # tuples where the config comes from Keras in memory, not JSON
        if len(item) >= 3 and isinstance(item[0], str) and isinstance(item[1], int):
            return (item[0],)
        return tuple(name for value in item for name in _tensor_sources(value))
    return ()


@dataclass
class KerasWeights:
    """The weight-holding layers of one file, in the file's (Keras model) order."""

    path: Path
    file_format: str
    layers: list[KerasLayer]
    input_size: int | None = None
    graph: KerasGraph | None = None  # the architecture, where the file records one


    def names(self) -> set[str]:
        return {layer.name for layer in self.layers}


def read_keras_weights(path: str | Path, *, not_keras: Mapping[str, str] = NOT_KERAS) -> KerasWeights:
    """Read any supported Keras file; raise :class:`CheckpointError` naming the file if it cannot be.

    The file's first bytes say what it is (:func:`~covid_cxr.model_files.file_kind`), so a checkpoint or an
    ONNX model given by mistake is named as such rather than reported as a broken HDF5 file, in the words of
    ``not_keras`` (by kind: a caller whose command takes other files words the advice for it).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a Keras file; name the model file in it ({EXPECTED})")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such Keras file")
    kind = file_kind(path)
    if kind == "zip":
        weights = _read_keras_zip(path, not_keras)
    elif kind in not_keras:
        raise CheckpointError(f"{path}: {not_keras[kind]}")
    else:
        weights = _read_hdf5(path, kind)
    _check_finite(weights)
    return weights


def zip_kind(path: Path) -> str:
    """What a zip file holds: ``keras`` (a .keras model), ``checkpoint`` (ours), ``torch`` (another ``torch.save``),
    ``zip`` (anything else) or ``damaged`` (no readable zip)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return _zip_kind(zf)
    except (zipfile.BadZipFile, zlib.error, EOFError):
        return "damaged"


def _zip_kind(zf: zipfile.ZipFile) -> str:
    names = set(zf.namelist())
    if {"config.json", "model.weights.h5"} <= names:
        return "keras"
    pickles = sorted(n for n in names if n == "data.pkl" or n.endswith("/data.pkl"))  # torch.save's layout
    if not pickles:
        return "zip"
    # The format key is a plain string in the pickle; the tensors lie in other members, so this reads little.
    return "checkpoint" if CHECKPOINT_FORMAT.encode() in zf.read(pickles[0]) else "torch"


def _read_hdf5(path: Path, kind: str) -> KerasWeights:
    """An HDF5 Keras file; one that cannot be opened or read is refused saying which (``kind``: its first bytes)."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        if kind == "hdf5":
            raise CheckpointError(
                f"{path}: {DAMAGED}: an HDF5 file that cannot be opened ({exc}), likely cut short by an interrupted "
                "copy or download; copy it again"
            ) from exc
        raise CheckpointError(f"{path}: not an HDF5 or .keras file ({exc}); {EXPECTED}") from exc
    with f:
        try:
            return _read_h5(f, path)
        except OSError as exc:  # data past the end of a truncated file, a chunk that does not decompress
            raise CheckpointError(f"{path}: {DAMAGED}: its data cannot be read ({exc}); copy it again") from exc


def _check_finite(weights: KerasWeights) -> None:
    """Refuse NaN or infinite weights: they load without complaint, then every probability is NaN and argmax
    calls every image the first class."""
    bad = [(layer.name, count) for layer in weights.layers if (count := _non_finite(layer))]
    if bad:
        (name, count), more = bad[0], len(bad) - 1
        others = f" (and {more} more layer{'s' if more > 1 else ''})" if more else ""
        raise CheckpointError(
            f"{weights.path}: damaged model file: layer {name!r} holds {count} NaN or infinite weight value"
            f"{'s' if count > 1 else ''}{others}; a model with them gives NaN probabilities for every image: use "
            "an intact copy of the file"
        )


def _non_finite(layer: KerasLayer) -> int:
    return sum(int(a.size - np.count_nonzero(np.isfinite(a))) for a in layer.weights.values())


def _read_h5(f: h5py.File, path: Path, config: dict[str, Any] | None = None) -> KerasWeights:
    if "layer_names" in f.attrs:
        return KerasWeights(path, "keras-legacy-weights", _read_legacy(f, path))
    if "model_weights" in f and "layer_names" in f["model_weights"].attrs:
        model_config = f.attrs.get("model_config")
        config = _parse_config(model_config, path, "model_config") if model_config else None
        size, graph = _size_and_graph(config, path, "model_config") if config else (None, None)
        return KerasWeights(path, "keras-legacy-model", _read_legacy(f["model_weights"], path), size, graph)
    if "layers" in f or "vars" in f:
        size, graph = _size_and_graph(config, path, "config.json") if config else (None, None)
        fmt = "keras3-model" if config is not None else "keras3-weights"
        return KerasWeights(path, fmt, _read_keras3(f, path, config), size, graph)
    raise CheckpointError(
        f"{path}: an HDF5 file but not one Keras wrote (no 'layer_names', 'model_weights' or 'layers'); "
        "expected a Keras .h5/.hdf5, .weights.h5 or .keras file"
    )


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _parse_config(raw: Any, path: Path, where: str) -> dict[str, Any]:
    """A model config from its JSON text (``where``: the attribute or member that holds it), or why the file is
    damaged: the text is not JSON, or its JSON is not an object as Keras writes a model."""
    try:
        config = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        raise CheckpointError(f"{path}: {DAMAGED}: its {where} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        found = _JSON_TYPES.get(type(config), "null")
        raise CheckpointError(f"{path}: {DAMAGED}: its {where} is {found} in JSON; Keras writes a model as an object")
    return config


@contextmanager
def _laid_out_as_keras(path: Path, where: str) -> Iterator[None]:
    """A config is JSON from a file, so of any shape: one Keras did not write is a damaged file, not a crash."""
    try:
        yield
    except (AttributeError, TypeError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path}: {DAMAGED}: its {where} is not laid out as Keras writes one ({exc})") from exc


def _size_and_graph(config: dict[str, Any], path: Path, where: str) -> tuple[int | None, KerasGraph]:
    with _laid_out_as_keras(path, where):
        return _input_size(config), model_graph(config)


def _text(value: Any, path: Path, what: str) -> str:
    """A name stored in the file, which must be UTF-8 text (HDF5 looks names up by their UTF-8 bytes)."""
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        text.encode("utf-8")
    except UnicodeError as exc:
        shown = bytes(value) if isinstance(value, bytes) else value  # b'..', not numpy's np.bytes_(b'..')
        raise CheckpointError(f"{path}: {DAMAGED}: {what} {shown!r} is not UTF-8 text") from exc
    return text


def _array(dataset: Any, path: Path, what: str) -> np.ndarray:
    """A weight's numbers; text or records where numbers belong is a damaged file, not a failed float conversion."""
    if not isinstance(dataset, h5py.Dataset):
        raise CheckpointError(f"{path}: {DAMAGED}: {what} is an HDF5 group where an array of weights belongs")
    kind = dataset.dtype.kind
    if kind not in "fiu":
        held = f"text ({dataset.dtype})" if kind in "SUO" else f"{dataset.dtype} data"
        raise CheckpointError(f"{path}: {DAMAGED}: {what} holds {held} where weights are numbers")
    return np.asarray(dataset)


def _read_legacy(group: h5py.Group, path: Path) -> list[KerasLayer]:
    """Legacy layout; a nested model's group holds several layers, told apart by weight-name prefix."""
    layers: dict[str, KerasLayer] = {}
    for layer_name in (_text(n, path, "the layer name") for n in group.attrs["layer_names"]):
        if not isinstance(group.get(layer_name), h5py.Group):
            raise CheckpointError(f"{path}: {DAMAGED}: 'layer_names' lists {layer_name!r}, which has no group here")
        layer_group = group[layer_name]
        for weight_name in (_text(n, path, "the weight name") for n in layer_group.attrs.get("weight_names", [])):
            parts = weight_name.split("/")
            owner = parts[-2] if len(parts) >= 2 else layer_name
            weight = parts[-1].split(":")[0]
            if weight not in KNOWN_WEIGHTS:
                raise CheckpointError(f"{path}: layer {owner!r} has a weight {weight_name!r} of no known kind")
            if weight_name not in layer_group:
                raise CheckpointError(
                    f"{path}: {DAMAGED}: layer {layer_name!r} lists weight {weight_name!r}, which has no array here"
                )
            array = _array(layer_group[weight_name], path, f"weight {weight_name!r}")
            layers.setdefault(owner, KerasLayer(owner, {})).weights[weight] = array
    return list(layers.values())


_SUFFIX = re.compile(r"_\d+$")


def _read_keras3(f: h5py.File, path: Path, config: dict[str, Any] | None) -> list[KerasLayer]:
    """Keras 3 layout: groups named by class with a counter, positional variables."""
    with _laid_out_as_keras(path, "config.json"):
        names_from_config = _config_paths(config) if config else {}
    found: list[tuple[str, KerasLayer]] = []

    def visit(group_path: str, obj: Any) -> None:
        if not (isinstance(obj, h5py.Group) and group_path.endswith("/vars")):
            return
        keys = sorted((k for k in obj if k.isdigit()), key=int)
        arrays = [obj[k] for k in keys if isinstance(obj[k], h5py.Dataset)]
        if not arrays:
            return
        layer_path = group_path[: -len("/vars")]
        cls = _SUFFIX.sub("", layer_path.rsplit("/", 1)[-1])
        order = WEIGHT_ORDER.get(cls)
        if order is None:
            raise CheckpointError(f"{path}: {layer_path} is a {cls!r} layer, which no network here has")
        name = obj.attrs.get("name")
        name = _text(name, path, f"the name of {layer_path}") if name is not None else names_from_config.get(layer_path)
        if name is None:
            raise CheckpointError(
                f"{path}: {layer_path} carries no layer name (older Keras 3); save the model as .keras "
                "(which records names) or as .h5, and import that"
            )
        if len(arrays) > len(order):
            raise CheckpointError(f"{path}: {layer_path} has {len(arrays)} variables; a {cls} has at most {len(order)}")
        weights = {w: _array(a, path, f"{layer_path}/vars/{k}") for w, k, a in zip(order, keys, arrays)}
        found.append((layer_path, KerasLayer(name, weights)))

    f.visititems(visit)
    # visititems walks alphabetically; Keras' counters give the model's order within a class.
    found.sort(key=lambda item: _path_order(item[0]))
    return [layer for _, layer in found]


def _path_order(layer_path: str) -> tuple[tuple[str, int], ...]:
    out = []
    for part in layer_path.split("/"):
        counter = re.search(r"_(\d+)$", part)
        out.append((part[: counter.start()], int(counter.group(1))) if counter else (part, -1))
    return tuple(out)


def snake_case(name: str) -> str:
    """Keras' ``to_snake_case`` for class names (Conv2D -> conv2d)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _config_paths(config: dict[str, Any], prefix: str = "layers") -> dict[str, str]:
    """Map Keras 3 weight paths (``layers/conv2d_3``) to layer names, from a model's config."""
    out: dict[str, str] = {}
    used: dict[str, int] = {}
    for layer in config.get("config", {}).get("layers", []):
        snake = snake_case(layer["class_name"])
        if snake in used:
            used[snake] += 1
            snake = f"{snake}_{used[snake]}"
        else:
            used[snake] = 0
        path = f"{prefix}/{snake}"
        out[path] = layer.get("config", {}).get("name") or layer.get("name", snake)
        if "layers" in layer.get("config", {}):
            out.update(_config_paths(layer, f"{path}/layers"))
    return out


def _input_size(config: dict[str, Any]) -> int | None:
    """Height of the first input layer's shape in a Keras model config, if it states one."""
    for layer in config.get("config", {}).get("layers", []):
        if layer.get("class_name") == "InputLayer":
            cfg = layer.get("config", {})
            shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
            if shape and len(shape) == 4 and isinstance(shape[1], int):
                return int(shape[1])
    return None


def _read_keras_zip(path: Path, not_keras: Mapping[str, str]) -> KerasWeights:
    """A ``.keras`` file; another zip (a covid-cxr checkpoint, a torch file) is refused saying what it is."""
    try:
        with zipfile.ZipFile(path) as zf:
            kind = _zip_kind(zf)
            if kind != "keras":
                raise CheckpointError(f"{path}: {not_keras[kind]}")
            config = _parse_config(zf.read("config.json"), path, "config.json")
            data = zf.read("model.weights.h5")
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise CheckpointError(
            f"{path}: {DAMAGED}: a zip file that cannot be read ({exc}), likely cut short by an interrupted copy or "
            "download; copy it again"
        ) from exc
    try:
        f = h5py.File(io.BytesIO(data), "r")
    except OSError as exc:
        raise CheckpointError(f"{path}: {DAMAGED}: its model.weights.h5 is not an HDF5 file ({exc})") from exc
    with f:
        try:
            return _read_h5(f, path, config)
        except OSError as exc:
            raise CheckpointError(f"{path}: {DAMAGED}: its model.weights.h5 cannot be read ({exc})") from exc
