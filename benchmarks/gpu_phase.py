"""Times one phase of the paper preset on a GPU and projects the whole protocol: 5 folds x 3 networks.

The paper's protocol per network and fold: 8 phases x 100 epochs over 633 images (batch 20 for the
concatenated network, 30 for Xception and ResNet50V2), then a test pass over about 11302 images.
This script trains each network for ``--epochs`` timed epochs (after ``--warmup-epochs`` untimed ones,
which also absorb ``torch.compile``) on a phase-sized set of random uint8 images, through the same
code as ``covid-cxr train``: :func:`covid_cxr.train.engine.train_one_epoch` with the paper's Nadam,
the on-device augmentation, bf16 autocast and channels_last from :func:`covid_cxr.runtime.choose_runtime`.
It times inference over ``--test-images`` the same way, and prints (and writes, with ``--out``) a JSON
projection: seconds per epoch, per phase (x100), per fold (x8 + test), and for all 5 x 3 runs.

    python -m benchmarks.gpu_phase --out gpu.json            # on a CUDA machine
    python -m benchmarks.gpu_phase --device cpu --image-size 96 --phase-images 40 --epochs 1 --test-images 40
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit

PAPER = {"phases": 8, "epochs_per_phase": 100, "phase_images": 633, "test_images": 11302, "folds": 5}
BATCH = {"concat": 20, "xception": 30, "resnet50v2": 30}


def time_network(network: str, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from covid_cxr.config import make_config
    from covid_cxr.inference.protocol import predict_in_batches
    from covid_cxr.inference.torch_model import TorchPredictor
    from covid_cxr.labels import CLASSES
    from covid_cxr.models import build_model
    from covid_cxr.preprocess import Preprocessing
    from covid_cxr.runs.checkpoint import Checkpoint
    from covid_cxr.runtime import choose_runtime
    from covid_cxr.train.augment import Augmenter
    from covid_cxr.train.engine import train_one_epoch
    from covid_cxr.train.loader import Batch
    from covid_cxr.train.runner import make_optimizer

    runtime = choose_runtime(args.device, args.precision)
    pre = Preprocessing(image_size=args.image_size)
    model = build_model(network, image_size=args.image_size).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    config = make_config("paper")
    optimizer = make_optimizer(model, config)
    augmenter = Augmenter(config.augment, seed=0)
    trained = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.phase_images, args.image_size, args.image_size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, len(CLASSES), (args.phase_images,), generator=gen)
    batch_size = BATCH[network]
    pin = runtime.device.type == "cuda"
    batches = []
    for s in range(0, args.phase_images, batch_size):
        chunk = images[s : s + batch_size]
        batches.append(Batch(images=chunk.pin_memory() if pin else chunk, labels=labels[s : s + batch_size],
                             global_size=len(chunk)))

    def sync() -> None:
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()

    def epoch() -> None:
        train_one_epoch(trained, batches, optimizer, preprocessing=pre, runtime=runtime, augmenter=augmenter)
        sync()

    t0 = time.perf_counter()
    for _ in range(args.warmup_epochs):
        epoch()
    warmup_s = time.perf_counter() - t0
    epoch_times = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        epoch()
        epoch_times.append(time.perf_counter() - t0)
    epoch_s = float(np.median(epoch_times))

    ckpt = Checkpoint(network, tuple(CLASSES), pre, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    predictor = TorchPredictor(ckpt, device=args.device, precision=args.precision)
    test = np.random.default_rng(0).integers(0, 256, (args.test_images, args.image_size, args.image_size), dtype=np.uint8)
    predict_in_batches(predictor, test[: min(len(test), 64)], batch_size=64)  # warm-up
    sync()
    t0 = time.perf_counter()
    predict_in_batches(predictor, test, batch_size=64)
    sync()
    test_s = (time.perf_counter() - t0) * PAPER["test_images"] / args.test_images
    phase_s = epoch_s * (PAPER["phase_images"] / args.phase_images) * PAPER["epochs_per_phase"]
    fold_s = phase_s * PAPER["phases"] + test_s
    return {
        "network": network,
        "batch": batch_size,
        "runtime": runtime.describe(),
        "compiled": args.compile,
        "warmup_s": warmup_s,
        "epoch_s_measured": epoch_s,
        "phase_s": phase_s,
        "test_pass_s": test_s,
        "fold_s": fold_s,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if runtime.device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--networks", nargs="+", default=["concat", "xception", "resnet50v2"], choices=list(BATCH))
    parser.add_argument("--phase-images", type=int, default=PAPER["phase_images"])
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
    networks = [time_network(name, args) for name in args.networks]
    per_network_protocol = {n["network"]: n["fold_s"] * PAPER["folds"] for n in networks}
    result = {
        "task": "gpu_phase",
        "card": card,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "image_size": args.image_size,
        "networks": networks,
        "protocol_s_per_network": per_network_protocol,
        "protocol_hours_total": sum(per_network_protocol.values()) / 3600,
        "measured_networks": args.networks,
    }
    emit(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(f"{card}: all {PAPER['folds']} folds x {len(networks)} networks projected at "
          f"{result['protocol_hours_total']:.2f} h")


if __name__ == "__main__":
    main()
