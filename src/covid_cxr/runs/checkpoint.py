"""Our checkpoint format: one file that rebuilds a model and its preprocessing alone.

A checkpoint is a ``torch.save`` of a plain dict (loadable with ``weights_only=True``):

=====================  =======================================================================
``format``             ``"covid-cxr-checkpoint"``
``format_version``     integer, :data:`FORMAT_VERSION`
``network``            registry name (``concat``, ``xception``, ``resnet50v2``)
``classes``            class keys in output-unit order
``preprocessing``      :class:`~covid_cxr.preprocess.Preprocessing` as a dict
``model_state``        the model's ``state_dict``
``meta``               free-form provenance: package version, creation time, source (run, fold,
                       epoch, imported file...), metrics at save time
``train_state``        optional: optimizer/scheduler/RNG states and progress, for resuming
``operating_point``    optional: the decision rule chosen on validation
                       (:meth:`covid_cxr.operating_point.OperatingPoint.to_dict`); absent means argmax
=====================  =======================================================================

Writes are atomic (:func:`covid_cxr.atomic.replace_atomically`), so a crash at any moment leaves
either the old file or the new one.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from covid_cxr import __version__
from covid_cxr.atomic import replace_atomically, signals_held, stream_sha256
from covid_cxr.errors import CheckpointError
from covid_cxr.labels import check_classes
from covid_cxr.model_files import FORMAT, file_kind, not_a_model
from covid_cxr.models import build_model
from covid_cxr.preprocess import Preprocessing

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A network's name, classes, preprocessing and weights: everything needed to rebuild it."""

    network: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    model_state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    train_state: dict[str, Any] | None = None
    operating_point: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The dict ``torch.save`` writes (the format in the module docstring)."""
        out: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "network": self.network,
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_dict(),
            "model_state": self.model_state,
            "meta": {"covid_cxr_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.meta},
        }
        if self.train_state is not None:
            out["train_state"] = self.train_state
        if self.operating_point is not None:
            out["operating_point"] = self.operating_point
        return out

    def build_model(self, *, strict: bool = True) -> torch.nn.Module:
        """Rebuild the network with its weights, in eval mode."""
        model = build_model(self.network, num_classes=len(self.classes), image_size=self.preprocessing.image_size)
        missing, unexpected = model.load_state_dict(self.model_state, strict=False)
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"checkpoint weights do not fit network {self.network!r}: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        damaged = non_finite(self.model_state)
        if strict and damaged:  # NaN weights gave NaN probabilities, which argmax decides as the first class, COVID-19
            raise CheckpointError(f"checkpoint weights hold NaN or inf values, in {', '.join(damaged[:3])}"
                                  + (f" and {len(damaged) - 3} other tensors" if len(damaged) > 3 else "")
                                  + ": the file is damaged or its training diverged; use another checkpoint")
        return model.eval()


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return [name for name, tensor in state.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Save ``obj`` to ``path`` through a temporary file and a rename; never leaves a partial file. A Ctrl-C or
    SIGTERM that comes meanwhile acts once the file is in place (:func:`~covid_cxr.atomic.signals_held`)."""
    with signals_held(signal.SIGINT, signal.SIGTERM, redeliver=True):
        return replace_atomically(path, lambda fh: torch.save(obj, fh))


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write ``ckpt`` atomically to ``path``."""
    return atomic_torch_save(ckpt.to_dict(), path)


def unreadable(path: Path, exc: BaseException) -> str:
    """Why ``torch.load`` could not read ``path``, said by what the file is (:func:`file_kind`), with the fix.

    torch's own words (an unpickling error suggesting ``weights_only=False``, ``EOFError``, ``KeyError: 101``)
    tell a user nothing and one of them suggests running arbitrary code.
    """
    try:
        kind = file_kind(path)
    except OSError:
        kind = None
    if said := not_a_model(path, kind):
        return said
    if kind == "onnx":
        return (f"{path}: an ONNX model, not a covid-cxr checkpoint; give the checkpoint (.pt, e.g. RUN/best.pt) "
                "it was exported from")
    if kind == "other":
        return (f"{path}: not a covid-cxr checkpoint (those are zip archives written by 'covid-cxr train' or "
                "'covid-cxr import-keras'); give one of those")
    return f"{path}: not a readable checkpoint, damaged or not covid-cxr's ({type(exc).__name__}: {exc})"


def _read(path: Path, map_location: str | torch.device, *, mmap: bool = False, fh: BinaryIO | None = None
          ) -> dict[str, Any]:  # fmt: skip
    """The checkpoint's dict, its format checked; ``mmap`` maps the weights instead of reading them.

    ``fh``: read from this file, open on ``path`` (named in messages), instead of opening ``path``.
    """
    if fh is None and not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path if fh is None else fh, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same to a user
        raise CheckpointError(unreadable(path, exc)) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        # a torch file, read, but not ours (import-keras converts Keras files, and would refuse this one)
        raise CheckpointError(
            f"{path}: a PyTorch file, but not a covid-cxr checkpoint (those are written by 'covid-cxr train' and "
            "'covid-cxr import-keras'); give one of those, or convert the authors' Keras .hdf5 with import-keras"
        )
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by a newer covid-cxr (format {data['format_version']}); upgrade covid-cxr to read it"
        )
    return data


def checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's ``meta`` (what it was trained on: fold, data, split hash) without reading its weights."""
    return dict(_read(Path(path), "cpu", mmap=True).get("meta", {}))


def checkpoint_rule_and_meta(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """A checkpoint's stored operating point (None: argmax) and its ``meta``, without reading its weights."""
    data = _read(Path(path), "cpu", mmap=True)
    return data.get("operating_point"), dict(data.get("meta", {}))


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    return _checkpoint(path, _read(path, map_location))


def load_checkpoint_sha256(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
                           ) -> tuple[Checkpoint, str]:  # fmt: skip
    """:func:`load_checkpoint`, and the sha256 of the very bytes it read.

    Both come from one open file, so a checkpoint replaced meanwhile (best.pt of a run still training:
    replaced by a rename, which leaves an open file as it was) cannot pair one epoch's weights with
    another's hash in a result that names the file it evaluated.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as fh:
        sha256 = stream_sha256(fh)
        fh.seek(0)
        return _checkpoint(path, _read(path, map_location, fh=fh)), sha256


def _checkpoint(path: Path, data: dict[str, Any]) -> Checkpoint:
    """The :class:`Checkpoint` a checked checkpoint dict holds."""
    try:
        return Checkpoint(
            network=str(data["network"]),
            classes=check_classes(data["classes"]),
            preprocessing=Preprocessing.from_dict(dict(data["preprocessing"])),
            model_state=data["model_state"],
            meta=dict(data.get("meta", {})),
            train_state=data.get("train_state"),
            operating_point=data.get("operating_point"),
        )
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed checkpoint ({exc})") from exc
