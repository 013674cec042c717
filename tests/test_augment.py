"""On-device augmentation: sampled ranges and frequencies, Keras' geometry, seeding, rank slices."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from covid_cxr.config import AugmentSettings
from covid_cxr.train.augment import (
    AffineParams,
    Augmenter,
    grid_matrices,
    pixel_matrices,
    sample_params,
    warp,
)

PAPER = AugmentSettings()


def _params(n: int = 1, **values: float | bool) -> AffineParams:
    base: dict[str, float | bool] = dict(
        rotation_deg=0.0, shift_rows=0.0, shift_cols=0.0, shear_deg=0.0, zoom_rows=1.0, zoom_cols=1.0,
        flip_horizontal=False, flip_vertical=False,
    )  # fmt: skip
    base.update(values)
    return AffineParams(**{k: torch.full((n,), v, dtype=torch.bool if isinstance(v, bool) else torch.float64)
                           for k, v in base.items()})  # fmt: skip


def _keras_reference(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Keras apply_affine_transform for transforms landing on pixel centres: input = M @ (output - c) + c,
    clamped to the border (fill_mode='nearest')."""
    h, w = image.shape
    cr, cc = (h - 1) / 2, (w - 1) / 2
    out = np.empty_like(image)
    for r, c in itertools.product(range(h), range(w)):
        src = matrix @ np.array([r - cr, c - cc, 1.0])
        sr = int(round(min(max(src[0] + cr, 0), h - 1)))
        sc = int(round(min(max(src[1] + cc, 0), w - 1)))
        out[r, c] = image[sr, sc]
    return out


def test_sampled_ranges_and_frequencies() -> None:
    gen = torch.Generator().manual_seed(0)
    p = sample_params(20_000, PAPER, 300, 300, gen)
    angle = p.rotation_deg % 360
    assert angle.min() >= 0 and angle.max() < 360
    hist = torch.histc(angle.float(), bins=8, min=0, max=360) / len(p)
    assert torch.allclose(hist, torch.full_like(hist, 1 / 8), atol=0.01)  # uniform over the circle
    for shift in (p.shift_rows, p.shift_cols):
        assert shift.abs().max() <= 15.0 and shift.abs().max() > 14.9  # 0.05 * 300 px, both signs
        assert abs(float((shift > 0).double().mean()) - 0.5) < 0.02
    for zoom in (p.zoom_rows, p.zoom_cols):
        assert zoom.min() >= 0.95 and zoom.max() <= 1.05 and zoom.max() - zoom.min() > 0.099
    assert float(torch.corrcoef(torch.stack([p.zoom_rows, p.zoom_cols]))[0, 1]) == pytest.approx(0, abs=0.03)
    assert p.shear_deg.abs().max() <= 0.05 and p.shear_deg.abs().max() > 0.049  # degrees, as Keras reads it
    for flip in (p.flip_horizontal, p.flip_vertical):
        assert abs(float(flip.double().mean()) - 0.5) < 0.02
    off = sample_params(1000, AugmentSettings(horizontal_flip=False, vertical_flip=False, rotation_range=0.0),
                        300, 300, gen)  # fmt: skip
    assert not off.flip_horizontal.any() and not off.flip_vertical.any() and (off.rotation_deg == 0).all()


def test_matrix_is_keras_composition() -> None:
    p = _params(rotation_deg=30.0, shift_rows=2.0, shift_cols=-3.0, shear_deg=10.0, zoom_rows=0.9, zoom_cols=1.1,
                flip_horizontal=True)  # fmt: skip
    t, s = math.radians(30), math.radians(10)
    rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    shift = np.array([[1, 0, 2.0], [0, 1, -3.0], [0, 0, 1]])
    shear = np.array([[1, -math.sin(s), 0], [0, math.cos(s), 0], [0, 0, 1]])
    zoom = np.diag([0.9, 1.1, 1.0])
    flip = np.diag([1.0, -1.0, 1.0])
    np.testing.assert_allclose(pixel_matrices(p)[0].numpy(), rot @ shift @ shear @ zoom @ flip, atol=1e-12)


@pytest.mark.parametrize(
    ("size", "values"),
    [
        ((7, 7), {"rotation_deg": 90.0}),
        ((7, 7), {"rotation_deg": 270.0, "shift_cols": 2.0, "flip_vertical": True}),
        ((7, 7), {"zoom_rows": 2.0, "zoom_cols": 2.0}),
        ((7, 7), {"rotation_deg": 180.0, "shift_rows": -3.0, "flip_horizontal": True}),
        ((5, 9), {"rotation_deg": 180.0, "shift_rows": 1.0, "shift_cols": 4.0}),
        ((5, 9), {"flip_horizontal": True, "flip_vertical": True, "zoom_cols": 2.0}),
    ],
)
def test_warp_matches_keras_geometry(size: tuple[int, int], values: dict) -> None:
    h, w = size
    image = np.random.default_rng(1).integers(0, 255, size=(h, w)).astype(np.float32)
    p = _params(**values)
    expected = _keras_reference(image, pixel_matrices(p)[0].numpy())
    got = warp(torch.from_numpy(image)[None, None], grid_matrices(p, h, w))[0, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_identity_and_border_fill() -> None:
    x = torch.rand(3, 3, 16, 16)
    assert torch.allclose(warp(x, grid_matrices(_params(3), 16, 16)), x, atol=1e-5)
    shifted = warp(x, grid_matrices(_params(3, shift_cols=40.0), 16, 16))  # far outside: the last column repeated
    assert torch.allclose(shifted, x[..., -1:].expand_as(x), atol=1e-5)


def test_seeded_and_rank_slices_match_the_global_batch() -> None:
    x = torch.rand(6, 3, 32, 32)
    a, b = Augmenter(PAPER, seed=3), Augmenter(PAPER, seed=3)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), Augmenter(PAPER, seed=4)(x))
    whole = Augmenter(PAPER, seed=5)(x)
    parts = [Augmenter(PAPER, seed=5)(x[r::2], global_size=6, rank=r, world=2) for r in range(2)]
    assert torch.allclose(parts[0], whole[0::2]) and torch.allclose(parts[1], whole[1::2])


def test_disabled_augmentation_is_identity() -> None:
    x = torch.rand(2, 3, 20, 20)
    assert torch.equal(Augmenter(AugmentSettings(enabled=False))(x), x)
