"""``covid-cxr predict``: classify X-ray files (PNG, JPEG, DICOM) with a checkpoint or an ONNX model.

Files are decoded in worker threads while the previous batch runs through the network. A file
that cannot be read is reported (path and reason) and skipped; the exit status is 1 when any
input failed, so scripts notice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from covid_cxr.data.images import load_image
from covid_cxr.deploy.backends import BACKENDS, LoadedModel, is_checkpoint_file, load_model, resolve_compile
from covid_cxr.deploy.files import expand_inputs
from covid_cxr.errors import ConfigError, ImageDecodeError
from covid_cxr.gradcam import COMBINED, METHODS, GradCam, save_overlay
from covid_cxr.inference import COMPILE_CHOICES, COMPILE_MIN_IMAGES, should_compile
from covid_cxr.runtime import PRECISIONS

GRADCAM_BATCH = 4  # a backward pass keeps every activation: small batches bound its memory


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify X-ray files, folders or globs with a checkpoint or ONNX model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a covid-cxr checkpoint (.pt) or an exported ONNX model")
    p.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", type=Path, help="write the predictions to this .csv or .json file (default: print them)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="auto (default: the fastest exact path here for a .pt, onnx for .onnx), torch or onnx")
    p.add_argument("--gradcam", type=Path, metavar="DIR", help="write a Grad-CAM overlay PNG per image into DIR")
    p.add_argument("--gradcam-class", metavar="CLASS",
                   help="class the overlays explain (covid, pneumonia, normal; default: the predicted one)")
    p.add_argument("--gradcam-method", choices=METHODS, help="auto (default: HiResCAM for the flatten head, "
                   "Grad-CAM for a pooling one), hirescam or gradcam")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="default auto (bf16 where native)")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images (default 2)")
    p.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help=f"torch.compile the network (default auto: for {COMPILE_MIN_IMAGES}+ images, where the "
                   "~30 s compilation pays for itself)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 1:
        raise ConfigError("--batch-size and --workers must be >= 1")
    if args.out is not None and args.out.suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"--out must end in .csv or .json; got {args.out}")
    if args.gradcam_class and not args.gradcam:
        raise ConfigError("--gradcam-class needs --gradcam DIR")
    if args.gradcam_method and not args.gradcam:
        raise ConfigError("--gradcam-method needs --gradcam DIR")
    inputs = expand_inputs(args.paths)
    compile_model = should_compile(args.compile, len(inputs.files))
    if compile_model and args.compile == "auto":  # auto compiles PyTorch checkpoints only, never an ONNX model
        compile_model = args.checkpoint.is_file() and is_checkpoint_file(args.checkpoint) and resolve_compile(
            args.compile, len(inputs.files), backend=args.backend, device=args.device, precision=args.precision)
    loaded = load_model(args.checkpoint, backend=args.backend, device=args.device, precision=args.precision,
                        compile=compile_model)
    print(f"model: {loaded.describe()}", file=sys.stderr)
    if compile_model:
        started = time.perf_counter()
        loaded.predictor.warm_up(args.batch_size)  # type: ignore[attr-defined]
        print(f"compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    cam = loaded.gradcam() if args.gradcam else None
    if cam is not None and args.gradcam_method:
        cam = cam.with_method(args.gradcam_method)
    if cam is not None and args.gradcam_class:
        cam.class_index(args.gradcam_class)  # refuse a bad class name before any work
    failures: list[tuple[str, str]] = list(inputs.missing)
    rows = predict_files(loaded, inputs.files, args, failures, cam)

    classes = loaded.predictor.classes
    counts = Counter(r["class"] for r in rows)
    summary = ", ".join(f"{c} {counts.get(c, 0)}" for c in classes)
    if args.out is None:
        _print_rows(rows, classes)
    else:
        _write(args.out, rows, failures, classes)
        print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    for path, reason in failures:
        print(f"failed: {path}: {reason}", file=sys.stderr)
    print(f"predicted {len(rows)} images ({summary}); {len(failures)} failed", file=sys.stderr)
    return 1 if failures or not rows else 0


def predict_files(
    loaded: LoadedModel,
    files: list[Path],
    args: argparse.Namespace,
    failures: list[tuple[str, str]],
    cam: GradCam | None,
) -> list[dict[str, Any]]:
    """Decode and classify ``files`` a batch at a time; append unreadable ones to ``failures``."""
    predictor = loaded.predictor
    size = predictor.preprocessing.image_size
    batches = [files[i : i + args.batch_size] for i in range(0, len(files), args.batch_size)]
    rows: list[dict[str, Any]] = []
    overlay_names: Counter[str] = Counter()
    progress = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        transient=True, disable=len(batches) < 2 or not sys.stderr.isatty())
    with ThreadPoolExecutor(args.workers) as pool, progress:
        task = progress.add_task("predict", total=len(files))
        decode = lambda batch: [pool.submit(load_image, f, size) for f in batch]  # noqa: E731
        upcoming = decode(batches[0]) if batches else []
        for k, batch in enumerate(batches):
            current, upcoming = upcoming, decode(batches[k + 1]) if k + 1 < len(batches) else []
            good, images = [], []
            for path, future in zip(batch, current):
                try:
                    images.append(future.result())
                    good.append(path)
                except ImageDecodeError as exc:
                    failures.append((str(path), exc.reason))
            if images:
                stack = np.stack(images)
                probs = predictor.predict_proba(stack)
                for path, p in zip(good, probs):
                    best = int(np.argmax(p))
                    rows.append({"path": str(path), "class": predictor.classes[best],
                                 **{f"p_{c}": float(v) for c, v in zip(predictor.classes, p)}})
                if cam is not None:
                    targets = [args.gradcam_class or int(np.argmax(p)) for p in probs]
                    _write_overlays(cam, stack, good, targets, args.gradcam, overlay_names)
            progress.advance(task, len(batch))
    return rows


def _write_overlays(cam: GradCam, stack: np.ndarray, paths: list[Path], targets: list[int | str], folder: Path,
                    names: Counter[str]) -> None:
    """One PNG per image (``<stem>.png``; for several backbones also ``<stem>.<backbone>.png``)."""
    for start in range(0, len(stack), GRADCAM_BATCH):
        chunk = slice(start, start + GRADCAM_BATCH)
        results = cam(stack[chunk], targets[chunk])
        for path, image, result in zip(paths[chunk], stack[chunk], results):
            names[path.stem] += 1
            stem = path.stem if names[path.stem] == 1 else f"{path.stem}-{names[path.stem]}"
            save_overlay(folder / f"{stem}.png", image, result.map)
            if len(result.maps) > 1:
                for layer, heat in result.maps.items():
                    if layer != COMBINED:
                        save_overlay(folder / f"{stem}.{layer}.png", image, heat)


def _print_rows(rows: list[dict[str, Any]], classes: tuple[str, ...]) -> None:
    width = max((len(r["path"]) for r in rows), default=4)
    print(f"{'path':<{width}}  {'class':<9}  " + "  ".join(f"{'p_' + c:>11}" for c in classes))
    for r in rows:
        print(f"{r['path']:<{width}}  {r['class']:<9}  " + "  ".join(f"{r['p_' + c]:>11.4f}" for c in classes))


def _write(out: Path, rows: list[dict[str, Any]], failures: list[tuple[str, str]], classes: tuple[str, ...]) -> None:
    import pandas as pd

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        counts = Counter(r["class"] for r in rows)
        doc = {"predictions": rows, "failed": [{"path": p, "reason": r} for p, r in failures],
               "summary": {c: counts.get(c, 0) for c in classes}}
        out.write_text(json.dumps(doc, indent=2) + "\n")
    else:
        pd.DataFrame(rows, columns=["path", "class", *(f"p_{c}" for c in classes)]).to_csv(out, index=False)
