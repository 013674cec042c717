"""ONNX graph rewrites: each leaves the outputs as they were and removes what it says it removes."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from covid_cxr.deploy.graph import batchnorm_as_depthwise_conv, unshare_pad_constants  # noqa: E402
from covid_cxr.deploy.quantize import prepare_for_int8  # noqa: E402
from covid_cxr.inference.onnx_graph import fold_pads_into_pools  # noqa: E402

SIZE = 15  # odd, so "same" pooling pads one side only, as in Xception


def _model(nodes, inits, out_channels: int = 4):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out_channels, None, None])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (2, 4, SIZE, SIZE)).astype(np.float32)


def _const(value, name):
    return numpy_helper.from_array(np.asarray(value), name)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_minus_inf_pad_merges_into_max_pool_with_identical_output() -> None:
    inits = [_const(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads"), _const(np.float32(-np.inf), "neg_inf")]
    nodes = [
        helper.make_node("Pad", ["x", "pads", "neg_inf"], ["p"], mode="constant", name="pad"),
        helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3, 3], strides=[2, 2], name="pool"),
    ]
    model = _model(nodes, inits)
    x = -np.abs(_x()) - 1.0  # all negative: a zero pad would win the max, a -inf one never does
    before = _run(model, x)
    assert fold_pads_into_pools(model) == 1
    assert _ops(model) == ["MaxPool"] and list(model.graph.node[0].input) == ["x"]
    assert [i.name for i in model.graph.initializer] == []  # the pad's constants went with it
    np.testing.assert_array_equal(_run(model, x), before)


@pytest.mark.parametrize("value, reader", [(0.0, "MaxPool"), (-np.inf, "AveragePool")])
def test_pads_that_are_not_minus_inf_before_a_max_pool_stay(value: float, reader: str) -> None:
    inits = [_const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"), _const(np.float32(value), "fill")]
    nodes = [
        helper.make_node("Pad", ["x", "pads", "fill"], ["p"], mode="constant", name="pad"),
        helper.make_node(reader, ["p"], ["y"], kernel_shape=[3, 3], strides=[2, 2], name="pool"),
    ]
    model = _model(nodes, inits)
    assert fold_pads_into_pools(model) == 0
    assert _ops(model) == ["Pad", reader]


def test_batchnorm_becomes_an_equal_depthwise_conv() -> None:
    rng = np.random.default_rng(1)
    stats = [rng.uniform(0.5, 1.5, 4), rng.normal(0, 0.2, 4), rng.normal(0, 0.5, 4), rng.uniform(0.2, 3, 4)]
    names = ["scale", "bias", "mean", "var"]
    inits = [_const(v.astype(np.float32), n) for v, n in zip(stats, names)]
    nodes = [helper.make_node("BatchNormalization", ["x", *names], ["y"], epsilon=1.001e-5, name="bn")]
    model = _model(nodes, inits)
    x = _x(2)
    before = _run(model, x)
    assert batchnorm_as_depthwise_conv(model) == 1
    (conv,) = model.graph.node
    assert conv.op_type == "Conv" and helper.get_attribute_value(conv.attribute[0]) in (4, [1, 1])
    assert {i.name for i in model.graph.initializer} == {"bn_dw_weight", "bn_dw_bias"}
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-5, atol=1e-5)
    assert np.abs(before).max() > 0.5  # the map is not the identity: equality above means something


def test_shared_pad_constants_get_their_own_copies_and_unfoldable_minus_inf_pads_stay_fp32() -> None:
    inits = [
        _const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
        _const(np.float32(0.0), "zero"),
        _const(np.float32(-np.inf), "neg_inf"),
        _const(np.ones((4, 4, 3, 3), np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Pad", ["x", "pads", "zero"], ["a"], mode="constant", name="pad_a"),
        helper.make_node("Pad", ["a", "pads", "zero"], ["b"], mode="constant", name="pad_b"),
        # a -inf pad read by a convolution: not a pooling pad, cannot merge, and has no 8-bit scale
        helper.make_node("Pad", ["b", "pads", "neg_inf"], ["c"], mode="constant", name="pad_c"),
        helper.make_node("Conv", ["c", "w"], ["y"], name="conv"),
    ]
    model = _model(nodes, inits)
    keep = prepare_for_int8(model)
    assert set(keep) == {"pad_c", "conv"}
    fills = [n.input[2] for n in model.graph.node if n.op_type == "Pad"]
    assert len(set(fills)) == 3
    assert unshare_pad_constants(model) == 0  # already unshared
