"""Open a model file for inference with the backend the user chose.

A covid-cxr checkpoint (a ``torch.save`` zip) runs on PyTorch or, exported in memory, on ONNX
Runtime; an exported ``.onnx`` file runs on ONNX Runtime only. The file's bytes, not its name,
say which it is. Grad-CAM needs gradients, so it is available whenever a checkpoint is at hand,
whatever backend answers the predictions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from covid_cxr.checkpoint import Checkpoint, load_checkpoint
from covid_cxr.deploy.onnx import OnnxPredictor, export_onnx_bytes, file_sha256
from covid_cxr.errors import CheckpointError, ConfigError
from covid_cxr.gradcam import GradCam
from covid_cxr.inference import Predictor, TorchPredictor

BACKENDS = ("torch", "onnx")


@dataclass
class LoadedModel:
    predictor: Predictor
    network: str
    sha256: str  # of the file given, so a response names exactly the weights that produced it
    checkpoint: Checkpoint | None

    def describe(self) -> str:
        return f"{self.network} on {self.predictor.backend}: {self.predictor.describe()}"  # type: ignore[attr-defined]

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
        return fh.read(4) == b"PK\x03\x04"


def load_model(
    path: str | os.PathLike[str],
    *,
    backend: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
) -> LoadedModel:
    """Open ``path`` (checkpoint or ONNX file) on ``backend`` (default: torch for a checkpoint, onnx for ONNX).

    ``compile``: run the PyTorch network through ``torch.compile`` (see :class:`TorchPredictor`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file (a .pt checkpoint or an exported .onnx model)")
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    sha = file_sha256(path)
    if compile and (backend == "onnx" or not is_checkpoint_file(path)):
        raise ConfigError(f"{path}: --compile applies to a PyTorch checkpoint on the torch backend; ONNX Runtime "
                          "optimises its graph itself")
    if not is_checkpoint_file(path):
        if backend == "torch":
            raise ConfigError(f"{path} is an ONNX model; run it with --backend onnx, or give the .pt checkpoint")
        predictor = OnnxPredictor(path)
        return LoadedModel(predictor, predictor.network, sha, None)
    ckpt = load_checkpoint(path)
    if backend == "onnx":
        if device not in ("auto", "cpu") or precision not in ("auto", "fp32"):
            raise ConfigError("--backend onnx runs in fp32 on ONNX Runtime's own providers; drop --device/--precision")
        predictor = OnnxPredictor(export_onnx_bytes(ckpt, source_sha256=sha))
        return LoadedModel(predictor, ckpt.network, sha, ckpt)
    predictor = TorchPredictor(ckpt, device=device, precision=precision, compile=compile)
    return LoadedModel(predictor, ckpt.network, sha, ckpt)
