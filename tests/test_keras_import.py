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
    """A Keras 3 model config in Keras 2.3's form: class 'Model', inbound nodes as [[[layer, node, tensor, {}]]]."""
    import json

    model = json.loads(config)
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
