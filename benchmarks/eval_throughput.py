"""Evaluation throughput: images/s of the batched inference loop at 300x300, and the cost of the metrics.

Runs the same path as ``covid-cxr evaluate`` (a memory-mapped uint8 cache read a batch at a
time by :func:`covid_cxr.inference.protocol.predict_in_batches` through :class:`TorchPredictor`) on an
untrained network (speed does not depend on the weights), then times every metric, the patient
bootstrap and the artefacts on a predictions table the size of a paper test fold (11,302 images).

    python benchmarks/eval_throughput.py --network concat --images 64 --batch-size 32
    python benchmarks/eval_throughput.py --device cuda --images 11302 --batch-size 128

Prints one JSON object; the numbers go to benchmarks/RESULTS.md ("Evaluation throughput").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covid_cxr.evaluate.predictions import validate_predictions
from covid_cxr.evaluate.run import write_evaluation
from covid_cxr.inference.protocol import predict_in_batches
from covid_cxr.inference.torch_model import TorchPredictor
from covid_cxr.labels import CLASSES
from covid_cxr.models import build_model
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.checkpoint import Checkpoint

PAPER_TEST_IMAGES = 11302  # 31 COVID-19, 4420 pneumonia, 6851 normal (SPEC section 2)


def inference_rate(network: str, size: int, images: int, batch_size: int, device: str, precision: str,
                   folder: Path) -> dict[str, float | str]:
    """Images/s of the batched loop over a memory-mapped cache (one warm-up batch not counted)."""
    model = build_model(network, image_size=size)
    ckpt = Checkpoint(network=network, classes=CLASSES, preprocessing=Preprocessing(image_size=size),
                      model_state=model.state_dict())
    predictor = TorchPredictor(ckpt, device=device, precision=precision)
    cache = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(images, size, size))
    cache[:] = np.random.default_rng(0).integers(0, 256, size=cache.shape, dtype=np.uint8)
    cache.flush()
    cache = np.load(folder / "images.npy", mmap_mode="r")
    predict_in_batches(predictor, cache, batch_size=batch_size, indices=np.arange(min(batch_size, images)))
    if predictor.runtime.device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    predict_in_batches(predictor, cache, batch_size=batch_size)
    if predictor.runtime.device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    one_start, one_cpu = time.perf_counter(), time.process_time()
    ones = min(images, 8)
    predict_in_batches(predictor, cache, batch_size=1, indices=np.arange(ones))
    one_seconds, one_cpu = time.perf_counter() - one_start, time.process_time() - one_cpu
    # CPU seconds (all threads) stay stable when other jobs share the cores; wall seconds do not.
    return {"runtime": predictor.runtime.describe(), "images": images, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "images_per_cpu_second": images / cpu_seconds,
            "batch1_images_per_cpu_second": ones / one_cpu,
            "images_per_second": images / seconds, "batch1_images_per_second": ones / one_seconds,
            "projected_seconds_for_11302": PAPER_TEST_IMAGES / (images / seconds)}


def metrics_cost(folder: Path, n_boot: int) -> dict[str, float]:
    """Seconds for metrics (with the patient bootstrap) and all artefacts on a paper-sized test fold."""
    rng = np.random.default_rng(1)
    true = np.repeat([0, 1, 2], [31, 4420, 6851])
    logits = rng.normal(size=(len(true), 3))
    logits[np.arange(len(true)), true] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(true))],
                          "patient_id": [f"p{i // 2}" for i in range(len(true))], "source": "bench",
                          "label": np.array(CLASSES)[true]})
    for k, name in enumerate(CLASSES):
        frame[f"p_{name}"] = probs[:, k]
    frame["pred"] = np.array(CLASSES)[probs.argmax(axis=1)]
    preds = validate_predictions(frame, "benchmark")
    start, cpu_start = time.perf_counter(), time.process_time()
    preds.metrics(n_boot=n_boot)
    metric_seconds, metric_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    start = time.perf_counter()
    write_evaluation(preds, folder / "eval", {"network": "bench", "fold": 1, "split": "test"}, n_boot=n_boot)
    return {"metrics_seconds": metric_seconds, "metrics_cpu_seconds": metric_cpu,
            "metrics_and_artefacts_seconds": time.perf_counter() - start,
            "bootstrap_resamples": n_boot}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="concat", choices=("concat", "xception", "resnet50v2"))
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--images", type=int, default=64, help="images to run (11302 = a paper test fold)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="covid-cxr-bench-") as tmp:
        result = {"network": args.network, "image_size": args.image_size, "batch_size": args.batch_size,
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                             f"load {os.getloadavg()[0]:.1f}", "torch": torch.__version__}
        result.update(inference_rate(args.network, args.image_size, args.images, args.batch_size, args.device,
                                     args.precision, Path(tmp)))
        result.update(metrics_cost(Path(tmp), args.bootstrap))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
