"""The network registry's entries: one frozen record per network, data only (no torch).

Like timm's pretrained configs, each entry carries what a network needs besides its layers: its
backbones (in concatenation order), the paper's batch size (Table 2), the default input side, the
optimizer recipe (Keras Nadam as the authors trained it) and the Keras ImageNet files with the input
scaling those weights were trained with. :mod:`covid_cxr.config` takes its defaults from here and
:mod:`covid_cxr.models` builds the networks and loads the files; this module imports nothing heavy so
that settings and the command line can name the networks without loading torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from covid_cxr.errors import CheckpointError, ConfigError, did_you_mean

PAPER_IMAGE_SIZE = 300
"""The paper's input side (300 x 300): the default of every network, the cache and ``prepare``."""

MIN_IMAGE_SIZE = 71
"""Smallest input for which both backbones still produce a feature map (Keras' own minimum for Xception)."""

MAX_IMAGE_SIZE = 2048
"""Largest image cache ``prepare`` builds (a side of 2048 px is 4 MiB an image)."""

_KERAS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications"


@dataclass(frozen=True)
class WeightsFile:
    """One downloadable weights file, the digest it must have, and the input scaling it was trained with."""

    backbone: str
    filename: str
    url: str
    sha256: str | None = None
    md5: str | None = None
    scaling: str = "symmetric"  # Keras 'tf' mode (x / 127.5 - 1): how keras.applications fed ImageNet

    def check(self, path: Path) -> None:
        """Raise :class:`CheckpointError` if ``path`` does not have the known digest."""
        algorithm, expected = ("sha256", self.sha256) if self.sha256 else ("md5", self.md5)
        if expected is None:
            raise CheckpointError(f"{self.filename}: no known digest to check the file against")
        digest = hashlib.new(algorithm)
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected.lower():
            raise CheckpointError(
                f"{path}: {algorithm.upper()} is {digest.hexdigest()}, expected {expected} for {self.filename}; "
                f"the file is corrupt or not the official one: delete it and download it again from {self.url}"
            )


@dataclass(frozen=True)
class OptimizerRecipe:
    """What the optimizer is built from: Keras' Nadam with its own epsilon and momentum schedule."""

    name: str = "nadam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-7  # Keras Nadam's epsilon (torch's default is 1e-8)
    momentum_decay: float = 4e-3  # Keras' schedule_decay 0.004, the same momentum schedule as torch


@dataclass(frozen=True)
class NetworkEntry:
    """One network of the paper and everything besides its layers that training and loading need."""

    name: str
    backbones: tuple[str, ...]  # concatenation order: the authors concatenate Xception's map first
    paper_batch_size: int  # Table 2 of the paper
    image_size: int = PAPER_IMAGE_SIZE
    optimizer: OptimizerRecipe = OptimizerRecipe()

    @property
    def imagenet(self) -> tuple[WeightsFile, ...]:
        """The Keras ImageNet no-top files, one per backbone."""
        return tuple(IMAGENET_FILES[b] for b in self.backbones)

    @property
    def imagenet_scaling(self) -> str:
        """The input scaling the ImageNet weights of every backbone expect."""
        (scaling,) = {f.scaling for f in self.imagenet}
        return scaling


IMAGENET_FILES: dict[str, WeightsFile] = {
    "xception": WeightsFile(
        "xception",
        "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_KERAS_BASE}/xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        md5="b0042744bf5b25fce3cb969f33bebb97",
    ),
    "resnet50v2": WeightsFile(
        "resnet50v2",
        "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_KERAS_BASE}/resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        md5="fac2f116257151a9d068a22e544a4917",
    ),
}
"""Keras' published no-top ImageNet files per backbone, with Keras' own MD5 (what ``keras.applications`` checks)."""

NETWORKS: dict[str, NetworkEntry] = {
    "concat": NetworkEntry("concat", ("xception", "resnet50v2"), paper_batch_size=20),
    "xception": NetworkEntry("xception", ("xception",), paper_batch_size=30),
    "resnet50v2": NetworkEntry("resnet50v2", ("resnet50v2",), paper_batch_size=30),
}
"""The paper's networks, in the order the command line lists them."""

NETWORK_NAMES: tuple[str, ...] = tuple(NETWORKS)
PAPER_OPTIMIZER = OptimizerRecipe()
"""The optimizer recipe every network of the paper shares (the settings' defaults come from it)."""


def network_entry(name: str) -> NetworkEntry:
    """The registry entry of network ``name``; an unknown name is refused with the nearest valid one."""
    if name not in NETWORKS:
        raise ConfigError(f"unknown network {name!r}{did_you_mean(name, NETWORKS)}; "
                          f"valid networks are {', '.join(NETWORKS)}")
    return NETWORKS[name]


def pretrained_scaling_warning(network: str, pretrained: str, scaling: str) -> str | None:
    """Why starting ``network`` from ``pretrained`` weights with input ``scaling`` is a mismatch, or ``None``.

    The Keras ImageNet weights were trained on inputs in [-1, 1] (``symmetric``); the paper's ``unit``
    (x / 255) feeds them inputs they never saw. It trains, so the paper's setting stays allowed, but the
    run should say so.
    """
    if pretrained != "imagenet":
        return None
    expected = network_entry(network).imagenet_scaling
    if scaling == expected:
        return None
    paper = " (the paper did this, so it is allowed)" if scaling == "unit" else ""
    return (f"{network}'s ImageNet weights expect scaling {expected!r} (Keras 'tf' mode, x / 127.5 - 1) but the "
            f"settings say {scaling!r}: the pretrained filters see inputs of another range{paper}. Pass "
            f"--scaling {expected} (scaling: {expected} in a settings file) to feed them what they were trained on")
