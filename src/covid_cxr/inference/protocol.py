"""What every inference backend offers, and the batched loop over any of them.

:class:`~covid_cxr.inference.torch_model.TorchPredictor` and
:class:`~covid_cxr.inference.onnx_model.OnnxPredictor` both satisfy :class:`Predictor`, so ``evaluate``,
``predict``, the web service and the audits never care which one they hold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from covid_cxr.errors import CheckpointError
from covid_cxr.preprocess import Preprocessing


class Predictor(Protocol):
    """What every inference backend offers."""

    backend: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S) at ``preprocessing.image_size`` -> float32 probabilities (N, num_classes)."""
        ...

    def describe(self) -> str:
        """One line naming how it runs (device, precision, providers, compilation), for logs."""
        ...

    def warm_up(self, batch_size: int) -> None:
        """Do now, for batches of ``batch_size``, the one-off work (compilation) the first real call would pay."""
        ...


def check_batch(batch: Any, image_size: int) -> None:
    """Refuse a batch (numpy array or tensor) that is not uint8 (N, S, S) at the model's size, with the reason."""
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
        out[start : start + len(rows)] = finite(predictor.predict_proba(np.ascontiguousarray(batch)))
        if on_batch is not None:
            on_batch(len(rows))
    return out


def finite(probs: np.ndarray) -> np.ndarray:
    """``probs``, refused when a row holds NaN or an infinity: argmax of NaN is index 0, so every such image would be
    called COVID-19 (a checkpoint with such weights is refused when its network is built; this is any model's)."""
    bad = int((~np.isfinite(probs).all(axis=1)).sum())
    if bad:
        raise CheckpointError(f"the model gave NaN or infinite probabilities for {bad} of {len(probs)} images: its "
                              "weights are damaged (or an exported file was edited); export it again from a sound "
                              "checkpoint")
    return probs
