"""The fixed model and images every configuration is compared on, made once per benchmark run.

Accuracy differences (bf16, ONNX Runtime, int8 against fp32) mean something only on a model whose
outputs depend on the image, so we never compare on untrained random weights:

- ``--checkpoint RUN/best.pt`` of a training run (``covid-cxr demo`` writes one): its own test split
  from the prepared data named in ``run.json`` (up to ``max_eval`` images), and training images of
  the fold for int8 calibration;
- otherwise a stand-in made here, at the paper's 300x300: the concatenated network with fresh
  (Keras-initialised) weights whose BatchNorm statistics are re-estimated on synthetic chest images
  (``covid_cxr.synth.render_chest``) and whose final Dense layer is fitted on them; evaluated on
  other synthetic chest images. It is not a trained diagnostic model, and RESULTS.md says so.

Then the checkpoint is exported to ONNX (``covid_cxr.deploy.onnx``) and quantized to int8 in both
graph formats (``covid_cxr.deploy.quantize``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covid_cxr.labels import CLASSES
from covid_cxr.preprocess import Preprocessing, to_model_input
from covid_cxr.runs.checkpoint import Checkpoint, load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class Reference:
    checkpoint: Path
    eval_set: Path  # npz: images uint8 (N, S, S), labels int64 (N,)
    onnx_dir: Path  # fp32.onnx, int8-qoperator.onnx, int8-qdq.onnx
    description: str
    image_size: int
    seconds: dict[str, float]


def synthetic_chests(n_per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_class`` synthetic radiographs of each class, in class order; labels index :data:`CLASSES`."""
    from covid_cxr.synth import render_chest

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index, label in enumerate(CLASSES):
        for _ in range(n_per_class):
            images.append(render_chest(rng, size, label).image)
            labels.append(index)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


@torch.no_grad()
def _fit_stand_in(images: np.ndarray, labels: np.ndarray, size: int, seed: int) -> Checkpoint:
    """Concat network, BatchNorm statistics from ``images``, Dense layer fitted to ``labels``."""
    from covid_cxr.models import build_model

    torch.manual_seed(seed)
    pre = Preprocessing(image_size=size, scaling="symmetric")
    model = build_model("concat", num_classes=len(CLASSES), image_size=size).to(memory_format=torch.channels_last)
    x_all = to_model_input(torch.from_numpy(images), pre, channels_last=True)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:  # a cumulative average over all batches, not Keras' 0.99 momentum
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for start in range(0, len(x_all), 16):
        model.forward_features(x_all[start : start + 16])
    model.eval()
    feats = torch.cat(
        [model.head_conv(model.forward_features(x_all[s : s + 16])).permute(0, 2, 3, 1).flatten(1) for s in range(0, len(x_all), 16)]
    )
    classifier = model.classifier
    y = torch.from_numpy(labels)
    with torch.enable_grad():
        optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
        for _ in range(200):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(classifier(feats), y) + 1e-3 * classifier.weight.square().sum()
            loss.backward()
            optimizer.step()
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return Checkpoint("concat", tuple(CLASSES), pre, state, meta={"source": "benchmarks stand-in (synthetic fit)"})


def _run_eval_set(ckpt_path: Path, max_eval: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str] | None:
    """Test and calibration images of the training run that wrote ``ckpt_path``, when there is one."""
    run_json = ckpt_path.parent / "run.json"
    if not run_json.is_file():
        return None
    from covid_cxr.data.prepared import PreparedData

    run = json.loads(run_json.read_text())
    data = PreparedData(Path(run["data"]))
    splits = data.fold(int(run["fold"]))
    cache = data.cache(int(run["image_size"]))
    rng = np.random.default_rng(seed)
    test = splits.test.sample(n=min(max_eval, len(splits.test)), random_state=int(rng.integers(1 << 31)))
    train = splits.phases[0].sample(n=min(64, len(splits.phases[0])), random_state=seed)
    classes = list(load_checkpoint(ckpt_path).classes)
    images = np.asarray(cache.images[np.sort(cache.rows(test["image_id"]))])
    order = np.argsort(cache.rows(test["image_id"]))
    labels = np.asarray([classes.index(c) for c in test["label"].to_numpy()[order]], dtype=np.int64)
    calib = np.asarray(cache.images[np.sort(cache.rows(train["image_id"]))])
    where = f"{len(images)} test images of fold {run['fold']} of {run['data']}"
    return images, labels, calib, where


def make_reference(out_dir: Path, *, checkpoint: Path | None = None, image_size: int = 300, max_eval: int = 600,
                   seed: int = 0, int8_formats: tuple[str, ...] = ("qoperator", "qdq")) -> Reference:
    from covid_cxr.deploy.onnx import export_onnx
    from covid_cxr.deploy.quantize import quantize_onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    run_set = _run_eval_set(checkpoint, max_eval, seed) if checkpoint is not None else None
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        size = ckpt.preprocessing.image_size
        if run_set is None:
            images, labels = synthetic_chests(20, size, seed + 1)
            calib = synthetic_chests(16, size, seed)[0]
            where = f"{len(images)} synthetic chest images"
        else:
            images, labels, calib, where = run_set
        description = f"checkpoint {checkpoint} ({ckpt.network}, {size}px), evaluated on {where}"
        ckpt_path = checkpoint
    else:
        size = image_size
        calib, fit_labels = synthetic_chests(12, size, seed)
        ckpt = _fit_stand_in(calib, fit_labels, size, seed)
        # The stand-in does not generalise to new synthetic images (its Dense layer memorises 36 images in
        # 102400 dimensions and calls every new image one class), so the fixed set holds the fitted images,
        # on which its outputs vary, plus as many new ones.
        fresh, fresh_labels = synthetic_chests(12, size, seed + 1)
        images, labels = np.concatenate([calib, fresh]), np.concatenate([fit_labels, fresh_labels])
        ckpt_path = save_checkpoint(ckpt, out_dir / "reference.pt")
        description = (f"stand-in concat network at {size}px (fresh weights, BatchNorm statistics and Dense layer fitted "
                       f"on {len(calib)} synthetic chest images), evaluated on those {len(calib)} images plus "
                       f"{len(fresh)} new ones; not a trained diagnostic model")
    seconds["model"] = time.perf_counter() - t0
    eval_set = out_dir / "eval_set.npz"
    np.savez(eval_set, images=images, labels=labels)
    onnx_dir = out_dir / "onnx"
    t0 = time.perf_counter()
    export_onnx(ckpt, onnx_dir / "fp32.onnx", dynamic_batch=True)
    seconds["export"] = time.perf_counter() - t0
    for fmt in int8_formats:
        t0 = time.perf_counter()
        quantize_onnx(onnx_dir / "fp32.onnx", onnx_dir / f"int8-{fmt}.onnx", calib, quant_format=fmt)
        seconds[f"quantize_{fmt}"] = time.perf_counter() - t0
    return Reference(ckpt_path, eval_set, onnx_dir, description, size, seconds)
