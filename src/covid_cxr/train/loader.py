"""Batches of uint8 images straight from the prepared memory-mapped cache.

The cache (``PreparedData.cache()``) holds every image once, resized, as uint8. A batch is a
fancy-indexed read of its rows: no decoding, no per-image Python work. Batches travel as uint8
(four times fewer bytes than float), in pinned memory when the device is a GPU, built ahead by
worker processes (``workers``, ``prefetch``); scaling and augmentation happen on the device.

The order of a training epoch is a pure function of ``(seed, epoch)``, so a resumed run draws the
same batches as an uninterrupted one without storing any sampler state. In a multi-process run
every rank builds the same global batches and keeps its slice ``[rank::world]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from covid_cxr.errors import DataError
from covid_cxr.labels import CLASSES


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # uint8 (n, S, S): this rank's slice
    labels: torch.Tensor  # int64 (n,)
    global_size: int  # images in the whole global batch (all ranks)


def label_indices(labels: Sequence[str], classes: Sequence[str] = CLASSES, *, where: str = "split") -> np.ndarray:
    """Class keys -> output-unit indices; an unknown key is a data error naming where it came from."""
    lookup = {c: i for i, c in enumerate(classes)}
    try:
        return np.fromiter((lookup[str(x)] for x in labels), dtype=np.int64, count=len(labels))
    except KeyError as exc:
        raise DataError(f"{where}: unknown label {exc.args[0]!r}; expected one of {', '.join(classes)}") from exc


def epoch_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` items for one epoch, reproducible from ``(seed, epoch)`` alone."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def global_batches(order: np.ndarray, batch_size: int, *, world: int = 1) -> list[np.ndarray]:
    """Split an epoch order into global batches (the last may be short).

    A last batch with fewer images than ranks is dropped: every rank must take part in each step
    of a data-parallel run (with one process nothing is ever dropped).
    """
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if batches and len(batches[-1]) < world:
        batches.pop()
    return batches


class _BatchReader(Dataset):
    """Item ``i`` is this rank's slice of global batch ``i``, read from the cache in one go."""

    def __init__(
        self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray, batches: list[np.ndarray], rank: int, world: int
    ) -> None:
        self.images = images
        self.rows = rows
        self.labels = labels
        self.batches = batches
        self.rank = rank
        self.world = world

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        positions = self.batches[i]
        mine = positions[self.rank :: self.world]
        pixels = np.ascontiguousarray(self.images[self.rows[mine]])
        return torch.from_numpy(pixels), torch.from_numpy(self.labels[mine]), len(positions)

    def __getstate__(self) -> dict[str, Any]:
        # A memmap pickles as a full copy; workers reopen the file instead.
        state = dict(self.__dict__)
        images = self.images
        if isinstance(images, np.memmap) and images.filename:
            state["images"] = (str(images.filename), images.dtype.str, images.shape, int(images.offset))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        images = state["images"]
        if isinstance(images, tuple):
            filename, dtype, shape, offset = images
            state["images"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=shape, offset=offset)
        self.__dict__.update(state)


@dataclass(frozen=True)
class LoaderOptions:
    """How a loader delivers batches, whatever their order: this rank's share, workers, pinned memory."""

    rank: int = 0
    world: int = 1
    workers: int = 0
    prefetch: int = 2
    pin_memory: bool = False


class BatchLoader:
    """Iterable of :class:`Batch` for one epoch over ``rows`` of the cache, in the order ``batches`` give."""

    def __init__(
        self,
        images: np.ndarray,
        rows: np.ndarray,
        labels: np.ndarray,
        batches: list[np.ndarray],
        options: LoaderOptions = LoaderOptions(),
    ) -> None:
        if len(rows) != len(labels):
            raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
        rows = np.asarray(rows, dtype=np.int64)
        self.reader = _BatchReader(images, rows, labels, batches, options.rank, options.world)
        self.options = options

    def __len__(self) -> int:
        return len(self.reader)

    def __iter__(self) -> Iterator[Batch]:
        workers = self.options.workers
        loader = DataLoader(
            self.reader,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            prefetch_factor=self.options.prefetch if workers > 0 else None,
            pin_memory=self.options.pin_memory,
        )
        for images, labels, global_size in loader:
            yield Batch(images=images, labels=labels, global_size=int(global_size))


def train_loader(
    images: np.ndarray, rows: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int, epoch: int,
    options: LoaderOptions = LoaderOptions(),
) -> BatchLoader:  # fmt: skip
    """One shuffled training epoch (the order depends only on ``seed`` and ``epoch``)."""
    order = epoch_order(len(rows), seed=seed, epoch=epoch)
    return BatchLoader(images, rows, labels, global_batches(order, batch_size, world=options.world), options)


def eval_loader(
    images: np.ndarray, rows: np.ndarray, labels: np.ndarray, *, batch_size: int,
    options: LoaderOptions = LoaderOptions(),
) -> BatchLoader:  # fmt: skip
    """Every row once, in order; ranks split each batch, none is dropped (empty slices are fine)."""
    batches = [np.arange(i, min(i + batch_size, len(rows))) for i in range(0, len(rows), batch_size)]
    return BatchLoader(images, rows, labels, batches, options)
