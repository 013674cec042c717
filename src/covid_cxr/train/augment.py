"""Training augmentation on the device: one composed affine warp per image, a whole batch at once.

This follows Keras ``ImageDataGenerator.random_transform`` + ``apply_affine_transform``, the
authors' augmentation, as closely as a batched warp allows:

- rotation ``uniform(-r, r)`` degrees (r = 360 covers the circle uniformly, as "0-360");
- shifts ``uniform(-s, s)`` times the height (rows) and the width (columns);
- shear ``uniform(-k, k)`` in DEGREES: Keras' ``shear_range`` is an angle in degrees, so the
  authors' 0.05 is a 0.05 degree shear (a near-identity; we keep it, faithful rather than "fixed");
- zoom: two independent factors ``uniform(1 - z, 1 + z)``, rows and columns;
- the matrix ``R @ T @ S @ Z`` maps output to input coordinates about the image centre, exactly
  Keras' composition, then horizontal and vertical flips (p = 0.5 each) of the output;
- fill "nearest" = replicate the border (``padding_mode='border'``); interpolation bilinear, Keras'
  default ``interpolation_order=1`` (``nearest`` is a setting).

Warping the scaled float input equals Keras' warp-then-rescale, since rescaling is affine per
pixel and both interpolation and border fill commute with it. Parameters come from one seeded
``torch.Generator`` on the CPU (so the draw does not depend on the device), a fixed number of
draws per image, and are sampled for the whole global batch so every rank of a multi-process run
applies the transforms a single process would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from covid_cxr.config import AugmentSettings

_DRAWS_PER_IMAGE = 8


@dataclass(frozen=True)
class AffineParams:
    """Sampled transform parameters, one entry per image (all CPU tensors of shape (N,))."""

    rotation_deg: torch.Tensor
    shift_rows: torch.Tensor  # pixels
    shift_cols: torch.Tensor  # pixels
    shear_deg: torch.Tensor
    zoom_rows: torch.Tensor
    zoom_cols: torch.Tensor
    flip_horizontal: torch.Tensor  # bool
    flip_vertical: torch.Tensor  # bool

    def __len__(self) -> int:
        return int(self.rotation_deg.shape[0])


def sample_params(
    n: int, settings: AugmentSettings, height: int, width: int, generator: torch.Generator
) -> AffineParams:
    """Draw ``n`` transforms; always ``8 * n`` uniforms, so the generator advances the same for any settings."""
    u = torch.rand((n, _DRAWS_PER_IMAGE), generator=generator, dtype=torch.float64)

    def sym(col: int, half_range: float) -> torch.Tensor:
        return (u[:, col] * 2.0 - 1.0) * half_range

    return AffineParams(
        rotation_deg=sym(0, settings.rotation_range),
        shift_rows=sym(1, settings.height_shift_range) * height,
        shift_cols=sym(2, settings.width_shift_range) * width,
        shear_deg=sym(3, settings.shear_range),
        zoom_rows=1.0 + sym(4, settings.zoom_range),
        zoom_cols=1.0 + sym(5, settings.zoom_range),
        flip_horizontal=(u[:, 6] < 0.5) & settings.horizontal_flip,
        flip_vertical=(u[:, 7] < 0.5) & settings.vertical_flip,
    )


def pixel_matrices(params: AffineParams) -> torch.Tensor:
    """(N, 3, 3) homogeneous maps from output to input pixel coordinates (row, col), centred on the image."""
    n = len(params)
    theta = params.rotation_deg * (math.pi / 180.0)
    shear = params.shear_deg * (math.pi / 180.0)
    eye = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)

    rot = eye.clone()
    rot[:, 0, 0], rot[:, 0, 1] = torch.cos(theta), -torch.sin(theta)
    rot[:, 1, 0], rot[:, 1, 1] = torch.sin(theta), torch.cos(theta)
    shift = eye.clone()
    shift[:, 0, 2], shift[:, 1, 2] = params.shift_rows, params.shift_cols
    shear_m = eye.clone()
    shear_m[:, 0, 1], shear_m[:, 1, 1] = -torch.sin(shear), torch.cos(shear)
    zoom = eye.clone()
    zoom[:, 0, 0], zoom[:, 1, 1] = params.zoom_rows, params.zoom_cols
    flip = eye.clone()
    flip[:, 0, 0] = torch.where(params.flip_vertical, -1.0, 1.0)
    flip[:, 1, 1] = torch.where(params.flip_horizontal, -1.0, 1.0)
    # Keras: input = (R T S Z) @ output; the flips act on the output afterwards.
    return rot @ shift @ shear_m @ zoom @ flip


def grid_matrices(params: AffineParams, height: int, width: int) -> torch.Tensor:
    """(N, 2, 3) float32 matrices for ``F.affine_grid(..., align_corners=False)``.

    ``affine_grid`` works in (x = column, y = row) coordinates normalised so that a pixel centre
    ``c`` lies at ``(c - (size - 1) / 2) / (size / 2)``: the same centre Keras offsets to.
    """
    m = pixel_matrices(params)
    swap = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    m_xy = swap @ m @ swap
    scale = torch.diag(torch.tensor([width / 2.0, height / 2.0, 1.0], dtype=torch.float64))
    normalised = torch.linalg.inv(scale) @ m_xy @ scale
    return normalised[:, :2, :].to(torch.float32)


def warp(images: torch.Tensor, matrices: torch.Tensor, *, interpolation: str = "bilinear") -> torch.Tensor:
    """Apply one (2, 3) matrix per image to a float batch (N, C, H, W), border-replicating outside."""
    if not images.is_floating_point():
        raise TypeError(f"warp expects a float batch (after to_model_input), got {images.dtype}")
    grid = F.affine_grid(matrices.to(images.device), list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode=interpolation, padding_mode="border", align_corners=False)
    return out.to(images.dtype)


class Augmenter:
    """The training augmentation with its own seeded generator (its state goes into ``last.pt``)."""

    def __init__(self, settings: AugmentSettings, seed: int = 0) -> None:
        self.settings = settings
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def sample(self, n: int, height: int, width: int) -> AffineParams:
        return sample_params(n, self.settings, height, width, self.generator)

    def __call__(self, images: torch.Tensor, *, global_size: int | None = None, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Warp ``images`` (this rank's slice ``[rank::world]`` of a global batch of ``global_size``)."""
        n, _, height, width = images.shape
        total = n if global_size is None else global_size
        params = self.sample(total, height, width)
        matrices = grid_matrices(params, height, width)[rank::world]
        if matrices.shape[0] != n:
            raise ValueError(f"rank slice holds {n} images but the global batch gives {matrices.shape[0]} transforms")
        if not self.settings.enabled:
            return images
        return warp(images, matrices, interpolation=self.settings.interpolation)
