"""int8 quantization: the int8 graph really is int8, cannot saturate, keeps the metadata, and agrees with fp32.

A small convolutional ONNX model is written in the test; the saturation bound is also checked on
the real concatenated network at 71 px (about 30 CPU-seconds to export and quantize).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from covid_cxr.deploy.quantize import META_KEY, quantize_onnx  # noqa: E402
from covid_cxr.deploy.saturation import int8_record_lines  # noqa: E402
from covid_cxr.errors import CheckpointError, ConfigError  # noqa: E402
from covid_cxr.inference.int8 import (  # noqa: E402
    INT16_MAX,
    Int8Form,
    pair_sum_bound,
    saturating_products,
    unsigned_weights,
)
from covid_cxr.inference.onnx_model import FORMAT, META_PREFIX, OnnxPredictor  # noqa: E402
from covid_cxr.labels import CLASSES  # noqa: E402

SIZE = 72


def _tiny_model(path: Path, dense_bias: np.ndarray | None = None) -> Path:
    """Conv-ReLU-(-inf pad, max-pool)-BN-ReLU-Conv-ReLU-pool-Gemm-Softmax with covid-cxr metadata: the real graph in small."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (16, 8, 3, 3)).astype(np.float32)
    wg = rng.normal(0, 1.0, (3, 16)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "b2"),
        numpy_helper.from_array(wg, "wg"),
        numpy_helper.from_array(np.zeros(3, np.float32) if dense_bias is None else dense_bias.astype(np.float32), "bg"),
        numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads"),
        numpy_helper.from_array(np.array(-np.inf, np.float32), "minus_inf"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_scale"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "bn_bias"),
        numpy_helper.from_array(rng.normal(0.5, 0.1, 8).astype(np.float32), "bn_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "bn_var"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        # Keras' "same" max-pool: pad bottom/right with -inf, then pool (no 8-bit scale covers -inf)
        helper.make_node("Pad", ["r1", "pads", "minus_inf"], ["padded"], mode="constant", name="pad"),
        helper.make_node("MaxPool", ["padded"], ["pooled"], kernel_shape=[2, 2], strides=[1, 1], name="maxpool"),
        # ResNet50V2's pre-activation: a BatchNorm that follows no convolution, so no exporter folds it
        helper.make_node("BatchNormalization", ["pooled", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["normed"],
                         epsilon=1.001e-5, name="preact_bn"),
        helper.make_node("Relu", ["normed"], ["preact"], name="preact_relu"),
        helper.make_node("Conv", ["preact", "w2", "b2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gp"], name="pool"),
        helper.make_node("Flatten", ["gp"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["logits"], transB=1, name="dense"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    meta = {
        "format": FORMAT,
        "network": "tiny",
        "classes": json.dumps(list(CLASSES)),
        "preprocessing": json.dumps({"image_size": SIZE, "scaling": "unit", "channels": 3}),
        "version": "test",
        "source_sha256": "",
    }
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _images(n: int, seed: int) -> np.ndarray:
    """Smooth random blobs: images with structure, so the three logits actually differ between images."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = np.empty((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        cy, cx, r, level = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4), rng.uniform(0.3, 1)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r)) * level
        out[i] = np.clip(255 * (blob + rng.normal(0, 0.03, blob.shape)), 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = _tiny_model(tmp_path_factory.mktemp("quant") / "tiny.onnx")
    # Centre the logits on the test images, so that all three classes occur among the predictions.
    logits = np.log(OnnxPredictor(path).predict_proba(_images(64, seed=2)))
    return _tiny_model(path, dense_bias=-logits.mean(0))


@pytest.mark.parametrize("quant_format, int8_op", [("qoperator", "QLinearConv"), ("qdq", "QuantizeLinear")])
def test_int8_model_agrees_with_fp32(tiny: Path, tmp_path: Path, quant_format: str, int8_op: str) -> None:
    out = quantize_onnx(tiny, tmp_path / f"tiny-{quant_format}.onnx", _images(32, seed=1), quant_format=quant_format)
    model = onnx.load(out)
    ops = {node.op_type for node in model.graph.node}
    assert int8_op in ops
    int8_weights = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 4]
    assert int8_weights, "convolution weights should be stored as int8"
    assert "Softmax" in ops  # probabilities stay fp32
    # The -inf pad was merged into the max-pool (whose own pads never win the max), so the pool reads the
    # 8-bit tensor directly; the BatchNorm became a depthwise convolution, so no fp32 island is left.
    assert "Pad" not in ops and "BatchNormalization" not in ops
    (pool,) = [node for node in model.graph.node if node.op_type == "MaxPool"]
    assert helper.get_attribute_value(next(a for a in pool.attribute if a.name == "pads")) == [0, 0, 1, 1]
    if quant_format == "qoperator":
        assert sum(node.op_type == "QLinearConv" for node in model.graph.node) == 3
        assert [node.op_type for node in model.graph.node].count("DequantizeLinear") == 1  # before the softmax

    fp32, int8 = OnnxPredictor(tiny), OnnxPredictor(out)
    assert int8.classes == fp32.classes and int8.preprocessing == fp32.preprocessing
    assert json.loads(int8.metadata["quantization"])["format"] == quant_format
    assert META_KEY.startswith(META_PREFIX)

    test = _images(64, seed=2)  # not the calibration images
    p32, p8 = fp32.predict_proba(test), int8.predict_proba(test)
    assert p8.shape == p32.shape and np.allclose(p8.sum(1), 1.0, atol=1e-4)
    assert len(set(p32.argmax(1))) > 1, "the fixture should produce more than one class"
    assert (p8.argmax(1) == p32.argmax(1)).mean() >= 0.9
    # 0.034 on this fixture whether the BatchNorm runs as an int8 depthwise conv or stays fp32.
    assert np.abs(p8 - p32).mean() < 0.05


def test_refuses_bad_inputs(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="calibration images"):
        quantize_onnx(tiny, tmp_path / "a.onnx", _images(4, seed=0))
    with pytest.raises(ValueError, match="shape"):
        quantize_onnx(tiny, tmp_path / "a.onnx", np.zeros((16, 64, 64), np.uint8))
    with pytest.raises(ConfigError, match="qoperator"):
        quantize_onnx(tiny, tmp_path / "a.onnx", _images(16, seed=0), quant_format="int4")
    with pytest.raises(CheckpointError, match="no such ONNX file"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "a.onnx", _images(16, seed=0))
    not_onnx = tmp_path / "bad.onnx"
    not_onnx.write_bytes(b"this is not a protobuf")
    with pytest.raises(CheckpointError):
        quantize_onnx(not_onnx, tmp_path / "a.onnx", _images(16, seed=0))
    assert not (tmp_path / "a.onnx").exists()


def _residual_model(path: Path, relu: bool) -> Path:
    """An Add whose output feeds a ReLU and a shortcut conv, as Xception's residual sums do; negatives included."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.6, (8, 3, 3, 3)).astype(np.float32), "wa"),
        numpy_helper.from_array(np.full(8, -0.3, np.float32), "ba"),
        numpy_helper.from_array(rng.normal(0, 0.6, (8, 3, 1, 1)).astype(np.float32), "wb"),
        numpy_helper.from_array(rng.normal(0, 0.4, (8, 8, 3, 3)).astype(np.float32), "wr"),
        numpy_helper.from_array(rng.normal(0, 0.2, (8, 8, 1, 1)).astype(np.float32), "ws"),
        numpy_helper.from_array(rng.normal(0, 1.0, (3, 8)).astype(np.float32), "wg"),
        numpy_helper.from_array(np.zeros(3, np.float32), "bg"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "wa", "ba"], ["a"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("Conv", ["image", "wb"], ["b"], strides=[2, 2], name="conv_b"),
        helper.make_node("Add", ["a", "b"], ["s"], name="residual_sum"),
        helper.make_node("Relu" if relu else "Identity", ["s"], ["r"], name="block_relu"),
        helper.make_node("Conv", ["r", "wr"], ["c"], pads=[1, 1, 1, 1], name="conv_r"),
        helper.make_node("Conv", ["s", "ws"], ["t"], name="shortcut"),  # the sum's second reader
        helper.make_node("Add", ["c", "t"], ["u"], name="out_sum"),
        helper.make_node("GlobalAveragePool", ["u"], ["gp"], name="pool"),
        helper.make_node("Flatten", ["gp"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["logits"], transB=1, name="dense"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in {"format": FORMAT, "network": "residual", "classes": json.dumps(list(CLASSES)),
                       "preprocessing": json.dumps({"image_size": SIZE, "scaling": "symmetric", "channels": 3}),
                       "version": "test", "source_sha256": ""}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    onnx.save(model, path)
    return path


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    import torch

    from covid_cxr.preprocess import Preprocessing, to_model_input

    x = to_model_input(torch.from_numpy(images), Preprocessing(SIZE, "symmetric")).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": x})[0]


@pytest.mark.parametrize("quant_format", ["qoperator", "qdq"])
def test_a_relu_sharing_its_input_still_clips_negatives(tmp_path: Path, quant_format: str) -> None:
    """ONNX Runtime's QOperator quantizer used to drop such a ReLU (int8 55% vs fp32 90% on a trained concat)."""
    with_relu = _residual_model(tmp_path / "relu.onnx", relu=True)
    without = _residual_model(tmp_path / "identity.onnx", relu=False)
    out = quantize_onnx(with_relu, tmp_path / "int8.onnx", _images(32, seed=1), quant_format=quant_format)
    test = _images(32, seed=2)
    right, wrong, int8 = _logits(with_relu, test), _logits(without, test), _logits(out, test)
    gap = np.abs(right - wrong).mean()
    assert gap > 0.1  # the ReLU matters on these images, so the comparison below can tell the two apart
    assert np.abs(int8 - right).mean() < 0.2 * gap


def _weight_values(model: onnx.ModelProto) -> list[np.ndarray]:
    """code - zero point of every product's constant weight, in graph order (both formats): the values up to
    their scale, which the uint8 form does not touch."""
    from covid_cxr.inference.int8 import WEIGHT_INPUTS
    from covid_cxr.inference.onnx_graph import graph_constants

    constants = graph_constants(model.graph)
    out = []
    for node in model.graph.node:
        w_at, zp_at = WEIGHT_INPUTS.get(node.op_type, (0, 0))
        if node.op_type not in WEIGHT_INPUTS or node.input[w_at] not in constants:
            continue
        codes = constants[node.input[w_at]].astype(np.int64)
        if codes.ndim < 2:
            continue  # a bias's DequantizeLinear
        zero = constants[node.input[zp_at]].astype(np.int64)
        shape = (-1,) + (1,) * (codes.ndim - 1) if zero.size == codes.shape[0] else (zero.size,)
        out.append(codes - (zero.reshape(shape) if zero.size > 1 else zero.reshape(())))
    return out


@pytest.mark.parametrize("quant_format", ["qoperator", "qdq"])
def test_seven_bit_weights_cannot_saturate(tiny: Path, tmp_path: Path, quant_format: str) -> None:
    """The 7-bit option: every u8 x s8 product, the BatchNorm-as-depthwise conv and the dense layer included, stays
    within int16 even in the int8 form."""
    out = quantize_onnx(tiny, tmp_path / "int8.onnx", _images(16, seed=1), quant_format=quant_format,
                        seven_bit_weights=True)
    model = onnx.load(out)
    products = pair_sum_bound(model)
    assert len(products) == 4  # conv1, the BatchNorm's depthwise conv, conv2, the dense layer
    assert {p.activation_max for p in products} == {255}  # activations are never assumed narrower than uint8
    assert not saturating_products(model) and max(p.bound for p in products) <= INT16_MAX
    record = json.loads(OnnxPredictor(out).metadata["quantization"])
    assert record["saturation_free"] is True and record["max_int16_pair_sum"] == max(p.bound for p in products)
    assert record["weight_range"] == [-64, 64] and "7-bit" in record["weight_scheme"]
    assert record["uint8_form_without_vnni"] is False


@pytest.mark.parametrize("quant_format", ["qoperator", "qdq"])
def test_8bit_weights_in_their_uint8_form_cannot_saturate_and_hold_the_same_values(
    tiny: Path, tmp_path: Path, quant_format: str
) -> None:
    """The default: full 8-bit weights, whose int8 form saturates without VNNI (2 x 255 x 127 > 32767) and whose
    uint8 form (what such CPUs run) has no product left that can, with every weight value unchanged."""
    out = quantize_onnx(tiny, tmp_path / "int8.onnx", _images(16, seed=1), quant_format=quant_format)
    model = onnx.load(out)
    over = saturating_products(model)
    assert len(over) == 4 and max(p.weight_max for p in over) == 127 and max(p.bound for p in over) == 2 * 255 * 127
    record = json.loads(OnnxPredictor(out).metadata["quantization"])
    assert record["saturation_free"] is False and record["weight_range"] == [-127, 127]
    assert "full 8-bit range; run as uint8 (zero point 128)" in record["weight_scheme"]
    assert record["uint8_form_without_vnni"] is True
    before = _weight_values(model)
    assert unsigned_weights(model) == 4
    assert saturating_products(model) == [] and all(p.unsigned for p in pair_sum_bound(model))
    after = _weight_values(model)
    assert len(after) == len(before) == 4 and all(np.array_equal(a, b) for a, b in zip(before, after))
    onnx.checker.check_model(model)


def _saturating_conv(path: Path, signed: bool) -> tuple[Path, np.ndarray, int, int]:
    """One 1x1 QLinearConv of 60 channels whose every pair sum is 2 x 255 x 127 = 64770: the int8 or uint8 form.

    Returns the file, the input, and the exact output code and the one vpmaddubsw's saturated sums give.
    """
    k, side, y_scale = 60, 4, 16384.0
    x = np.full((1, k, side, side), 255, np.uint8)
    codes = np.full((1, k, 1, 1), 127, np.int8)
    w, w_zero = (codes, np.zeros(1, np.int8)) if signed else ((codes.astype(np.int16) + 128).astype(np.uint8),
                                                             np.full(1, 128, np.uint8))
    inits = [numpy_helper.from_array(v, n) for v, n in (
        (np.array(1.0, np.float32), "x_scale"), (np.array(0, np.uint8), "x_zero"), (w, "w"),
        (np.ones(1, np.float32), "w_scale"), (w_zero, "w_zero"), (np.array(y_scale, np.float32), "y_scale"),
        (np.array(0, np.uint8), "y_zero"))]
    node = helper.make_node("QLinearConv", ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"],
                            ["y"], name="conv")
    graph = helper.make_graph([node], "sat", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 1, side, side])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    exact = round(k * 255 * 127 / y_scale)  # 118.6 -> 119
    saturated = round(k // 2 * INT16_MAX / y_scale)  # 30 clipped pair sums -> 60
    return path, x, exact, saturated


_RUN_CONV = """import sys, numpy as np, onnxruntime as ort
x = np.full((1, 60, 4, 4), 255, np.uint8)
for path in sys.argv[1:]:
    y = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    print(sorted(set(y.ravel().tolist())))
"""


def test_uint8_form_computes_exactly_where_the_int8_form_saturates(tmp_path: Path) -> None:
    """ONNX Runtime on this CPU, and on its AVX2 kernels under QEMU's Zen 2 CPU model where qemu-x86_64 is installed:
    the uint8 form gives the exact sum on both; the int8 form gives it with VNNI and the clipped one on the Zen 2."""
    import platform
    import re
    import shutil
    import subprocess
    import sys

    import onnxruntime as ort

    signed, x, exact, saturated = _saturating_conv(tmp_path / "s8.onnx", signed=True)
    unsigned, _, _, _ = _saturating_conv(tmp_path / "u8.onnx", signed=False)
    run = lambda p: set(ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].ravel())  # noqa: E731
    assert run(unsigned) == {exact}
    assert run(signed) <= {exact, saturated}  # exact with VNNI, clipped without: nothing else
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or platform.machine() != "x86_64":
        pytest.skip("qemu-x86_64 (Debian's qemu-user) is not installed, or this is not an x86-64 host: "
                    "the Zen 2 kernels were not run")
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"version (\d+)\.(\d+)", version)
    if found is None or (int(found[1]), int(found[2])) < (7, 2):
        pytest.skip(f"{qemu} is older than QEMU 7.2, which first emulates AVX2: {version.splitlines()[:1]}")
    done = subprocess.run([qemu, "-cpu", "EPYC-Rome", sys.executable, "-c", _RUN_CONV, str(signed), str(unsigned)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == [f"[{saturated}]", f"[{exact}]"], done.stdout


def test_the_predictor_runs_the_uint8_form_where_told(tiny: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Both forms are exact, so the probabilities are the same bits whichever form this CPU's default runs (on a CPU
    without VNNI the default is the uint8 form too: there the comparison checks only the forcing)."""
    out = quantize_onnx(tiny, tmp_path / "int8.onnx", _images(16, seed=1))
    test = _images(16, seed=3)
    default = OnnxPredictor(out)
    monkeypatch.setenv("COVID_CXR_INT8_WEIGHTS", "uint8")
    forced = OnnxPredictor(out)
    assert forced.int8_form == Int8Form(unsigned=4, saturating=0, forced="uint8")
    assert "int8-weights=uint8" in forced.describe()
    assert np.array_equal(forced.predict_proba(test), default.predict_proba(test))
    monkeypatch.setenv("COVID_CXR_INT8_WEIGHTS", "int16")
    with pytest.raises(ConfigError, match="COVID_CXR_INT8_WEIGHTS must be one of auto, uint8, int8"):
        OnnxPredictor(out)


@pytest.mark.parametrize(("flags", "vnni", "unsigned"),
                         [(["avx2", "fma"], False, 4), (["avx2", "avx512_vnni"], True, 0)])
def test_the_predictor_picks_the_form_by_the_cpu(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 flags: list[str], vnni: bool, unsigned: int) -> None:
    """By default an x86 CPU without VNNI gets the uint8 form (and predict/serve say so); one with VNNI, the stored
    form."""
    import io

    import covid_cxr.inference.onnx_model as onnx_model
    from covid_cxr.deploy.saturation import print_int8_record

    cpu = {"machine": "x86_64", "model": "Some CPU", "flags": flags, "vnni": vnni}
    monkeypatch.delenv("COVID_CXR_INT8_WEIGHTS", raising=False)
    monkeypatch.setattr(onnx_model, "cpu_features", lambda: cpu)  # what the predictor reads the CPU with
    out = quantize_onnx(tiny, tmp_path / "int8.onnx", _images(16, seed=1))
    predictor = OnnxPredictor(out)
    assert (predictor.int8_form.unsigned if predictor.int8_form else 0) == unsigned
    printed = io.StringIO()
    print_int8_record(predictor, out, file=printed)
    assert ("int8 weights run here in their uint8 form" in printed.getvalue()) == (unsigned > 0)
    assert "warning" not in printed.getvalue()
    seven = quantize_onnx(tiny, tmp_path / "int8-7bit.onnx", _images(16, seed=1), seven_bit_weights=True)
    assert OnnxPredictor(seven).int8_form is None  # 7-bit weights cannot saturate: nothing to convert anywhere


def test_real_concat_network_in_its_uint8_form_cannot_saturate(tmp_path: Path) -> None:
    """The concatenated Xception + ResNet50V2, exported and quantized as ``export --int8`` does (at 71 px)."""
    from covid_cxr.deploy.onnx import export_onnx
    from covid_cxr.runs.checkpoint import load_checkpoint
    from tests.test_server import tiny_checkpoint

    size = 71
    ckpt = load_checkpoint(tiny_checkpoint(tmp_path / "concat.pt", "concat", size=size))
    fp32 = export_onnx(ckpt, tmp_path / "concat.onnx")
    images = np.random.default_rng(0).integers(0, 256, (8, size, size), dtype=np.uint8)
    model = onnx.load(quantize_onnx(fp32, tmp_path / "concat.int8.onnx", images))
    ops = [n.op_type for n in model.graph.node]
    products = pair_sum_bound(model)
    # Every integer product is seen: the network's convolutions (depthwise ones and former BatchNorms included).
    assert len(products) == sum(op in ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger") for op in ops)
    assert ops.count("QLinearConv") > 100 and "Conv" not in ops and "BatchNormalization" not in ops
    depthwise = [n for n in model.graph.node if n.op_type == "QLinearConv" and
                 next((a.i for a in n.attribute if a.name == "group"), 1) > 1]
    assert depthwise, "Xception's separable convs and the BatchNorms run as depthwise QLinearConv"
    assert saturating_products(model), "full 8-bit weights: the int8 form can saturate without VNNI"
    before = _weight_values(model)
    assert unsigned_weights(model) == len(products)  # every product's weight, none shared
    assert saturating_products(model) == [] and all(p.unsigned for p in pair_sum_bound(model))
    assert all(np.array_equal(a, b) for a, b in zip(before, _weight_values(model), strict=True))


def test_record_names_the_scheme_and_the_form_the_weights_run_in() -> None:
    check = {"images": 300, "source": "validation images", "agreement_pct": 99.3, "accuracy_difference_pp": -0.33}
    vnni_cpu = {"machine": "x86_64", "model": "Xeon", "flags": ["avx2", "avx512_vnni"], "vnni": True}
    avx2_cpu = {"machine": "x86_64", "model": "AMD EPYC 7B12", "flags": ["avx2", "fma"], "vnni": False}
    new = {"format": "qoperator", "weights": "int8 per-channel", "weight_scheme": "int8 per-channel, full 8-bit range",
           "saturation_free": False, "check": check, "checked_on": vnni_cpu}
    old = {"format": "qoperator", "weights": "int8 per-channel", "check": check}

    (line,) = int8_record_lines(new, "m.int8.onnx", None, cpu=vnni_cpu)  # a VNNI CPU: nothing to add
    assert "full 8-bit range" in line and "99.3%" in line and "-0.33 pp" in line and "Xeon (avx2 avx512_vnni)" in line
    line, form = int8_record_lines(new, "m.int8.onnx", Int8Form(unsigned=92, saturating=0), cpu=avx2_cpu)
    assert form.startswith("int8 weights run here in their uint8 form (zero point 128; 92 weight tensors)")
    assert "AMD EPYC 7B12 (avx2 fma)) has no VNNI" in form and "warning" not in form
    unknown = {"machine": "x86_64", "model": "x86_64", "vnni": None}  # no /proc/cpuinfo to read
    assert "may lack VNNI" in int8_record_lines(new, "m", Int8Form(unsigned=92, saturating=0), cpu=unknown)[1]
    line, warning = int8_record_lines(old, "m.int8.onnx", Int8Form(0, 92, forced="int8"), cpu=avx2_cpu)
    assert "checking CPU not recorded" in line
    assert warning.startswith("warning: m.int8.onnx: 92 int8 products can saturate int16 sums here "
                              "(COVID_CXR_INT8_WEIGHTS=int8)") and warning.endswith("unset COVID_CXR_INT8_WEIGHTS")
