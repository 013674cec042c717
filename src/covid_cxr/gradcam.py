"""Class activation maps: where in the X-ray the evidence for a class lies, and overlays that show it.

For each layer in ``model.gradcam_layers()`` (each backbone's last feature map ``A``, channels
``k``) and the class logit ``y`` (the logit is explained, not the softmax probability, whose
gradient vanishes when the network is confident), two maps are available:

- ``"gradcam"`` (Selvaraju et al., 2017): ``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the
  spatial mean of ``dy/dA_k``.
- ``"hirescam"`` (Draelos & Carin, 2020, "Use HiResCAM instead of Grad-CAM for faithful
  explanations of convolutional neural networks", arXiv:2011.08891):
  ``ReLU(sum_k dy/dA_k * A_k)``, the gradient times the activation at each position.

Which is faithful depends on the head. When it pools globally (mean over positions, then linear),
the gradient is the same at every position, so the two maps are identical.
The package's :class:`~covid_cxr.models.concat.CxrNet` instead flattens (1x1 conv -> flatten ->
dense): each position has its own dense weights, and averaging the gradient over positions mixes
one position's weights with another's activations. Grad-CAM can then put the map where the network
does not look: on a small CNN with this head trained (twelve seeds) on synthetic radiographs with a
lesion in one lung, Grad-CAM's median ratio of map mass in the lesion's lung to the other lung was
1.4-4.2, HiResCAM's 3.9-14.6, higher on every seed (``tests/test_gradcam_localisation.py``).
For a head that is affine in ``A`` (the dense head in eval mode), HiResCAM's unrectified map summed
over positions is exactly ``y(A) - y(0)``: the head's own computation, split by position.

``method="auto"`` (the default) therefore uses HiResCAM unless the model declares a pooling head
with a class attribute ``head_pools = True``; a model that does not say is taken to flatten.

The concatenated network's combined map is the method applied to the concatenated 4096-channel map
that its head actually reads. Both maps are sums of per-channel terms, so that map is exactly
``ReLU(raw_xception + raw_resnet50v2)``, the sum of the two backbones' maps *before* their ReLU
and normalisation: a region one backbone argues for and the other against counts as the head
sees it, instead of each map being stretched to [0, 1] on its own and averaged.

Maps come back upsampled to the input size and scaled to [0, 1] per image (all zeros when no
region argues for the class).
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from covid_cxr.atomic import write_bytes
from covid_cxr.choices import CAM_METHODS
from covid_cxr.errors import ConfigError
from covid_cxr.labels import normalize_label
from covid_cxr.preprocess import Preprocessing, to_model_input

COMBINED = "combined"
# A PNG text chunk (keyword NUL text) that every overlay file carries, right after its header: how a later ``predict``
# knows a file in its --gradcam folder is an overlay it may replace, and not an X-ray or a user's own picture.
OVERLAY_MARK = b"Software\0covid-cxr Grad-CAM overlay"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEADER_END = len(_PNG_SIGNATURE) + 25  # the IHDR chunk: length, type, 13 bytes, CRC


def resolve_method(model: torch.nn.Module, method: str) -> str:
    """``"hirescam"`` or ``"gradcam"``: ``"auto"`` picks Grad-CAM only for a model whose ``head_pools`` is true."""
    if method not in CAM_METHODS:
        raise ConfigError(f"CAM method must be one of {', '.join(CAM_METHODS)}; got {method!r}")
    if method != "auto":
        return method
    return "gradcam" if getattr(model, "head_pools", False) else "hirescam"


@dataclass(frozen=True)
class CamResult:
    """The class activation map(s) of one image for one class."""

    target: int  # index of the class explained
    probabilities: np.ndarray  # (C,) float32
    maps: dict[str, np.ndarray]  # layer name (and "combined") -> (S, S) float32 in [0, 1]
    method: str = "hirescam"  # "hirescam" or "gradcam": how the maps were made

    @property
    def map(self) -> np.ndarray:
        """The map to show: the combination for several backbones, else the only one."""
        return self.maps[COMBINED] if COMBINED in self.maps else next(iter(self.maps.values()))


class GradCam:
    """HiResCAM or Grad-CAM over a network's ``gradcam_layers()``, always in fp32 (gradients in bf16 are too
    coarse). ``method``: ``"auto"`` (HiResCAM unless ``model.head_pools``), ``"hirescam"`` or ``"gradcam"``;
    the one used is ``self.method``."""

    def __init__(self, model: torch.nn.Module, preprocessing: Preprocessing, classes: Sequence[str],
                 method: str = "auto") -> None:
        layers = model.gradcam_layers()
        if not layers:
            raise ConfigError(f"network {getattr(model, 'network_name', type(model).__name__)} names no Grad-CAM layer")
        self.model = model
        self.layers: dict[str, torch.nn.Module] = dict(layers)
        self.preprocessing = preprocessing
        self.classes = tuple(classes)
        self.method = resolve_method(model, method)

    def with_method(self, method: str) -> GradCam:
        """The same network and classes explained with another method (``"auto"`` resolves for this model)."""
        return GradCam(self.model, self.preprocessing, self.classes, method)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def class_index(self, target: int | str) -> int:
        """Accept a class index or any spelling of a class name; refuse others with the valid names."""
        if isinstance(target, (int, np.integer)):
            if not 0 <= int(target) < len(self.classes):
                raise ConfigError(f"class index must be in 0..{len(self.classes) - 1}; got {target}")
            return int(target)
        key = normalize_label(target, where="the Grad-CAM class")
        return self.classes.index(key)

    def _targets(self, target: int | str | Sequence[int | str] | None, n: int) -> torch.Tensor | None:
        if target is None:
            return None
        if isinstance(target, (str, int, np.integer)):
            return torch.full((n,), self.class_index(target), dtype=torch.long)
        indices = [self.class_index(t) for t in target]
        if len(indices) != n:
            raise ValueError(f"{len(indices)} targets for {n} images")
        return torch.tensor(indices, dtype=torch.long)

    def __call__(self, images: np.ndarray, target: int | str | Sequence[int | str] | None = None) -> list[CamResult]:
        """Maps for a uint8 batch (N, S, S) for ``target``: one class for all, one per image, or (None) the
        class this fp32 forward pass predicts."""
        batch = torch.as_tensor(np.ascontiguousarray(images)).to(self.device)
        chosen = self._targets(target, len(batch))  # a bad class fails before any work
        x = to_model_input(batch, self.preprocessing).requires_grad_(True)  # grads flow even if weights are frozen
        acts: dict[str, torch.Tensor] = {}
        hooks = [
            layer.register_forward_hook(lambda _m, _i, out, name=name: acts.__setitem__(name, out))
            for name, layer in self.layers.items()
        ]
        try:
            with torch.inference_mode(False), torch.enable_grad():
                logits = self.model(x).float()
                targets = logits.argmax(dim=1) if chosen is None else chosen.to(logits.device)
                score = logits.gather(1, targets[:, None]).sum()  # samples are independent in eval mode
                names = list(self.layers)
                grads = torch.autograd.grad(score, [acts[n] for n in names])
        finally:
            for hook in hooks:
                hook.remove()
        raw = {}
        for name, grad in zip(names, grads):
            act = acts[name].detach().float()
            weights = grad.float() if self.method == "hirescam" else grad.float().mean(dim=(2, 3), keepdim=True)
            raw[name] = (weights * act).sum(dim=1, keepdim=True)  # (N, 1, h, w), before ReLU
        if len(raw) > 1:
            size = max((r.shape[-2:] for r in raw.values()), key=lambda s: s[0] * s[1])
            raw[COMBINED] = sum(F.interpolate(r, size=size, mode="bilinear", align_corners=False) for r in raw.values())
        side = self.preprocessing.image_size
        maps = {name: _normalise(F.interpolate(r.relu(), size=(side, side), mode="bilinear", align_corners=False))
                for name, r in raw.items()}
        probs = torch.softmax(logits.detach(), dim=1).cpu().numpy()
        picked = targets.cpu().numpy()
        return [
            CamResult(int(picked[i]), probs[i], {name: m[i] for name, m in maps.items()}, self.method)
            for i in range(len(picked))
        ]


def _normalise(maps: torch.Tensor) -> np.ndarray:
    """(N, 1, S, S) non-negative -> (N, S, S) float32 scaled to [0, 1] per image."""
    peak = maps.amax(dim=(1, 2, 3), keepdim=True)
    scaled = torch.where(peak > 0, maps / peak.clamp_min(1e-12), torch.zeros_like(maps))
    return scaled[:, 0].cpu().numpy().astype(np.float32)


def overlay(image: np.ndarray, cam: np.ndarray, *, strength: float = 0.6) -> np.ndarray:
    """RGB uint8 (H, W, 3): the gray X-ray with a jet heatmap whose opacity grows with the map.

    ``cam`` is resized to the image; where the map is zero the X-ray shows untouched.
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a grayscale uint8 image, got {image.dtype} {image.shape}")
    h, w = image.shape
    cam = np.clip(cv2.resize(cam.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    heat = cv2.applyColorMap(np.round(cam * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    gray = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    alpha = (strength * cam)[..., None]
    return np.round(gray * (1 - alpha) + heat.astype(np.float32) * alpha).astype(np.uint8)


def overlay_png(image: np.ndarray, cam: np.ndarray) -> bytes:
    """The overlay encoded as PNG bytes (what the web service returns)."""
    ok, data = cv2.imencode(".png", overlay(image, cam)[..., ::-1])
    if not ok:
        raise RuntimeError("OpenCV could not encode the overlay as PNG")
    return data.tobytes()


def save_overlay(path: str | os.PathLike[str], image: np.ndarray, cam: np.ndarray) -> Path:
    """Write the overlay as a PNG carrying :data:`OVERLAY_MARK`, atomically: a failure leaves no half-written file."""
    return write_bytes(path, _marked(overlay_png(image, cam)))


def is_overlay(path: str | os.PathLike[str]) -> bool:
    """True for a regular file (not a link) that :func:`save_overlay` wrote: one a later run may replace."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # never opened otherwise: reading a pipe would wait forever
            return False
        with open(path, "rb") as fh:
            head = fh.read(_HEADER_END + 8 + len(OVERLAY_MARK))
    except OSError:
        return False
    return head.startswith(_PNG_SIGNATURE) and head[_HEADER_END + 4 :] == b"tEXt" + OVERLAY_MARK


def _marked(png: bytes) -> bytes:
    """``png`` with :data:`OVERLAY_MARK` as a tEXt chunk right after its header (where :func:`is_overlay` looks)."""
    kind = b"tEXt" + OVERLAY_MARK
    chunk = struct.pack(">I", len(OVERLAY_MARK)) + kind + struct.pack(">I", zlib.crc32(kind))
    return png[:_HEADER_END] + chunk + png[_HEADER_END:]
