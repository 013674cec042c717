"""torch.compile in the predictor: same probabilities as eager, one compilation whatever the batch sizes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from covid_cxr.choices import COMPILE_MIN_IMAGES
from covid_cxr.inference.backends import load_model
from covid_cxr.inference.protocol import predict_in_batches
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.inference.torch_model import TorchPredictor, should_compile
from covid_cxr.runs.checkpoint import load_checkpoint
from tests.test_server import tiny_checkpoint

pytestmark = pytest.mark.slow  # one inductor compilation of a small Xception (~1 min on 2 cores)

SIZE = 71


def test_should_compile() -> None:
    assert should_compile("on", 1) and not should_compile("off", 10**6)
    assert should_compile("auto", COMPILE_MIN_IMAGES) and not should_compile("auto", COMPILE_MIN_IMAGES - 1)
    with pytest.raises(ValueError, match="auto, on, off"):
        should_compile("yes", 10)


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler (inductor builds its kernels); install g++",
)
def test_compiled_predictor_matches_eager_and_compiles_once(tmp_path) -> None:
    from torch._dynamo.utils import counters

    path = tiny_checkpoint(tmp_path / "tiny.pt", "xception", size=SIZE)
    eager = TorchPredictor(load_checkpoint(path), device="cpu", precision="fp32")
    torch._dynamo.reset()
    counters.clear()
    fp32_cpu = InferenceSettings(device="cpu", precision="fp32")
    loaded = load_model(path, fp32_cpu, compile=True)  # as predict/serve --compile open it
    compiled = loaded.predictor
    compiled.warm_up(5)  # compiles here, for batches of 5
    assert "compile=on" in loaded.describe()
    images = np.random.default_rng(0).integers(0, 256, (12, SIZE, SIZE), dtype=np.uint8)
    # batches of 5, 5 and 2: the last is padded to the compiled 5; then one call of 12 is split into 5+5+2
    p_batched = predict_in_batches(compiled, images, batch_size=5)
    p_whole = compiled.predict_proba(images)
    p_eager = eager.predict_proba(images)
    assert compiled.compiled, "compilation fell back to eager mode"
    assert compiled.describe().endswith("compile=on") and eager.describe().endswith("compile=off")
    assert counters["stats"]["unique_graphs"] == 1  # no recompilation for the other batch sizes
    assert p_eager.std() > 0.01  # outputs differ between images, so the comparison means something
    np.testing.assert_allclose(p_batched, p_eager, atol=1e-4)
    np.testing.assert_allclose(p_whole, p_eager, atol=1e-4)
