"""Batched inference from a checkpoint: uint8 grayscale images in, class probabilities out.

:class:`TorchPredictor` is the one inference loop of the package: ``evaluate`` runs it over a
prepared split, ``predict`` over files, the web service over uploads, the audits over altered
images. The ONNX Runtime backend (``covid_cxr.deploy.onnx``) offers the same surface
(``classes``, ``preprocessing``, ``predict_proba``), so callers never care which one they hold.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from covid_cxr.preprocess import Preprocessing, to_model_input
from covid_cxr.runs.checkpoint import Checkpoint
from covid_cxr.runtime import Runtime, choose_runtime


class Predictor(Protocol):
    """What every inference backend offers."""

    backend: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S) at ``preprocessing.image_size`` -> float32 probabilities (N, num_classes)."""
        ...


COMPILE_CHOICES = ("auto", "on", "off")
# torch.compile of the concatenated network takes ~30 s on 2 cores and then saves ~12% per image at batch 20
# (benchmarks/RESULTS.md: 9.4 -> 10.5 images/s at 300 px); below this many images it costs more than it saves.
COMPILE_MIN_IMAGES = 3000


def should_compile(choice: str, images: int) -> bool:
    """Resolve ``--compile auto|on|off`` for a job of ``images`` images."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}; got {choice!r}")
    return choice == "on" or (choice == "auto" and images >= COMPILE_MIN_IMAGES)


def fold_batchnorms(model: torch.nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution, in place.

    The folded convolution computes ``bn(conv(x))`` in one pass (equal up to float rounding: about 1e-7
    relative), and the BatchNorm becomes an ``Identity``, so the module tree (``forward_features``, the
    Grad-CAM layers) stays as it was. BatchNorms after an addition (ResNet50V2's pre-activations) stay.
    The graph is read with ``torch.fx``; returns how many BatchNorms were folded.
    """
    from torch import fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from covid_cxr.models.layers import MaxPool2dSame

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, name: str) -> bool:  # its padding reads the input's shape
            return isinstance(m, MaxPool2dSame) or super().is_leaf_module(m, name)

    if model.training:
        raise ValueError("fold_batchnorms needs a model in eval mode: training BatchNorms use batch statistics")
    graph = _Tracer().trace(model)
    calls = [n for n in graph.nodes if n.op == "call_module"]
    uses: dict[str, int] = {}
    for node in calls:
        uses[node.target] = uses.get(node.target, 0) + 1
    folded = 0
    for node in calls:
        bn = model.get_submodule(node.target)
        source = node.args[0] if node.args else None
        if not isinstance(bn, torch.nn.BatchNorm2d) or getattr(source, "op", None) != "call_module":
            continue
        conv = model.get_submodule(source.target)
        if not isinstance(conv, torch.nn.Conv2d) or len(source.users) != 1 or uses[source.target] != 1:
            continue
        model.set_submodule(source.target, fuse_conv_bn_eval(conv, bn))
        model.set_submodule(node.target, torch.nn.Identity())
        folded += 1
    return folded


class TorchPredictor:
    """A checkpoint's network in eval mode on the chosen runtime.

    With ``compile=True`` the network runs through ``torch.compile`` with inductor's freezing (BatchNorms
    folded into the convolutions, weights prepacked for oneDNN): the fastest inference PyTorch offers
    here, for jobs long enough to repay the compilation. The compiled graph is specialised to the first
    batch size it sees; smaller batches are zero-padded to it and larger ones split, so it never
    recompiles. If compilation fails (no C++ compiler, an unsupported platform) the predictor says so on
    stderr and goes on in eager mode.
    """

    backend = "torch"

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        device: str = "auto",
        precision: str = "auto",
        channels_last: bool | None = None,
        compile: bool = False,
        fold: bool = False,
    ) -> None:
        self.checkpoint = checkpoint
        self.classes = checkpoint.classes
        self.preprocessing = checkpoint.preprocessing
        self.runtime: Runtime = choose_runtime(device, precision, channels_last)
        model = checkpoint.build_model()
        self.folded = fold_batchnorms(model) if fold else 0
        model = model.to(self.runtime.device)
        if self.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.compiled = compile
        self._compiled_model = torch.compile(self.model) if compile else None
        self._compiled_batch: int | None = None

    def describe(self) -> str:
        folded = f" bn_folded={self.folded}" if self.folded else ""
        return f"{self.runtime.describe()} compile={'on' if self.compiled else 'off'}{folded}"

    def warm_up(self, batch: int) -> None:
        """One forward pass on blank images: compiles now, for batches of ``batch``, instead of on the first real call."""
        size = self.preprocessing.image_size
        self.predict_proba(np.zeros((batch, size, size), dtype=np.uint8))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled_model is None:
            return self.model(x)
        import torch._inductor.config as inductor_config

        n = len(x)
        step = self._compiled_batch or n
        outputs = []
        for start in range(0, n, step):
            part = x[start : start + step]
            if len(part) < step:  # pad to the compiled batch size: a new shape would mean a new compilation
                layout = torch.channels_last if self.runtime.channels_last else torch.contiguous_format
                filler = part.new_zeros((step - len(part), *part.shape[1:]))
                part = torch.cat([part, filler]).contiguous(memory_format=layout)
            try:
                with inductor_config.patch(freezing=True):
                    out = self._compiled_model(part)
            except Exception as exc:  # inductor raises many types; any failure means: run eagerly
                print(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                      "going on without it", file=sys.stderr)
                self._compiled_model, self.compiled = None, False
                return self.model(x)
            self._compiled_batch = step
            outputs.append(out[: min(step, n - start)])
        return torch.cat(outputs)

    def inputs(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The float network input for a uint8 batch, on the runtime's device."""
        batch = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        check_batch(batch, self.preprocessing.image_size)
        batch = batch.to(self.runtime.device, non_blocking=True)
        return to_model_input(batch, self.preprocessing, channels_last=self.runtime.channels_last)

    @torch.inference_mode()
    def logits(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        with self.runtime.autocast():
            return self._forward(self.inputs(images)).float()

    def predict_proba(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        return torch.softmax(self.logits(images), dim=1).cpu().numpy()


def check_batch(batch: torch.Tensor | np.ndarray, image_size: int) -> None:
    """Refuse a batch that is not uint8 (N, S, S) at the model's size, with the reason."""
    shape = tuple(batch.shape)
    if len(shape) != 3 or shape[1:] != (image_size, image_size):
        raise ValueError(f"expected uint8 images of shape (N, {image_size}, {image_size}), got {shape}")
    if str(batch.dtype) not in ("uint8", "torch.uint8"):
        raise ValueError(f"expected uint8 images, got {batch.dtype}")


def predict_in_batches(
    predictor: Predictor,
    images: np.ndarray | Sequence[np.ndarray],
    *,
    batch_size: int = 32,
    indices: np.ndarray | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Probabilities for ``images[indices]`` (all when None), ``batch_size`` at a time.

    ``images`` may be a memory-mapped cache: rows are read a batch at a time, never all at once.
    ``on_batch(n)`` is called after each batch with its size (for progress bars).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1; got {batch_size}")
    order = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64)
    out = np.empty((len(order), len(predictor.classes)), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        if isinstance(images, np.ndarray):
            batch = images[rows]
        else:
            batch = np.stack([images[i] for i in rows])
        out[start : start + len(rows)] = predictor.predict_proba(np.ascontiguousarray(batch))
        if on_batch is not None:
            on_batch(len(rows))
    return out
