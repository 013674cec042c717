"""Which exact inference path is fastest on this CPU: the measurements behind ``--backend auto``.

Times the concatenated network at 300 px, batch 1 and batch 20, on every path ``predict``, ``evaluate``
and ``serve`` can take from a checkpoint: PyTorch fp32 contiguous and channels_last, each with and
without the BatchNorms folded into the convolutions, ONNX Runtime fp32 (in-memory export, all graph
optimisations, one thread per physical core), and bf16 autocast where the CPU has it natively. Each path
runs in its own process, first with the CPU's full instruction set, then with PyTorch held to AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``: the stand-in for an AVX2-only CPU such as Zen 2).
ONNX Runtime's MLAS picks its kernels from ``cpuid`` and reads no such variable, so its AVX2 figure
cannot be taken on an AVX-512 machine and is not reported. Every path's probabilities are compared with
PyTorch fp32 contiguous on the same images. Also timed: exporting the checkpoint to ONNX and opening the
session (what the ONNX path costs once per process).

    python -m benchmarks.exact_paths [--out DIR] [--reps 5] [--no-avx2]
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

import numpy as np

from benchmarks.common import emit, parse_results, time_call

REPO = Path(__file__).resolve().parents[1]
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
PATHS: dict[str, dict[str, Any]] = {
    # name: how the predictor is built (backends.make_predictor arguments)
    "torch-fp32": {"backend": "torch", "precision": "fp32", "channels_last": False, "fold": False},
    "torch-fp32-fold": {"backend": "torch", "precision": "fp32", "channels_last": False, "fold": True},
    "torch-fp32-cl": {"backend": "torch", "precision": "fp32", "channels_last": True, "fold": False},
    "torch-fp32-cl-fold": {"backend": "torch", "precision": "fp32", "channels_last": True, "fold": True},
    "ort-fp32": {"backend": "onnx"},
    "torch-bf16-cl": {"backend": "torch", "precision": "bf16", "channels_last": True, "fold": False},
    "torch-bf16-cl-fold": {"backend": "torch", "precision": "bf16", "channels_last": True, "fold": True},
}


def _predictor(name: str, checkpoint: Path, onnx: Path) -> Any:
    from covid_cxr.inference.onnx_model import OnnxPredictor
    from covid_cxr.inference.torch_model import TorchPredictor
    from covid_cxr.runs.checkpoint import load_checkpoint

    spec = PATHS[name]
    if spec["backend"] == "onnx":
        return OnnxPredictor(onnx.read_bytes())
    return TorchPredictor(load_checkpoint(checkpoint), device="cpu", precision=spec["precision"],
                          channels_last=spec["channels_last"], fold=spec["fold"])


def worker(args: argparse.Namespace) -> None:
    """One path in this process: timings at each batch size, then the probabilities of the fixed images."""
    from covid_cxr.perf import apply_speed_settings
    from covid_cxr.runtime import cpu_has_native_bf16

    speed = apply_speed_settings()
    t0 = time.perf_counter()
    predictor = _predictor(args.worker, args.checkpoint, args.onnx)
    setup = time.perf_counter() - t0
    images = np.load(args.images)
    base = {"path": args.worker, "isa": args.isa, "describe": predictor.describe(), "threads": speed.threads,
            "native_bf16_seen": cpu_has_native_bf16(), "setup_s": setup}
    for batch in args.batch_sizes:
        x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
        timing = time_call(lambda x=x: predictor.predict_proba(x), warmup=args.warmup, reps=args.reps)
        emit({**base, "batch": batch, "images_per_s": batch / timing["median_s"], **timing})
    np.save(args.out_probs, predictor.predict_proba(images))
    emit({**base, "batch": None, "probabilities": str(args.out_probs)})


def _prepare(out: Path, image_size: int) -> tuple[Path, Path, Path, dict[str, float]]:
    """A stand-in checkpoint (fitted BatchNorm statistics, so outputs vary with the image), its ONNX export, images."""
    from benchmarks.reference import _fit_stand_in, synthetic_chests
    from covid_cxr.inference.onnx_model import OnnxPredictor, export_onnx_bytes
    from covid_cxr.runs.checkpoint import load_checkpoint, save_checkpoint

    seconds: dict[str, float] = {}
    fit, labels = synthetic_chests(4, image_size, 0)
    ckpt_path = save_checkpoint(_fit_stand_in(fit, labels, image_size, 0), out / "stand-in.pt")
    images = np.concatenate([fit, synthetic_chests(4, image_size, 1)[0]])[:20]
    np.save(out / "images.npy", images)
    t0 = time.perf_counter()
    data = export_onnx_bytes(load_checkpoint(ckpt_path))
    seconds["export_onnx_s"] = time.perf_counter() - t0
    (out / "fp32.onnx").write_bytes(data)
    t0 = time.perf_counter()
    OnnxPredictor(data)
    seconds["open_session_s"] = time.perf_counter() - t0
    return ckpt_path, out / "fp32.onnx", out / "images.npy", seconds


def _paths_for(isa: str, native_bf16: bool) -> list[str]:
    names = [n for n in PATHS if native_bf16 and isa == "native" or "bf16" not in n]
    return [n for n in names if not (isa == "avx2" and PATHS[n]["backend"] == "onnx")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.exact_paths", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/exact-<time>)")
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-avx2", action="store_true", help="skip the AVX2 stand-in rows")
    parser.add_argument("--paths", nargs="+", choices=tuple(PATHS), default=None, help="only these paths (default all)")
    parser.add_argument("--avx2-paths", nargs="+", choices=tuple(PATHS), default=None,
                        help="only these paths under the AVX2 stand-in (default: every PyTorch fp32 path)")
    parser.add_argument("--worker", choices=tuple(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--isa", default="native", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-probs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from benchmarks.machine import describe_machine, load_average
    from covid_cxr.runtime import cpu_has_native_bf16

    out = args.out or REPO / "benchmarks" / "results" / time.strftime("exact-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "machine": describe_machine(), "load_average": [load_average()]}
    if (out / "stand-in.pt").is_file() and (out / "fp32.onnx").is_file():  # a rerun into the same folder
        ckpt, onnx, images, report["once_per_process"] = out / "stand-in.pt", out / "fp32.onnx", out / "images.npy", {}
    else:
        ckpt, onnx, images, report["once_per_process"] = _prepare(out, args.image_size)
    print(f"[exact] prepared: {report['once_per_process']}", flush=True)
    results: list[dict[str, Any]] = []
    for isa in ("native",) if args.no_avx2 else ("native", "avx2"):
        chosen = args.avx2_paths if isa == "avx2" else args.paths
        for name in [n for n in _paths_for(isa, cpu_has_native_bf16()) if chosen is None or n in chosen]:
            probs = out / f"probs-{isa}-{name}.npy"
            argv_worker = [sys.executable, "-m", "benchmarks.exact_paths", "--worker", name, "--isa", isa,
                           "--checkpoint", str(ckpt), "--onnx", str(onnx), "--images", str(images),
                           "--out-probs", str(probs), "--warmup", str(args.warmup), "--reps", str(args.reps),
                           "--batch-sizes", *map(str, args.batch_sizes)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   **(AVX2_ENV if isa == "avx2" else {})}
            done = subprocess.run(argv_worker, cwd=REPO, env=env, capture_output=True, text=True, check=False)
            rows = parse_results(done.stdout)
            if done.returncode != 0:
                rows.append({"path": name, "isa": isa, "error": done.stderr.strip().splitlines()[-3:]})
            results.extend(rows)
            print(f"[exact] {isa} {name}: " + ", ".join(f"b{r['batch']} {r['images_per_s']:.2f} img/s"
                                                      for r in rows if r.get("batch")) + (" FAILED" if done.returncode else ""),
                  flush=True)
            report["load_average"].append(load_average())
    reference = np.load(out / "probs-native-torch-fp32.npy")  # written by the torch-fp32 path (run it once)
    for row in results:
        if row.get("probabilities"):
            row["max_abs_prob_diff_vs_torch_fp32"] = float(np.abs(np.load(row["probabilities"]) - reference).max())
    report.update(results=results, finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    print(render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    """The RESULTS.md table: one row per (instruction set, path)."""
    diffs = {(r["isa"], r["path"]): r["max_abs_prob_diff_vs_torch_fp32"] for r in report["results"]
             if "max_abs_prob_diff_vs_torch_fp32" in r}
    lines = ["| ISA | path | img/s b1 | img/s b20 | max abs prob diff vs torch fp32 |", "|---|---|---|---|---|"]
    seen: dict[tuple[str, str], dict[int, float]] = {}
    for r in report["results"]:
        if r.get("batch"):
            seen.setdefault((r["isa"], r["path"]), {})[r["batch"]] = r["images_per_s"]
    for (isa, path), rates in seen.items():
        cells = " | ".join(f"{rates[b]:.2f}" if b in rates else "-" for b in (1, 20))
        lines.append(f"| {isa} | {path} | {cells} | {diffs.get((isa, path), float('nan')):.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
