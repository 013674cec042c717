"""The registry: one name -> one network, built the same way everywhere (training, import, serving).

The entries themselves (backbones, the paper's batch size, default image size, optimizer recipe,
ImageNet files and the scaling they expect) are data in :mod:`covid_cxr.networks`, below the
settings; this module turns an entry into layers.
"""

from __future__ import annotations

from covid_cxr.models.concat import CxrNet
from covid_cxr.networks import NETWORK_NAMES, network_entry


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(NETWORK_NAMES)


def backbones_of(name: str) -> tuple[str, ...]:
    """The backbones a network is made of, in concatenation order."""
    return network_entry(name).backbones


def build_model(name: str, num_classes: int = 3, image_size: int | None = None, *, drop_rate: float = 0.5) -> CxrNet:
    """Build network ``name`` with freshly initialised weights (Keras' initialisers); ``image_size`` defaults to
    the entry's (the paper's 300)."""
    entry = network_entry(name)
    return CxrNet(name, entry.backbones, num_classes, image_size or entry.image_size, drop_rate=drop_rate)
