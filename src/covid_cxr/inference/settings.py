"""How to run a model over images: one frozen value shared by evaluation, calibration, prediction and the audits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InferenceSettings:
    """Images per forward pass, the device, the autocast precision and the backend.

    ``backend`` (torch | onnx; None: ``$COVID_CXR_BACKEND``, else auto, see
    :func:`covid_cxr.inference.backends.choose_backend`) applies where a model file may run on either;
    the audits need the PyTorch network itself and always run it. The ``--compile`` choice is not here:
    whether to compile depends on the job's size (:func:`~covid_cxr.inference.backends.resolve_compile`).
    """

    batch_size: int = 64
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: str = "auto"  # one of covid_cxr.choices.PRECISIONS
    backend: str | None = None
