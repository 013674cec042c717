"""One training epoch and one evaluation pass: tensors in, statistics out, no files touched.

Losses are cross-entropy on logits (the network's softmax is folded into the loss, as Keras'
``categorical_crossentropy`` on a softmax output computes). In a data-parallel run each rank's
loss is scaled by ``world * n_rank / n_global``, so DDP's gradient average equals the mean over
the global batch even when the last batch does not split evenly; the reported sums are
all-reduced, so every rank reports the global figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from covid_cxr.preprocess import Preprocessing, to_model_input
from covid_cxr.runtime import Runtime
from covid_cxr.train.augment import Augmenter
from covid_cxr.train.distributed import DistInfo, all_reduce_sum
from covid_cxr.train.loader import Batch


@dataclass(frozen=True)
class EpochStats:
    """One pass's mean loss and accuracy over every image of every rank, and its duration."""

    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


BatchCallback = Callable[[int, int, float, int], None]
"""``on_batch(batch_index, num_batches, running_loss, images_so_far)`` for progress displays."""


Step = Callable[[torch.Tensor, torch.Tensor, Batch], tuple[torch.Tensor, torch.Tensor]]
"""``step(x, y, batch) -> (logits, per-image loss)`` on one batch already on the device."""


def _inputs(batch: Batch, pre: Preprocessing, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    images = batch.images.to(runtime.device, non_blocking=True)
    labels = batch.labels.to(runtime.device, non_blocking=True)
    return to_model_input(images, pre), labels


def _memory_format(x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x


def _loop(batches: Iterable[Batch], step: Step, *, preprocessing: Preprocessing, runtime: Runtime, dist: DistInfo,
          on_batch: BatchCallback | None = None) -> EpochStats:  # fmt: skip
    """The loop training and evaluation share: each batch to the device, ``step``, and the all-reduced sums."""
    num_batches = len(batches) if hasattr(batches, "__len__") else 0  # type: ignore[arg-type]
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    correct = torch.zeros((), dtype=torch.int64, device=runtime.device)
    seen_global = 0
    start = time.perf_counter()
    for index, batch in enumerate(batches):
        seen_global += batch.global_size
        if batch.images.shape[0] == 0:  # this rank's slice of a last evaluation batch smaller than the world
            continue
        x, y = _inputs(batch, preprocessing, runtime)
        logits, per_image = step(x, y, batch)
        loss_sum += per_image.detach().sum().double()
        correct += (logits.detach().argmax(1) == y).sum()
        if on_batch is not None:
            on_batch(index, num_batches, float(loss_sum) / max(seen_global // dist.world_size, 1), seen_global)
    totals = all_reduce_sum(torch.stack([loss_sum, correct.double()]), dist)
    seconds = time.perf_counter() - start
    n = max(seen_global, 1)
    return EpochStats(loss=float(totals[0]) / n, accuracy=float(totals[1]) / n, images=seen_global, seconds=seconds)


def train_one_epoch(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    preprocessing: Preprocessing,
    runtime: Runtime,
    augmenter: Augmenter | None = None,
    dist: DistInfo | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_batch: BatchCallback | None = None,
) -> EpochStats:
    """Train over ``batches`` once; returns the mean loss and accuracy over all images of all ranks."""
    dist = dist or DistInfo()
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if augmenter is not None:
            x = augmenter(x, global_size=batch.global_size, rank=dist.rank, world=dist.world_size)
        x = _memory_format(x, runtime)
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast():
            logits = model(x)
        per_image = F.cross_entropy(logits.float(), y, reduction="none")
        loss = per_image.sum() * (dist.world_size / batch.global_size)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return logits, per_image

    return _loop(batches, step, preprocessing=preprocessing, runtime=runtime, dist=dist, on_batch=on_batch)


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    preprocessing: Preprocessing,
    runtime: Runtime,
    dist: DistInfo | None = None,
) -> EpochStats:
    """Loss and accuracy without augmentation (resize and scale only), in eval mode."""
    dist = dist or DistInfo()
    model.eval()

    def step(x: torch.Tensor, y: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with runtime.autocast():
            logits = model(_memory_format(x, runtime)).float()
        return logits, F.cross_entropy(logits, y, reduction="none")

    return _loop(batches, step, preprocessing=preprocessing, runtime=runtime, dist=dist)
