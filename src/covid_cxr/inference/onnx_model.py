"""The ONNX Runtime backend, and the torch -> ONNX export it runs (a file, or the cached fp32 backend).

The exported graph is the network itself: float input ``image`` (N, 3, S, S) (or (N, 1, S, S)),
outputs ``logits`` and ``probabilities`` (N, C). What turns a raw X-ray into that input travels in
the model's ``metadata_props`` (keys in :data:`META_KEYS`): input size, scaling, channels, resize method, class
names in output order, network name, covid-cxr version and the source checkpoint's hash. The
predictor feeds the graph through :func:`covid_cxr.preprocess.to_model_input`, the same function
PyTorch uses, so the two backends cannot disagree on scaling.

Exporter: the ``torch.export``-based one (``dynamo=True``). The TorchScript tracer records the
TensorFlow "same" padding arithmetic on input shapes as ONNX ops and exports its floor division
as a truncating ``Div``, so Xception's odd-sized pads come out one pixel off and the graph fails
to run; ``torch.export`` resolves those shapes to constants (only the batch axis is symbolic, with
``--dynamic-batch``), and it needs opset 18 or later. Writing the export to a file is
:func:`covid_cxr.deploy.onnx.export_onnx`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covid_cxr import __version__
from covid_cxr.errors import CheckpointError, ConfigError
from covid_cxr.inference.int8 import Int8Form, cpu_features, open_form, reads_graph
from covid_cxr.inference.protocol import check_batch
from covid_cxr.labels import check_classes
from covid_cxr.perf import apply_speed_settings
from covid_cxr.preprocess import Preprocessing, to_model_input
from covid_cxr.runs.checkpoint import Checkpoint

DEFAULT_OPSET = 18
MIN_OPSET = 18  # the lowest opset the torch.export-based exporter writes without a lossy conversion
META_PREFIX = "covid_cxr."
META_KEYS = ("format", "network", "classes", "preprocessing", "version", "source_sha256", "operating_point")
FORMAT = "covid-cxr-onnx/1"


class _WithProbabilities(torch.nn.Module):
    """The network plus its softmax, so ONNX consumers get probabilities without knowing the head."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits, dim=1)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress lines and warnings about ops we do not use (torchvision's)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx_bytes(
    checkpoint: Checkpoint,
    *,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    source_sha256: str = "",
) -> bytes:
    """Serialise the checkpoint's network, with its preprocessing metadata, as an ONNX model."""
    import onnx  # ~1 s to import: only an export needs it, not every run that opens a model

    from covid_cxr.inference.onnx_graph import fold_pads_into_pools  # imports onnx too

    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ConfigError(f"--opset must be between {MIN_OPSET} and {onnx.defs.onnx_opset_version()}; got {opset}")
    pre = checkpoint.preprocessing
    model = _WithProbabilities(checkpoint.build_model()).eval()
    example = torch.zeros(2 if dynamic_batch else 1, pre.channels, pre.image_size, pre.image_size)
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits", "probabilities"],
            dynamic_shapes=shapes,
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    fold_pads_into_pools(proto)  # Keras' -inf "same" max-pool pads become MaxPool pads: same numbers, no copy
    meta = {
        "format": FORMAT,
        "network": checkpoint.network,
        "classes": json.dumps(list(checkpoint.classes)),
        "preprocessing": json.dumps(pre.to_dict(), sort_keys=True),
        "version": __version__,
        "source_sha256": source_sha256,
    }
    if checkpoint.operating_point is not None:  # the decision rule travels with the weights (absent: argmax)
        meta["operating_point"] = json.dumps(checkpoint.operating_point, sort_keys=True)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    proto.producer_name, proto.producer_version = "covid-cxr", __version__
    proto.doc_string = (
        f"covid-cxr {checkpoint.network}: input 'image' float (N,{pre.channels},{pre.image_size},{pre.image_size}), "
        f"grayscale uint8 resized '{pre.resize}', scaled '{pre.scaling}'; "
        f"outputs logits and probabilities over {', '.join(checkpoint.classes)}"
    )
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def read_metadata(metadata: dict[str, str], *, where: str) -> tuple[str, tuple[str, ...], Preprocessing, dict[str, str]]:
    """Network, classes, preprocessing and the rest, from an ONNX model's metadata_props."""
    ours = {k[len(META_PREFIX) :]: v for k, v in metadata.items() if k.startswith(META_PREFIX)}
    if ours.get("format") != FORMAT:
        raise CheckpointError(
            f"{where}: not an ONNX model exported by covid-cxr (no {META_PREFIX}format metadata); "
            "export one with 'covid-cxr export CHECKPOINT --format onnx'"
        )
    try:
        classes = check_classes(json.loads(ours["classes"]))
        pre = Preprocessing.from_dict(json.loads(ours["preprocessing"]))
        return ours["network"], classes, pre, ours
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{where}: malformed covid-cxr metadata in the ONNX model ({exc})") from exc


class OnnxPredictor:
    """ONNX Runtime session over an exported model; the :class:`~covid_cxr.inference.protocol.Predictor` surface."""

    backend = "onnx"

    def __init__(self, source: str | os.PathLike[str] | bytes, *, device: str = "auto") -> None:
        """Open ``source`` on the execution providers for ``device`` (see :func:`onnx_providers`)."""
        import onnxruntime as ort  # imported only by the runs that use this backend

        where = "<in-memory ONNX model>" if isinstance(source, bytes) else str(source)
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise CheckpointError(f"{where}: no such ONNX file")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.speed = apply_speed_settings()
        options.intra_op_num_threads = self.speed.threads  # physical cores, as for torch
        providers = onnx_providers(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(
                source if isinstance(source, bytes) else os.fspath(source), sess_options=options, providers=providers
            )
        except Exception as exc:  # ORT raises its own exception types for every kind of bad file
            raise CheckpointError(f"{where}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        self.network, self.classes, self.preprocessing, self.metadata = read_metadata(meta, where=where)
        self.int8_form: Int8Form | None = None  # how an int8 model's weights run on this CPU (None: as stored)
        if "quantization" in self.metadata:
            self._open_int8_form(source, options, providers)
        self.source_sha256 = self.metadata.get("source_sha256", "")
        first = self.session.get_inputs()[0]
        self._input = first.name
        # An export without --dynamic-batch takes exactly its traced batch (1): larger batches go through in pieces.
        self.fixed_batch = first.shape[0] if isinstance(first.shape[0], int) else None

    def _open_int8_form(self, source: str | os.PathLike[str] | bytes, options: Any, providers: list[Any]) -> None:
        """Reopen an int8 model with its weights in the form this CPU runs exactly (:mod:`covid_cxr.inference.int8`)."""
        import onnx
        import onnxruntime as ort

        cpu = cpu_features()
        if not reads_graph(cpu):
            return  # a VNNI CPU (or not x86): the int8 form is exact and fastest; no need to read the graph
        # Read again as a graph (the session does not give it back): only on CPUs without VNNI, only for int8 files.
        model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(os.fspath(source))
        self.int8_form = open_form(model, cpu)
        if self.int8_form is not None and self.int8_form.unsigned:
            self.session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)

    def describe(self) -> str:
        """Execution providers and threads."""
        threads = self.session.get_session_options().intra_op_num_threads
        capped = "" if self.speed.cpu_limit is None else f" (cgroup CPU limit {self.speed.cpu_limit:g})"
        weights = "" if self.int8_form is None or not self.int8_form.unsigned else " int8-weights=uint8"
        return f"onnxruntime providers={','.join(self.session.get_providers())} threads={threads}{capped}{weights}"

    def warm_up(self, batch_size: int) -> None:
        """Nothing to do: ONNX Runtime optimises its graph when the session opens."""

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S) -> float32 probabilities (N, C)."""
        batch = torch.as_tensor(np.asarray(images))
        check_batch(batch, self.preprocessing.image_size)
        x = to_model_input(batch, self.preprocessing).numpy()
        step = self.fixed_batch or max(len(x), 1)
        if len(x) % step:
            raise ValueError(f"this ONNX model takes batches of exactly {step}; re-export it with --dynamic-batch")
        probs = [self.session.run(["probabilities"], {self._input: x[i : i + step]})[0] for i in range(0, len(x), step)]
        return np.concatenate(probs).astype(np.float32, copy=False) if probs else np.empty((0, len(self.classes)), np.float32)


def onnx_providers(device: str, available: Sequence[str]) -> list[str | tuple[str, dict[str, Any]]]:
    """ONNX Runtime execution providers for ``--device``, given those this onnxruntime build has.

    ``cpu``: the CPU alone, even where onnxruntime-gpu is installed; ``cuda`` / ``cuda:N``: that GPU
    (the CPU runs any op it lacks); ``auto``: the GPU first where there is one.
    """
    cuda = "CUDAExecutionProvider"
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        return [p for p in (cuda, "CPUExecutionProvider") if p in available] or list(available)
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index or "0").isdigit():
        raise ConfigError(f"--device {device!r}: ONNX Runtime runs on cpu, cuda or cuda:N")
    if cuda not in available:
        raise ConfigError(f"--device {device}: this onnxruntime has no CUDA provider (it has {', '.join(available)}); "
                          "install onnxruntime-gpu, or use --device cpu")
    return [(cuda, {"device_id": int(index or 0)}), "CPUExecutionProvider"]
