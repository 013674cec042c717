"""Keras parity: Keras models with random weights and BatchNorm statistics, saved in every format we
read, imported, and compared with Keras' own outputs (Keras 3, torch backend, eval mode)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_cxr.cli import main as cli_main
from covid_cxr.errors import CheckpointError
from covid_cxr.labels import KERAS_AUTHORS_ORDER
from covid_cxr.models import build_model
from covid_cxr.models.pretrained import load_imagenet_weights
from covid_cxr.runs.checkpoint import load_checkpoint
from covid_cxr.runs.keras_import import import_keras

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("these tests need Keras on its torch backend (KERAS_BACKEND=torch)", allow_module_level=True)
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402  (needs the backend chosen first)

TOL = 1e-4  # max abs difference allowed in fp32 (features, logits and probabilities)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras' numpy-2 chatter


def _randomize(model: keras.Model, rng: np.random.Generator) -> None:
    """Random BatchNorm statistics and affine parameters, and a Dense kernel large enough to matter."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.2, c), rng.uniform(0.5, 1.5, c)]
            )
        elif isinstance(layer, keras.layers.Dense):
            kernel, bias = layer.get_weights()
            layer.set_weights([rng.normal(0, 0.02, kernel.shape), rng.normal(0, 0.1, bias.shape)])


def _with_head(inp: keras.KerasTensor, features: keras.KerasTensor) -> keras.Model:
    """The authors' head; outputs (backbone map, flatten, softmax) so logits can be rebuilt exactly."""
    x = keras.layers.Conv2D(1024, 1)(features)
    flat = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.5)(flat)
    out = keras.layers.Dense(3, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(0.0, 0.001))(x)
    return keras.Model(inp, [features, flat, out])


def _save_keras2_h5(model: keras.Model, path: Path, *, whole: bool) -> Path:
    """Write the legacy HDF5 layout as Keras 2 wrote it (weight names 'layer/kernel:0', 'batch_input_shape')."""
    import h5py

    if whole:
        model.save(path.with_suffix(".k3.h5"))
        shutil.move(path.with_suffix(".k3.h5"), path)
    else:
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)
    with h5py.File(path, "r+") as f:
        root = f["model_weights"] if whole else f
        root.attrs["keras_version"] = "2.3.1"
        root.attrs["backend"] = "tensorflow"
        for name in root.attrs["layer_names"]:
            group = root[name]
            old = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
            for weight in old:
                group.move(weight, weight + ":0")
            if old:
                group.attrs["weight_names"] = [f"{w}:0".encode() for w in old]
        if whole:
            config = f.attrs["model_config"]
            config = config.decode() if isinstance(config, bytes) else config
            f.attrs["model_config"] = _keras2_config(config.replace('"batch_shape"', '"batch_input_shape"'))
    return path


def _keras2_config(config: str) -> str:
    """A Keras 3 model config in Keras 2.3's form: class 'Model', inbound nodes as [[[layer, node, tensor, {}]]];
    a Sequential keeps its class and loses its InputLayer (Keras 2.2/2.3 serialised ``self.layers``, which
    leaves it out), and nested models are converted too."""
    import json

    model = json.loads(config)
    if model["class_name"] == "Sequential":
        model["config"]["layers"] = [layer for layer in model["config"]["layers"] if layer["class_name"] != "InputLayer"]
        for layer in model["config"]["layers"]:
            if layer["class_name"] == "Functional":
                layer.update(json.loads(_keras2_config(json.dumps(layer))))
        return json.dumps(model)
    model["class_name"] = "Model"

    def sources(item: object) -> list[list]:
        if isinstance(item, dict):
            if item.get("class_name") == "__keras_tensor__":
                return [[*item["config"]["keras_history"], {}]]
            return [s for value in item.values() for s in sources(value)]
        return [s for value in item for s in sources(value)] if isinstance(item, list) else []

    for layer in model["config"]["layers"]:
        layer["inbound_nodes"] = [sources(node["args"]) for node in layer["inbound_nodes"]]
    return json.dumps(model)


def _keras_outputs(model: keras.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    features, flat, probs = (keras.ops.convert_to_numpy(t) for t in model(x, training=False))
    dense = model.layers[-1]
    kernel, bias = dense.get_weights()
    return {"features": features, "logits": flat @ kernel + bias, "probs": probs}


def _ours(model: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    inp = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        features = model.forward_features(inp)
        logits = model.forward_head(features)
    return {
        "features": features.permute(0, 2, 3, 1).numpy(),
        "logits": logits.numpy(),
        "probs": logits.softmax(-1).numpy(),
    }


def _assert_parity(
    ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], keys: tuple[str, ...] = ("features", "logits", "probs")
) -> None:
    for key in keys:
        diff = float(np.abs(ours[key] - ref[key]).max())
        assert diff <= TOL, f"{key}: max abs difference {diff:.3g} > {TOL} (scale {np.abs(ref[key]).max():.3g})"


def _concat_model(size: int, *, resnet_first: bool, rng: np.random.Generator) -> tuple[keras.Model, tuple]:
    """The concatenated network with the paper's head and random weights, Xception's map first as the authors' (or
    ResNet50V2's); and its input and the two maps, to build variants on."""
    inp = keras.Input((size, size, 3))
    xcep = keras.applications.Xception(include_top=False, weights=None, input_tensor=inp)
    resn = keras.applications.ResNet50V2(include_top=False, weights=None, input_tensor=inp)
    maps = [resn.output, xcep.output] if resnet_first else [xcep.output, resn.output]
    model = _with_head(inp, keras.layers.concatenate(maps))
    _randomize(model, rng)
    return model, (inp, xcep.output, resn.output)


@pytest.fixture(scope="module")
def concat_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], np.ndarray, dict[str, np.ndarray]]:
    """The authors' concatenated network at 300x300, saved in every format, with Keras' outputs."""
    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("concat")
    model, _ = _concat_model(300, resnet_first=False, rng=rng)
    x = rng.uniform(0, 1, (1, 300, 300, 3)).astype("float32")
    ref = _keras_outputs(model, x)
    files = {
        "keras2.hdf5": _save_keras2_h5(model, folder / "authors.hdf5", whole=True),
        "keras3.h5": folder / "model.h5",
        "keras": folder / "model.keras",
        "weights.h5": folder / "model.weights.h5",
    }
    model.save(files["keras3.h5"])
    model.save(files["keras"])
    model.save_weights(files["weights.h5"])
    return files, x, ref


@pytest.fixture(scope="module")
def concat_imported(concat_files) -> dict[str, torch.Tensor]:
    """The authors' format (Keras 2 .hdf5), imported: the reference the other formats must equal."""
    return import_keras(concat_files[0]["keras2.hdf5"]).model_state


@pytest.mark.slow
def test_concat_parity_authors_format(concat_files, concat_imported) -> None:
    files, x, ref = concat_files
    ckpt = import_keras(files["keras2.hdf5"])  # network, input size and classes inferred
    assert ckpt.network == "concat"
    assert ckpt.classes == KERAS_AUTHORS_ORDER
    assert ckpt.preprocessing.image_size == 300 and ckpt.preprocessing.scaling == "unit"
    assert ckpt.preprocessing.resize == "bilinear"  # the authors' evaluation: cv2.resize's default
    _assert_parity(_ours(ckpt.build_model(), x), ref)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["keras3.h5", "keras", "weights.h5"])
def test_concat_every_format_gives_the_same_weights(concat_files, concat_imported, fmt: str) -> None:
    """Same tensors as the format checked against Keras above, hence the same outputs."""
    files, _, _ = concat_files
    ckpt = import_keras(files[fmt])
    assert (ckpt.network, ckpt.classes, ckpt.preprocessing.image_size) == ("concat", KERAS_AUTHORS_ORDER, 300)
    assert ckpt.model_state.keys() == concat_imported.keys()
    unequal = [k for k, v in ckpt.model_state.items() if not torch.equal(v, concat_imported[k])]
    assert not unequal, unequal[:5]


@pytest.mark.slow
def test_cli_import_keras_writes_a_checkpoint(concat_files, tmp_path: Path) -> None:
    files, x, ref = concat_files
    out = tmp_path / "authors.pt"
    code = cli_main([
        "import-keras", str(files["keras2.hdf5"]), "--network", "concat", "--out", str(out),
        "--classes", "normal", "pneumonia", "covid", "--scaling", "symmetric", "--resize", "nearest",
    ])
    assert code == 0
    ckpt = load_checkpoint(out)  # the file, read back as predict and serve will read it
    assert ckpt.classes == ("normal", "pneumonia", "covid")
    assert ckpt.preprocessing.scaling == "symmetric" and ckpt.preprocessing.resize == "nearest"
    _assert_parity(_ours(ckpt.build_model(), x), ref, keys=("logits",))
    # A wrong network is refused with the fix in the message, and exits 2 (a user error).
    wrong = ["import-keras", str(files["keras2.hdf5"]), "--network", "xception", "--out", str(tmp_path / "x.pt")]
    assert cli_main(wrong) == 2


def test_keras3_paths_map_to_names_from_the_config_alone(concat_files) -> None:
    """Older Keras 3 files carry no layer names in the weights; the .keras config must give the same ones."""
    import io
    import json
    import zipfile

    import h5py

    from covid_cxr.models.keras_reader import _config_paths

    files, _, _ = concat_files
    with zipfile.ZipFile(files["keras"]) as zf:
        mapping = _config_paths(json.loads(zf.read("config.json")))
        data = zf.read("model.weights.h5")
    named: dict[str, str] = {}

    def record(path: str, obj: object) -> None:
        if path.endswith("/vars") and "name" in obj.attrs:
            named[path[: -len("/vars")]] = obj.attrs["name"]

    with h5py.File(io.BytesIO(data), "r") as f:
        f.visititems(record)
    assert len(named) > 300
    assert {p: mapping[p] for p in named} == named


@pytest.fixture(scope="module", params=["xception", "resnet50v2"])
def single_files(request, tmp_path_factory: pytest.TempPathFactory):
    """One backbone at 299x299: its no-top weights in the ImageNet files' layout, and a whole model."""
    name = request.param
    rng = np.random.default_rng(5)
    folder = tmp_path_factory.mktemp(name)
    inp = keras.Input((299, 299, 3))
    app = keras.applications.Xception if name == "xception" else keras.applications.ResNet50V2
    backbone = app(include_top=False, weights=None, input_tensor=inp)
    model = _with_head(inp, backbone.output)
    _randomize(model, rng)
    x = rng.uniform(0, 1, (1, 299, 299, 3)).astype("float32")
    ref = _keras_outputs(model, x)
    notop = _save_keras2_h5(backbone, folder / f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5", whole=False)
    whole = folder / (f"{name}.weights.h5" if name == "xception" else f"{name}.hdf5")
    if name == "xception":
        model.save_weights(whole)
    else:
        _save_keras2_h5(model, whole, whole=True)
    return name, notop, whole, x, ref, backbone.count_params()


@pytest.mark.slow
def test_single_backbone_parity_at_299(single_files) -> None:
    name, _, whole, x, ref, _ = single_files
    ckpt = import_keras(whole, name, image_size=299)
    assert ckpt.network == name
    _assert_parity(_ours(ckpt.build_model(), x), ref)
    if whole.name.endswith(".weights.h5"):
        # Keras 3 versions that wrote no layer names into .weights.h5: refused, pointing to .keras.
        import h5py

        anonymous = shutil.copy(whole, whole.with_name("anonymous.weights.h5"))
        with h5py.File(anonymous, "r+") as f:
            f.visititems(lambda p, o: o.attrs.__delitem__("name") if p.endswith("/vars") and "name" in o.attrs else None)
        with pytest.raises(CheckpointError, match="save the model as .keras"):
            import_keras(anonymous, name, image_size=299)


@pytest.mark.slow
def test_imagenet_layout_loads_into_the_backbone(single_files, tmp_path: Path) -> None:
    name, notop, _, x, ref, _ = single_files
    model = build_model(name, image_size=299).eval()
    load_imagenet_weights(model, weights_file=notop, allow_download=False)
    _assert_parity(_ours(model, x), ref, keys=("features",))
    # A folder holding the official file name works as well.
    model2 = build_model(name, image_size=299).eval()
    load_imagenet_weights(model2, weights_file=notop.parent, allow_download=False)
    backbone1, backbone2 = model.backbones[name].state_dict(), model2.backbones[name].state_dict()
    assert all(torch.equal(backbone1[k], backbone2[k]) for k in backbone1)
    # The file converts to a checkpoint whose head is new.
    ckpt = import_keras(notop, image_size=299)
    assert ckpt.network == name and ckpt.meta["source"]["head"].startswith("initialised")
    assert ckpt.preprocessing.resize == "area"  # backbone weights are trained on by us, with our resize
    # A file missing one layer is refused and leaves the model untouched.
    from covid_cxr.models.keras_import import load_keras_layers
    from covid_cxr.models.keras_reader import read_keras_weights

    fresh = build_model(name, image_size=299)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    layers = read_keras_weights(notop).layers
    with pytest.raises(CheckpointError, match="is missing"):
        load_keras_layers(fresh.backbones[name], layers[:-1], source=str(notop))
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    # A backbone file for the other network is refused, naming the file.
    other = "resnet50v2" if name == "xception" else "xception"
    with pytest.raises(CheckpointError, match=notop.name):
        load_imagenet_weights(build_model(other, image_size=299), weights_file=notop, allow_download=False)
    # concat needs both files: one alone is refused with the missing file's name.
    with pytest.raises(CheckpointError, match=f"{other}_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        load_imagenet_weights(build_model("concat", image_size=299), weights_file=[notop], allow_download=False)


def test_max_pool_same_matches_keras_on_odd_and_even_sizes() -> None:
    from covid_cxr.models.layers import MaxPool2dSame

    rng = np.random.default_rng(0)
    pool = keras.layers.MaxPooling2D(3, strides=2, padding="same")
    for size in (6, 7, 10, 37, 74):
        x = rng.normal(size=(1, size, size + 1, 2)).astype("float32") - 3.0  # negative: padding must not win
        ref = keras.ops.convert_to_numpy(pool(x))
        ours = MaxPool2dSame(3, 2)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        assert ours.shape == ref.shape
        np.testing.assert_array_equal(ours, ref)


def test_keras_parameter_counts_equal_ours(single_files) -> None:
    """Keras' count_params (parameters + BatchNorm statistics) equals ours for the backbone."""
    name, *_, keras_count = single_files
    ours = build_model(name, image_size=299).backbones[name]
    stats = sum(m.running_mean.numel() * 2 for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert keras_count == sum(p.numel() for p in ours.parameters()) + stats


def test_unknown_and_broken_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such Keras file"):
        import_keras(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(CheckpointError, match="junk.h5"):
        import_keras(junk)
    zipped = tmp_path / "x.keras"
    shutil.make_archive(str(tmp_path / "x"), "zip", tmp_path, "junk.h5")
    shutil.move(tmp_path / "x.zip", zipped)
    with pytest.raises(CheckpointError, match="not a Keras .keras file"):
        import_keras(zipped)


@pytest.fixture(scope="module")
def reversed_concat(tmp_path_factory: pytest.TempPathFactory):
    """The concatenated network at 96x96 built ResNet50V2-first (the authors put Xception first), saved
    in the authors' format, as .keras and as weights only; with Keras' outputs and its backbones."""
    rng = np.random.default_rng(7)
    folder = tmp_path_factory.mktemp("reversed")
    model, parts = _concat_model(96, resnet_first=True, rng=rng)
    x = rng.uniform(0, 1, (2, 96, 96, 3)).astype("float32")
    files = {"keras2.hdf5": _save_keras2_h5(model, folder / "reversed.hdf5", whole=True), "keras": folder / "r.keras"}
    model.save(files["keras"])
    model.save_weights(folder / "r.weights.h5")
    files["weights.h5"] = folder / "r.weights.h5"
    return files, x, _keras_outputs(model, x), parts


def test_reversed_concatenation_imports_with_keras_outputs(reversed_concat, tmp_path: Path, capsys) -> None:
    """ResNet50V2-first files import with the head conv's input channels reordered: Keras' probabilities,
    and the record and the printout say what was done."""
    files, x, ref, _ = reversed_concat
    out = tmp_path / "reversed.pt"
    assert cli_main(["import-keras", str(files["keras2.hdf5"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "concatenates resnet50v2, xception" in printed and "reordered" in printed
    ckpt = load_checkpoint(out)
    assert "reordered" in ckpt.meta["source"]["architecture"]
    assert (ckpt.network, ckpt.preprocessing.image_size) == ("concat", 96)
    _assert_parity(_ours(ckpt.build_model(), x), ref, keys=("logits", "probs"))
    # The .keras file (Keras 3's config format) reads the same order and gives the same tensors.
    keras3 = import_keras(files["keras"])
    unequal = [k for k, v in keras3.model_state.items() if not torch.equal(v, ckpt.model_state[k])]
    assert not unequal, unequal[:5]


def test_weights_only_file_says_the_architecture_was_not_checked(reversed_concat) -> None:
    files, *_ = reversed_concat
    ckpt = import_keras(files["weights.h5"])
    assert ckpt.meta["source"]["architecture"].startswith("not checked")
    assert "xception, resnet50v2" in ckpt.meta["source"]["architecture"]  # the order it assumed


def test_a_head_conv_with_an_activation_is_refused(reversed_concat, tmp_path: Path) -> None:
    """A ReLU on the head conv changes every output yet fits every weight's shape: refused, naming the
    file, the layer and what the network has there."""
    *_, (inp, xcep, resn) = reversed_concat
    features = keras.layers.concatenate([xcep, resn])
    conv = keras.layers.Conv2D(1024, 1, activation="relu", name="head_conv")(features)
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(conv))
    path = tmp_path / "relu_head.keras"
    keras.Model(inp, out).save(path)
    with pytest.raises(CheckpointError, match=r"relu_head\.keras: layer 'head_conv' \(Conv2D\) has activation='relu'"):
        import_keras(path)
    # The same head with the ReLU as a layer of its own stands where the network has a Conv2D.
    from covid_cxr.models.keras_import import check_head
    from covid_cxr.models.keras_reader import KerasWeights, model_graph

    act = keras.layers.Activation("relu", name="extra_relu")(keras.layers.Conv2D(1024, 1)(features))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(act)))
    graph = model_graph(keras.saving.serialize_keras_object(model))
    with pytest.raises(CheckpointError, match=r"x\.h5: layer 'extra_relu' \(Activation\) stands where the head has"):
        check_head(KerasWeights(Path("x.h5"), "keras3-model", [], graph=graph), "concat")


# The backbones' architecture: checked layer by layer against keras.applications' own.


def test_backbone_reference_equals_what_keras_builds() -> None:
    """The shipped reference is what the installed Keras builds, and the package installs it."""
    import tomllib

    from benchmarks.keras_reference import build_reference, reference_text
    from covid_cxr.models.keras_architecture import REFERENCE_FILE
    from tests.conftest import REPO

    assert reference_text(build_reference()) == REFERENCE_FILE.read_text(encoding="utf-8")
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert REFERENCE_FILE.relative_to(REPO / "src" / "covid_cxr").as_posix() in package_data["covid_cxr"]


def _whole_model_json(backbone: str, size: int = 71) -> dict:
    """A whole single-backbone model (the paper's head) as Keras writes its config into a file."""
    import json

    inp = keras.Input((size, size, 3))
    app = keras.applications.Xception if backbone == "xception" else keras.applications.ResNet50V2
    return json.loads(_with_head(inp, app(include_top=False, weights=None, input_tensor=inp).output).to_json())


@pytest.fixture(scope="module")
def whole_configs() -> dict[str, dict]:
    return {backbone: _whole_model_json(backbone) for backbone in ("xception", "resnet50v2")}


def _layer(doc: dict, name: str) -> dict:
    return next(layer for layer in doc["config"]["layers"] if layer["name"] == name)


def _sources(layer: dict) -> list[str]:
    from covid_cxr.models.keras_reader import _tensor_sources

    return list(_tensor_sources(layer["inbound_nodes"]))


def _rewire(layer: dict, old: str, new: str) -> None:
    """Make ``layer`` read ``new`` where it read ``old``."""

    def visit(item: object) -> None:
        if isinstance(item, dict):
            if item.get("class_name") == "__keras_tensor__" and item["config"]["keras_history"][0] == old:
                item["config"]["keras_history"][0] = new
            for value in item.values():
                visit(value)
        elif isinstance(item, list):
            for value in item:
                visit(value)

    visit(layer["inbound_nodes"])


def _stride(doc: dict) -> str:
    _layer(doc, "block1_conv1")["config"]["strides"] = [1, 1]
    return r"layer 'block1_conv1' \(Conv2D\) has strides=\[1, 1\] where Keras' Xception has strides=\[2, 2\]"


def _padding(doc: dict) -> str:
    _layer(doc, "block1_conv2")["config"]["padding"] = "same"
    return r"layer 'block1_conv2' \(Conv2D\) has padding='same' where Keras' Xception has padding='valid'"


def _epsilon(doc: dict) -> str:
    _layer(doc, "post_bn")["config"]["epsilon"] = 1e-3
    return r"layer 'post_bn' \(BatchNormalization\) has epsilon=0.001 where Keras' ResNet50V2 has epsilon=1.001e-05"


def _relu_removed(doc: dict) -> str:
    doc["config"]["layers"].remove(_layer(doc, "conv2_block1_1_relu"))
    _rewire(_layer(doc, "conv2_block1_2_pad"), "conv2_block1_1_relu", "conv2_block1_1_bn")
    return r"the model config has no layer 'conv2_block1_1_relu' \(Activation reading \['conv2_block1_1_bn'\]\)"


def _skip_moved(doc: dict) -> str:
    """Block 7's residual Add reads block 5's output instead of block 6's (the same shape: Keras builds it)."""
    add = next(layer for layer in doc["config"]["layers"] if "block7_sepconv3_bn" in _sources(layer))
    previous = _sources(add)[1]
    earlier = _sources(_layer(doc, previous))[1]
    _rewire(add, previous, earlier)
    return (rf"layer '{add['name']}' \(Add\) reads \['block7_sepconv3_bn', '{earlier}'\] "
            rf"where Keras' Xception reads \['block7_sepconv3_bn', '{previous}'\]")  # fmt: skip


@pytest.mark.parametrize(
    ("backbone", "modify", "fmt"),
    [("xception", _stride, "hdf5"), ("xception", _padding, "keras"), ("resnet50v2", _epsilon, "hdf5"),
     ("resnet50v2", _relu_removed, "keras"), ("xception", _skip_moved, "hdf5")],
    ids=["stride", "padding", "bn-epsilon", "relu-removed", "skip-moved"],
)  # fmt: skip
def test_a_backbone_unlike_keras_own_is_refused(whole_configs, backbone, modify, fmt: str, tmp_path: Path) -> None:
    """A change that fits every weight's shape yet changes every output: the Keras model is built and saved
    (the authors' format or .keras), and the import refuses it naming the file, the layer and the setting."""
    import copy
    import json

    doc = copy.deepcopy(whole_configs[backbone])
    message = modify(doc)
    for layer in doc["config"]["layers"]:
        layer.pop("build_config", None)  # shapes follow from the changed graph (the Dense's input differs)
    model = keras.models.model_from_json(json.dumps(doc))  # Keras itself builds the changed model
    path = tmp_path / f"changed.{fmt}"
    if fmt == "hdf5":
        _save_keras2_h5(model, path, whole=True)
    else:
        model.save(path)
    with pytest.raises(CheckpointError, match=rf"changed\.{fmt}: {message}.*only Keras' own backbones import"):
        import_keras(path, backbone)


def test_every_keras_version_writes_a_backbone_that_passes(whole_configs) -> None:
    """Keras 2's node format, tf.keras' BatchNorm axis ([3]) and Keras 2.3's Conv2D (no 'groups' setting) all
    describe Keras' own Xception; so does Keras 3's (the parity tests import those files)."""
    import json

    from covid_cxr.models.keras_architecture import backbone_difference
    from covid_cxr.models.keras_reader import model_graph

    doc = json.loads(_keras2_config(json.dumps(whole_configs["xception"])))
    for layer in doc["config"]["layers"]:
        if layer["class_name"] == "BatchNormalization":
            layer["config"]["axis"] = [3]
        layer["config"].pop("groups", None)
    assert backbone_difference(model_graph(doc), "xception") is None
    # A setting no Keras version leaves out is refused when missing, not taken for Keras' value.
    del _layer(doc, "block2_pool")["config"]["strides"]
    assert backbone_difference(model_graph(doc), "xception") == (
        "layer 'block2_pool' (MaxPooling2D) records no strides where Keras' Xception has strides=[2, 2]"
    )


def test_a_nested_backbone_model_is_checked_inside(tmp_path: Path) -> None:
    """A backbone called as a model of its own (its layers nested in the file's config) is compared inside;
    preprocessing layers in front of it change its input and are refused."""
    import json

    from covid_cxr.models.keras_architecture import check_backbones
    from covid_cxr.models.keras_import import check_head
    from covid_cxr.models.keras_reader import KerasWeights, model_graph

    def weights_of(model: keras.Model) -> KerasWeights:
        graph = model_graph(json.loads(model.to_json()))
        return KerasWeights(tmp_path / "nested.keras", "keras3-model", [], graph=graph)

    inp = keras.Input((71, 71, 3))
    base = keras.applications.ResNet50V2(include_top=False, weights=None, input_shape=(71, 71, 3))
    nested = weights_of(_with_head(inp, base(inp)))
    assert check_backbones(nested, ["resnet50v2"]) and check_head(nested, "resnet50v2") is not None
    rescaled = weights_of(_with_head(inp, base(keras.layers.Rescaling(1 / 255)(inp))))
    refused = r"nested\.keras: layer 'resnet50v2' \(Functional\), Keras' ResNet50V2, reads \['rescaling(_\d+)?'\] where"
    with pytest.raises(CheckpointError, match=refused + " the network feeds it the model's input"):
        check_backbones(rescaled, ["resnet50v2"])


def test_a_keras2_sequential_file_without_an_input_layer_imports(tmp_path: Path) -> None:
    """Keras 2.2/2.3 wrote a Sequential model's config without its InputLayer: the nested backbone, its first
    layer, reads nothing named, and is the model's input all the same (refused by the first backbone check)."""
    import json

    import h5py

    base = keras.applications.Xception(weights=None, include_top=False, input_shape=(71, 71, 3))
    model = keras.Sequential([keras.Input((71, 71, 3)), base, keras.layers.Conv2D(1024, 1), keras.layers.Flatten(),
                              keras.layers.Dropout(0.5), keras.layers.Dense(3, activation="softmax")])
    path = _save_keras2_h5(model, tmp_path / "sequential.hdf5", whole=True)
    with h5py.File(path) as f:
        doc = json.loads(f.attrs["model_config"])
    assert doc["class_name"] == "Sequential"
    assert [layer["class_name"] for layer in doc["config"]["layers"]] == ["Model", "Conv2D", "Flatten", "Dropout",
                                                                          "Dense"]
    ckpt = import_keras(path)
    assert ckpt.meta["source"]["architecture"].startswith("checked: ")
    x = np.random.default_rng(0).random((2, 71, 71, 3), dtype=np.float32)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    assert float(np.abs(_ours(ckpt.build_model().eval(), x)["probs"] - expected).max()) <= TOL


def test_a_backbone_file_with_a_model_config_is_checked_too(tmp_path: Path) -> None:
    """Backbone weights saved as a Keras model (no head) record their architecture: checked before import."""
    import json

    backbone = keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3))
    backbone.save(tmp_path / "xception.keras")
    ckpt = import_keras(tmp_path / "xception.keras")
    assert ckpt.meta["source"]["architecture"].startswith("checked: ")
    assert ckpt.meta["source"]["head"].startswith("initialised")
    doc = json.loads(backbone.to_json())
    _layer(doc, "block14_sepconv2_act")["config"]["activation"] = "linear"  # the last ReLU dropped
    keras.models.model_from_json(json.dumps(doc)).save(tmp_path / "changed.keras")
    with pytest.raises(CheckpointError, match=r"changed\.keras: layer 'block14_sepconv2_act' \(Activation\) has "
                                              r"activation='linear' where Keras' Xception has activation='relu'"):
        import_keras(tmp_path / "changed.keras")
    # The same file given as ImageNet weights for training (--weights-file) is checked too, before any weight loads.
    model = build_model("xception", image_size=71)
    before = [t.clone() for t in model.state_dict().values()]
    with pytest.raises(CheckpointError, match=r"changed\.keras: layer 'block14_sepconv2_act'"):
        load_imagenet_weights(model, weights_file=tmp_path / "changed.keras", allow_download=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values(), strict=True))
    load_imagenet_weights(model, weights_file=tmp_path / "xception.keras", allow_download=False)
