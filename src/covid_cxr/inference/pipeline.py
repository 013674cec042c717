"""``covid-cxr predict``: classify X-ray files (PNG, JPEG, DICOM) with a checkpoint or an ONNX model.

Files are decoded in worker threads while the previous batch runs through the network, each
resized by the method the model records (``area`` for ours, ``bilinear`` for the authors'
imported Keras models). Every input gets a row, in input order, written as the run goes (a CSV
is flushed after every batch, so an interrupted or killed run keeps what was done): a prediction,
or the reason the input was refused (an unreadable, truncated or multi-frame file, a folder named
like an image, a pattern that matches nothing) in the ``error`` column. File names that are not
UTF-8 are read as the OS holds them and written with \\xNN escapes.

Exit status: 0 when every input was predicted; 1 when any input was refused (each is named with
its reason in the output and on stderr) or none was predicted; 2 for a usage error (a bad option,
an unreadable model); 130 when interrupted (the rows written so far stay).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from covid_cxr.data.images import load_image
from covid_cxr.deploy.backends import BACKENDS, LoadedModel, is_checkpoint_file, load_model, resolve_compile
from covid_cxr.deploy.files import display_path, expand_inputs
from covid_cxr.deploy.output import SUFFIXES, PredictionSink
from covid_cxr.deploy.saturation import print_int8_record
from covid_cxr.errors import ConfigError, ImageDecodeError
from covid_cxr.gradcam import COMBINED, METHODS, GradCam, save_overlay
from covid_cxr.inference import COMPILE_CHOICES, COMPILE_MIN_IMAGES, should_compile
from covid_cxr.operating_point import of_predictor
from covid_cxr.runtime import PRECISIONS

GRADCAM_BATCH = 4  # a backward pass keeps every activation: small batches bound its memory


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify X-ray files, folders or globs with a checkpoint or ONNX model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a covid-cxr checkpoint (.pt) or an exported ONNX model")
    p.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", type=Path, help="write the predictions to this .csv or .json file as they are made "
                   "(default: print them); a refused input's row gives the reason in the 'error' column")
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
    if args.out is not None and args.out.suffix.lower() not in SUFFIXES:
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
    print(f"operating point: {of_predictor(loaded.predictor).describe()}", file=sys.stderr)
    print_int8_record(loaded.predictor, args.checkpoint)
    if compile_model:
        started = time.perf_counter()
        loaded.predictor.warm_up(args.batch_size)  # type: ignore[attr-defined]
        print(f"compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    cam = loaded.gradcam() if args.gradcam else None
    if cam is not None and args.gradcam_method:
        cam = cam.with_method(args.gradcam_method)
    if cam is not None and args.gradcam_class:
        cam.class_index(args.gradcam_class)  # refuse a bad class name before any work
    classes = loaded.predictor.classes
    width = max((len(display_path(f)) for f in inputs.files), default=4)
    sink = PredictionSink(args.out, classes, path_width=width)
    complete = False
    try:
        for path, reason in inputs.failures:
            sink.fail(path, reason)
        predict_files(loaded, inputs.files, args, sink, cam)
        complete = True
    finally:
        sink.close(complete=complete)
        _summarise(sink, args.out, complete)
    return 1 if sink.failed or not sink.predicted else 0


def _summarise(sink: PredictionSink, out: Path | None, complete: bool) -> None:
    """The stderr epilogue: where the rows went, every refused input with its reason, the counts."""
    if out is not None:
        print(f"wrote {sink.predicted} predictions and {len(sink.failed)} refusals to {display_path(out)}",
              file=sys.stderr)
    for path, reason in sink.failed:
        print(f"failed: {path}: {reason}", file=sys.stderr)
    summary = ", ".join(f"{c} {sink.counts.get(c, 0)}" for c in sink.classes)
    state = "" if complete else "interrupted: "
    print(f"{state}predicted {sink.predicted} images ({summary}); {len(sink.failed)} failed", file=sys.stderr)


def _decoded(future: Future[np.ndarray]) -> np.ndarray | str:
    """The decoded image, or the reason its file is refused."""
    try:
        return future.result()
    except ImageDecodeError as exc:
        return exc.reason
    except Exception as exc:  # an unforeseen failure of one file is that file's row, not the end of the run
        return f"unexpected error while decoding ({type(exc).__name__}: {exc})"


def predict_files(
    loaded: LoadedModel,
    files: list[Path],
    args: argparse.Namespace,
    sink: PredictionSink,
    cam: GradCam | None,
) -> None:
    """Decode and classify ``files`` a batch at a time, each row to ``sink`` as its batch is done."""
    predictor = loaded.predictor
    pre = predictor.preprocessing
    decision = of_predictor(predictor)  # the checkpoint's (or ONNX model's) rule; argmax when it has none
    batches = [files[i : i + args.batch_size] for i in range(0, len(files), args.batch_size)]
    overlay_names: Counter[str] = Counter()
    progress = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        transient=True, disable=len(batches) < 2 or not sys.stderr.isatty())
    pool = ThreadPoolExecutor(args.workers)

    def decode(batch: list[Path]) -> list[Future[np.ndarray]]:
        return [pool.submit(load_image, f, pre.image_size, resize=pre.resize) for f in batch]

    try:
        with progress:
            task = progress.add_task("predict", total=len(files))
            upcoming = decode(batches[0]) if batches else []
            for k, batch in enumerate(batches):
                current, upcoming = upcoming, decode(batches[k + 1]) if k + 1 < len(batches) else []
                decoded = [(path, _decoded(future)) for path, future in zip(batch, current)]
                good = [(path, image) for path, image in decoded if isinstance(image, np.ndarray)]
                probs = predictor.predict_proba(np.stack([image for _, image in good])) if good else []
                decided = decision.decide(probs, predictor.classes) if good else []
                found = iter(zip(probs, decided))
                for path, image in decoded:  # rows in input order, refusals where they fell
                    if isinstance(image, str):
                        sink.fail(display_path(path), image)
                    else:
                        sink.add(display_path(path), *next(found))
                if good and cam is not None:
                    targets = [args.gradcam_class or int(k) for k in decided]
                    _write_overlays(cam, np.stack([image for _, image in good]), [path for path, _ in good], targets,
                                    args.gradcam, overlay_names)
                sink.flush()
                progress.advance(task, len(batch))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
