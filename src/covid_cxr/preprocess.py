"""Preprocessing: the one definition, carried by every checkpoint.

Images travel as grayscale ``uint8`` of shape (N, H, W) (or (N, 1, H, W)) already resized to
``image_size`` by the data cache or the inference loader, by the method :attr:`Preprocessing.resize`
names (:data:`covid_cxr.choices.RESIZE_METHODS`): ``area`` (anti-aliased) for our models,
``bilinear`` for a model imported from the authors' Keras files, whose evaluation used
``cv2.resize``'s default. A checkpoint written before the field existed reads as ``area``, which
is what the package always did. On the device they become float
(N, 3, H, W): the gray channel repeated three times, then scaled as :attr:`Preprocessing.scaling`
says. The paper (the authors' code) scales by 1/255 to [0, 1]; the Keras ImageNet weights of
Xception and ResNet50V2 expect [-1, 1] (``x / 127.5 - 1``). Training, evaluation, export and
serving all call :func:`to_model_input`, so the scalings can never drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from covid_cxr.choices import RESIZE_METHODS
from covid_cxr.config import SCALINGS
from covid_cxr.errors import ConfigError
from covid_cxr.networks import MIN_IMAGE_SIZE, PAPER_IMAGE_SIZE


@dataclass(frozen=True)
class Preprocessing:
    """How a raw grayscale uint8 image becomes the network's input."""

    image_size: int = PAPER_IMAGE_SIZE
    scaling: str = "unit"
    channels: int = 3
    resize: str = "area"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_METHODS:
            raise ConfigError(f"resize must be one of {', '.join(RESIZE_METHODS)}; got {self.resize!r}")
        if self.scaling not in SCALINGS:
            raise ConfigError(f"scaling must be one of {', '.join(SCALINGS)}; got {self.scaling!r}")
        if not isinstance(self.image_size, int) or self.image_size < MIN_IMAGE_SIZE:
            raise ConfigError(
                f"image_size must be an integer >= {MIN_IMAGE_SIZE} (the networks need at least that); "
                f"got {self.image_size!r}"
            )
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3; got {self.channels!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        unknown = set(data) - {"image_size", "scaling", "channels", "resize"}
        if unknown:
            raise ConfigError(f"unknown preprocessing keys: {', '.join(sorted(unknown))}")
        return cls(**data)


def to_model_input(
    images: torch.Tensor,
    pre: Preprocessing,
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """Turn a uint8 batch (N, H, W) or (N, 1, H, W) into the network's float input (N, C, H, W).

    Runs on whatever device ``images`` is on: move the uint8 batch first (four times fewer bytes).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 batch, got {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected (N, H, W) or (N, 1, H, W) grayscale, got shape {tuple(images.shape)}")
    mul, add = SCALINGS[pre.scaling]
    x = images.to(dtype).mul_(mul).add_(add)
    if pre.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)
