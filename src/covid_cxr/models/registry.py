"""The registry: one name -> one network, built the same way everywhere (training, import, serving)."""

from __future__ import annotations

from covid_cxr.errors import ConfigError
from covid_cxr.models.concat import CxrNet

_REGISTRY: dict[str, tuple[str, ...]] = {
    # name: backbones, in concatenation order (the authors concatenate Xception's map first)
    "concat": ("xception", "resnet50v2"),
    "xception": ("xception",),
    "resnet50v2": ("resnet50v2",),
}


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(_REGISTRY)


def backbones_of(name: str) -> tuple[str, ...]:
    """The backbones a network is made of, in concatenation order."""
    _check_name(name)
    return _REGISTRY[name]


def build_model(name: str, num_classes: int = 3, image_size: int = 300, *, drop_rate: float = 0.5) -> CxrNet:
    """Build network ``name`` with freshly initialised weights (Keras' initialisers)."""
    _check_name(name)
    return CxrNet(name, _REGISTRY[name], num_classes, image_size, drop_rate=drop_rate)


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown network {name!r}; valid networks are {', '.join(_REGISTRY)}")

