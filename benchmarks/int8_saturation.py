"""What saturation-free int8 costs: agreement and accuracy on a trained model, speed at 300 px.

Three forms of int8 weights for the same fp32 ONNX model: full 8-bit ([-127, 127], what ``covid-cxr
export --int8`` writes, run as stored on VNNI CPUs), the same weights in their uint8 form (code + 128,
zero point 128: what CPUs without VNNI run), and 7-bit ([-64, 64], ONNX Runtime's ``reduce_range``,
the previous version's export).

- ``--checkpoint RUN/best.pt`` (a trained model in its run folder, e.g. ``covid-cxr demo``'s): all
  are calibrated and checked as ``export --int8`` does (64 phase-1 training images; the run's
  validation images), and the agreement with fp32 and the accuracy difference are printed.
- Speed: the concatenated network at ``--speed-size`` (300, the paper's input) with random weights
  (speed does not depend on their values), the three int8 forms, batches of 1 and 20, timed
  alternately so that a change in the machine's load hits them alike.

On a machine with VNNI the 8-bit and 7-bit files run the same u8 x s8 kernels and the uint8 form
runs ONNX Runtime's slower u8 x u8 ones; without VNNI the uint8 form is the exact one and the 8-bit
file as stored gives wrong answers, so what matters there is the uint8 form's speed against the
7-bit file's. CPU and load are printed with every figure.

    python -m benchmarks.int8_saturation [--checkpoint RUN/best.pt] [--speed-size 300] [--reps 7] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import load_average

BATCHES = (1, 20)


def _quantize_forms(fp32: Path, folder: Path, calibration: np.ndarray) -> dict[str, Path]:
    """The three forms as files: each runs as stored under ``COVID_CXR_INT8_WEIGHTS=int8``."""
    import onnx

    from covid_cxr.deploy.quantize import quantize_onnx
    from covid_cxr.inference.int8 import unsigned_weights

    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer advice on the root logger
    eight = quantize_onnx(fp32, folder / "m.int8-8bit.onnx", calibration, batch_size=4)
    model = onnx.load(os.fspath(eight))
    unsigned_weights(model)
    onnx.save(model, os.fspath(folder / "m.int8-8bit-uint8.onnx"))
    return {
        "int8 8-bit": eight,
        "int8 8-bit, uint8 form": folder / "m.int8-8bit-uint8.onnx",
        "int8 7-bit": quantize_onnx(fp32, folder / "m.int8-7bit.onnx", calibration, batch_size=4,
                                    seven_bit_weights=True),
    }


def run_checkpoint(checkpoint: Path, check_count: int) -> tuple[Any, Any]:
    """The checkpoint and its calibration and validation images, chosen as ``export --int8`` chooses them."""
    from covid_cxr.config import CALIBRATION_COUNT
    from covid_cxr.deploy.calibration import read_run, run_images
    from covid_cxr.runs.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    run = read_run(checkpoint)
    if run is None:
        raise SystemExit(f"{checkpoint}: no run.json beside it; give the best.pt of a training run")
    return ckpt, run_images(checkpoint, run, ckpt.preprocessing, ckpt.classes,
                            calibration_count=CALIBRATION_COUNT, check_count=check_count)


def accuracy(checkpoint: Path, folder: Path, check_count: int) -> dict[str, Any]:
    """Both int8 exports of a trained checkpoint against fp32 on its run's validation images."""
    import onnx

    from covid_cxr.deploy.calibration import check_int8
    from covid_cxr.deploy.onnx import export_onnx
    from covid_cxr.inference.int8 import saturating_products
    from covid_cxr.inference.onnx_model import OnnxPredictor

    given = os.environ.get("COVID_CXR_INT8_WEIGHTS")
    os.environ["COVID_CXR_INT8_WEIGHTS"] = "int8"  # each file as stored: the point is to compare the forms
    ckpt, images = run_checkpoint(checkpoint, check_count)
    fp32_path = export_onnx(ckpt, folder / "m.onnx")
    fp32 = OnnxPredictor(fp32_path)
    out: dict[str, Any] = {"checkpoint": str(checkpoint), "network": ckpt.network,
                           "image_size": ckpt.preprocessing.image_size}
    for name, path in _quantize_forms(fp32_path, folder, images.calibration).items():
        result = check_int8(fp32, OnnxPredictor(path), images.check_images, images.check_labels, images.check_source)
        over = saturating_products(onnx.load(os.fspath(path)))
        out[name] = {**result.as_dict(), "summary": result.summary(), "saturating_products": len(over)}
        print(f"[{name}] {result.summary()}; products that can saturate without VNNI: {len(over)}", flush=True)
    if given is None:
        os.environ.pop("COVID_CXR_INT8_WEIGHTS")
    else:
        os.environ["COVID_CXR_INT8_WEIGHTS"] = given  # the user's own setting, for what runs next
    return out


def _time(session: Any, x: np.ndarray) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    session.run(["probabilities"], {"image": x})
    return time.perf_counter() - start, time.process_time() - cpu


def speed(folder: Path, size: int, reps: int) -> dict[str, Any]:
    """img/s of the three int8 forms of the concatenated network at ``size`` px, batches 1 and 20."""
    import onnxruntime as ort
    import torch

    from covid_cxr.deploy.onnx import export_onnx
    from covid_cxr.labels import CLASSES
    from covid_cxr.models.registry import build_model
    from covid_cxr.preprocess import Preprocessing, to_model_input
    from covid_cxr.runs.checkpoint import Checkpoint

    torch.manual_seed(0)
    pre = Preprocessing(size, "symmetric")
    ckpt = Checkpoint("concat", tuple(CLASSES), pre, build_model("concat", image_size=size).state_dict())
    fp32 = export_onnx(ckpt, folder / "speed.onnx")
    rng = np.random.default_rng(0)
    models = _quantize_forms(fp32, folder, rng.integers(0, 256, (8, size, size), np.uint8))
    sessions = {name: ort.InferenceSession(os.fspath(p), providers=["CPUExecutionProvider"]) for name, p in models.items()}
    out: dict[str, Any] = {"image_size": size, "load_before": load_average()}
    for batch in BATCHES:
        x = to_model_input(torch.from_numpy(rng.integers(0, 256, (batch, size, size), np.uint8)), pre).numpy()
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sessions}
        for session in sessions.values():
            _time(session, x)  # warm-up
        for _ in range(reps):
            for name, session in sessions.items():
                runs[name].append(_time(session, x))
        for name, times in runs.items():
            wall = statistics.median(t for t, _ in times)
            cpu = statistics.median(c for _, c in times)
            out[f"{name} batch {batch}"] = {"img_per_s": round(batch / wall, 2), "cpu_s_per_img": round(cpu / batch, 4),
                                            "median_s": round(wall, 4), "reps": reps}
            print(f"[speed {size}px] {name} batch {batch:2d}: {batch / wall:7.2f} img/s "
                  f"({cpu / batch:.3f} CPU-s/img)", flush=True)
    out["load_after"] = load_average()
    return out


def main() -> None:
    from covid_cxr.inference.int8 import cpu_features, describe_cpu

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a trained best.pt with run.json beside it (accuracy part)")
    p.add_argument("--check-count", type=int, default=300, help="validation images to compare on (default 300)")
    p.add_argument("--speed-size", type=int, default=300, help="input size for the speed part; 0 skips it")
    p.add_argument("--reps", type=int, default=7, help="timed calls per model and batch size (median)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args()
    cpu = cpu_features()
    result: dict[str, Any] = {"cpu": cpu, "load_start": load_average()}
    print(f"CPU: {describe_cpu(cpu)}; load {result['load_start']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="int8-saturation-") as tmp:
        if args.checkpoint is not None:
            result["accuracy"] = accuracy(args.checkpoint, Path(tmp), args.check_count)
        if args.speed_size:
            result["speed"] = speed(Path(tmp), args.speed_size, args.reps)
    result["load_end"] = load_average()
    print(f"load at the end {result['load_end']}", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
