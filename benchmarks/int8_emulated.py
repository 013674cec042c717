"""int8 on a CPU without VNNI, emulated: the same models run natively and under ``qemu-x86_64 -cpu Haswell``.

Haswell has AVX2 and no AVX-512 or VNNI, so ONNX Runtime's int8 kernels add pairs of u8 x s8
products in saturating int16 (``vpmaddubsw``) there, as on a Zen 2. Both int8 exports of a trained
checkpoint (7-bit weights, what ``export --int8`` writes; full 8-bit weights, earlier versions) and
the fp32 model run on the same validation images on both; the logits are compared. Saturation-free
weights must give bit-identical int8 logits on both CPUs; 8-bit weights differ where pairs saturate.
Needs ``qemu-user`` (``apt-get install qemu-user``); slow: the tiny model of tests/test_quantize.py
(200 images) took 2 minutes, the concatenated network at 72 px had not finished 20 images after 21
CPU-minutes of emulation, so keep ``--images`` small.

    python -m benchmarks.int8_emulated --checkpoint RUN/best.pt [--images 40] [--cpu Haswell]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("fp32", "int8 7-bit", "int8 8-bit")


def run_models(folder: Path, tag: str) -> None:
    """Logits of every model on the saved inputs (ONNX Runtime and numpy only: quick to start under emulation)."""
    import onnxruntime as ort

    x = np.load(folder / "inputs.npy")
    out = {}
    for name in MODELS:
        session = ort.InferenceSession(os.fspath(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        out[name] = session.run(["logits"], {session.get_inputs()[0].name: x})[0]
    np.savez(folder / f"logits-{tag}.npz", **out)


def prepare(checkpoint: Path, folder: Path, count: int) -> np.ndarray:
    """Export and quantize as ``export --int8`` does; save ``count`` validation inputs; returns their labels."""
    import torch

    from benchmarks.int8_saturation import _quantize_both, run_checkpoint
    from covid_cxr.deploy.onnx import export_onnx
    from covid_cxr.preprocess import to_model_input

    ckpt, images = run_checkpoint(checkpoint, count)
    export_onnx(ckpt, folder / "fp32.onnx")
    for name, path in _quantize_both(folder / "fp32.onnx", folder, images.calibration).items():
        shutil.move(path, folder / f"{name}.onnx")
    x = to_model_input(torch.from_numpy(images.check_images), ckpt.preprocessing).numpy()
    np.save(folder / "inputs.npy", x)
    return np.asarray([ckpt.classes.index(c) for c in images.check_labels])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a trained best.pt with run.json beside it")
    p.add_argument("--images", type=int, default=40, help="validation images to compare on (default 40)")
    p.add_argument("--cpu", default="Haswell", help="qemu CPU model to emulate (default Haswell: AVX2, no VNNI)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        run_models(args.worker, args.cpu)
        return
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or args.checkpoint is None:
        raise SystemExit("needs --checkpoint and qemu-x86_64 on PATH (apt-get install qemu-user)")
    with tempfile.TemporaryDirectory(prefix="int8-emulated-") as tmp:
        folder = Path(tmp)
        labels = prepare(args.checkpoint, folder, args.images)
        run_models(folder, "native")
        started = time.perf_counter()
        cmd = [qemu, "-cpu", args.cpu, sys.executable, "-m", "benchmarks.int8_emulated", "--worker", tmp,
               "--cpu", args.cpu]
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)  # qemu warns about every CPUID bit it lacks
        print(f"{len(labels)} validation images; emulated run {time.perf_counter() - started:.0f} s", flush=True)
        native, emulated = np.load(folder / "logits-native.npz"), np.load(folder / f"logits-{args.cpu}.npz")
        reference = native["fp32"].argmax(1)
        for name in MODELS:
            a, b = native[name], emulated[name]
            print(f"{name:10s}: identical on both {np.array_equal(a, b)}, max |logit difference| "
                  f"{np.abs(a - b).max():.3g}; agreement with fp32 (native) native "
                  f"{100 * (a.argmax(1) == reference).mean():.1f}%, {args.cpu} {100 * (b.argmax(1) == reference).mean():.1f}%;"
                  f" accuracy native {100 * (a.argmax(1) == labels).mean():.1f}%, "
                  f"{args.cpu} {100 * (b.argmax(1) == labels).mean():.1f}%", flush=True)


if __name__ == "__main__":
    main()
