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
  ``$COVID_CXR_CACHE/onnx`` by the checkpoint's sha256, so later runs open it in a second; the cache keeps the
  most recently used exports within 1.5 GiB.

A checkpoint that decides by a threshold (an operating point other than argmax) runs in fp32 under
``--precision auto``, on every device: its threshold was chosen, and its sensitivity and specificity
measured, on fp32 probabilities, and bf16 moves a probability by up to ~0.1, enough to flip the images
near the threshold. On a CPU that makes it ONNX Runtime fp32 whatever the CPU; the reason line says so.
An explicit ``--precision bf16`` is kept, with :func:`precision_warning`.

``$COVID_CXR_BACKEND`` is the default for ``--backend``, for checkpoints and ONNX files alike; an error it
causes names it, so a user who never typed ``--backend`` knows what to unset.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from covid_cxr import __version__, fmt
from covid_cxr.atomic import file_sha256, write_bytes
from covid_cxr.choices import BACKENDS
from covid_cxr.errors import CheckpointError, ConfigError, did_you_mean
from covid_cxr.gradcam import GradCam
from covid_cxr.inference.onnx_model import OnnxPredictor, export_onnx_bytes
from covid_cxr.inference.protocol import Predictor
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.inference.torch_model import TorchPredictor, should_compile
from covid_cxr.models.pretrained import default_cache_dir
from covid_cxr.operating_point import OperatingPoint, decision_precision
from covid_cxr.model_files import file_kind, not_a_model
from covid_cxr.runs.checkpoint import Checkpoint, load_checkpoint_sha256
from covid_cxr.runtime import choose_runtime

BACKEND_ENV = "COVID_CXR_BACKEND"  # the default for --backend (auto when unset)


@dataclass(frozen=True)
class BackendChoice:
    """Which backend runs a checkpoint, and the reason printed beside it."""

    backend: str  # torch | onnx
    reason: str
    origin: str = "auto"  # what asked for it: --backend, $COVID_CXR_BACKEND, or auto (the rule)
    precision: str = "auto"  # what it runs at: --precision, or fp32 where auto meets a model with a threshold rule


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
    backend: str | None = None, *, device: str = "auto", precision: str = "auto", compile: bool = False,
    rule: str = "argmax",
) -> BackendChoice:
    """Resolve ``--backend`` (None: ``$COVID_CXR_BACKEND``, else auto) for a checkpoint on this machine.

    ``rule``: the operating point the model decides by (its name, ``sensitivity=0.95``); with a threshold rule,
    ``precision="auto"`` means fp32, the precision the threshold was chosen in, and the reason says so where
    auto would otherwise have taken bf16 or fp16.
    """
    decided = decision_precision(precision, rule)
    choice = replace(_choose_backend(backend, device, decided, compile), precision=decided)
    if decided == precision:
        return choice
    usual = choose_runtime(device, "auto").precision
    if usual == "fp32":
        return choice
    return replace(choice, reason=f"{choice.reason}; fp32, not {usual}: the model decides by {rule}, a threshold "
                   "chosen on fp32 probabilities")


def _choose_backend(backend: str | None, device: str, precision: str, compile: bool) -> BackendChoice:
    """:func:`choose_backend` for a precision already settled against the model's rule."""
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

    def warnings(self) -> list[str]:
        """What the user should know before trusting the decisions (see :func:`precision_warning`)."""
        warning = precision_warning(self.predictor)
        return [warning] if warning else []

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
    return file_kind(path) == "zip"


def model_file_kind(path: Path) -> str:
    """``"checkpoint"`` or ``"onnx"`` by the file's first bytes; a file that is neither raises, naming the fix.

    Everything that is not a zip would otherwise reach ONNX Runtime and come back as "InvalidProtobuf".
    """
    kind = file_kind(path)
    if kind == "zip":
        return "checkpoint"
    if said := not_a_model(path, kind):
        raise CheckpointError(said)
    if kind == "pickle" or (kind == "other" and path.suffix.lower() in (".pt", ".pth", ".ckpt")):
        raise CheckpointError(f"{path}: not a covid-cxr checkpoint (those are zip archives written by 'covid-cxr "
                              "train' or 'covid-cxr import-keras') nor an exported .onnx model; give one of those")
    return "onnx"  # an ONNX file, or anything else: ONNX Runtime's own check names what is wrong with it


def resolve_compile(
    choice: str, images: int, settings: InferenceSettings = InferenceSettings(), *, model: Path | None = None,
    follow_rule: bool = False,
) -> bool:
    """``--compile auto|on|off`` for a job of ``images`` images: auto compiles only a PyTorch checkpoint (never
    the ``model`` file when it is an ONNX one), and only when auto's backend is PyTorch anyway (on an fp32-only
    CPU it is ONNX Runtime, which needs no compilation; so it is for a ``model`` with a threshold rule when
    ``follow_rule``, see :func:`load_model`)."""
    wanted = should_compile(choice, images)
    if wanted and choice == "auto":
        if model is not None and not (model.is_file() and is_checkpoint_file(model)):
            return False
        rule = stored_rule(model) if model is not None and follow_rule else "argmax"
        auto = choose_backend(settings.backend, device=settings.device, precision=settings.precision, rule=rule)
        return auto.backend == "torch"
    return wanted


def stored_rule(path: Path) -> str:
    """The name of the operating point a checkpoint file carries, read without reading its weights (mapped)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same to a user
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    return OperatingPoint.from_dict(data.get("operating_point") if isinstance(data, dict) else None).name


# The ONNX cache keeps the most recently used exports within this many bytes (one concat export is 180 MB:
# eight of them; a researcher's five folds, retrained, would otherwise fill a home folder by the gigabyte).
ONNX_CACHE_BYTES = 1536 * 2**20


def cached_onnx(checkpoint: Checkpoint, sha256: str) -> tuple[bytes, str]:
    """The checkpoint's fp32 ONNX export, from the cache when an earlier run wrote it; and where it came from.

    Keyed by the checkpoint file's sha256 and the covid-cxr version (whose exporter wrote it). A cache that
    cannot be written (read-only home, full disk) only costs the export again next time, and says so. A new
    export evicts the least recently used ones beyond :data:`ONNX_CACHE_BYTES` (:func:`trim_onnx_cache`).
    """
    folder = default_cache_dir() / "onnx"
    target = folder / f"{sha256}-{__version__}.onnx"
    try:
        data = target.read_bytes()
    except OSError:
        pass  # not exported yet, evicted by another process, or no cache folder: export (and say why not cached)
    else:
        _touch(target)
        return data, f"cached export {target}"
    started = time.perf_counter()
    data = export_onnx_bytes(checkpoint, source_sha256=sha256)
    took = f"exported in {time.perf_counter() - started:.0f} s"
    try:
        write_bytes(target, data)
    except OSError as exc:
        return data, f"{took}; not cached ({exc.strerror or exc}: set COVID_CXR_CACHE to a writable folder)"
    evicted = trim_onnx_cache(folder, keep=target, limit=ONNX_CACHE_BYTES)
    return data, f"{took}, cached as {target}" + (f" ({evicted} older export(s) evicted)" if evicted else "")


def trim_onnx_cache(folder: Path, *, keep: Path, limit: int) -> int:
    """Remove the least recently used exports until the folder's ``.onnx`` files fit in ``limit`` bytes.

    ``keep`` (the export just written) always stays, whatever its size. Recency is the file's modification
    time, which a cache hit refreshes. Files another process removed meanwhile are skipped; returns the number
    removed by this call.
    """
    entries = []
    for path in folder.glob("*.onnx"):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = 0
    for _, size, path in sorted(entries, key=lambda entry: entry[0]):  # oldest first
        if total <= limit:
            break
        if path == keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue  # gone already, or not ours to remove: it only costs disk
        total -= size
        removed += 1
    return removed


def _touch(path: Path) -> None:
    """Mark a cache entry as just used (a read-only cache keeps its order: nothing is evicted from it either)."""
    try:
        os.utime(path)
    except OSError:
        pass


def make_predictor(
    checkpoint: Checkpoint, sha256: str, settings: InferenceSettings = InferenceSettings(), *, compile: bool = False,
    follow_rule: bool = False,
) -> tuple[Predictor, BackendChoice]:
    """The predictor for a loaded checkpoint on the chosen backend (see :func:`choose_backend`).

    ``follow_rule``: the predictions will be decided by the checkpoint's operating point, so a threshold rule
    makes ``--precision auto`` fp32 (as ``predict`` and ``serve`` do).
    """
    device = settings.device
    rule = _rule_of(checkpoint).name if follow_rule else "argmax"
    choice = choose_backend(settings.backend, device=device, precision=settings.precision, compile=compile, rule=rule)
    precision = choice.precision
    if choice.backend == "onnx":
        if compile:
            raise ConfigError(f"--compile applies to the torch backend, not to {_asked('onnx', choice.origin)}: ONNX "
                              f"Runtime optimises its graph itself{_or_unset(choice.origin)}")
        if precision not in ("auto", "fp32"):
            raise ConfigError(f"{_asked('onnx', choice.origin)} runs in fp32 on ONNX Runtime; drop --precision "
                              f"{precision}{_or_unset(choice.origin)}")
        data, cached = cached_onnx(checkpoint, sha256)
        return OnnxPredictor(data, device=device), replace(choice, reason=f"{choice.reason}; {cached}")
    # Folding is exact up to float rounding (benchmarks/RESULTS.md) and the compiled graph folds by itself.
    predictor = TorchPredictor(checkpoint, device=device, precision=precision, compile=compile, fold=not compile)
    return predictor, choice


def precision_of(predictor: Predictor) -> tuple[str, dict[str, Any] | None]:
    """The precision the model computes in (``int8``, ``bf16``, ``fp32`` ...) and, for an int8 model, the record
    of its check against fp32 (``covid_cxr.quantization``) as export stored it."""
    runtime = getattr(predictor, "runtime", None)
    if runtime is not None:
        return str(runtime.precision), None
    raw = (getattr(predictor, "metadata", None) or {}).get("quantization")
    if raw is None:
        return "fp32", None
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    return "int8", record if isinstance(record, dict) else {}


def precision_warning(predictor: Predictor) -> str | None:
    """A warning when a model with a threshold rule runs in reduced precision (an explicit ``--precision bf16``):
    its decisions near the threshold may differ from those its validation figures describe."""
    op = _rule_of(predictor)
    precision = predictor.runtime.precision if isinstance(predictor, TorchPredictor) else "fp32"
    if op.rule == "argmax" or precision == "fp32":
        return None
    rule = f"COVID-19 when p_{op.positive_class} >= {fmt.exact(op.threshold)}"
    return (f"warning: the model decides by {op.name} ({rule}), a threshold chosen and validated on fp32 "
            f"probabilities; {precision} moves a probability by up to about 0.1, so images near the threshold may be "
            f"decided otherwise than its validation sensitivity and specificity say. Drop --precision {precision} "
            "(auto runs such a model in fp32) for the documented rule")


def _rule_of(source: Checkpoint | Predictor) -> OperatingPoint:
    """The operating point a checkpoint or a loaded predictor carries (argmax when none)."""
    if isinstance(source, Checkpoint):
        return OperatingPoint.from_dict(source.operating_point)
    checkpoint = getattr(source, "checkpoint", None)
    return _rule_of(checkpoint) if checkpoint is not None else OperatingPoint()


def _asked(backend: str, origin: str) -> str:
    """How the user asked for ``backend``, in their words: '--backend onnx' or '$COVID_CXR_BACKEND=onnx'."""
    return f"{origin}={backend}" if origin.startswith("$") else f"{origin} {backend}"


def _or_unset(origin: str) -> str:
    return f" (or unset {BACKEND_ENV})" if origin.startswith("$") else ""


def load_model(
    path: str | os.PathLike[str], settings: InferenceSettings = InferenceSettings(), *, compile: bool = False,
    follow_rule: bool = False,
) -> LoadedModel:
    """Open ``path`` (checkpoint or ONNX file) on ``settings.backend`` (default auto: :func:`choose_backend` for a
    checkpoint, ONNX Runtime for an ONNX file); ``settings.batch_size`` is the caller's to use.

    ``compile``: run the PyTorch network through ``torch.compile`` (see :class:`TorchPredictor`).
    ``follow_rule``: the caller decides by the model's operating point (``predict``, ``serve``), so a checkpoint
    with a threshold rule runs in fp32 under ``--precision auto`` (see :func:`make_predictor`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file (a .pt checkpoint or an exported .onnx model)")
    if model_file_kind(path) == "onnx":
        return _load_onnx_file(path, settings, compile=compile)
    ckpt, sha = load_checkpoint_sha256(path)
    predictor, choice = make_predictor(ckpt, sha, settings, compile=compile, follow_rule=follow_rule)
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
