"""The PyTorch backend: a checkpoint's network in eval mode, BatchNorms folded, optionally compiled.

:class:`TorchPredictor` is the inference loop ``evaluate`` runs over a prepared split, ``predict`` over
files, the web service over uploads and the audits over altered images; it is also the one place
that compiles (:meth:`TorchPredictor.warm_up`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import numpy as np
import torch
from torch import fx
from torch.nn.utils.fusion import fuse_conv_bn_eval

from covid_cxr.choices import COMPILE_CHOICES, COMPILE_MIN_IMAGES
from covid_cxr.inference.protocol import check_batch
from covid_cxr.models.layers import MaxPool2dSame
from covid_cxr.preprocess import to_model_input
from covid_cxr.runs.checkpoint import Checkpoint
from covid_cxr.runtime import Runtime, choose_runtime


def should_compile(choice: str, images: int) -> bool:
    """Resolve ``--compile auto|on|off`` for a job of ``images`` images (auto: :data:`COMPILE_MIN_IMAGES` or more)."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}; got {choice!r}")
    return choice == "on" or (choice == "auto" and images >= COMPILE_MIN_IMAGES)


def fold_batchnorms(model: torch.nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution, in place.

    The folded convolution computes ``bn(conv(x))`` in one pass (equal up to float rounding: about 1e-7
    relative), and the BatchNorm becomes an ``Identity``, so the module tree (``forward_features``, the
    Grad-CAM layers) stays as it was. BatchNorms after an addition (ResNet50V2's pre-activations) stay.
    The graph is read with ``torch.fx``; returns how many BatchNorms were folded.
    """
    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, name: str) -> bool:  # its padding reads the input's shape
            return isinstance(m, MaxPool2dSame) or super().is_leaf_module(m, name)

    if model.training:
        raise ValueError("fold_batchnorms needs a model in eval mode: training BatchNorms use batch statistics")
    graph = _Tracer().trace(model)
    calls = [n for n in graph.nodes if n.op == "call_module"]
    uses: dict[str, int] = {}
    for node in calls:
        uses[node.target] = uses.get(node.target, 0) + 1
    folded = 0
    for node in calls:
        bn = model.get_submodule(node.target)
        source = node.args[0] if node.args else None
        if not isinstance(bn, torch.nn.BatchNorm2d) or getattr(source, "op", None) != "call_module":
            continue
        conv = model.get_submodule(source.target)
        if not isinstance(conv, torch.nn.Conv2d) or len(source.users) != 1 or uses[source.target] != 1:
            continue
        model.set_submodule(source.target, fuse_conv_bn_eval(conv, bn))
        model.set_submodule(node.target, torch.nn.Identity())
        folded += 1
    return folded


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """CUDA convolutions and matmuls in true fp32, restored after. PyTorch lets cuDNN use TF32 by default, which
    rounds inputs to 10 mantissa bits: enough to move a probability across a threshold chosen in fp32. (No effect on
    a CPU, whose fp32 is always fp32.)"""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class TorchPredictor:
    """A checkpoint's network in eval mode on the chosen runtime.

    With ``compile=True`` the network runs through ``torch.compile`` with inductor's freezing (BatchNorms
    folded into the convolutions, weights prepacked for oneDNN): the fastest inference PyTorch offers
    here, for jobs long enough to repay the compilation. The compiled graph is specialised to the first
    batch size it sees; smaller batches are zero-padded to it and larger ones split, so it never
    recompiles. If compilation fails (no C++ compiler, an unsupported platform) the predictor says so on
    stderr and goes on in eager mode.
    """

    backend = "torch"

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        device: str = "auto",
        precision: str = "auto",
        channels_last: bool | None = None,
        compile: bool = False,
        fold: bool = False,
    ) -> None:
        self.checkpoint = checkpoint
        self.classes = checkpoint.classes
        self.preprocessing = checkpoint.preprocessing
        self.runtime: Runtime = choose_runtime(device, precision, channels_last)
        model = checkpoint.build_model()
        self.folded = fold_batchnorms(model) if fold else 0
        model = model.to(self.runtime.device)
        if self.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.compiled = compile
        self._compiled_model = torch.compile(self.model) if compile else None
        self._compiled_batch: int | None = None

    def describe(self) -> str:
        """Device, precision, layout, compilation and folded BatchNorms."""
        folded = f" bn_folded={self.folded}" if self.folded else ""
        return f"{self.runtime.describe()} compile={'on' if self.compiled else 'off'}{folded}"

    def warm_up(self, batch_size: int) -> None:
        """Compile now, for batches of ``batch_size``, with one pass over blank images (eager mode: nothing to do)."""
        if self._compiled_model is not None:
            size = self.preprocessing.image_size
            self.predict_proba(np.zeros((batch_size, size, size), dtype=np.uint8))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled_model is None:
            return self.model(x)
        import torch._inductor.config as inductor_config  # ~1 s to import: only compiled predictors need it

        n = len(x)
        step = self._compiled_batch or n
        outputs = []
        for start in range(0, n, step):
            part = x[start : start + step]
            if len(part) < step:  # pad to the compiled batch size: a new shape would mean a new compilation
                layout = torch.channels_last if self.runtime.channels_last else torch.contiguous_format
                filler = part.new_zeros((step - len(part), *part.shape[1:]))
                part = torch.cat([part, filler]).contiguous(memory_format=layout)
            try:
                with inductor_config.patch(freezing=True):
                    out = self._compiled_model(part)
            except Exception as exc:  # inductor raises many types; any failure means: run eagerly
                print(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                      "going on without it", file=sys.stderr)
                self._compiled_model, self.compiled = None, False
                return self.model(x)
            self._compiled_batch = step
            outputs.append(out[: min(step, n - start)])
        return torch.cat(outputs)

    def inputs(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The float network input for a uint8 batch, on the runtime's device."""
        batch = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        check_batch(batch, self.preprocessing.image_size)
        batch = batch.to(self.runtime.device, non_blocking=True)
        return to_model_input(batch, self.preprocessing, channels_last=self.runtime.channels_last)

    @torch.inference_mode()
    def logits(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The network's logits; fp32 is true fp32 on a GPU too (see :func:`exact_fp32`)."""
        exact = exact_fp32() if self.runtime.precision == "fp32" else contextlib.nullcontext()
        with exact, self.runtime.autocast():
            return self._forward(self.inputs(images)).float()

    def predict_proba(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        return torch.softmax(self.logits(images), dim=1).cpu().numpy()
