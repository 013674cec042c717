"""The networks' structure and behaviour, without Keras: sizes, counts, gradients, modes, precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from covid_cxr.errors import ConfigError
from covid_cxr.labels import CLASSES
from covid_cxr.models import build_model, list_models
from covid_cxr.models.layers import MaxPool2dSame, same_padding
from covid_cxr.networks import MIN_IMAGE_SIZE
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

# Keras' count_params (trainable + BatchNorm moving statistics) for each network with the head.
XCEPTION_NOTOP = 20_861_480
RESNET50V2_NOTOP = 23_564_800
HEAD = {"concat": 4096 * 1024 + 1024 + 102_400 * 3 + 3, "xception": 2048 * 1024 + 1024 + 102_400 * 3 + 3}
HEAD["resnet50v2"] = HEAD["xception"]


def _keras_count(module: nn.Module) -> int:
    params = sum(p.numel() for p in module.parameters())
    return params + sum(m.running_mean.numel() + m.running_var.numel() for m in module.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.fixture(scope="module")
def concat() -> nn.Module:
    return build_model("concat")


def test_parameter_counts_equal_keras(concat) -> None:
    assert _keras_count(concat.backbones["xception"]) == XCEPTION_NOTOP
    assert _keras_count(concat.backbones["resnet50v2"]) == RESNET50V2_NOTOP
    assert concat.keras_param_count() == _keras_count(concat) == 48_928_811
    for name in ("xception", "resnet50v2"):
        notop = XCEPTION_NOTOP if name == "xception" else RESNET50V2_NOTOP
        assert build_model(name).keras_param_count() == notop + HEAD[name]


def test_surface_and_feature_maps(concat) -> None:
    assert list_models() == ["concat", "xception", "resnet50v2"]
    assert (concat.network_name, concat.num_classes, concat.image_size, concat.feature_size) == ("concat", 3, 300, (10, 10))
    assert set(concat.gradcam_layers()) == {"xception", "resnet50v2"}
    # The authors' Dense initialiser, N(0, 0.001), zero bias.
    assert abs(concat.classifier.weight.std().item() - 0.001) < 1e-4 and not concat.classifier.bias.any()
    x = torch.rand(1, 3, 300, 300)
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, k=k: seen.__setitem__(k, out)) for k, m in concat.gradcam_layers().items()]
    concat.eval()
    with torch.no_grad():
        features = concat.forward_features(x)
        logits = concat.forward_head(features)
    for h in hooks:
        h.remove()
    assert features.shape == (1, 4096, 10, 10)
    assert logits.shape == (1, 3)
    # The Grad-CAM layers' outputs are exactly the backbone maps, in concatenation order.
    assert torch.equal(torch.cat([seen["xception"], seen["resnet50v2"]], dim=1), features)
    # Logits, not probabilities: nothing forces them to sum to one.
    assert not torch.allclose(logits.sum(-1), torch.ones(1))


def test_static_feature_size_matches_the_maps(concat) -> None:
    """The head is sized from ``feature_size``; it must equal the real map side at every input size."""
    from covid_cxr.models.concat import BACKBONES

    concat.eval()
    for size in (MIN_IMAGE_SIZE, 96, 299):
        with torch.no_grad():
            xcep = concat.backbones["xception"](torch.rand(1, 3, size, size))
            resn = concat.backbones["resnet50v2"](torch.rand(1, 3, size, size))
        side = BACKBONES["xception"].feature_size(size)
        assert side == BACKBONES["resnet50v2"].feature_size(size)
        assert xcep.shape == resn.shape == (1, 2048, side, side), size
    assert BACKBONES["xception"].feature_size(299) == BACKBONES["xception"].feature_size(300) == 10
    assert build_model("xception", image_size=MIN_IMAGE_SIZE).feature_size == (3, 3)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="concat, xception, resnet50v2"):
        build_model("resnet50")
    with pytest.raises(ConfigError, match=str(MIN_IMAGE_SIZE)):
        build_model("concat", image_size=MIN_IMAGE_SIZE - 1)
    with pytest.raises(ConfigError, match="drop_rate"):
        build_model("xception", drop_rate=1.0)


def test_tf_same_padding_rule() -> None:
    # TensorFlow pads total//2 before and the rest after; 3x3 stride-2 pooling of an even side pads (0, 1).
    assert same_padding(74, 3, 2) == (0, 1)
    assert same_padding(147, 3, 2) == (1, 1)
    assert same_padding(74, 1, 2) == (0, 0) and same_padding(75, 1, 2) == (0, 0)
    assert same_padding(10, 3, 1) == (1, 1)
    # Padding never wins the max, even for all-negative inputs.
    x = -torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    out = MaxPool2dSame(3, 2)(x)
    assert out.shape == (1, 1, 2, 2)
    assert torch.equal(out, torch.tensor([[[[-1.0, -3.0], [-9.0, -11.0]]]]))


def test_gradients_reach_every_parameter() -> None:
    model = build_model("concat", image_size=MIN_IMAGE_SIZE).train()  # smallest input: cheap, same parameters
    logits = model(torch.rand(2, 3, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE))
    nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    assert not dead, f"no gradient reaches {dead[:5]}"


def test_train_and_eval_differ_only_through_batchnorm_and_dropout() -> None:
    torch.manual_seed(0)
    model = build_model("xception", image_size=MIN_IMAGE_SIZE)
    x = torch.rand(2, 3, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE)
    with torch.no_grad():
        reference = model.eval()(x)
        model.train()
        for m in model.modules():  # everything in train mode except BN and Dropout
            if isinstance(m, (nn.BatchNorm2d, nn.Dropout)):
                m.eval()
        assert torch.equal(model(x), reference)
        bn = model.backbones["xception"].block1_conv1_bn
        before = bn.running_mean.clone()
        model.train()
        trained = model(x)
        assert not torch.allclose(trained, reference)
        # Keras' momentum 0.99: the running mean moves 1% of the way to the batch mean.
        stem = model.backbones["xception"].block1_conv1(x)
        expected = 0.99 * before + 0.01 * stem.mean(dim=(0, 2, 3))
        torch.testing.assert_close(bn.running_mean, expected, rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_rebuilds_the_same_network(tmp_path: Path) -> None:
    model = build_model("resnet50v2", image_size=MIN_IMAGE_SIZE).eval()
    ckpt = Checkpoint("resnet50v2", CLASSES, Preprocessing(image_size=MIN_IMAGE_SIZE), model.state_dict())
    again = load_checkpoint(save_checkpoint(ckpt, tmp_path / "r.pt")).build_model()
    assert again.image_size == MIN_IMAGE_SIZE and not again.training
    x = torch.rand(1, 3, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


# Last: it changes the shared model's head and memory format.
def test_bf16_autocast_channels_last_gives_the_fp32_class(concat) -> None:
    """bf16 autocast + channels_last against fp32, concat at 300x300: same class, probabilities within 0.01."""
    torch.manual_seed(1)
    model = concat.eval()
    nn.init.normal_(model.classifier.weight, 0.0, 0.02)  # a trained-like head, so classes are well apart
    x = torch.rand(2, 3, 300, 300)
    with torch.no_grad():
        ref = model(x).softmax(-1)
        model_cl = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model_cl(x.contiguous(memory_format=torch.channels_last)).float().softmax(-1)
    assert torch.equal(low.argmax(-1), ref.argmax(-1))
    assert (low - ref).abs().max().item() <= 0.01  # measured: 0.0012 (logits: 0.004) at 300 px
