"""``import-keras`` on files that are damaged, are no Keras model, or would be destroyed by ``--out``: each is
refused in one line naming the file (or ``--out``) and what is wrong, exit status 2, nothing written.

Keras itself is not needed: the files are written in the legacy HDF5 layout with h5py, mostly with only the
layers a check looks at (Xception's ``block1_conv1`` tells the network, one Dense layer the head).
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from covid_cxr.cli import main as cli_main
from covid_cxr.errors import CheckpointError
from covid_cxr.labels import CLASSES
from covid_cxr.models.keras_import import _head_shape
from covid_cxr.models.keras_reader import KerasLayer, KerasWeights, read_keras_weights
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

ERROR = "covid-cxr import-keras: error: "
Layers = list[tuple[str, dict[str, np.ndarray]]]


def _write_legacy(path: Path, layers: Layers, *, config: str | None = None) -> Path:
    """A whole model in the legacy layout (the authors' .hdf5): ``model_weights/<layer>/<layer>/<weight>:0``."""
    with h5py.File(path, "w") as f:
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = [name.encode() for name, _ in layers]
        for name, weights in layers:
            layer = group.create_group(name)
            names = [f"{name}/{key}:0" for key in weights]
            layer.attrs["weight_names"] = [n.encode() for n in names]
            for key, n in zip(weights, names, strict=True):
                layer.create_dataset(n, data=np.asarray(weights[key], dtype=np.float32))
        if config is not None:
            f.attrs["model_config"] = config
    return path


def _tiny_layers(outputs: int = 3, side: int = 3) -> Layers:
    """Xception's first conv (which tells the network) and a head Dense reading a ``side``x``side`` map."""
    return [
        ("block1_conv1", {"kernel": np.zeros((3, 3, 3, 32))}),
        ("dense_1", {"kernel": np.zeros((side * side * 1024, outputs)), "bias": np.zeros(outputs)}),
    ]


def _tiny(path: Path, **kwargs: int) -> Path:
    return _write_legacy(path, _tiny_layers(**kwargs))


def _whole_layers(size: int = 71) -> Layers:
    """Every weight of our Xception with the paper's head, in Keras' layouts (as the QA's make_keras.py builds)."""
    from covid_cxr.models import build_model
    from covid_cxr.models.layers import SeparableConv2d

    torch.manual_seed(0)
    layers: Layers = []
    for path, module in build_model("xception", image_size=size).named_modules():
        if not hasattr(module, "keras_name"):
            continue
        name = module.keras_name or f"auto_{path.replace('.', '_')}"
        if isinstance(module, SeparableConv2d):
            weights = {"depthwise_kernel": module.depthwise.weight.permute(2, 3, 0, 1),
                       "pointwise_kernel": module.pointwise.weight.permute(2, 3, 1, 0)}  # fmt: skip
        elif isinstance(module, torch.nn.BatchNorm2d):
            weights = {"gamma": module.weight, "beta": module.bias, "moving_mean": module.running_mean,
                       "moving_variance": module.running_var + 0.5}  # fmt: skip
        elif isinstance(module, torch.nn.Conv2d):
            weights = {"kernel": module.weight.permute(2, 3, 1, 0)}
            if module.bias is not None:
                weights["bias"] = module.bias
        elif isinstance(module, torch.nn.Linear):
            weights = {"kernel": module.weight.T, "bias": module.bias}
        else:
            continue
        layers.append((name, {k: v.detach().numpy() for k, v in weights.items()}))
    return layers


@pytest.fixture(scope="module")
def whole_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole Xception model at 71x71 (no model config), which imports."""
    return _write_legacy(tmp_path_factory.mktemp("whole") / "xception.hdf5", _whole_layers())


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = cli_main(["import-keras", *map(str, args)])
    return code, capsys.readouterr().err


def _refused(code: int, err: str, *fragments: str) -> None:
    """Exit status 2, one line, no traceback, every fragment in it."""
    assert code == 2, err
    assert err.startswith(ERROR) and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# 1. NaN and infinite weights


def test_non_finite_weights_are_refused_naming_the_layer(tmp_path: Path, capsys) -> None:
    layers = _tiny_layers()
    kernel = layers[0][1]["kernel"]
    kernel.flat[:5] = np.nan
    kernel.flat[5:7] = np.inf
    path = _write_legacy(tmp_path / "nan.hdf5", layers)
    with pytest.raises(CheckpointError, match=r"nan\.hdf5: damaged model file: layer 'block1_conv1' holds 7 NaN"):
        read_keras_weights(path)
    code, err = _cli(capsys, path, "--out", tmp_path / "nan.pt")
    _refused(code, err, "nan.hdf5", "damaged", "'block1_conv1'", "7 NaN or infinite")
    assert not (tmp_path / "nan.pt").exists()


def test_a_whole_model_with_nan_statistics_is_refused(whole_file: Path, tmp_path: Path, capsys) -> None:
    """The QA's case: one BatchNorm's statistics NaN in an otherwise good model, which imported and then called
    every image COVID-19 with NaN probabilities."""
    path = Path(shutil.copy(whole_file, tmp_path / "xc_nan.hdf5"))
    with h5py.File(path, "r+") as f:
        f["model_weights/block2_sepconv1_bn/block2_sepconv1_bn/moving_variance:0"][:3] = np.nan
        f["model_weights/block3_sepconv1_bn/block3_sepconv1_bn/gamma:0"][0] = -np.inf
    code, err = _cli(capsys, path, "--out", tmp_path / "x.pt")
    _refused(code, err, "xc_nan.hdf5", "layer 'block2_sepconv1_bn' holds 3 NaN", "(and 1 more layer)")
    assert not (tmp_path / "x.pt").exists()


# 2. --out


def test_an_out_that_is_the_input_is_refused(whole_file: Path, tmp_path: Path, capsys) -> None:
    """Under any name: the model imports, so the checkpoint would have replaced it."""
    path = Path(shutil.copy(whole_file, tmp_path / "same.hdf5"))
    before = path.read_bytes()
    (tmp_path / "link.hdf5").symlink_to(path)
    os.link(path, tmp_path / "hard.hdf5")
    for out in (path, tmp_path / "link.hdf5", tmp_path / "hard.hdf5", tmp_path / "." / "same.hdf5"):
        code, err = _cli(capsys, path, "--out", out)
        _refused(code, err, f"--out {out} is the input file", "--out " + str(tmp_path / "same.pt"))
    assert path.read_bytes() == before


def test_an_out_that_is_no_checkpoint_is_refused(tmp_path: Path, capsys) -> None:
    path = _tiny(tmp_path / "in.hdf5")
    text = tmp_path / "notes.txt"
    text.write_text("results\n")
    keras3 = tmp_path / "model.keras"
    with zipfile.ZipFile(keras3, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("model.weights.h5", b"")
    state = tmp_path / "state.pt"
    torch.save({"weight": torch.zeros(2)}, state)
    outs = {text: "a file of another kind", _tiny(tmp_path / "other.hdf5"): "an HDF5 file",
            keras3: "a Keras .keras model", state: "a PyTorch file of something else"}  # fmt: skip
    for out, what in outs.items():
        before = out.read_bytes()
        code, err = _cli(capsys, path, "--out", out)
        _refused(code, err, f"--out {out} exists and is not a covid-cxr checkpoint ({what}")
        assert out.read_bytes() == before


def test_an_out_that_cannot_be_written_is_refused_before_the_conversion(tmp_path: Path, capsys, monkeypatch) -> None:
    import covid_cxr.runs.keras_import

    def convert(*args: object, **kwargs: object) -> None:
        raise AssertionError("the conversion ran before --out was checked")

    monkeypatch.setattr(covid_cxr.runs.keras_import, "import_keras", convert)
    path = _tiny(tmp_path / "in.hdf5")
    folder = tmp_path / "outdir"
    folder.mkdir()
    code, err = _cli(capsys, path, "--out", folder)
    _refused(code, err, f"--out {folder}: a folder", f"--out {folder / 'model.pt'}")
    assert ".tmp" not in err and list(folder.iterdir()) == []
    text = tmp_path / "file.txt"
    text.write_text("x")
    code, err = _cli(capsys, path, "--out", text / "x.pt")
    _refused(code, err, f"--out {text / 'x.pt'}: {text} is a file, not a folder")
    if os.geteuid() != 0:  # root writes into a read-only folder
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o555)
        code, err = _cli(capsys, path, "--out", locked / "x.pt")
        _refused(code, err, f"--out {locked / 'x.pt'}: cannot write in {locked}")


def test_an_earlier_import_is_replaced(whole_file: Path, tmp_path: Path, capsys) -> None:
    """A checkpoint at --out (an earlier import's), or an empty file, is what --out may overwrite."""
    out = tmp_path / "xception.pt"
    out.touch()
    assert cli_main(["import-keras", str(whole_file), "--out", str(out)]) == 0
    assert cli_main(["import-keras", str(whole_file), "--out", str(out), "--scaling", "symmetric"]) == 0
    assert load_checkpoint(out).preprocessing.scaling == "symmetric"


# 3. Damaged files


def _add_to_names(group: h5py.Group, attr: str, name: bytes) -> None:
    names = [n if isinstance(n, bytes) else n.encode() for n in group.attrs[attr]]
    group.attrs[attr] = np.array([*names, name])  # fixed-length bytes, as Keras 2 wrote them


def _missing_group(f: h5py.File) -> str:
    _add_to_names(f["model_weights"], "layer_names", b"ghost_layer")
    return "'layer_names' lists 'ghost_layer', which has no group"


def _missing_array(f: h5py.File) -> str:
    _add_to_names(f["model_weights/block1_conv1"], "weight_names", b"block1_conv1/bias:0")
    return "layer 'block1_conv1' lists weight 'block1_conv1/bias:0', which has no array"


def _config_list(f: h5py.File) -> str:
    f.attrs["model_config"] = "[1, 2, 3]"
    return "its model_config is an array in JSON"


def _config_bad_json(f: h5py.File) -> str:
    f.attrs["model_config"] = '{"class_name": "Functional", "config": '
    return "its model_config is not valid JSON"


def _config_bad_layers(f: h5py.File) -> str:
    f.attrs["model_config"] = '{"class_name": "Functional", "config": {"layers": [1, 2]}}'
    return "its model_config is not laid out as Keras writes one"


def _name_not_utf8(f: h5py.File) -> str:
    _add_to_names(f["model_weights"], "layer_names", b"blo\xffck")
    return r"the layer name b'blo\xffck' is not UTF-8 text"


def _text_weights(f: h5py.File) -> str:
    name = "model_weights/block1_conv1/block1_conv1/kernel:0"
    del f[name]
    f[name] = np.array([b"ab", b"cd"])
    return "weight 'block1_conv1/kernel:0' holds text (|S2) where weights are numbers"


@pytest.mark.parametrize(
    "damage", [_missing_group, _missing_array, _config_list, _config_bad_json, _config_bad_layers, _name_not_utf8,
               _text_weights],
)  # fmt: skip
def test_a_damaged_file_is_refused_in_one_line(damage, tmp_path: Path, capsys) -> None:
    path = _tiny(tmp_path / "damaged.hdf5")
    with h5py.File(path, "r+") as f:
        problem = damage(f)
    code, err = _cli(capsys, path, "--out", tmp_path / "x.pt")
    _refused(code, err, f"{path}: damaged or not a Keras model file: {problem}")


def test_a_truncated_file_is_refused_as_damaged(tmp_path: Path, capsys) -> None:
    path = _tiny(tmp_path / "cut.hdf5")
    keras3 = tmp_path / "cut.keras"
    with zipfile.ZipFile(keras3, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.write(path, "model.weights.h5")
    for cut in (path, keras3):
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
        code, err = _cli(capsys, cut, "--out", tmp_path / "x.pt")
        _refused(code, err, f"{cut}: damaged or not a Keras model file", "copy it again")


# 4. Files that are no Keras model, and what the model is not


def test_files_that_are_no_keras_model_say_what_they_are(tmp_path: Path, capsys) -> None:
    ours = save_checkpoint(Checkpoint("xception", CLASSES, Preprocessing(image_size=71), {}), tmp_path / "ours.pt")
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX ModelProto's first fields
    empty = tmp_path / "empty.hdf5"
    empty.touch()
    cases = {ours: "already a covid-cxr checkpoint (no import needed)", other: "a PyTorch file (torch.save), not a "
             "Keras model", onnx: "an ONNX model (not Keras)", tmp_path: "a folder, not a Keras file",
             empty: "an empty file (0 bytes)"}  # fmt: skip
    for path, words in cases.items():
        code, err = _cli(capsys, path, "--out", tmp_path / "x.pt")
        _refused(code, err, f"{path}: {words}")


@pytest.mark.parametrize("outputs", [2, 4])
def test_only_three_class_models_import(outputs: int, tmp_path: Path, capsys) -> None:
    path = _tiny(tmp_path / f"classes{outputs}.hdf5", outputs=outputs)
    code, err = _cli(capsys, path, "--out", tmp_path / "x.pt")
    _refused(code, err, f"{path}: only 3-class models (COVID-19, pneumonia, normal", f"has {outputs} outputs")


def test_an_image_size_the_model_does_not_take_names_the_models_own(tmp_path: Path, capsys) -> None:
    path = _tiny(tmp_path / "xc71.hdf5")  # its Dense reads a 3x3 map: 71x71 inputs, among others
    code, err = _cli(capsys, path, "--out", tmp_path / "x.pt", "--image-size", "300")
    _refused(code, err, f"{path}: --image-size 300 does not fit the model, whose inputs are 71x71", "pass 71")
    # Where the model config records the size, that one is named, and a size giving the same map is refused too.
    dense = KerasLayer("dense", {"kernel": np.zeros((10 * 10 * 1024, 3)), "bias": np.zeros(3)})
    weights = KerasWeights(path, "keras-legacy-model", [dense], input_size=300)
    assert _head_shape("xception", weights, path, True, None) == (300, 3)
    assert _head_shape("xception", weights, path, True, 300) == (300, 3)
    for size in (299, 128):
        with pytest.raises(CheckpointError, match=r"inputs are 300x300 \(its model config\).*or pass 300"):
            _head_shape("xception", weights, path, True, size)


def test_kernels_of_the_wrong_rank_are_refused_naming_the_layer() -> None:
    from torch import nn

    from covid_cxr.models.keras_import import load_keras_layers
    from covid_cxr.models.layers import SeparableConv2d, keras_layer

    net = nn.Sequential(SeparableConv2d(2, 4, "sep"), keras_layer(nn.Conv2d(4, 4, 1), "conv"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    good_conv = KerasLayer("conv", {"kernel": np.zeros((1, 1, 4, 4)), "bias": np.zeros(4)})
    cases = {
        # A depthwise kernel flattened to 3 dimensions (a hand-edited or foreign file): once a permute() traceback.
        "has shape (3, 3, 2) where a separable convolution needs 4": {
            "depthwise_kernel": np.zeros((3, 3, 2)), "pointwise_kernel": np.zeros((1, 1, 2, 4))},
        "has shape (2, 4) where a separable convolution needs 4": {
            "depthwise_kernel": np.zeros((3, 3, 2, 1)), "pointwise_kernel": np.zeros((2, 4))},
        "has a depthwise kernel but no pointwise kernel": {"depthwise_kernel": np.zeros((3, 3, 2, 1))},
    }  # fmt: skip
    for words, arrays in cases.items():
        refusal = rf"^model\.h5: weights do not fit the network: layer 'sep' .*{re.escape(words)}"
        with pytest.raises(CheckpointError, match=refusal):
            load_keras_layers(net, [KerasLayer("sep", arrays), good_conv], source="model.h5")
    # A kernel of 3 dimensions where a convolution stands: what it has, not "is a other layer".
    sep = KerasLayer("sep", {"depthwise_kernel": np.zeros((3, 3, 2, 1)), "pointwise_kernel": np.zeros((1, 1, 2, 4))})
    odd = KerasLayer("conv", {"kernel": np.zeros((1, 4, 4)), "bias": np.zeros(4)})
    with pytest.raises(CheckpointError, match=r"layer 'conv' has weights that fit no convolution, dense or BatchNorm "
                       r"layer \(kernel \(1, 4, 4\), bias \(4,\)\); the network has a conv there"):
        load_keras_layers(net, [sep, odd], source="model.h5")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing half-loaded
    load_keras_layers(net, [sep, good_conv], source="model.h5")  # the same layers, well formed, load
