"""Training throughput (images/s) of the real training step, for fp32 / bf16 and channels_last or not.

Times :func:`covid_cxr.train.engine.train_one_epoch` (uint8 batches from a memory-mapped array via
the training loader, on-device augmentation, scaling, forward, cross-entropy, backward, Nadam step)
on an untrained network: speed does not depend on the weights. The first ``--warmup`` steps are
not timed.

    python benchmarks/train_throughput.py --network concat --image-size 300 --batch-size 20 --steps 10
    python benchmarks/train_throughput.py --device cuda --steps 50 --write   # adds rows to RESULTS.md

``--write`` appends the rows to the ``## Training throughput`` section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from covid_cxr.config import AugmentSettings
from covid_cxr.models import build_model
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runtime import choose_runtime
from covid_cxr.train.augment import Augmenter
from covid_cxr.train.engine import train_one_epoch
from covid_cxr.train.loader import LoaderOptions, train_loader

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Training throughput"
HEADER = (
    "| date (UTC) | machine | network | image | batch | precision | memory | images/s | s/step |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
)


def measure(network: str, image_size: int, batch: int, steps: int, warmup: int, device: str, precision: str,
            channels_last: bool, folder: Path) -> tuple[float, float]:  # fmt: skip
    """(images/s, seconds per step) over ``steps`` timed steps."""
    runtime = choose_runtime(device, precision, channels_last)
    torch.manual_seed(0)
    model = build_model(network, 3, image_size).to(runtime.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.NAdam(model.parameters(), lr=1e-4, eps=1e-7)
    n = batch * (steps + warmup)
    path = folder / f"images-{image_size}.u8"
    images = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, image_size, image_size))
    images[:] = np.random.default_rng(0).integers(0, 256, size=images.shape, dtype=np.uint8)
    images.flush()
    images = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, image_size, image_size))
    labels = np.arange(n) % 3
    pre = Preprocessing(image_size=image_size)
    aug = Augmenter(AugmentSettings(), seed=0)
    stamps: list[float] = []

    def on_batch(index: int, total: int, loss: float, seen: int) -> None:
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    options = LoaderOptions(pin_memory=runtime.device.type == "cuda")
    loader = train_loader(images, np.arange(n), labels, batch_size=batch, seed=0, epoch=0, options=options)
    train_one_epoch(model, loader, optimizer, preprocessing=pre, runtime=runtime, augmenter=aug, on_batch=on_batch)
    seconds = stamps[-1] - stamps[warmup - 1] if warmup else stamps[-1] - stamps[0]
    timed = steps if warmup else steps - 1
    return batch * timed / seconds, seconds / timed


def machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), load average {load:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", default="concat")
    p.add_argument("--image-size", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--write", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            for channels_last in (False, True):
                rate, per_step = measure(args.network, args.image_size, args.batch_size, args.steps, args.warmup,
                                         args.device, precision, channels_last, Path(tmp))  # fmt: skip
                memory = "channels_last" if channels_last else "contiguous"
                row = (f"| {dt.datetime.now(dt.timezone.utc):%Y-%m-%d} | {machine(args.device)} | {args.network} | "
                       f"{args.image_size} | {args.batch_size} | {precision} | {memory} | {rate:.2f} | {per_step:.2f} |")  # fmt: skip
                print(row, flush=True)
                rows.append(row)
    if args.write:
        write_rows(rows)


def write_rows(rows: list[str]) -> None:
    """Append rows to this script's section of RESULTS.md (creating the file or the section)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n`python benchmarks/train_throughput.py` (see its docstring).\n\n{HEADER}"
    start = text.index(SECTION)
    nxt = text.find("\n## ", start + len(SECTION))
    end = len(text) if nxt == -1 else nxt
    section = text[start:end].rstrip("\n")
    if HEADER.splitlines()[0] not in section:
        section += "\n\n" + HEADER.rstrip("\n")
    # rows go right after the table's last row
    lines = section.split("\n")
    last_row = max(i for i, line in enumerate(lines) if line.startswith("|"))
    lines[last_row + 1 : last_row + 1] = rows
    RESULTS.write_text(text[:start] + "\n".join(lines) + "\n" + text[end:])


if __name__ == "__main__":
    main()
