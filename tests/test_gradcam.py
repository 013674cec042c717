"""Grad-CAM: the maps are Grad-CAM of the map the head reads, for the class asked; overlays show them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from covid_cxr.checkpoint import load_checkpoint
from covid_cxr.errors import ConfigError
from covid_cxr.gradcam import COMBINED, GradCam, overlay
from covid_cxr.preprocess import to_model_input
from covid_cxr.synth import render_chest
from tests.test_server import tiny_checkpoint

SIZE = 71


@pytest.fixture(scope="module")
def concat(tmp_path_factory):
    ckpt = load_checkpoint(tiny_checkpoint(tmp_path_factory.mktemp("cam") / "concat.pt", "concat", size=SIZE))
    return ckpt.build_model(), ckpt


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([render_chest(rng, SIZE, label).image for label in ("pneumonia", "normal")])


def reference_cams(model, x: torch.Tensor, target: int, parts: dict[str, slice]) -> dict[str, np.ndarray]:
    """Grad-CAM written out from the definition, on channel ranges of the concatenated map the head reads."""
    features = model.forward_features(x).detach().requires_grad_(True)
    score = model.forward_head(features)[:, target].sum()
    (grad,) = torch.autograd.grad(score, features)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    out = {}
    for name, channels in parts.items():
        raw = (weights[:, channels] * features.detach()[:, channels]).sum(dim=1, keepdim=True).relu()
        up = F.interpolate(raw, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
        peak = up.amax(dim=(1, 2), keepdim=True)
        out[name] = torch.where(peak > 0, up / peak.clamp_min(1e-12), torch.zeros_like(up)).numpy()
    return out


def test_combined_map_is_gradcam_on_the_concatenated_map(concat, images):
    model, ckpt = concat
    cam = GradCam(model, ckpt.preprocessing, ckpt.classes)
    results = cam(images, "pneumonia")
    assert set(results[0].maps) == {"xception", "resnet50v2", COMBINED}
    x = to_model_input(torch.from_numpy(images), ckpt.preprocessing)
    target = ckpt.classes.index("pneumonia")
    # Xception's map comes first in the concatenation.
    parts = {COMBINED: slice(None), "xception": slice(0, 2048), "resnet50v2": slice(2048, None)}
    expected = reference_cams(model, x, target, parts)
    for name, ref in expected.items():
        got = np.stack([r.maps[name] for r in results])
        assert got.shape == (2, SIZE, SIZE) and got.min() >= 0 and got.max() <= 1
        np.testing.assert_allclose(got, ref, atol=1e-4, err_msg=name)
    assert not np.allclose(expected["xception"], expected["resnet50v2"], atol=1e-2)  # the combination is not trivial
    np.testing.assert_array_equal(results[0].map, results[0].maps[COMBINED])


def test_target_choice(concat, images):
    model, ckpt = concat
    cam = GradCam(model, ckpt.preprocessing, ckpt.classes)
    with torch.no_grad():
        logits = model(to_model_input(torch.from_numpy(images), ckpt.preprocessing))
    default = cam(images)
    assert [r.target for r in default] == logits.argmax(1).tolist()
    np.testing.assert_allclose(np.stack([r.probabilities for r in default]), logits.softmax(1).numpy(), atol=1e-5)
    assert [r.target for r in cam(images, [2, "covid"])] == [2, ckpt.classes.index("covid")]
    assert cam.class_index("No Finding") == ckpt.classes.index("normal")
    # Bad targets are refused before any forward pass.
    with pytest.raises(ValueError, match="unknown class label"):
        cam(images, "flu")
    with pytest.raises(ConfigError, match="class index"):
        cam(images, 3)
    with pytest.raises(ValueError, match="1 targets for 2 images"):
        cam(images, [0])


def test_overlay_leaves_cold_regions_untouched():
    image = np.tile(np.arange(0, 200, 2, dtype=np.uint8), (60, 1))  # (60, 100)
    cam = np.zeros((10, 10), dtype=np.float32)
    cam[:, 8:] = 1.0  # hot on the right fifth
    out = overlay(image, cam)
    assert out.shape == (60, 100, 3) and out.dtype == np.uint8
    left = out[:, :60]
    np.testing.assert_array_equal(left, np.repeat(image[:, :60, None], 3, axis=2))
    right = out[:, -5:].astype(int)
    assert (np.abs(right[..., 0] - right[..., 2]) > 20).all()  # coloured where the map is hot
    with pytest.raises(ValueError, match="grayscale uint8"):
        overlay(image.astype(np.float32), cam)
