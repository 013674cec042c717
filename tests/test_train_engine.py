"""The epoch engine and the batch loader on tiny data made here (no prepared folder needed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from covid_cxr.config import AugmentSettings
from covid_cxr.preprocess import Preprocessing, to_model_input
from covid_cxr.runtime import choose_runtime
from covid_cxr.train.augment import Augmenter
from covid_cxr.train.engine import evaluate, train_one_epoch
from covid_cxr.train.loader import (
    LoaderOptions,
    eval_loader,
    global_batches,
    label_indices,
    train_loader,
)
from covid_cxr.train.progress import Progress

SIZE = 72
PRE = Preprocessing(image_size=SIZE)
RUNTIME = choose_runtime("cpu", "fp32", False)


class TinyNet(nn.Module):
    """Mean brightness per class is enough for this data."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class k images are uniformly bright at about 40 + 80 k, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    base = 40 + 80 * labels[:, None, None]
    pixels = np.clip(base + rng.normal(0, 10, size=(n, SIZE, SIZE)), 0, 255).astype(np.uint8)
    return pixels, labels.astype(np.int64)


def test_loss_falls_on_a_learnable_set() -> None:
    torch.manual_seed(0)
    images, labels = _images(24)
    model = TinyNet()
    opt = torch.optim.NAdam(model.parameters(), lr=3e-2)
    aug = Augmenter(AugmentSettings(), seed=0)
    losses = []
    for epoch in range(12):
        batches = train_loader(images, np.arange(24), labels, batch_size=8, seed=0, epoch=epoch)
        losses.append(train_one_epoch(model, batches, opt, preprocessing=PRE, runtime=RUNTIME, augmenter=aug).loss)
    assert losses[-1] < 0.5 * losses[0]
    val = evaluate(model, eval_loader(images, np.arange(24), labels, batch_size=10), preprocessing=PRE, runtime=RUNTIME)
    assert val.images == 24 and val.accuracy > 0.9


def test_evaluation_applies_no_augmentation() -> None:
    torch.manual_seed(1)
    images, labels = _images(9)
    model = TinyNet().eval()
    stats = evaluate(model, eval_loader(images, np.arange(9), labels, batch_size=4), preprocessing=PRE, runtime=RUNTIME)
    with torch.no_grad():
        logits = model(to_model_input(torch.from_numpy(images), PRE))
    expected = nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item()
    assert stats.loss == pytest.approx(expected, rel=1e-5)
    assert stats.accuracy == pytest.approx((logits.argmax(1).numpy() == labels).mean())


def test_epoch_order_batches_and_rank_slices() -> None:
    images, labels = _images(10)
    rows = np.arange(10)[::-1].copy()  # cache rows need not follow split order
    a = [b.labels.tolist() for b in train_loader(images, rows, labels, batch_size=4, seed=3, epoch=2)]
    b = [b.labels.tolist() for b in train_loader(images, rows, labels, batch_size=4, seed=3, epoch=2)]
    c = [b.labels.tolist() for b in train_loader(images, rows, labels, batch_size=4, seed=3, epoch=3)]
    assert a == b and a != c and [len(x) for x in a] == [4, 4, 2]
    whole = list(train_loader(images, rows, labels, batch_size=4, seed=3, epoch=2))
    for rank in range(2):
        share = LoaderOptions(rank=rank, world=2)
        part = list(train_loader(images, rows, labels, batch_size=4, seed=3, epoch=2, options=share))
        for w, p in zip(whole, part, strict=True):
            assert torch.equal(p.images, w.images[rank::2]) and p.global_size == w.global_size
    assert [len(x) for x in global_batches(np.arange(9), 4, world=2)] == [4, 4]  # a 1-image tail is dropped
    assert [len(x) for x in global_batches(np.arange(9), 4, world=1)] == [4, 4, 1]


def test_worker_processes_read_the_memmap_file(tmp_path: Path) -> None:
    images, labels = _images(12)
    path = tmp_path / "cache.u8"
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=images.shape)
    mm[:] = images
    mm.flush()
    ro = np.memmap(path, dtype=np.uint8, mode="r", shape=images.shape)
    rows = np.arange(12)
    inline = list(train_loader(ro, rows, labels, batch_size=5, seed=0, epoch=0, options=LoaderOptions(workers=0)))
    spawned = LoaderOptions(workers=1, prefetch=2)
    workers = list(train_loader(ro, rows, labels, batch_size=5, seed=0, epoch=0, options=spawned))
    assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(inline, workers))
    assert inline[0].images.dtype == torch.uint8


def test_unknown_label_names_the_split() -> None:
    assert label_indices(["normal", "covid"]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="phase 3: unknown label 'flu'"):
        label_indices(["covid", "flu"], where="phase 3")


def test_progress_live_line_and_plain_log() -> None:
    images, labels = _images(6)
    model, opt = TinyNet(), torch.optim.SGD(TinyNet().parameters(), lr=0.0)
    for live in (True, False):
        out = io.StringIO()
        progress = Progress(4, num_phases=2, stream=out, live=live, min_interval=0.0)
        progress.start_epoch(1, 1, 2, 0)
        batches = train_loader(images, np.arange(6), labels, batch_size=2, seed=0, epoch=0)
        stats = train_one_epoch(model, batches, opt, preprocessing=PRE, runtime=RUNTIME, on_batch=progress.on_batch)
        progress.end_epoch(stats, stats, best=True)
        text = out.getvalue()
        assert "phase 1/2 epoch 1/2" in text and "ETA" in text and "*best*" in text
        assert ("batch 3/3" in text) is live and text.count("\n") == 1


def test_cv_fold_lists() -> None:
    from covid_cxr.cli.cv import parse_folds
    from covid_cxr.errors import ConfigError

    assert parse_folds("1-5") == [1, 2, 3, 4, 5] and parse_folds("2") == [2] and parse_folds("1,3-4") == [1, 3, 4]
    for bad in ("0-2", "3-1", "a", "1,1", ""):
        with pytest.raises(ConfigError, match="--folds"):
            parse_folds(bad)
