"""Open a model file for inference on the fastest exact backend for this machine, or the one asked for.

A covid-cxr checkpoint (a ``torch.save`` zip) runs on PyTorch or, exported to ONNX, on ONNX Runtime;
an exported ``.onnx`` file runs on ONNX Runtime only. The file's bytes, not its name, say which it is.
Grad-CAM needs gradients, so it is available whenever a checkpoint is at hand, whatever backend
answers the predictions.

``--backend auto`` (the default of ``predict``, ``evaluate`` and ``serve``) decides by
:func:`choose_backend`, one rule measured in ``benchmarks/RESULTS.md`` ("Which path auto takes"):

- a GPU, or a CPU with native bf16 (AVX512-BF16/AMX) under ``--precision auto``: PyTorch, bf16 autocast,
  channels_last, BatchNorms folded into the convolutions;
- ``torch.compile`` asked for, or a precision only PyTorch runs (bf16, fp16): PyTorch;
- otherwise (fp32 on a CPU: every AVX2-only CPU): ONNX Runtime fp32, the faster of the two exact fp32 paths.
  The checkpoint is exported once (tens of seconds) and the export is cached under
  ``$COVID_CXR_CACHE/onnx`` by the checkpoint's sha256, so later runs open it in a second.

``$COVID_CXR_BACKEND`` is the default for ``--backend``, for checkpoints and ONNX files alike; an error it
causes names it, so a user who never typed ``--backend`` knows what to unset.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from covid_cxr import __version__
from covid_cxr.atomic import file_sha256, write_bytes
from covid_cxr.choices import BACKENDS
from covid_cxr.errors import CheckpointError, ConfigError, did_you_mean
from covid_cxr.gradcam import GradCam
from covid_cxr.inference.onnx_model import OnnxPredictor, export_onnx_bytes
from covid_cxr.inference.protocol import Predictor
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.inference.torch_model import TorchPredictor, should_compile
from covid_cxr.models.pretrained import default_cache_dir
from covid_cxr.runs.checkpoint import Checkpoint, load_checkpoint
from covid_cxr.runtime import choose_runtime

BACKEND_ENV = "COVID_CXR_BACKEND"  # the default for --backend (auto when unset)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"  # Keras .h5/.hdf5 files (the authors' models)
PICKLE_MAGIC = b"\x80"  # a pickle: torch.save's legacy format, or a pickled model


@dataclass(frozen=True)
class BackendChoice:
    """Which backend runs a checkpoint, and the reason printed beside it."""

    backend: str  # torch | onnx
    reason: str
    origin: str = "auto"  # what asked for it: --backend, $COVID_CXR_BACKEND, or auto (the rule)


def requested_backend(backend: str | None) -> tuple[str, str]:
    """``--backend`` when given, else ``$COVID_CXR_BACKEND``, else auto; and which of them it came from."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV, "").strip().lower()
        if not backend:
            return "auto", "auto"
        origin = f"${BACKEND_ENV}"
    else:
        origin = "--backend"
    if backend not in BACKENDS:
        fix = f" (unset {BACKEND_ENV} or fix its value)" if origin != "--backend" else ""
        raise ConfigError(f"{origin} must be one of {', '.join(BACKENDS)}; got {backend!r}"
                          f"{did_you_mean(backend, BACKENDS)}{fix}")
    return backend, origin


def choose_backend(
    backend: str | None = None, *, device: str = "auto", precision: str = "auto", compile: bool = False
) -> BackendChoice:
    """Resolve ``--backend`` (None: ``$COVID_CXR_BACKEND``, else auto) for a checkpoint on this machine."""
    backend, origin = requested_backend(backend)
    if backend != "auto":
        return BackendChoice(backend, "asked for" if origin == "--backend" else f"asked for by {origin}", origin)
    if compile:
        return BackendChoice("torch", "auto: torch.compile asked for")
    if precision in ("bf16", "fp16"):
        return BackendChoice("torch", f"auto: {precision} runs on PyTorch")
    runtime = choose_runtime(device, precision)
    if runtime.device.type != "cpu":
        return BackendChoice("torch", f"auto: {runtime.device.type} device")
    if runtime.precision == "bf16":
        return BackendChoice("torch", "auto: native bf16 CPU, bf16 autocast is fastest")
    return BackendChoice("onnx", "auto: fp32 on CPU, ONNX Runtime is the fastest exact path")


@dataclass
class LoadedModel:
    """A model file opened for inference: its predictor, identity, and the checkpoint when it is one."""

    predictor: Predictor
    network: str
    sha256: str  # of the file given, so a response names exactly the weights that produced it
    checkpoint: Checkpoint | None
    choice: BackendChoice | None = None

    def describe(self) -> str:
        why = f" ({self.choice.reason})" if self.choice is not None else ""
        return f"{self.network} on {self.predictor.backend}{why}: {self.predictor.describe()}"

    def warm_up(self, batch_size: int) -> None:
        """Compile now for batches of ``batch_size`` (a compiled network only), saying how long it took on stderr."""
        started = time.perf_counter()
        self.predictor.warm_up(batch_size)
        if isinstance(self.predictor, TorchPredictor) and self.predictor.compiled:
            print(f"compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    def gradcam(self) -> GradCam:
        """Grad-CAM on the PyTorch network (the predictor's own when it is PyTorch)."""
        if isinstance(self.predictor, TorchPredictor):
            return GradCam(self.predictor.model, self.predictor.preprocessing, self.predictor.classes)
        if self.checkpoint is None:
            raise ConfigError("Grad-CAM needs gradients, which an ONNX file does not give; use the .pt checkpoint")
        return GradCam(self.checkpoint.build_model(), self.checkpoint.preprocessing, self.checkpoint.classes)


def is_checkpoint_file(path: Path) -> bool:
    """``torch.save`` writes a zip archive; an ONNX model is a protobuf, which never starts with ``PK``."""
    with open(path, "rb") as fh:
        return fh.read(4) == ZIP_MAGIC


def model_file_kind(path: Path) -> str:
    """``"checkpoint"`` or ``"onnx"`` by the file's first bytes; a file that is neither raises, naming the fix.

    Everything that is not a zip would otherwise reach ONNX Runtime and come back as "InvalidProtobuf".
    """
    with open(path, "rb") as fh:
        head = fh.read(len(HDF5_MAGIC))
    if head.startswith(ZIP_MAGIC):
        return "checkpoint"
    if not head:
        raise CheckpointError(f"{path}: empty file (0 bytes), likely an interrupted copy or download; copy the model "
                              "file again")
    if head == HDF5_MAGIC:
        raise CheckpointError(f"{path}: a Keras HDF5 model; convert it first with 'covid-cxr import-keras {path} "
                              "--out model.pt', then give model.pt")
    if head.startswith(PICKLE_MAGIC) or path.suffix.lower() in (".pt", ".pth", ".ckpt"):
        raise CheckpointError(f"{path}: not a covid-cxr checkpoint (those are zip archives written by 'covid-cxr "
                              "train' or 'covid-cxr import-keras') nor an exported .onnx model; give one of those")
    return "onnx"


def resolve_compile(
    choice: str, images: int, settings: InferenceSettings = InferenceSettings(), *, model: Path | None = None
) -> bool:
    """``--compile auto|on|off`` for a job of ``images`` images: auto compiles only a PyTorch checkpoint (never
    the ``model`` file when it is an ONNX one), and only when auto's backend is PyTorch anyway (on an fp32-only
    CPU it is ONNX Runtime, which needs no compilation)."""
    wanted = should_compile(choice, images)
    if wanted and choice == "auto":
        if model is not None and not (model.is_file() and is_checkpoint_file(model)):
            return False
        auto = choose_backend(settings.backend, device=settings.device, precision=settings.precision)
        return auto.backend == "torch"
    return wanted


def cached_onnx(checkpoint: Checkpoint, sha256: str) -> tuple[bytes, str]:
    """The checkpoint's fp32 ONNX export, from the cache when an earlier run wrote it; and where it came from.

    Keyed by the checkpoint file's sha256 and the covid-cxr version (whose exporter wrote it). A cache that
    cannot be written (read-only home, full disk) only costs the export again next time, and says so.
    """
    target = default_cache_dir() / "onnx" / f"{sha256}-{__version__}.onnx"
    if target.is_file():
        return target.read_bytes(), f"cached export {target}"
    started = time.perf_counter()
    data = export_onnx_bytes(checkpoint, source_sha256=sha256)
    took = f"exported in {time.perf_counter() - started:.0f} s"
    try:
        write_bytes(target, data)
    except OSError as exc:
        return data, f"{took}; not cached ({exc.strerror or exc}: set COVID_CXR_CACHE to a writable folder)"
    return data, f"{took}, cached as {target}"


def make_predictor(
    checkpoint: Checkpoint, sha256: str, settings: InferenceSettings = InferenceSettings(), *, compile: bool = False
) -> tuple[Predictor, BackendChoice]:
    """The predictor for a loaded checkpoint on the chosen backend (see :func:`choose_backend`)."""
    device, precision = settings.device, settings.precision
    choice = choose_backend(settings.backend, device=device, precision=precision, compile=compile)
    if choice.backend == "onnx":
        if compile:
            raise ConfigError(f"--compile applies to the torch backend, not to {_asked('onnx', choice.origin)}: ONNX "
                              f"Runtime optimises its graph itself{_or_unset(choice.origin)}")
        if precision not in ("auto", "fp32"):
            raise ConfigError(f"{_asked('onnx', choice.origin)} runs in fp32 on ONNX Runtime; drop --precision "
                              f"{precision}{_or_unset(choice.origin)}")
        data, cached = cached_onnx(checkpoint, sha256)
        return OnnxPredictor(data, device=device), BackendChoice("onnx", f"{choice.reason}; {cached}", choice.origin)
    # Folding is exact up to float rounding (benchmarks/RESULTS.md) and the compiled graph folds by itself.
    predictor = TorchPredictor(checkpoint, device=device, precision=precision, compile=compile, fold=not compile)
    return predictor, choice


def _asked(backend: str, origin: str) -> str:
    """How the user asked for ``backend``, in their words: '--backend onnx' or '$COVID_CXR_BACKEND=onnx'."""
    return f"{origin}={backend}" if origin.startswith("$") else f"{origin} {backend}"


def _or_unset(origin: str) -> str:
    return f" (or unset {BACKEND_ENV})" if origin.startswith("$") else ""


def load_model(
    path: str | os.PathLike[str], settings: InferenceSettings = InferenceSettings(), *, compile: bool = False
) -> LoadedModel:
    """Open ``path`` (checkpoint or ONNX file) on ``settings.backend`` (default auto: :func:`choose_backend` for a
    checkpoint, ONNX Runtime for an ONNX file); ``settings.batch_size`` is the caller's to use.

    ``compile``: run the PyTorch network through ``torch.compile`` (see :class:`TorchPredictor`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file (a .pt checkpoint or an exported .onnx model)")
    if model_file_kind(path) == "onnx":
        return _load_onnx_file(path, settings, compile=compile)
    sha, ckpt = file_sha256(path), load_checkpoint(path)
    predictor, choice = make_predictor(ckpt, sha, settings, compile=compile)
    return LoadedModel(predictor, ckpt.network, sha, ckpt, choice)


def _load_onnx_file(path: Path, settings: InferenceSettings, *, compile: bool) -> LoadedModel:
    """An exported ONNX model: ONNX Runtime in fp32, on the providers for ``settings.device``."""
    backend, origin = requested_backend(settings.backend)
    if compile:
        raise ConfigError(f"{path}: --compile applies to a PyTorch checkpoint on the torch backend; ONNX Runtime "
                          "optimises its graph itself")
    if backend == "torch":
        raise ConfigError(f"{path} is an ONNX model, which runs on ONNX Runtime, but {_asked('torch', origin)} asks "
                          f"for PyTorch; give the .pt checkpoint, or use --backend onnx{_or_unset(origin)}")
    if settings.precision not in ("auto", "fp32"):
        raise ConfigError(f"{path} is an ONNX model, which runs in fp32; drop --precision {settings.precision}")
    predictor = OnnxPredictor(path, device=settings.device)
    choice = BackendChoice("onnx", "an ONNX file", origin)
    return LoadedModel(predictor, predictor.network, file_sha256(path), None, choice)
