"""Class activation maps: HiResCAM (the default for the package's flatten head) or Grad-CAM of the map the head
reads, for the class asked, written out here from their definitions; overlays show them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from covid_cxr.errors import ConfigError
from covid_cxr.gradcam import COMBINED, GradCam, overlay
from covid_cxr.preprocess import to_model_input
from covid_cxr.runs.checkpoint import load_checkpoint
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


PARTS = {COMBINED: slice(None), "xception": slice(0, 2048), "resnet50v2": slice(2048, None)}  # Xception comes first


def reference_cams(model, x: torch.Tensor, target: int, parts: dict[str, slice],
                   method: str = "gradcam") -> dict[str, np.ndarray]:
    """The maps written out from the definitions, on channel ranges of the concatenated map the head reads:
    Grad-CAM weighs channels by the position-averaged gradient, HiResCAM multiplies gradient and activation
    element-wise."""
    features = model.forward_features(x).detach().requires_grad_(True)
    score = model.forward_head(features)[:, target].sum()
    (grad,) = torch.autograd.grad(score, features)
    weights = grad.mean(dim=(2, 3), keepdim=True) if method == "gradcam" else grad
    out = {}
    for name, channels in parts.items():
        raw = (weights[:, channels] * features.detach()[:, channels]).sum(dim=1, keepdim=True).relu()
        up = F.interpolate(raw, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
        peak = up.amax(dim=(1, 2), keepdim=True)
        out[name] = torch.where(peak > 0, up / peak.clamp_min(1e-12), torch.zeros_like(up)).numpy()
    return out


def test_combined_map_is_gradcam_on_the_concatenated_map(concat, images):
    model, ckpt = concat
    cam = GradCam(model, ckpt.preprocessing, ckpt.classes, method="gradcam")
    results = cam(images, "pneumonia")
    assert set(results[0].maps) == {"xception", "resnet50v2", COMBINED}
    assert cam.method == "gradcam" and all(r.method == "gradcam" for r in results)
    x = to_model_input(torch.from_numpy(images), ckpt.preprocessing)
    target = ckpt.classes.index("pneumonia")
    expected = reference_cams(model, x, target, PARTS)
    for name, ref in expected.items():
        got = np.stack([r.maps[name] for r in results])
        assert got.shape == (2, SIZE, SIZE) and got.min() >= 0 and got.max() <= 1
        np.testing.assert_allclose(got, ref, atol=1e-4, err_msg=name)
    assert not np.allclose(expected["xception"], expected["resnet50v2"], atol=1e-2)  # the combination is not trivial
    np.testing.assert_array_equal(results[0].map, results[0].maps[COMBINED])


def test_combined_map_is_hirescam_on_the_concatenated_map(concat, images):
    """The default for the flatten head: HiResCAM, per backbone and on all 4096 channels."""
    model, ckpt = concat
    cam = GradCam(model, ckpt.preprocessing, ckpt.classes)
    assert cam.method == "hirescam"  # "auto": CxrNet flattens
    results = cam(images, "pneumonia")
    assert set(results[0].maps) == {"xception", "resnet50v2", COMBINED}
    assert all(r.method == "hirescam" for r in results)
    x = to_model_input(torch.from_numpy(images), ckpt.preprocessing)
    target = ckpt.classes.index("pneumonia")
    expected = reference_cams(model, x, target, PARTS, method="hirescam")
    for name, ref in expected.items():
        got = np.stack([r.maps[name] for r in results])
        assert got.shape == (2, SIZE, SIZE) and got.min() >= 0 and got.max() <= 1
        np.testing.assert_allclose(got, ref, atol=1e-4, err_msg=name)
    assert not np.allclose(expected["xception"], expected["resnet50v2"], atol=1e-2)
    gradcam = reference_cams(model, x, target, {COMBINED: slice(None)})[COMBINED]
    assert not np.allclose(expected[COMBINED], gradcam, atol=1e-2)  # the methods differ behind this head
    np.testing.assert_array_equal(results[0].map, results[0].maps[COMBINED])


def test_hirescam_splits_the_logit_by_position(concat, images):
    """Why HiResCAM for the flatten head: in eval mode the head is affine in the map it reads, so the
    unrectified map summed over positions is exactly the logit minus the logit of an all-zero map."""
    model, ckpt = concat
    x = to_model_input(torch.from_numpy(images), ckpt.preprocessing)
    target = ckpt.classes.index("pneumonia")
    features = model.forward_features(x).detach().double().requires_grad_(True)
    head = [model.head_conv.double(), model.classifier.double()]
    try:
        logits = model.forward_head(features)[:, target]
        (grad,) = torch.autograd.grad(logits.sum(), features)
        zero = model.forward_head(torch.zeros_like(features))[:, target]
    finally:
        for layer in head:
            layer.float()
    raw = (grad * features).sum(dim=1)  # (N, h, w) before the ReLU
    np.testing.assert_allclose(raw.sum(dim=(1, 2)).detach().numpy(), (logits - zero).detach().numpy(), rtol=1e-9)
    # Grad-CAM's map does not add up to the logit: its weights average other positions' dense weights.
    averaged = (grad.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1)
    assert not np.allclose(averaged.sum(dim=(1, 2)).detach().numpy(), raw.sum(dim=(1, 2)).detach().numpy())


def test_method_choice(concat, images):
    model, ckpt = concat
    cam = GradCam(model, ckpt.preprocessing, ckpt.classes)
    assert cam.with_method("gradcam").method == "gradcam" and cam.with_method("auto").method == "hirescam"
    model.head_pools = True  # a model that declares a pooling head gets Grad-CAM from "auto"
    try:
        assert GradCam(model, ckpt.preprocessing, ckpt.classes).method == "gradcam"
        assert GradCam(model, ckpt.preprocessing, ckpt.classes, "hirescam").method == "hirescam"
    finally:
        del model.head_pools
    with pytest.raises(ConfigError, match="hirescam, gradcam"):
        GradCam(model, ckpt.preprocessing, ckpt.classes, "scorecam")


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
