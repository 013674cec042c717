"""One synthetic chest radiograph with known geometry.

A body, two lung fields, heart, spine and ribs, with per-image variation of anatomy,
exposure, gamma and noise. The class evidence is drawn inside the lungs and returned as a
mask, so tests and audits know exactly where it is:

- ``pneumonia``: one to three dense focal opacities (lobar consolidation), usually in one lung;
- ``covid``: patchy ground-glass haze in the periphery and lower zones of both lungs;
- ``normal``: none.

Amplitudes vary per image and some cases are faint, so a CNN learns the task at 96-128 px in a
few epochs without it being trivial. Everything is drawn at a base resolution of at most 256 px
with vectorised numpy and upscaled with OpenCV, so a 1024 px image costs a few milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from covid_cxr.labels import CLASSES

BASE_SIZE = 256
"""Largest resolution the anatomy is drawn at; larger outputs are upscaled."""

SIDES = ("left", "right", "both")
"""Where the evidence may be put. Sides are the IMAGE's halves: 'left' is columns < W/2."""


@dataclass(frozen=True)
class ChestImage:
    """A rendered radiograph: the image and where its lungs and its class evidence are."""

    image: np.ndarray  # uint8 (H, W)
    lung_mask: np.ndarray  # bool (H, W): the two lung fields (heart excluded)
    lesion_mask: np.ndarray  # bool (H, W): where class evidence was drawn; empty for normal
    label: str
    lesion_side: str | None  # 'left', 'right', 'both', or None for normal


@lru_cache(maxsize=4)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    return (y + 0.5) / n, (x + 0.5) / n


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a few random cells upsampled smoothly."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(small, (n, n), interpolation=cv2.INTER_CUBIC)


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    """Normalised radial distance from an ellipse's centre (1 on its border)."""
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = y - cy, x - cx
    u = (c * dx + s * dy) / rx
    v = (-s * dx + c * dy) / ry
    return np.sqrt(u * u + v * v)


def _soft_inside(r: np.ndarray, edge: float) -> np.ndarray:
    """1 well inside (r < 1), 0 outside, a smooth ramp of relative width ``edge``."""
    return np.clip((1.0 - r) / edge, 0.0, 1.0)


def _lesion_sides(rng: np.random.Generator, label: str, lesion_side: str | None) -> str | None:
    if label == "normal":
        return None
    if lesion_side is not None:
        return lesion_side
    if label == "covid":
        return "both"
    return str(rng.choice(SIDES, p=[0.45, 0.45, 0.10]))


def render_chest(
    rng: np.random.Generator, size: int, label: str, *, lesion_side: str | None = None
) -> ChestImage:
    """Draw one radiograph of class ``label`` at ``size`` x ``size`` pixels.

    ``lesion_side`` ('left', 'right', 'both'; image halves) forces where the evidence goes;
    by default pneumonia picks one side (rarely both) and COVID-19 is bilateral.
    """
    if label not in CLASSES:
        raise ValueError(f"label must be one of {', '.join(CLASSES)}; got {label!r}")
    if lesion_side is not None and lesion_side not in SIDES:
        raise ValueError(f"lesion_side must be one of {', '.join(SIDES)} or None; got {lesion_side!r}")
    if label == "normal" and lesion_side is not None:
        raise ValueError("a normal image has no lesion, so lesion_side must be None")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels; got {size}")
    n = min(size, BASE_SIZE)
    y, x = _grid(n)
    u = rng.uniform

    cx = 0.5 + u(-0.03, 0.03)
    body = _soft_inside(_ellipse(y, x, 0.62 + u(-0.03, 0.03), cx, 0.62, 0.40 + u(-0.04, 0.04), 0.0), 0.08)
    img = 0.06 + 0.04 * (1 - y) + 0.40 * body

    lungs = []
    lung_r = []
    for s in (-1.0, 1.0):
        ly, lx = 0.46 + u(-0.03, 0.03), cx + s * (0.165 + u(-0.015, 0.02))
        ry, rx, ang = 0.25 + u(-0.03, 0.03), 0.115 + u(-0.015, 0.015), s * u(0.0, 0.12)
        r = _ellipse(y, x, ly, lx, ry, rx, ang)
        lung_r.append((r, ly, lx, ry, rx))
        lungs.append(_soft_inside(r, 0.12))
    heart_r = _ellipse(y, x, 0.63 + u(-0.02, 0.02), cx + 0.05 + u(-0.02, 0.02),
                       0.10 + u(-0.01, 0.02), 0.12 + u(-0.01, 0.02), u(-0.3, 0.1))
    heart = _soft_inside(heart_r, 0.2)
    lung_soft = np.maximum(lungs[0], lungs[1]) * (1 - heart)
    img -= (0.26 + u(-0.05, 0.05)) * lung_soft
    img += 0.22 * heart * body
    img += (0.16 + u(-0.04, 0.04)) * np.exp(-(((x - cx) / 0.035) ** 2)) * (y > 0.15) * body  # spine
    period, bend, phase = 0.065 + u(-0.01, 0.01), 2.5 + u(-0.8, 0.8), u(0, 2 * np.pi)
    ribs = (0.5 + 0.5 * np.sin(2 * np.pi * (y + bend * (x - cx) ** 2) / period + phase)) ** 4
    img += (0.07 + u(-0.02, 0.03)) * ribs * lung_soft

    lung_mask_n = (lungs[0] > 0.5) | (lungs[1] > 0.5)
    lung_mask_n &= heart_r > 1.0
    sides = _lesion_sides(rng, label, lesion_side)
    evidence = np.zeros_like(img)
    if label == "pneumonia":
        for i, lung in enumerate(lungs):
            if sides not in ("both", ("left", "right")[i]):
                continue
            r, ly, lx, ry, rx = lung_r[i]
            side = np.zeros_like(img)
            for _ in range(int(rng.integers(1, 4))):
                ang, rad = u(0, 2 * np.pi), np.sqrt(u(0.0, 0.45))
                by = ly + 0.35 * ry + rad * ry * 0.5 * np.sin(ang)  # lower zones mostly
                bx = lx + rad * rx * 0.8 * np.cos(ang)
                size_r = u(0.035, 0.08)
                blob = np.exp(-(((y - by) ** 2 + (x - bx) ** 2) / (2 * size_r**2)))
                shape = 1 + 0.35 * _smooth_noise(rng, n, 6)
                side += u(0.20, 0.42) * blob * np.clip(shape, 0.3, 1.7)
            evidence += side * lung
    elif label == "covid":
        patch = np.clip(0.5 + 0.6 * _smooth_noise(rng, n, 12), 0, 1)
        strength = u(0.14, 0.30)
        for i, lung in enumerate(lungs):
            if sides not in ("both", ("left", "right")[i]):
                continue
            r, ly, lx, ry, rx = lung_r[i]
            peripheral = np.clip((r - 0.35) / 0.45, 0, 1)
            lower = np.clip(0.35 + (y - ly) / ry, 0, 1)
            evidence += strength * lung * peripheral * lower * patch
    img += evidence * body

    gain, gamma = u(0.85, 1.15), u(0.8, 1.25)
    img = np.clip(img * gain + 0.05 * _smooth_noise(rng, n, 4), 0, 1) ** gamma
    img += rng.normal(0, u(0.01, 0.03), img.shape).astype(np.float32)
    out = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)

    peak = float(evidence.max())
    lesion_n = (evidence > 0.3 * peak) & lung_mask_n if peak > 0 else np.zeros_like(lung_mask_n)
    if n != size:
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_LINEAR)
        lung_mask_n = cv2.resize(lung_mask_n.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
        lesion_n = cv2.resize(lesion_n.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
    return ChestImage(image=out, lung_mask=lung_mask_n, lesion_mask=lesion_n, label=label, lesion_side=sides)
