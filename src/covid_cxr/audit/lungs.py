"""Lung fields: a coarse built-in estimate, or masks the user supplies.

The built-in estimate is COARSE, on purpose: it needs no model and no training data, and an
audit must not depend on a second network that could share the first one's shortcuts. On a
frontal radiograph (bone bright, air dark) the body is the large bright region; inside it the
lungs are the two large dark regions. Each found region is filled and replaced by its convex
hull so that dense opacities (the disease itself) stay inside the field. When the image does not
look like that (no plausible dark regions), a fixed anatomical prior of two ellipses is used and
the result says so. Its agreement with the true lung geometry of the synthetic radiographs
(``covid_cxr.synth.render_chest``) is measured in the tests (Dice about 0.8); on real images
supply masks (e.g. from a lung segmentation model) with ``--masks DIR``.

User masks: one image per test image in a folder, named by the image id with every ``/``
replaced by ``__`` and any image extension (:data:`MASK_EXTENSIONS`); non-zero (above half the
mask's maximum) means lung. They are resized to the model's input size with nearest-neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from covid_cxr.data.images import (
    decode_image,  # the one decoder: PNG, JPEG or DICOM by content
)
from covid_cxr.errors import DataError

WORK_SIZE = 128
"""Resolution the estimate runs at; the mask is resized back to the image's size."""

DARK_PERCENTILE = 35.0
"""Highest share (percent) of the body's pixels the dark lung threshold may take."""

MASK_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".dcm")

MAX_LISTED = 20
"""How many missing mask names one error message lists before it gives a count."""

COARSE_DESCRIPTION = (
    "built-in coarse estimate (dark regions inside the body, hull-filled; an anatomical prior where that "
    "fails). Not a segmentation: supply masks with --masks for real images"
)


@dataclass(frozen=True)
class LungFields:
    """Lung masks for a batch of images and how they were obtained."""

    masks: np.ndarray  # bool (N, S, S)
    method: str  # 'coarse-estimate' | 'user-masks'
    prior_used: int  # images where the coarse estimate fell back on the prior

    @property
    def description(self) -> str:
        if self.method == "user-masks":
            return "masks supplied by the user"
        return f"{COARSE_DESCRIPTION} (prior used for {self.prior_used} of {len(self.masks)} images)"


def prior_mask(size: int) -> np.ndarray:
    """Two ellipses where the lungs of an upright frontal radiograph usually are."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    y, x = (y + 0.5) / size, (x + 0.5) / size
    mask = np.zeros((size, size), dtype=bool)
    for cx in (0.33, 0.67):
        mask |= ((x - cx) / 0.13) ** 2 + ((y - 0.46) / 0.25) ** 2 <= 1.0
    return mask


def _hull(component: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros(component.shape, dtype=np.uint8)
    if contours:
        cv2.fillPoly(out, [cv2.convexHull(np.vstack(contours))], 1)
    return out > 0


def estimate_lung_field(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """Coarse lung mask (bool, same shape as ``image``) and whether the prior had to be used."""
    if image.ndim != 2:
        raise ValueError(f"expected a grayscale (H, W) image, got shape {image.shape}")
    h, w = image.shape
    small = cv2.resize(image, (WORK_SIZE, WORK_SIZE), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (5, 5), 0)
    # Body: brighter than the air around it; the largest such region, holes (lungs) filled.
    _, bright = cv2.threshold(small, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(bright.astype(np.uint8), connectivity=4)
    found = None
    if n > 1:
        body = lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        body = cv2.morphologyEx(body.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8)) > 0
        body = _fill_holes(body)
        inner = cv2.erode(body.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        found = _dark_regions(small, inner)
    if found is None:
        mask, used_prior = prior_mask(WORK_SIZE), True
    else:
        mask, used_prior = found, False
    if (h, w) != mask.shape:
        mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    return mask, used_prior


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill regions not reachable from the image border (holes) of a binary mask."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    return (padded | (1 - flood)).astype(bool)[1:-1, 1:-1]


def _dark_regions(small: np.ndarray, inner: np.ndarray) -> np.ndarray | None:
    """The (up to) two large dark regions inside the body, hull-filled; None when implausible."""
    values = small[inner]
    if values.size < 0.15 * small.size or values.std() < 2.0:  # no body, or nothing to tell lungs by
        return None
    level, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Lungs fill about a third of the body on a frontal film: cap the level there so a dim lower
    # body (thick soft tissue, low exposure) does not join the lungs.
    level = min(float(level), float(np.percentile(values, DARK_PERCENTILE)))
    dark = (small <= level) & inner
    dark = cv2.morphologyEx(dark.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
    # One lung on each side of the body's midline: split there so the two never merge into one hull
    # that would swallow the mediastinum.
    mid = int(round(np.nonzero(inner)[1].mean()))
    hulls = []
    for cols in (slice(0, mid), slice(mid, small.shape[1])):
        half = np.zeros_like(dark)
        half[:, cols] = dark[:, cols]
        n, lab, stats, cents = cv2.connectedComponentsWithStats(half.astype(np.uint8), connectivity=4)
        candidates = [i for i in range(1, n)
                      if stats[i, cv2.CC_STAT_AREA] >= 0.01 * small.size and cents[i][1] < 0.8 * small.shape[0]]
        best = max(candidates, key=lambda i: stats[i, cv2.CC_STAT_AREA]) if candidates else None
        hulls.append(_hull(lab == best) if best is not None else np.zeros(small.shape, dtype=bool))
    # A lung filled by dense opacity is not dark: where one side found much less than the other,
    # the other side's field mirrored about the midline stands in for it.
    for i in (0, 1):
        mine, other = hulls[i], hulls[1 - i]
        if mine.sum() < 0.5 * other.sum():
            hulls[i] = mine | _mirror(other, mid)
    mask = hulls[0] | hulls[1]
    share = mask.mean()
    if not 0.06 <= share <= 0.6:
        return None
    return mask


def _mirror(mask: np.ndarray, mid: int) -> np.ndarray:
    """``mask`` reflected about column ``mid``."""
    out = np.zeros_like(mask)
    ys, xs = np.nonzero(mask)
    xs = 2 * mid - 1 - xs
    keep = (xs >= 0) & (xs < mask.shape[1])
    out[ys[keep], xs[keep]] = True
    return out


def estimate_lung_fields(images: np.ndarray) -> LungFields:
    """Coarse lung fields of a uint8 batch (N, S, S)."""
    masks = np.empty(images.shape, dtype=bool)
    prior = 0
    for i, image in enumerate(images):
        masks[i], used = estimate_lung_field(np.asarray(image))
        prior += used
    return LungFields(masks=masks, method="coarse-estimate", prior_used=prior)


def mask_stem(image_id: str) -> str:
    """The file name (without extension) a user mask for ``image_id`` must have."""
    return str(image_id).replace("/", "__")


def find_mask_files(mask_dir: Path, image_ids: Sequence[str]) -> dict[str, Path]:
    """Map every image id to its mask file; one error listing all that are missing (first N and a count)."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise DataError(f"{mask_dir}: no such mask folder; give --masks a folder of lung masks named by image id")
    by_stem: dict[str, Path] = {}
    for path in sorted(mask_dir.iterdir()):
        if path.is_file() and path.suffix.lower() in MASK_EXTENSIONS:
            by_stem.setdefault(path.stem, path)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for image_id in image_ids:
        path = by_stem.get(mask_stem(image_id))
        if path is None:
            missing.append(str(image_id))
        else:
            found[str(image_id)] = path
    if missing:
        shown = ", ".join(f"{mask_stem(m)}.*" for m in missing[:MAX_LISTED])
        more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        raise DataError(
            f"{mask_dir}: lung masks missing for {len(missing)} of {len(image_ids)} test images: {shown}{more}. "
            f"A mask is named by the image id with '/' replaced by '__' and any of "
            f"{', '.join(MASK_EXTENSIONS)}; add the missing masks or leave out --masks to use the coarse estimate"
        )
    return found


def load_user_masks(mask_dir: Path, image_ids: Sequence[str], image_size: int) -> LungFields:
    """Read the user's masks for ``image_ids`` at ``image_size``; refuse missing or empty ones, listing them."""
    files = find_mask_files(mask_dir, image_ids)
    masks = np.empty((len(image_ids), image_size, image_size), dtype=bool)
    empty: list[str] = []
    for i, image_id in enumerate(image_ids):
        raw = decode_image(files[str(image_id)])
        peak = int(raw.max())
        if peak == 0:
            empty.append(files[str(image_id)].name)
            continue
        resized = cv2.resize(raw, (image_size, image_size), interpolation=cv2.INTER_NEAREST)
        masks[i] = resized.astype(np.int32) * 2 >= peak
    if empty:
        more = f" and {len(empty) - MAX_LISTED} more" if len(empty) > MAX_LISTED else ""
        raise DataError(
            f"{mask_dir}: {len(empty)} lung masks are empty (all zero): {', '.join(empty[:MAX_LISTED])}{more}; "
            "a mask must mark the lung fields with non-zero pixels"
        )
    return LungFields(masks=masks, method="user-masks", prior_used=0)
