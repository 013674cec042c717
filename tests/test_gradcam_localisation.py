"""The maps follow the evidence: a network trained on synthetic radiographs whose pneumonia lies in
one lung puts the pneumonia map's mass in that lung, and the map moves when the lesion moves.

Xception and ResNet50V2 cannot be trained to localise in a test's CPU budget, so a small CNN with
the package's surface (``forward_features`` -> ``forward_head``, ``gradcam_layers()``) is trained
here, and the real :class:`covid_cxr.gradcam.GradCam` explains it, with each of two heads:

- Global average pooling (``head_pools = True``, so GradCam's "auto" uses Grad-CAM): Grad-CAM's
  channel weights (the spatially averaged gradient) are exactly what the head applies at every
  position, so the map is the network's own evidence.
- The package's head shape: 1x1 conv, flatten, linear (``head_pools = False``: HiResCAM). There the
  averaged weights can misstate the evidence. On this network trained with seeds 0-11, Grad-CAM's median
  mass ratio was 1.4-4.2 (below 4 for eleven seeds; on one side as few as 55% of images favoured the
  lesion's lung), while HiResCAM's was 3.9-14.6 on the same networks, 2.6-3.7 times Grad-CAM's on every
  seed. That is Grad-CAM's method, not this implementation (``test_gradcam.py`` pins both maps to their
  definitions).
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from covid_cxr.audit.cam_stats import mass_in_lungs
from covid_cxr.gradcam import GradCam
from covid_cxr.preprocess import Preprocessing, to_model_input
from covid_cxr.synth import render_chest

pytestmark = pytest.mark.slow  # two small trainings: about 30 CPU-seconds with the rest

SIZE = 72  # the smallest size Preprocessing accepts, rounded up to a multiple of the network's stride 8
CLASSES = ("pneumonia", "normal")
PRE = Preprocessing(image_size=SIZE, scaling="unit", channels=1)
TRAIN_PER_KIND = 200  # left-lung pneumonia, right-lung pneumonia, normal
STEPS, BATCH, LR = 600, 32, 3e-3
HELD_OUT = 40  # half with the lesion in the left lung, half in the right
MIN_SHARE = 0.8  # of held-out images whose lesion lung holds more map mass than the other lung
# Median of (mass in the lesion's lung) / (mass in the other lung). Measured: 6.6-12.7 for this network
# trained with seeds 0-5; at most 1.6 untrained (eight draws); 2.1 for the mean activation without Grad-CAM's
# gradient weights, which follows any bright spot. 4 lets through only a map that reads the lesion.
MIN_MEDIAN_RATIO = 4.0


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyCxrNet(nn.Module):
    """Four conv+BN+ReLU blocks (stride 8: a 9x9 map at 72 px), global average pooling, a linear layer."""

    network_name = "tiny"
    head_pools = True  # GradCam's "auto" then uses Grad-CAM, which is exact for this head

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.features = nn.Sequential(_block(1, 8, 2), _block(8, 16, 2), _block(16, 32, 2), _block(32, 32, 1))
        self.classifier = nn.Linear(32, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def gradcam_layers(self) -> dict[str, nn.Module]:
        return {"tiny": self.features[-1]}


class TinyFlatNet(TinyCxrNet):
    """The same blocks behind the package's head shape: 1x1 conv, flatten in Keras (h, w, c) order, linear."""

    head_pools = False
    HEAD_CHANNELS = 8

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__(num_classes)
        side = SIZE // 8
        self.head_conv = nn.Conv2d(32, self.HEAD_CHANNELS, 1)
        self.classifier = nn.Linear(side * side * self.HEAD_CHANNELS, num_classes)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head_conv(features).permute(0, 2, 3, 1).flatten(1))


def lung_sides(lung_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image-left and image-right lung fields: each connected piece goes to the side of its centroid
    (the heart may cut a lung in two; the lungs' centres lie well off the midline)."""
    n, labels, _, centroids = cv2.connectedComponentsWithStats(lung_mask.astype(np.uint8), connectivity=8)
    left = np.isin(labels, [i for i in range(1, n) if centroids[i][0] < SIZE / 2])
    right = np.isin(labels, [i for i in range(1, n) if centroids[i][0] >= SIZE / 2])
    return left, right


def render_pneumonia(seeds: list[int], sides: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, S, S) with the lesion on ``sides``, and the masks (N, S, S) of the lesion's lung and the other.

    One generator per seed: the same seed draws the same anatomy whichever side the lesion is put on.
    """
    images, lesion_lungs, other_lungs = [], [], []
    for seed, side in zip(seeds, sides):
        chest = render_chest(np.random.default_rng(seed), SIZE, "pneumonia", lesion_side=side)
        left, right = lung_sides(chest.lung_mask)
        lesion_lung, other_lung = (left, right) if side == "left" else (right, left)
        # The geometry the test rests on: the lesion lies in its lung and nowhere in the other.
        assert chest.lesion_mask.any() and not (chest.lesion_mask & other_lung).any()
        assert (chest.lesion_mask & lesion_lung).sum() == chest.lesion_mask.sum()
        images.append(chest.image)
        lesion_lungs.append(lesion_lung)
        other_lungs.append(other_lung)
    return np.stack(images), np.stack(lesion_lungs), np.stack(other_lungs)


def mass_ratios(cam: GradCam, images: np.ndarray, lesion_lungs: np.ndarray, other_lungs: np.ndarray) -> np.ndarray:
    """Per image: the pneumonia map's mass in the lesion's lung over its mass in the other lung (1, favouring
    neither, for an all-zero map)."""
    maps = np.stack([r.map for r in cam(images, "pneumonia")])
    lesion, other = mass_in_lungs(maps, lesion_lungs), mass_in_lungs(maps, other_lungs)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(lesion) & (lesion + other > 0), lesion / other, 1.0)


def localisation(ratios: np.ndarray, sides: list[str]) -> dict[str, float]:
    """The criterion's numbers: per lesion side, the share of images whose lesion lung holds more of the map's
    mass; and the median mass ratio. Each side on its own, so a map stuck on one lung fails half the images."""
    left = np.array(sides) == "left"
    return {"left": float((ratios[left] > 1).mean()), "right": float((ratios[~left] > 1).mean()),
            "median": float(np.median(ratios))}


def localises(numbers: dict[str, float]) -> bool:
    return min(numbers["left"], numbers["right"]) >= MIN_SHARE and numbers["median"] >= MIN_MEDIAN_RATIO


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    # One thread: on the shared 2-core machine, two threads cost ~10x the CPU time (spin-waiting).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(model_type: type[TinyCxrNet], seed: int = 0) -> TinyCxrNet:
    """The CNN trained, seeded, on left-lung pneumonia, right-lung pneumonia and normal images."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    kinds = [("pneumonia", "left"), ("pneumonia", "right"), ("normal", None)] * TRAIN_PER_KIND
    images = np.stack([render_chest(rng, SIZE, label, lesion_side=side).image for label, side in kinds])
    targets = torch.tensor([CLASSES.index(label) for label, _ in kinds])
    x = to_model_input(torch.from_numpy(images), PRE)
    model = model_type()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (BATCH,), generator=order)
        loss = nn.functional.cross_entropy(model(x[idx]), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(single_thread: None) -> TinyCxrNet:
    return train(TinyCxrNet)


HELD_OUT_SEEDS = list(range(10_000, 10_000 + HELD_OUT))  # never used for training (that draws from seed 0)
HELD_OUT_SIDES = ["left", "right"] * (HELD_OUT // 2)


def test_the_map_lies_in_the_lesion_lung(trained: TinyCxrNet) -> None:
    images, lesion_lungs, other_lungs = render_pneumonia(HELD_OUT_SEEDS, HELD_OUT_SIDES)
    with torch.no_grad():
        predicted = trained(to_model_input(torch.from_numpy(images), PRE)).argmax(1)
    assert (predicted == CLASSES.index("pneumonia")).float().mean() >= 0.8  # the network did learn the task
    ratios = mass_ratios(GradCam(trained, PRE, CLASSES), images, lesion_lungs, other_lungs)
    numbers = localisation(ratios, HELD_OUT_SIDES)
    assert localises(numbers), numbers


def test_moving_the_lesion_moves_the_map(trained: TinyCxrNet) -> None:
    """Negative control: the same anatomy (same seed) with the lesion put in the other lung, and each image
    mirrored left-right. If the map followed anatomy, position or the heart instead of the evidence, its
    favoured lung would not switch with the lesion."""
    cam = GradCam(trained, PRE, CLASSES)
    flipped_sides = ["right" if s == "left" else "left" for s in HELD_OUT_SIDES]
    images, lesion_lungs, other_lungs = render_pneumonia(HELD_OUT_SEEDS, HELD_OUT_SIDES)
    moved, moved_lesion, moved_other = render_pneumonia(HELD_OUT_SEEDS, flipped_sides)
    # The same seed draws the same lungs: the two fields are the same, with their roles swapped.
    np.testing.assert_array_equal(moved_lesion, other_lungs)
    before = mass_ratios(cam, images, lesion_lungs, other_lungs)
    after = mass_ratios(cam, moved, moved_lesion, moved_other)
    switched = (before > 1) & (after > 1)  # the favoured lung is the lesion's, wherever the lesion is put
    assert switched.mean() >= MIN_SHARE, f"the favoured lung switched with the lesion in only {switched.mean():.0%}"

    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    mirror_ratios = mass_ratios(cam, mirrored, lesion_lungs[:, :, ::-1], other_lungs[:, :, ::-1])
    # The masks were mirrored too, so the ratio is still lesion lung over other lung: it must stay above 1.
    assert (mirror_ratios > 1).mean() >= MIN_SHARE
    assert float(np.median(mirror_ratios)) >= MIN_MEDIAN_RATIO


def test_behind_a_pooling_head_the_methods_agree(trained: TinyCxrNet) -> None:
    """Why "auto" may keep Grad-CAM where the head pools: the gradient is the same at every position, so its
    spatial mean changes nothing and HiResCAM gives the same map."""
    images, _, _ = render_pneumonia(HELD_OUT_SEEDS[:8], HELD_OUT_SIDES[:8])
    cam = GradCam(trained, PRE, CLASSES)
    assert cam.method == "gradcam"
    gradcam = np.stack([r.map for r in cam(images, "pneumonia")])
    hirescam = np.stack([r.map for r in cam.with_method("hirescam")(images, "pneumonia")])
    assert gradcam.max() > 0
    np.testing.assert_allclose(hirescam, gradcam, atol=1e-5)


def test_an_untrained_network_does_not_pass(single_thread: None) -> None:
    """The criterion has power: the same network with its initial weights (three draws), which has learnt
    nothing about pneumonia, fails it. Random ReLU features do respond to a bright opacity, so the share of
    images can come close; the median ratio is what separates a network that reads the lesion."""
    images, lesion_lungs, other_lungs = render_pneumonia(HELD_OUT_SEEDS, HELD_OUT_SIDES)
    for seed in range(3):
        torch.manual_seed(seed)
        model = TinyCxrNet().eval()
        numbers = localisation(mass_ratios(GradCam(model, PRE, CLASSES), images, lesion_lungs, other_lungs),
                               HELD_OUT_SIDES)
        assert not localises(numbers), (seed, numbers)


# The flatten head (the package's shape) explained by HiResCAM, GradCam's default for it, against the same
# thresholds as the pooling head. Measured on TinyFlatNet trained with seeds 0-11 (the test trains seed 0):
# lower per-side share 0.75-1.0 (seed 0: 1.0), median ratio 3.9-14.6 (seed 0: 10.6); ten seeds of twelve meet
# both (seed 1: share 0.75; seed 7: median 3.9). Lesion moved: switched in 85-98% (seed 0: 95%); mirrored:
# share 0.83-1.0, median 3.4-17.8 (seed 0: 1.0, 7.1). Untrained (eight draws): lower share at most 0.7,
# median at most 1.6.


@pytest.fixture(scope="module")
def trained_flat(single_thread: None) -> TinyFlatNet:
    return train(TinyFlatNet)


def test_behind_a_flatten_head_hirescam_lies_in_the_lesion_lung(trained_flat: TinyFlatNet) -> None:
    images, lesion_lungs, other_lungs = render_pneumonia(HELD_OUT_SEEDS, HELD_OUT_SIDES)
    with torch.no_grad():
        predicted = trained_flat(to_model_input(torch.from_numpy(images), PRE)).argmax(1)
    assert (predicted == CLASSES.index("pneumonia")).float().mean() >= 0.8  # the network did learn the task
    cam = GradCam(trained_flat, PRE, CLASSES)
    assert cam.method == "hirescam"
    numbers = localisation(mass_ratios(cam, images, lesion_lungs, other_lungs), HELD_OUT_SIDES)
    assert localises(numbers), numbers
    # On every seed measured, Grad-CAM's averaged weights put less of the map in the lesion's lung (its median
    # ratio was 27-39% of HiResCAM's), so the default is the faithful choice here, not only a passing one.
    gradcam = localisation(mass_ratios(cam.with_method("gradcam"), images, lesion_lungs, other_lungs),
                           HELD_OUT_SIDES)
    assert gradcam["median"] < numbers["median"], (gradcam, numbers)


def test_behind_a_flatten_head_moving_the_lesion_moves_the_map(trained_flat: TinyFlatNet) -> None:
    """The negative control of :func:`test_moving_the_lesion_moves_the_map` for the flatten head: the lesion
    put in the other lung of the same anatomy, and each image mirrored."""
    cam = GradCam(trained_flat, PRE, CLASSES)
    flipped_sides = ["right" if s == "left" else "left" for s in HELD_OUT_SIDES]
    images, lesion_lungs, other_lungs = render_pneumonia(HELD_OUT_SEEDS, HELD_OUT_SIDES)
    moved, moved_lesion, moved_other = render_pneumonia(HELD_OUT_SEEDS, flipped_sides)
    before = mass_ratios(cam, images, lesion_lungs, other_lungs)
    after = mass_ratios(cam, moved, moved_lesion, moved_other)
    switched = (before > 1) & (after > 1)
    assert switched.mean() >= MIN_SHARE, f"the favoured lung switched with the lesion in only {switched.mean():.0%}"
    mirror_ratios = mass_ratios(cam, np.ascontiguousarray(images[:, :, ::-1]), lesion_lungs[:, :, ::-1],
                                other_lungs[:, :, ::-1])
    assert (mirror_ratios > 1).mean() >= MIN_SHARE
    assert float(np.median(mirror_ratios)) >= MIN_MEDIAN_RATIO


def test_behind_a_flatten_head_an_untrained_network_does_not_pass(single_thread: None) -> None:
    """The criterion has power for HiResCAM too: the flatten-head network with its initial weights fails it."""
    images, lesion_lungs, other_lungs = render_pneumonia(HELD_OUT_SEEDS, HELD_OUT_SIDES)
    for seed in range(3):
        torch.manual_seed(seed)
        model = TinyFlatNet().eval()
        cam = GradCam(model, PRE, CLASSES)
        assert cam.method == "hirescam"
        numbers = localisation(mass_ratios(cam, images, lesion_lungs, other_lungs), HELD_OUT_SIDES)
        assert not localises(numbers), (seed, numbers)
