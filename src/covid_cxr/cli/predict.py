"""``covid-cxr predict``: classify X-ray files (PNG, JPEG, DICOM) with a checkpoint or an ONNX model.

Files are decoded in worker threads while the previous batch runs through the network, each
resized by the method the model records (``area`` for ours, ``bilinear`` for the authors'
imported Keras models). Every input gets a row, in input order, written as the run goes (a CSV
is flushed after every batch, so an interrupted or killed run keeps what was done): a prediction,
or the reason the input was refused (an unreadable, truncated or multi-frame file, a folder named
like an image, a pattern that matches nothing) in the ``error`` column. File names that are not
UTF-8 are read as the OS holds them and written with \\xNN escapes.

Each prediction row also names what decided its class: the model's operating point (``rule``, and its
``threshold`` on p_covid: with a threshold the class need not be the most probable one), the model file's
``model_sha256`` and, with --gradcam, its overlay file(s). A model with a threshold rule runs in fp32 under
--precision auto (the rule was chosen on fp32 probabilities); --precision bf16 keeps bf16 and warns.
The model may be a run folder (its best.pt).

Overlays (--gradcam DIR) are named after the image (``a.png`` for ``a.dcm``; a UID-named DICOM keeps its whole
name) and never replace an input or any file already in DIR, except an overlay an earlier run wrote there
(so a rerun replaces its own): a taken name gets -2, -3 ...; a name too long for the file system is shortened
with a hash. An overlay that cannot be written leaves its prediction in place, with the reason in 'error'.

--out and --gradcam are checked before the model is loaded: a folder given as --out, a file given as
--gradcam, a place that cannot be written are refused with the reason.

Exit status: 0 when every input was predicted; 1 when any input was refused (each is named with
its reason in the output and on stderr), none was predicted or an overlay was not written; 2 for a usage
error (a bad option, an unreadable model, an --out or --gradcam that cannot be written, inputs that hold no
image file at all: then nothing is written); 130 when interrupted (the rows written so far stay).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covid_cxr.choices import (
    BACKENDS,
    CAM_METHODS,
    COMPILE_CHOICES,
    COMPILE_MIN_IMAGES,
    PRECISIONS,
)
from covid_cxr.errors import ConfigError, DataError
from covid_cxr.inference.inputs import expand_inputs, model_file
from covid_cxr.inference.sink import check_out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify X-ray files, folders or globs with a checkpoint or ONNX model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path,
                   help="a covid-cxr checkpoint (.pt), an exported ONNX model, or a run folder (its best.pt)")
    p.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", type=Path, help="write the predictions to this .csv or .json file as they are made "
                   "(default: print them); a refused input's row gives the reason in the 'error' column")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="auto (default: the fastest exact path here for a .pt, onnx for .onnx), torch or onnx")
    p.add_argument("--gradcam", type=Path, metavar="DIR", help="write a Grad-CAM overlay PNG per image into DIR "
                   "(never over an input or another file there, only over an earlier run's overlays)")
    p.add_argument("--gradcam-class", metavar="CLASS",
                   help="class the overlays explain (covid, pneumonia, normal; default: the predicted one)")
    p.add_argument("--gradcam-method", choices=CAM_METHODS, help="auto (default: HiResCAM for the flatten head, "
                   "Grad-CAM for a pooling one), hirescam or gradcam")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="default auto: bf16 where native, but fp32 for a model with a threshold rule (chosen in fp32)")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images (default 2)")
    p.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help=f"torch.compile the network (default auto: for {COMPILE_MIN_IMAGES}+ images, where the "
                   "~30 s compilation pays for itself)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The library (torch, numpy, onnxruntime) is imported here, not above: `covid-cxr --help` stays fast.
    from covid_cxr.deploy.saturation import print_int8_record
    from covid_cxr.inference.backends import load_model, resolve_compile
    from covid_cxr.inference.pipeline import (
        Classifier,
        Overlays,
        check_overlay_folder,
        predict_inputs,
    )
    from covid_cxr.inference.settings import InferenceSettings

    if args.batch_size < 1 or args.workers < 1:
        raise ConfigError("--batch-size and --workers must be >= 1")
    if args.gradcam_class and not args.gradcam:
        raise ConfigError("--gradcam-class needs --gradcam DIR")
    if args.gradcam_method and not args.gradcam:
        raise ConfigError("--gradcam-method needs --gradcam DIR")
    if args.out is not None:  # where the results go is checked before the model loads, not after its work
        check_out(args.out)
    if args.gradcam:
        check_overlay_folder(args.gradcam)
    model = model_file(args.checkpoint)
    inputs = expand_inputs(args.paths)
    if inputs.nothing_found():
        raise DataError(f"{inputs.nothing_found_message(args.paths)} (nothing was predicted or written)")
    settings = InferenceSettings(batch_size=args.batch_size, device=args.device, precision=args.precision,
                                 backend=args.backend)
    compile_model = resolve_compile(args.compile, len(inputs.files), settings, model=model, follow_rule=True)
    loaded = load_model(model, settings, compile=compile_model, follow_rule=True)
    classifier = Classifier(loaded.predictor)
    print(f"model: {loaded.describe()}", file=sys.stderr)
    print(f"operating point: {classifier.decision.describe()}", file=sys.stderr)
    for warning in loaded.warnings():
        print(warning, file=sys.stderr)
    print_int8_record(loaded.predictor, model)
    loaded.warm_up(settings.batch_size)
    overlays = None
    if args.gradcam:
        overlays = Overlays(loaded.gradcam(), args.gradcam, target=args.gradcam_class, method=args.gradcam_method)
    sink = predict_inputs(classifier, inputs, args.out, batch_size=settings.batch_size, workers=args.workers,
                          overlays=overlays, model_sha256=loaded.sha256)
    return 1 if sink.failed or sink.overlay_errors or not sink.predicted else 0
