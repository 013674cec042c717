"""Our side: one configuration of the concatenated network, timed through the package's own code paths.

Inference goes through :class:`covid_cxr.inference.torch_model.TorchPredictor` or
:class:`covid_cxr.inference.onnx_model.OnnxPredictor` (uint8 images in, probabilities out: what ``predict``,
``evaluate`` and the server run); a training step through :func:`covid_cxr.train.engine.train_one_epoch`
on one batch, with the paper's optimizer and the on-device augmentation (what ``train`` runs).
Each call is one process: its peak memory is the configuration's own.

    python -m benchmarks.torch_worker --config torch-bf16-cl --task infer --checkpoint REF.pt --eval-set EVAL.npz
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import cpu_seconds, emit, peak_rss_mib, time_call

TORCH_CONFIGS: dict[str, dict[str, Any]] = {
    # name: TorchPredictor / runtime arguments (+ compile)
    "torch-fp32": {"precision": "fp32", "channels_last": False},
    "torch-fp32-cl": {"precision": "fp32", "channels_last": True},
    "torch-bf16-cl": {"precision": "bf16", "channels_last": True},
    "torch-bf16-cl-compile": {"precision": "bf16", "channels_last": True, "compile": True},
}
ORT_CONFIGS = ("ort-fp32", "ort-int8-qoperator", "ort-int8-qdq")
# "default": what predict/evaluate/serve run from a checkpoint with every option left at auto (the backend
# covid_cxr.inference.backends.choose_backend picks for this CPU); trained as `train` does with precision auto.
DEFAULT_CONFIG = "default"
CONFIGS = (DEFAULT_CONFIG, *TORCH_CONFIGS, *ORT_CONFIGS)


def _predictor(config: str, checkpoint: Path, onnx_dir: Path) -> Any:
    if config == DEFAULT_CONFIG:
        from covid_cxr.inference.backends import load_model
        from covid_cxr.inference.settings import InferenceSettings

        loaded = load_model(checkpoint, InferenceSettings(device="cpu"))
        print(f"default: {loaded.describe()}", flush=True)
        return loaded.predictor
    if config in TORCH_CONFIGS:
        import torch

        from covid_cxr.inference.torch_model import TorchPredictor
        from covid_cxr.runs.checkpoint import load_checkpoint

        spec = TORCH_CONFIGS[config]
        predictor = TorchPredictor(
            load_checkpoint(checkpoint), device="cpu", precision=spec["precision"], channels_last=spec["channels_last"]
        )
        if spec.get("compile"):
            import torch._inductor.config as inductor_config

            # Freezing folds BatchNorms into the convolutions and prepacks the weights for oneDNN:
            # inductor's inference setting (the weights never change here).
            inductor_config.freezing = True
            predictor.model = torch.compile(predictor.model)
        return predictor
    from covid_cxr.inference.onnx_model import OnnxPredictor

    name = {"ort-fp32": "fp32", "ort-int8-qoperator": "int8-qoperator", "ort-int8-qdq": "int8-qdq"}[config]
    return OnnxPredictor(onnx_dir / f"{name}.onnx", device="cpu")


def _describe(predictor: Any) -> str:
    if hasattr(predictor, "runtime"):
        return f"{predictor.backend} {predictor.describe()}"
    from covid_cxr.perf import apply_speed_settings

    return f"{predictor.describe()} {apply_speed_settings().describe()}"


def run_infer(args: argparse.Namespace) -> None:
    from covid_cxr.perf import apply_speed_settings

    apply_speed_settings()  # before the first large allocation, as choose_runtime does for torch configs
    start = time.perf_counter()
    predictor = _predictor(args.config, args.checkpoint, args.onnx_dir)
    size = predictor.preprocessing.image_size
    rng = np.random.default_rng(0)
    base = {"side": "ours", "config": args.config, "task": "infer", "runtime": _describe(predictor)}
    first_call = None
    for batch in args.batch_sizes:
        images = rng.integers(0, 256, (batch, size, size), dtype=np.uint8)
        if first_call is None:  # compile and one-off set-up happen here, outside the timed repetitions
            t0 = time.perf_counter()
            predictor.predict_proba(images)
            first_call = time.perf_counter() - t0
        timing = time_call(lambda: predictor.predict_proba(images), warmup=args.warmup, reps=args.reps)
        emit({**base, "batch": batch, "images_per_s": batch / timing["median_s"], **timing,
              "peak_rss_mib": peak_rss_mib(), "cpu": cpu_seconds(), "setup_s": time.perf_counter() - start,
              "first_call_s": first_call})
    if args.eval_set is not None:
        data = np.load(args.eval_set)
        from covid_cxr.inference.protocol import predict_in_batches

        probs = predict_in_batches(predictor, data["images"], batch_size=20)
        np.save(args.out_probs, probs)
        emit({**base, "batch": None, "probabilities": str(args.out_probs)})


def run_train(args: argparse.Namespace) -> None:
    import torch

    from covid_cxr.config import make_config
    from covid_cxr.runs.checkpoint import load_checkpoint
    from covid_cxr.runtime import choose_runtime
    from covid_cxr.train.augment import Augmenter
    from covid_cxr.train.engine import train_one_epoch
    from covid_cxr.train.loader import Batch
    from covid_cxr.train.runner import make_optimizer

    spec = TORCH_CONFIGS.get(args.config, {"precision": "auto", "channels_last": None})
    if spec.get("compile"):
        raise SystemExit("training is not timed with torch.compile (see RESULTS.md)")
    runtime = choose_runtime("cpu", spec["precision"], spec["channels_last"])
    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.build_model()
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    config = make_config("paper")
    optimizer = make_optimizer(model, config)
    augmenter = Augmenter(config.augment, seed=0)
    size = ckpt.preprocessing.image_size
    gen = torch.Generator().manual_seed(0)
    base = {"side": "ours", "config": args.config, "task": "train", "runtime": runtime.describe()}
    for batch_size in args.batch_sizes:
        batch = Batch(
            images=torch.randint(0, 256, (batch_size, size, size), dtype=torch.uint8, generator=gen),
            labels=torch.randint(0, 3, (batch_size,), generator=gen),
            global_size=batch_size,
        )

        def step(batch: Batch = batch) -> None:
            train_one_epoch(model, [batch], optimizer, preprocessing=ckpt.preprocessing, runtime=runtime,
                            augmenter=augmenter)

        timing = time_call(step, warmup=args.warmup, reps=args.reps)
        emit({**base, "batch": batch_size, "step_s": timing["median_s"], **timing,
              "peak_rss_mib": peak_rss_mib(), "cpu": cpu_seconds()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=CONFIGS, required=True)
    parser.add_argument("--task", choices=("infer", "train"), required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--onnx-dir", type=Path, default=None)
    parser.add_argument("--eval-set", type=Path, default=None)
    parser.add_argument("--out-probs", type=Path, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    (run_infer if args.task == "infer" else run_train)(args)


if __name__ == "__main__":
    main()
