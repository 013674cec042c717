"""--backend auto: the rule that picks the inference path, and that every path it can pick gives the same numbers.

The rule is tested with the CPU's bf16 capability stood in (so both machine classes are covered on any
CPU); the agreement of the exact fp32 paths (PyTorch, PyTorch with folded BatchNorms, ONNX Runtime) is
tested on the CPU running the suite, with a tolerance far above float32 rounding through this network
(measured differences are ~1e-6) and far below any change of class.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

from covid_cxr import runtime
from covid_cxr.choices import COMPILE_MIN_IMAGES
from covid_cxr.errors import CheckpointError, ConfigError
from covid_cxr.inference import backends
from covid_cxr.inference.backends import choose_backend, load_model, resolve_compile
from covid_cxr.inference.onnx_model import export_onnx_bytes, onnx_providers
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.inference.torch_model import TorchPredictor, fold_batchnorms
from covid_cxr.models import build_model
from covid_cxr.runs.checkpoint import load_checkpoint
from tests.test_server import tiny_checkpoint

SIZE = 71
ON_CPU = InferenceSettings(device="cpu")  # precision auto: what predict/evaluate/serve get with --device cpu
PROB_ATOL = 1e-4  # fp32 paths differ only by the order of float sums: ~1e-6 here, on every CPU


@pytest.fixture
def cpu_kind(monkeypatch):
    """Stand in for the CPU class: ``cpu_kind(True)`` has native bf16, ``cpu_kind(False)`` is fp32-only."""
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)

    def set_kind(native_bf16: bool) -> None:
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)

    return set_kind


def test_auto_runs_bf16_torch_where_native_and_onnx_runtime_on_fp32_cpus(cpu_kind) -> None:
    cpu_kind(True)
    assert choose_backend(device="cpu").backend == "torch"
    assert choose_backend(device="cpu", precision="fp32").backend == "onnx"  # the fastest exact fp32 path
    cpu_kind(False)
    choice = choose_backend(device="cpu")
    assert choice.backend == "onnx" and "fp32" in choice.reason


def test_what_only_pytorch_can_do_keeps_pytorch(cpu_kind, monkeypatch) -> None:
    cpu_kind(False)
    assert choose_backend(device="cpu", compile=True).backend == "torch"
    assert choose_backend(device="cpu", precision="bf16").backend == "torch"
    assert choose_backend("torch", device="cpu").reason == "asked for"
    assert choose_backend("onnx", device="cpu").backend == "onnx"
    monkeypatch.setenv(backends.BACKEND_ENV, "torch")  # the default for --backend, e.g. for a CI job
    assert choose_backend(device="cpu").backend == "torch"
    monkeypatch.setenv(backends.BACKEND_ENV, "tensorflow")
    with pytest.raises(ConfigError, match="auto, torch, onnx"):
        choose_backend(device="cpu")


def test_auto_compiles_only_where_auto_runs_pytorch(cpu_kind) -> None:
    cpu_kind(True)
    assert resolve_compile("auto", COMPILE_MIN_IMAGES, ON_CPU)
    assert not resolve_compile("auto", COMPILE_MIN_IMAGES - 1, ON_CPU)
    cpu_kind(False)
    assert not resolve_compile("auto", COMPILE_MIN_IMAGES, ON_CPU)  # ONNX Runtime needs no compilation
    assert resolve_compile("on", 1, ON_CPU)  # asked for: PyTorch, compiled


def test_a_cpu_capped_to_avx2_is_treated_as_one() -> None:
    """The AVX2 stand-in (oneDNN capped) must not run bf16 in emulation: auto sees no native bf16 there."""
    import subprocess
    import sys

    probe = "from covid_cxr.runtime import cpu_has_native_bf16, choose_runtime; " \
            "print(cpu_has_native_bf16(), choose_runtime('cpu').precision)"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "fp32"]


def _random_batchnorm_statistics(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


@pytest.mark.parametrize("network", ["xception", "resnet50v2"])
def test_folding_batchnorms_keeps_outputs_and_module_tree(network: str) -> None:
    torch.manual_seed(0)
    model = build_model(network, image_size=SIZE).eval()
    _random_batchnorm_statistics(model)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        before = model(x)
        total = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        folded = fold_batchnorms(model)
        after = model(x)
    left = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if network == "xception":  # every Xception BatchNorm follows a convolution
        assert folded == total and not left
    else:  # ResNet50V2's pre-activation BatchNorms follow an addition or the stem's pool: they stay
        assert folded > 0 and left and all(n.endswith(("preact_bn", "post_bn")) for n in left)
    assert model.gradcam_layers()  # the named layers Grad-CAM hooks are still there
    torch.testing.assert_close(after, before, atol=1e-4 * before.abs().max().item(), rtol=1e-4)


def test_folding_refuses_a_training_model() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorms(build_model("xception", image_size=SIZE).train())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("choice") / "tiny.pt", "xception", size=SIZE)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COVID_CXR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_every_exact_path_gives_the_same_probabilities(ckpt, cache, cpu_kind) -> None:
    images = np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE), dtype=np.uint8)
    reference = TorchPredictor(load_checkpoint(ckpt), device="cpu", precision="fp32").predict_proba(images)
    assert reference.std() > 0.01  # outputs vary between images, so agreement means something
    cpu_kind(False)
    auto = load_model(ckpt, ON_CPU)  # what predict/evaluate/serve open on an fp32-only CPU
    assert auto.predictor.backend == "onnx" and "auto: fp32 on CPU" in auto.describe()
    assert "cached as" in auto.describe() and len(list(cache.glob("onnx/*.onnx"))) == 1
    torch_path = load_model(ckpt, InferenceSettings(device="cpu", precision="fp32", backend="torch"))
    assert "bn_folded=" in torch_path.describe()
    for loaded in (auto, torch_path):
        np.testing.assert_allclose(loaded.predictor.predict_proba(images), reference, atol=PROB_ATOL)
    again = load_model(ckpt, ON_CPU)  # a second run opens the cached export instead of exporting again
    assert "cached export" in again.describe()
    np.testing.assert_allclose(again.predictor.predict_proba(images), reference, atol=PROB_ATOL)


def test_grad_cam_works_on_every_path(ckpt, cache, cpu_kind) -> None:
    cpu_kind(False)
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    exact = [InferenceSettings(device="cpu", precision="fp32", backend=b) for b in ("torch", "onnx")]
    maps = [load_model(ckpt, how).gradcam() for how in exact]
    heat = [cam(image[None])[0].map for cam in maps]  # folded network vs the checkpoint's own
    assert heat[0].std() > 0.01
    np.testing.assert_allclose(heat[0], heat[1], atol=1e-3)


def test_onnx_backend_refuses_what_it_cannot_do(ckpt, cache) -> None:
    with pytest.raises(ConfigError, match="torch backend"):
        load_model(ckpt, InferenceSettings(backend="onnx"), compile=True)
    with pytest.raises(ConfigError, match="fp32"):
        load_model(ckpt, InferenceSettings(precision="bf16", backend="onnx"))


def test_the_cache_keeps_the_most_recently_used_exports_within_its_size(ckpt, cache, monkeypatch, cpu_kind) -> None:
    folder = cache / "onnx"
    folder.mkdir(parents=True)
    old = []
    for age, name in enumerate(["oldest", "older", "recent"]):  # three earlier exports, 1 MB each
        path = folder / f"{name}.onnx"
        path.write_bytes(bytes(2**20))
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
        old.append(path)
    (folder / "notes.txt").write_text("not an export")  # only .onnx files are the cache's to evict
    cpu_kind(False)
    size = len(export_onnx_bytes(load_checkpoint(ckpt)))
    # room for the new export (its metadata adds the checkpoint's sha256) and two of the others
    monkeypatch.setattr(backends, "ONNX_CACHE_BYTES", size + 2 * 2**20 + 4096)
    loaded = load_model(ckpt, ON_CPU)
    assert "(1 older export(s) evicted)" in loaded.describe()
    assert [path.exists() for path in old] == [False, True, True] and (folder / "notes.txt").exists()
    new = next(folder.glob("*-*.onnx"))
    os.utime(new, (1_000_000, 1_000_000))  # the new export aged past the others ...
    assert "cached export" in load_model(ckpt, ON_CPU).describe()
    assert new.stat().st_mtime > old[2].stat().st_mtime  # ... and a cache hit made it the most recent again
    assert backends.trim_onnx_cache(folder, keep=old[1], limit=0) == 2  # "keep" stays whatever the limit
    assert [path.name for path in folder.glob("*.onnx")] == ["older.onnx"]


def test_an_unwritable_cache_costs_the_export_not_the_run(ckpt, tmp_path, monkeypatch, cpu_kind) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("COVID_CXR_CACHE", str(blocker))
    cpu_kind(False)
    loaded = load_model(ckpt, ON_CPU)
    assert loaded.predictor.backend == "onnx" and "not cached" in loaded.describe()


GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]  # onnxruntime-gpu's list


def test_device_cpu_asks_onnx_runtime_for_the_cpu_alone(ckpt, cache) -> None:
    assert onnx_providers("cpu", GPU_BUILD) == ["CPUExecutionProvider"]  # even where onnxruntime-gpu is installed
    assert onnx_providers("auto", GPU_BUILD) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("cuda:1", GPU_BUILD) == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        onnx_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="cuda:N"):
        onnx_providers("tpu", GPU_BUILD)
    loaded = load_model(ckpt, InferenceSettings(device="cpu", backend="onnx"))
    assert loaded.predictor.session.get_providers() == ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def onnx_file(ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    path.write_bytes(export_onnx_bytes(load_checkpoint(ckpt)))
    return path


def test_files_that_are_no_model_say_what_they_are(tmp_path) -> None:
    keras = tmp_path / "covid_concat.hdf5"
    with h5py.File(keras, "w") as fh:  # a real HDF5 file, as Keras writes one
        fh.create_dataset("model_weights/dense/kernel", data=np.zeros((4, 3), np.float32))
    with pytest.raises(CheckpointError, match=r"Keras HDF5 model.*import-keras .*covid_concat.hdf5 --out model.pt"):
        load_model(keras)
    empty = tmp_path / "model.onnx"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model.onnx: empty file \(0 bytes\)"):
        load_model(empty)
    legacy = tmp_path / "weights.pt"  # torch.save's pre-zip format: a pickle, no covid-cxr checkpoint
    torch.save({"state": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    text = tmp_path / "notes.pt"
    text.write_text("not weights at all")
    for path in (legacy, text):
        with pytest.raises(CheckpointError, match=f"{path.name}: not a covid-cxr checkpoint") as caught:
            load_model(path)
        assert "Protobuf" not in str(caught.value)


def test_covid_cxr_backend_is_validated_applied_and_named(ckpt, onnx_file, cache, monkeypatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "onxx")
    for path in (ckpt, onnx_file):  # an ONNX file used to skip the variable altogether
        with pytest.raises(ConfigError, match=r"\$COVID_CXR_BACKEND must be one of .*did you mean 'onnx'"):
            load_model(path, ON_CPU)
    monkeypatch.setenv(backends.BACKEND_ENV, "torch")
    with pytest.raises(ConfigError, match=r"\$COVID_CXR_BACKEND=torch asks for PyTorch.*unset COVID_CXR_BACKEND"):
        load_model(onnx_file, ON_CPU)
    with pytest.raises(ConfigError, match=r"--backend torch asks for PyTorch"):
        load_model(onnx_file, InferenceSettings(backend="torch"))
    monkeypatch.setenv(backends.BACKEND_ENV, "onnx")
    with pytest.raises(ConfigError, match=r"\$COVID_CXR_BACKEND=onnx runs in fp32.*unset COVID_CXR_BACKEND") as caught:
        load_model(ckpt, InferenceSettings(precision="bf16"))
    assert "--backend onnx" not in str(caught.value)  # the user never typed it
    loaded = load_model(ckpt, ON_CPU)
    assert loaded.predictor.backend == "onnx" and "asked for by $COVID_CXR_BACKEND" in loaded.describe()
    assert load_model(onnx_file, ON_CPU).predictor.backend == "onnx"
