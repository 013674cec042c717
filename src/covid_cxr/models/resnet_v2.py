"""ResNet50V2 exactly as ``keras.applications.ResNet50V2(include_top=False)`` defines it.

What differs from the torchvision/timm ResNets and matters for Keras weights: pre-activation
blocks; the stride sits in the LAST block of stages 2-4, whose shortcut is then a 1x1 stride-2
max pool; the stem conv has a bias and is preceded by explicit zero padding (3), and the stem
pool by explicit zero padding (1) (zeros, not -inf: the stem output is not yet activated);
every block's last conv and the shortcut convs have biases; BatchNorm epsilon is 1.001e-5. At
300x300 the output map is 2048 x 10 x 10.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from covid_cxr.models.layers import batch_norm, init_like_keras, keras_layer

BN_EPS = 1.001e-5
STAGES: tuple[tuple[str, int, int, int], ...] = (
    # (Keras stage name, bottleneck filters, blocks, stride of the last block)
    ("conv2", 64, 3, 2),
    ("conv3", 128, 4, 2),
    ("conv4", 256, 6, 2),
    ("conv5", 512, 3, 1),
)


class _PreActBottleneck(nn.Module):
    """Keras ``residual_block_v2``: BN-ReLU pre-activation, 1x1 -> 3x3 (strided) -> 1x1."""

    def __init__(self, name: str, cin: int, filters: int, *, stride: int, conv_shortcut: bool) -> None:
        super().__init__()
        cout = 4 * filters
        self.preact_bn = batch_norm(cin, BN_EPS, f"{name}_preact_bn")
        self.preact_relu = nn.ReLU()
        self.shortcut_conv = (
            keras_layer(nn.Conv2d(cin, cout, 1, stride=stride), f"{name}_0_conv") if conv_shortcut else None
        )
        # Keras: MaxPooling2D(1, strides=stride) on the block input, i.e. subsampling.
        self.shortcut_pool = nn.MaxPool2d(1, stride) if not conv_shortcut and stride > 1 else None
        self.conv1 = keras_layer(nn.Conv2d(cin, filters, 1, bias=False), f"{name}_1_conv")
        self.bn1 = batch_norm(filters, BN_EPS, f"{name}_1_bn")
        self.relu1 = nn.ReLU()
        # Keras: ZeroPadding2D(1) then a valid conv, which is a symmetric zero padding of 1.
        self.conv2 = keras_layer(nn.Conv2d(filters, filters, 3, stride=stride, padding=1, bias=False), f"{name}_2_conv")
        self.bn2 = batch_norm(filters, BN_EPS, f"{name}_2_bn")
        self.relu2 = nn.ReLU()
        self.conv3 = keras_layer(nn.Conv2d(filters, cout, 1), f"{name}_3_conv")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.preact_relu(self.preact_bn(x))
        if self.shortcut_conv is not None:
            shortcut = self.shortcut_conv(preact)
        elif self.shortcut_pool is not None:
            shortcut = self.shortcut_pool(x)
        else:
            shortcut = x
        x = self.relu1(self.bn1(self.conv1(preact)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.conv3(x) + shortcut


class ResNet50V2(nn.Module):
    """The Keras ResNet50V2 backbone without its top: image (N, 3, H, W) -> map (N, 2048, h, w)."""

    out_channels = 2048
    keras_file = "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"

    def __init__(self) -> None:
        super().__init__()
        # ZeroPadding2D(3) + valid 7x7 conv == symmetric padding 3.
        self.conv1_conv = keras_layer(nn.Conv2d(3, 64, 7, stride=2, padding=3), "conv1_conv")
        self.pool1_pad = nn.ZeroPad2d(1)
        self.pool1_pool = nn.MaxPool2d(3, 2)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        cin = 64
        for stage, filters, n_blocks, last_stride in STAGES:
            for i in range(1, n_blocks + 1):
                name = f"{stage}_block{i}"
                stride = last_stride if i == n_blocks else 1
                blocks[name] = _PreActBottleneck(name, cin, filters, stride=stride, conv_shortcut=i == 1)
                cin = 4 * filters
        self.blocks = nn.Sequential(blocks)
        self.post_bn = batch_norm(cin, BN_EPS, "post_bn")
        self.post_relu = nn.ReLU()
        init_like_keras(self)

    @property
    def gradcam_layer(self) -> nn.Module:
        """The module whose output is the final map (post_relu)."""
        return self.post_relu

    @staticmethod
    def feature_size(image_size: int) -> int:
        """Side of the output map for a square input of ``image_size`` (10 at 299 and 300)."""
        size = (image_size + 6 - 7) // 2 + 1  # stem conv
        size = (size + 2 - 3) // 2 + 1  # stem pool
        for _, _, _, stride in STAGES:
            size = (size + 2 - 3) // stride + 1  # the strided 3x3 conv of each stage's last block
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1_pool(self.pool1_pad(self.conv1_conv(x)))
        x = self.blocks(x)
        return self.post_relu(self.post_bn(x))
