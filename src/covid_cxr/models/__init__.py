"""Networks: Keras-exact Xception and ResNet50V2, the paper's concatenated network, Keras import.

``build_model(name, num_classes, image_size)`` builds ``concat``, ``xception`` or ``resnet50v2``;
every model exposes ``forward_features``, ``forward_head``, ``forward`` (logits) and
``gradcam_layers()``. Keras weights come in through :mod:`covid_cxr.models.keras_import` and
:mod:`covid_cxr.models.pretrained`.
"""

from __future__ import annotations

from covid_cxr.models.concat import CxrNet
from covid_cxr.models.registry import backbones_of, build_model, list_models

__all__ = ["CxrNet", "backbones_of", "build_model", "list_models"]
