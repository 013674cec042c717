"""Is the data path ever the bottleneck? Cache reads + on-device augmentation, timed without the network.

Writes a memory-mapped uint8 cache like ``prepare`` does (N images at the paper's 300x300), then
runs the training input pipeline the way ``train`` does: :func:`covid_cxr.train.loader.train_loader`
reading shuffled batches of 20 from the memmap, :func:`covid_cxr.preprocess.to_model_input`, and the
authors' augmentation as one batched affine warp (:class:`covid_cxr.train.augment.Augmenter`).
Two passes: the first reads from disk (page cache cold for this file only if the OS dropped it),
the second from the page cache, which is the steady state of a 100-epoch phase.

    python -m benchmarks.datapath --images 633
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import emit


def measure(n_images: int, image_size: int, batch_size: int, workdir: Path) -> dict[str, float]:
    import torch

    from covid_cxr.config import make_config
    from covid_cxr.perf import apply_speed_settings
    from covid_cxr.preprocess import Preprocessing, to_model_input
    from covid_cxr.train.augment import Augmenter
    from covid_cxr.train.loader import train_loader

    apply_speed_settings()
    path = workdir / "images.u8"
    rng = np.random.default_rng(0)
    cache = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n_images, image_size, image_size))
    for start in range(0, n_images, 64):
        stop = min(start + 64, n_images)
        cache[start:stop] = rng.integers(0, 256, (stop - start, image_size, image_size), dtype=np.uint8)
    cache.flush()
    del cache
    images = np.memmap(path, dtype=np.uint8, mode="r", shape=(n_images, image_size, image_size))
    labels = rng.integers(0, 3, n_images)
    pre = Preprocessing(image_size=image_size)
    augmenter = Augmenter(make_config("paper").augment, seed=0)
    result: dict[str, float] = {}
    for epoch, name in ((0, "first_pass"), (1, "steady")):
        read_s = aug_s = 0.0
        t0, cpu0 = time.perf_counter(), time.process_time()
        loader = iter(train_loader(images, np.arange(n_images), labels, batch_size=batch_size, seed=0, epoch=epoch))
        while True:
            t_read = time.perf_counter()
            try:
                batch = next(loader)
            except StopIteration:
                break
            t_aug = time.perf_counter()
            x = augmenter(to_model_input(batch.images, pre), global_size=batch.global_size)
            x = x.contiguous(memory_format=torch.channels_last)
            read_s += t_aug - t_read
            aug_s += time.perf_counter() - t_aug
        total = time.perf_counter() - t0
        result[f"{name}_images_per_s"] = n_images / total
        result[f"{name}_images_per_cpu_s"] = n_images / (time.process_time() - cpu0)
        result[f"{name}_read_images_per_s"] = n_images / read_s
        result[f"{name}_augment_images_per_s"] = n_images / aug_s
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=633, help="one phase of the paper holds 633 images")
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="covid-cxr-datapath-") as tmp:
        figures = measure(args.images, args.image_size, args.batch_size, Path(tmp))
    emit({"task": "datapath", "images": args.images, "image_size": args.image_size, "batch": args.batch_size, **figures})


if __name__ == "__main__":
    main()
