"""The paper's network and its single-backbone baselines: backbone map(s) -> the same head.

Head (the authors' Keras code): Conv2D 1024 1x1 with bias and no activation -> Flatten ->
Dropout 0.5 -> Dense (kernel N(0, 0.001)). Keras flattens channels-last, so
:meth:`CxrNet.forward_head` flattens in (h, w, c) order: imported Dense weights then line up
unchanged, and so do ours when exported back. The softmax is left to the loss and to
inference: the model returns logits.
"""

from __future__ import annotations

import torch
from torch import nn

from covid_cxr.errors import ConfigError
from covid_cxr.models.layers import keras_layer
from covid_cxr.models.resnet_v2 import ResNet50V2
from covid_cxr.models.xception import Xception
from covid_cxr.networks import MIN_IMAGE_SIZE, PAPER_IMAGE_SIZE

BACKBONES: dict[str, type[nn.Module]] = {"xception": Xception, "resnet50v2": ResNet50V2}
HEAD_CHANNELS = 1024
DENSE_INIT_STD = 0.001


class CxrNet(nn.Module):
    """One or more Keras backbones fed the same image, concatenated, then the paper's head."""

    def __init__(
        self,
        network_name: str,
        backbones: tuple[str, ...],
        num_classes: int = 3,
        image_size: int = PAPER_IMAGE_SIZE,
        *,
        drop_rate: float = 0.5,
    ) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
            raise ConfigError(
                f"image_size must be an integer >= {MIN_IMAGE_SIZE} for network {network_name!r}; got {image_size!r}"
            )
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2; got {num_classes!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1); got {drop_rate!r}")
        sizes = {name: BACKBONES[name].feature_size(image_size) for name in backbones}
        if len(set(sizes.values())) != 1:
            raise ConfigError(f"image_size {image_size} gives backbone maps of different sizes {sizes}; use 299 or 300")
        side = next(iter(sizes.values()))
        self.network_name = network_name
        self.num_classes = num_classes
        self.image_size = image_size
        self.feature_size = (side, side)
        self.backbones = nn.ModuleDict({name: BACKBONES[name]() for name in backbones})
        channels = sum(b.out_channels for b in self.backbones.values())
        self.head_conv = keras_layer(nn.Conv2d(channels, HEAD_CHANNELS, 1), None)
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = keras_layer(nn.Linear(side * side * HEAD_CHANNELS, num_classes), None)
        nn.init.xavier_uniform_(self.head_conv.weight)  # Keras' Conv2D default (Glorot uniform)
        nn.init.zeros_(self.head_conv.bias)
        nn.init.normal_(self.classifier.weight, 0.0, DENSE_INIT_STD)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone map(s), concatenated on channels in registry order: (N, C, h, w)."""
        maps = [backbone(x) for backbone in self.backbones.values()]
        return maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """1x1 conv -> flatten in Keras (h, w, c) order -> dropout -> linear: logits (N, num_classes)."""
        x = self.head_conv(features)
        x = x.permute(0, 2, 3, 1).flatten(1)
        return self.classifier(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def gradcam_layers(self) -> dict[str, nn.Module]:
        """For each backbone, the module whose output is its final map (hook it for Grad-CAM)."""
        return {name: backbone.gradcam_layer for name, backbone in self.backbones.items()}

    def keras_param_count(self) -> int:
        """Parameters plus BatchNorm running statistics: the number Keras' ``count_params`` gives."""
        params = sum(p.numel() for p in self.parameters())
        stats = sum(
            m.running_mean.numel() + m.running_var.numel()
            for m in self.modules()
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
        )
        return params + stats

