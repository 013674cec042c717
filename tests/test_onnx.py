"""ONNX export: metadata that rebuilds the predictor alone, parity with PyTorch fp32, and refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from covid_cxr.atomic import file_sha256
from covid_cxr.cli import main
from covid_cxr.errors import CheckpointError, ConfigError
from covid_cxr.inference.backends import load_model
from covid_cxr.inference.onnx_model import META_PREFIX, OnnxPredictor
from covid_cxr.inference.protocol import predict_in_batches
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.inference.torch_model import TorchPredictor
from covid_cxr.labels import KERAS_AUTHORS_ORDER
from covid_cxr.runs.checkpoint import load_checkpoint
from tests.test_server import tiny_checkpoint

pytestmark = pytest.mark.slow  # one torch.export-based export, shared by the module

SIZE = 75  # odd sizes exercise the TensorFlow "same" padding that broke the TorchScript exporter


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One checkpoint (non-canonical class order, 'unit' scaling) exported once through the CLI."""
    folder = tmp_path_factory.mktemp("onnx")
    ckpt = tiny_checkpoint(folder / "tiny.pt", "xception", size=SIZE, classes=KERAS_AUTHORS_ORDER, scaling="unit")
    out = folder / "tiny.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out), "--dynamic-batch"]) == 0
    return ckpt, out


def test_metadata_rebuilds_classes_and_preprocessing(exported):
    ckpt_path, onnx_path = exported
    ckpt = load_checkpoint(ckpt_path)
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(meta[META_PREFIX + "classes"]) == list(KERAS_AUTHORS_ORDER)
    assert json.loads(meta[META_PREFIX + "preprocessing"]) == {"image_size": SIZE, "scaling": "unit", "channels": 3,
                                                                  "resize": "area"}
    assert meta[META_PREFIX + "network"] == "xception"
    assert meta[META_PREFIX + "source_sha256"] == file_sha256(ckpt_path)
    predictor = OnnxPredictor(onnx_path)
    assert predictor.classes == ckpt.classes == KERAS_AUTHORS_ORDER
    assert predictor.preprocessing == ckpt.preprocessing
    assert predictor.backend == "onnx" and predictor.network == "xception"


def test_compile_is_refused_for_onnx(exported):
    _, onnx_path = exported
    with pytest.raises(ConfigError, match="--compile applies to a PyTorch checkpoint"):
        load_model(onnx_path, compile=True)


def test_keras_max_pool_pads_are_folded_into_the_pools(exported):
    """Xception's -inf "same" pads are MaxPool pads in the export (the parity test below shows same numbers)."""
    _, onnx_path = exported
    nodes = onnx.load(str(onnx_path)).graph.node
    assert not [n for n in nodes if n.op_type == "Pad"]
    pools = [n for n in nodes if n.op_type == "MaxPool"]
    padded = [n for n in pools if any(a.name == "pads" and any(a.ints) for a in n.attribute)]
    assert len(pools) == 4 and padded  # Xception's four stride-2 pools; at 75 px some need no padding


def test_parity_with_pytorch_fp32(exported):
    ckpt_path, onnx_path = exported
    torch_pred = TorchPredictor(load_checkpoint(ckpt_path), device="cpu", precision="fp32")
    onnx_pred = OnnxPredictor(onnx_path)
    images = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE), dtype=np.uint8)
    p_torch = torch_pred.predict_proba(images)
    p_onnx = predict_in_batches(onnx_pred, images, batch_size=3)  # batches of 3 and 2: the batch axis is dynamic
    assert p_torch.std() > 0.01  # the outputs differ between images, so parity means something
    assert np.abs(p_torch - p_onnx).max() < 1e-4
    assert (p_torch.argmax(1) == p_onnx.argmax(1)).all()


def test_predict_through_both_backends_agrees(exported, tmp_path):
    ckpt_path, onnx_path = exported
    import cv2

    rng = np.random.default_rng(1)
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), rng.integers(0, 256, (100 + i, 90), dtype=np.uint8))
    out_t, out_o = tmp_path / "torch.json", tmp_path / "onnx.json"
    assert main(["predict", str(ckpt_path), str(tmp_path), "--out", str(out_t), "--precision", "fp32",
                 "--device", "cpu", "--backend", "torch"]) == 0
    assert main(["predict", str(onnx_path), str(tmp_path), "--out", str(out_o)]) == 0
    rows_t = json.loads(out_t.read_text())["predictions"]
    rows_o = json.loads(out_o.read_text())["predictions"]
    assert [r["path"] for r in rows_t] == [r["path"] for r in rows_o] and len(rows_t) == 3
    for a, b in zip(rows_t, rows_o):
        assert a["class"] == b["class"]
        assert max(abs(a[f"p_{c}"] - b[f"p_{c}"]) for c in KERAS_AUTHORS_ORDER) < 1e-4


def test_refusals(exported, tmp_path, capsys):
    ckpt_path, onnx_path = exported
    assert main(["export", str(ckpt_path), "--out", str(tmp_path / "x.onnx"), "--opset", "9"]) == 2
    assert "--opset must be between 18" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ConfigError, match="backend onnx"):
        load_model(onnx_path, InferenceSettings(backend="torch"))
    plain = onnx.load(str(onnx_path))
    del plain.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(plain, str(foreign))
    with pytest.raises(CheckpointError, match="not an ONNX model exported by covid-cxr"):
        OnnxPredictor(foreign)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a loadable ONNX model"):
        OnnxPredictor(junk)


def test_static_batch_export_still_predicts_batches(exported, tmp_path):
    ckpt_path, _ = exported
    out = tmp_path / "static.onnx"
    assert main(["export", str(ckpt_path), "--out", str(out)]) == 0  # the CLI's default: batch axis fixed to 1
    static = OnnxPredictor(out)
    assert static.fixed_batch == 1
    images = np.random.default_rng(2).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)
    expected = TorchPredictor(load_checkpoint(ckpt_path), device="cpu", precision="fp32").predict_proba(images)
    assert np.abs(static.predict_proba(images) - expected).max() < 1e-4
