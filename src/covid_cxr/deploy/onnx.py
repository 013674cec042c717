"""Write a checkpoint's ONNX export to a file: what ``covid-cxr export --format onnx`` produces.

The export itself (graph, metadata, checks) is :func:`covid_cxr.inference.onnx_model.export_onnx_bytes`,
which the cached fp32 backend runs too; the file opens with
:class:`~covid_cxr.inference.onnx_model.OnnxPredictor`, here or anywhere ONNX Runtime runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from covid_cxr.atomic import write_bytes
from covid_cxr.inference.onnx_model import DEFAULT_OPSET, export_onnx_bytes
from covid_cxr.runs.checkpoint import Checkpoint


def export_onnx(
    checkpoint: Checkpoint,
    out: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    source_sha256: str = "",
) -> Path:
    """Write the ONNX model to ``out`` atomically (temporary file, then rename)."""
    data = export_onnx_bytes(checkpoint, dynamic_batch=dynamic_batch, opset=opset, source_sha256=source_sha256)
    return write_bytes(out, data)
