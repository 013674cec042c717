"""``python -m benchmarks``: ours against Keras + TensorFlow, same run, same machine, as ratios.

Every configuration runs in its own process (``benchmarks.torch_worker``, ``benchmarks.keras_worker``)
so each peak-memory figure is its own and process-wide settings (allocator, threads) never leak.
Warm-up calls are excluded; each figure is the median of ``--reps`` calls. Accuracy differences
are measured on the fixed model and images of :mod:`benchmarks.reference`. The Keras side needs
an interpreter with TensorFlow: ``--keras-python`` or ``COVID_CXR_KERAS_PYTHON`` (see RESULTS.md).

    python -m benchmarks [--out DIR] [--checkpoint RUN/best.pt] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import parse_results
from benchmarks.machine import describe_machine, load_average
from benchmarks.report import analyse, render_table

REPO = Path(__file__).resolve().parents[1]
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


_LOG: list[dict[str, Any]] = []
_LOG_PATH: list[Path] = []


def _run(label: str, argv: list[str], env: dict[str, str] | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Run one worker; its results, or the reason it failed (the run goes on without it)."""
    print(f"[bench] {label} ...", flush=True)
    start = time.perf_counter()
    full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    try:
        done = subprocess.run(argv, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"label": label, "error": f"timed out after {timeout:.0f} s", "results": []}
    results = parse_results(done.stdout)
    entry: dict[str, Any] = {"label": label, "results": results, "wall_s": time.perf_counter() - start, "env": env or {}}
    if done.returncode != 0:
        entry["error"] = f"exit {done.returncode}: " + " | ".join(done.stderr.strip().splitlines()[-3:])
    print(f"[bench] {label}: {'FAILED ' + entry['error'] if 'error' in entry else 'ok'} ({entry['wall_s']:.0f} s)",
          flush=True)
    _LOG.append(entry)
    if _LOG_PATH:  # raw results so far, so a long run that is cut short still leaves its figures
        _LOG_PATH[0].write_text(json.dumps(_LOG, indent=1))
    return entry


def _jemalloc() -> str | None:
    return next((p for p in JEMALLOC_PATHS if Path(p).exists()), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<time>)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="trained checkpoint for the accuracy comparison (e.g. a demo run's best.pt); "
                             "default: a stand-in fitted on synthetic chest images at 300 px")
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--max-eval", type=int, default=600, help="test images of --checkpoint's run to compare on")
    parser.add_argument("--keras-python", default=os.environ.get("COVID_CXR_KERAS_PYTHON"),
                        help="interpreter with tensorflow-cpu and keras (default $COVID_CXR_KERAS_PYTHON)")
    parser.add_argument("--configs", nargs="+", default=None, help="our configurations (default: all)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--train-batch", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repetitions, 1 warm-up: for checking the harness")
    parser.add_argument("--no-allocators", action="store_true", help="skip the allocator comparison rows")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    parser.add_argument("--no-datapath", action="store_true", help="skip the data-path measurement")
    args = parser.parse_args(argv)

    from benchmarks.torch_worker import CONFIGS, TORCH_CONFIGS

    if args.quick:
        args.reps, args.warmup = 2, 1
    configs = args.configs or list(CONFIGS)
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    out = args.out or REPO / "benchmarks" / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    _LOG_PATH.append(out / "raw-runs.json")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    loads = [load_average()]

    from benchmarks.peak import measure_ceilings
    from benchmarks.reference import make_reference

    print("[bench] instruction ceilings ...", flush=True)
    ceilings = measure_ceilings()  # first, while nothing of ours has warmed or loaded the machine
    print(f"[bench] ceilings: {ceilings.get('gflops') or ceilings.get('error')}", flush=True)

    print("[bench] reference model, eval set, ONNX export and int8 quantization ...", flush=True)
    formats = tuple(f for f in ("qoperator", "qdq") if f"ort-int8-{f}" in configs)  # quantize only what is timed
    ref = make_reference(out / "reference", checkpoint=args.checkpoint, image_size=args.image_size,
                         max_eval=args.max_eval, int8_formats=formats)
    py = sys.executable
    timing = ["--warmup", str(args.warmup), "--reps", str(args.reps)]
    _LOG.append({"label": "ceilings", "results": [{"task": "ceilings", **ceilings}]})  # kept in raw-runs.json too
    runs: list[dict[str, Any]] = [_LOG[-1], _run("flops", [py, "-m", "benchmarks.flops", "--image-size", str(ref.image_size)])]
    keras_versions: dict[str, str] = {}
    if args.keras_python:
        for task, batches in (("infer", args.batch_sizes), ("train", [args.train_batch])):
            runs.append(_run(f"keras {task}", [args.keras_python, "-m", "benchmarks.keras_worker", "--task", task,
                                               "--image-size", str(ref.image_size), "--batch-sizes",
                                               *map(str, batches), *timing]))
        keras_versions = next((r["versions"] for e in runs for r in e["results"] if r.get("side") == "keras"), {})
    loads.append(load_average())
    common = ["--checkpoint", str(ref.checkpoint), "--onnx-dir", str(ref.onnx_dir)]
    for config in configs:
        runs.append(_run(f"{config} infer", [py, "-m", "benchmarks.torch_worker", "--config", config, "--task", "infer",
                                             *common, "--eval-set", str(ref.eval_set),
                                             "--out-probs", str(out / f"probs-{config}.npy"),
                                             "--batch-sizes", *map(str, args.batch_sizes), *timing]))
    train_configs = [c for c in configs if c == "default" or c in TORCH_CONFIGS and not TORCH_CONFIGS[c].get("compile")]
    if args.no_train:
        train_configs = []
    for config in train_configs:
        runs.append(_run(f"{config} train", [py, "-m", "benchmarks.torch_worker", "--config", config, "--task", "train",
                                             *common, "--batch-sizes", str(args.train_batch), *timing]))
    if not args.no_allocators and "torch-bf16-cl" in configs:
        variants = [("system malloc", {"COVID_CXR_ALLOCATOR": "system"})]
        if _jemalloc():
            variants.append(("jemalloc", {"LD_PRELOAD": _jemalloc()}))
        for name, env in variants:
            for task, batches in (("infer", [max(args.batch_sizes)]), ("train", [args.train_batch])):
                runs.append(_run(f"torch-bf16-cl [{name}] {task}",
                                 [py, "-m", "benchmarks.torch_worker", "--config", "torch-bf16-cl", "--task", task,
                                  *common, "--batch-sizes", *map(str, batches), *timing], env=env))
    if not args.no_datapath:
        runs.append(_run("datapath", [py, "-m", "benchmarks.datapath", "--image-size", str(ref.image_size)]))
    loads.append(load_average())

    summary = analyse(runs, ref, out, batch_sizes=args.batch_sizes, train_batch=args.train_batch)
    report = {
        "started_utc": started,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": describe_machine(keras_versions),
        "load_average_1_5_15min": loads,
        "settings": {"warmup": args.warmup, "reps": args.reps, "batch_sizes": args.batch_sizes,
                     "train_batch": args.train_batch, "image_size": ref.image_size},
        "reference": {"description": ref.description, "seconds": ref.seconds},
        "summary": summary,
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    table = render_table(report)
    (out / "results.md").write_text(table)
    print(table)
    print(f"[bench] wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
