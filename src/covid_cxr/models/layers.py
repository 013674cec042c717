"""Building blocks with Keras semantics, so Keras weights give Keras outputs.

Two Keras behaviours differ from PyTorch's defaults and matter for imported weights:

* TensorFlow "same" padding pads ``total // 2`` before and the rest after, so an odd total pads
  more on the bottom/right. For a stride-1 3x3 conv the total is always 2 (symmetric, so plain
  ``padding=1``); a 1x1 stride-2 conv never pads. Only the stride-2 "same" max pools need
  :class:`MaxPool2dSame`, which pads with ``-inf`` as TensorFlow does (padding never wins a max).
* Keras BatchNorm moves its statistics as ``0.99 * old + 0.01 * new`` (PyTorch momentum 0.01)
  and uses the epsilon each application sets.

Modules that hold Keras weights carry a ``keras_name`` attribute: the Keras layer name, or
``None`` where Keras names the layer automatically (``conv2d_3``...), so the importer matches
those by kind and shape instead of by name.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

KERAS_BN_MOMENTUM = 0.01
"""PyTorch momentum equal to Keras' default ``momentum=0.99``."""

M = TypeVar("M", bound=nn.Module)


def keras_layer(module: M, name: str | None) -> M:
    """Mark ``module`` as the PyTorch twin of the Keras layer ``name`` (``None``: auto-named in Keras)."""
    module.keras_name = name
    return module


def batch_norm(channels: int, eps: float, name: str | None) -> nn.BatchNorm2d:
    """A BatchNorm with Keras' momentum and the given epsilon, tagged with its Keras name."""
    return keras_layer(nn.BatchNorm2d(channels, eps=eps, momentum=KERAS_BN_MOMENTUM), name)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding (before, after) for one spatial dimension of ``size``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class MaxPool2dSame(nn.Module):
    """Max pooling with TensorFlow "same" padding (asymmetric when the total is odd)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The padding depends only on the (static) input shape, never on values.
        top, bottom = same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = same_padding(x.shape[-1], self.kernel_size, self.stride)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class SeparableConv2d(nn.Module):
    """Keras ``SeparableConv2D`` (3x3 depthwise, then 1x1 pointwise; "same" padding, stride 1, no bias)."""

    def __init__(self, in_channels: int, out_channels: int, name: str) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        keras_layer(self, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def init_like_keras(module: nn.Module) -> None:
    """Keras' default initialisers: Glorot-uniform kernels, zero biases, BatchNorm (1, 0).

    PyTorch's Xavier-uniform gives the same bound as Keras' Glorot for every conv here,
    depthwise included (only the sum of fan-in and fan-out enters the bound).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
