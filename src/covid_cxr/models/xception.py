"""Xception exactly as ``keras.applications.Xception(include_top=False)`` defines it.

Layer for layer the Keras model: valid 3x3 stem convs, separable convs with "same" padding,
stride-2 "same" max pools (asymmetric padding), 1x1 stride-2 conv shortcuts with BatchNorm, and
BatchNorm epsilon 1e-3 (Keras' default). Every weight-holding module carries its Keras layer
name (see :mod:`covid_cxr.models.layers`). At 300x300 the output map is 2048 x 10 x 10.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from covid_cxr.models.layers import (
    MaxPool2dSame,
    SeparableConv2d,
    batch_norm,
    init_like_keras,
    keras_layer,
)

BN_EPS = 1e-3


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


class _DownBlock(nn.Module):
    """Blocks 2-4 and 13: two separable convs and a strided pool, plus a strided 1x1 conv shortcut."""

    def __init__(self, name: str, cin: int, mid: int, cout: int, *, relu_first: bool) -> None:
        super().__init__()
        # Keras leaves the shortcut conv and BN unnamed (conv2d, conv2d_1, ...).
        self.residual_conv = keras_layer(nn.Conv2d(cin, cout, 1, stride=2, bias=False), None)
        self.residual_bn = batch_norm(cout, BN_EPS, None)
        # Block 2 follows the stem's ReLU directly; the others start with their own.
        self.sepconv1_act = nn.ReLU() if relu_first else nn.Identity()
        self.sepconv1 = SeparableConv2d(cin, mid, f"{name}_sepconv1")
        self.sepconv1_bn = batch_norm(mid, BN_EPS, f"{name}_sepconv1_bn")
        self.sepconv2_act = nn.ReLU()
        self.sepconv2 = SeparableConv2d(mid, cout, f"{name}_sepconv2")
        self.sepconv2_bn = batch_norm(cout, BN_EPS, f"{name}_sepconv2_bn")
        self.pool = MaxPool2dSame(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.residual_bn(self.residual_conv(x))
        x = self.sepconv1_bn(self.sepconv1(self.sepconv1_act(x)))
        x = self.sepconv2_bn(self.sepconv2(self.sepconv2_act(x)))
        return self.pool(x) + residual


class _MiddleBlock(nn.Module):
    """Blocks 5-12: three ReLU-separable conv-BN steps at 728 channels, identity shortcut."""

    def __init__(self, name: str, channels: int = 728) -> None:
        super().__init__()
        for i in (1, 2, 3):
            self.add_module(f"sepconv{i}_act", nn.ReLU())
            self.add_module(f"sepconv{i}", SeparableConv2d(channels, channels, f"{name}_sepconv{i}"))
            self.add_module(f"sepconv{i}_bn", batch_norm(channels, BN_EPS, f"{name}_sepconv{i}_bn"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.sepconv1_bn(self.sepconv1(self.sepconv1_act(x)))
        x = self.sepconv2_bn(self.sepconv2(self.sepconv2_act(x)))
        x = self.sepconv3_bn(self.sepconv3(self.sepconv3_act(x)))
        return x + residual


class _ExitBlock(nn.Module):
    """Block 14: separable convs to 1536 and 2048 channels, each followed by BN and ReLU."""

    def __init__(self, name: str = "block14") -> None:
        super().__init__()
        self.sepconv1 = SeparableConv2d(1024, 1536, f"{name}_sepconv1")
        self.sepconv1_bn = batch_norm(1536, BN_EPS, f"{name}_sepconv1_bn")
        self.sepconv1_act = nn.ReLU()
        self.sepconv2 = SeparableConv2d(1536, 2048, f"{name}_sepconv2")
        self.sepconv2_bn = batch_norm(2048, BN_EPS, f"{name}_sepconv2_bn")
        self.sepconv2_act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sepconv1_act(self.sepconv1_bn(self.sepconv1(x)))
        return self.sepconv2_act(self.sepconv2_bn(self.sepconv2(x)))


class Xception(nn.Module):
    """The Keras Xception backbone without its top: image (N, 3, H, W) -> map (N, 2048, h, w)."""

    out_channels = 2048
    keras_file = "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"

    def __init__(self) -> None:
        super().__init__()
        self.block1_conv1 = keras_layer(nn.Conv2d(3, 32, 3, stride=2, bias=False), "block1_conv1")
        self.block1_conv1_bn = batch_norm(32, BN_EPS, "block1_conv1_bn")
        self.block1_conv1_act = nn.ReLU()
        self.block1_conv2 = keras_layer(nn.Conv2d(32, 64, 3, bias=False), "block1_conv2")
        self.block1_conv2_bn = batch_norm(64, BN_EPS, "block1_conv2_bn")
        self.block1_conv2_act = nn.ReLU()
        blocks: OrderedDict[str, nn.Module] = OrderedDict(
            block2=_DownBlock("block2", 64, 128, 128, relu_first=False),
            block3=_DownBlock("block3", 128, 256, 256, relu_first=True),
            block4=_DownBlock("block4", 256, 728, 728, relu_first=True),
        )
        for i in range(5, 13):
            blocks[f"block{i}"] = _MiddleBlock(f"block{i}")
        blocks["block13"] = _DownBlock("block13", 728, 728, 1024, relu_first=True)
        blocks["block14"] = _ExitBlock("block14")
        self.blocks = nn.Sequential(blocks)
        init_like_keras(self)

    @property
    def gradcam_layer(self) -> nn.Module:
        """The module whose output is the final map (block14_sepconv2_act)."""
        return self.blocks.block14.sepconv2_act

    @staticmethod
    def feature_size(image_size: int) -> int:
        """Side of the output map for a square input of ``image_size`` (10 at 299 and 300)."""
        size = _conv_out(_conv_out(image_size, 3, 2), 3, 1)
        for _ in range(4):  # blocks 2, 3, 4 and 13 each halve, rounding up ("same")
            size = -(-size // 2)
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1_conv1_act(self.block1_conv1_bn(self.block1_conv1(x)))
        x = self.block1_conv2_act(self.block1_conv2_bn(self.block1_conv2(x)))
        return self.blocks(x)
