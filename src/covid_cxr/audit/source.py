"""Source probe: can a classifier tell which collection an image came from?

Probes are trained to predict ``source`` instead of the class:

- without a checkpoint, "is the source visible in the pixels at all?": image statistics with a
  logistic regression, and a small CNN trained from scratch on the cached images (downscaled to
  :data:`PROBE_SIZE`), each cross-fitted by patient over all the fold's images so that every
  image gets an out-of-sample score (:mod:`covid_cxr.audit.probes`); their mean is the probe;
- with a checkpoint, "does the trained model's representation carry the source?": a logistic
  regression on the checkpoint's frozen, globally pooled features, trained on the fold's
  training pool and tested on its test set. The checkpoint is fed its images resized by its own
  method (``Preprocessing.resize``), as ``predict`` would feed it; the probes without one read the
  prepared (``area``) cache, since they model no network's input.

Because classes and sources are confounded in this field's data (every COVID-19 image from one
collection), a probe can predict the source from the disease itself. So the finding that
matters is measured WITHIN a class that more than one source provides (e.g. pneumonia, from both
covid-chestxray and RSNA): there the disease cannot explain the source. Sources are weighted
equally in training (RSNA outnumbers covid-chestxray a hundredfold), and balanced accuracy and
AUC are reported beside plain accuracy, which a majority guess would make near-perfect. A class
that ONE source provides is the strongest confound of all, and is said so first
(:mod:`covid_cxr.audit.source_findings`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from covid_cxr.audit import source_findings as findings
from covid_cxr.audit.data import patient_groups, resolve_target, rows_of, split_images
from covid_cxr.audit.probes import (
    MIN_CNN_STEPS,
    PROBES,
    STATS_SIZE,
    cap_cells,
    crossfit,
    crossfit_parts,
    image_statistics,
    stats_probe,
)
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.splits import GROUP
from covid_cxr.errors import DataError
from covid_cxr.inference.torch_model import TorchPredictor
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.runs.resolve import cache_for, training_pool
from covid_cxr.runs.results import audit_dir_for, make_result, write_result
from covid_cxr.runtime import choose_runtime

PROBE_SIZE = 64
"""Side the CNN probe sees images at: enough for markers, text and borders, and fast on a CPU."""


class SourceCNN(nn.Module):
    """Four strided conv blocks and a linear layer: small enough to train in seconds, big enough for markers."""

    def __init__(self, num_sources: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels * 2, num_sources)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        # Max as well as mean pooling: a small marker is one bright spot, which averaging would dilute.
        return self.fc(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1))


def to_probe_input(images: np.ndarray, size: int = PROBE_SIZE) -> torch.Tensor:
    """uint8 (N, S, S) -> float (N, 1, size, size) in [0, 1], area-downscaled."""
    x = torch.as_tensor(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x


def probe_images(cache: Any, image_ids: Sequence[str], size: int = PROBE_SIZE, chunk: int = 1024) -> np.ndarray:
    """Cached images of ``image_ids`` downscaled to the probe's size, a chunk at a time (never all at 300 px).

    Always by ``area``: these are the probes' own inputs, made to the probes' measure, not a checkpoint's.
    """
    ids = list(image_ids)
    out = np.empty((len(ids), size, size), np.uint8)
    for start in range(0, len(ids), chunk):
        batch = rows_of(cache, ids[start : start + chunk])
        if batch.shape[-1] != size:
            batch = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in batch])
        out[start : start + len(batch)] = batch
    return out


def _class_weights(targets: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(targets, minlength=n).float().clamp_min(1.0)
    return counts.sum() / (n * counts)


def train_cnn_probe(
    images: np.ndarray, targets: np.ndarray, num_sources: int, *, epochs: int = 8, batch_size: int = 64,
    lr: float = 3e-3, seed: int = 0, device: torch.device | str = "cpu", min_steps: int = 0,
) -> SourceCNN:
    """Train :class:`SourceCNN` on uint8 images and integer source targets, sources weighted equally.

    ``min_steps`` raises the epoch count on small sets: a few dozen steps leave a CNN near chance.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SourceCNN(num_sources).to(device)
    x = to_probe_input(images).to(device)
    y = torch.as_tensor(targets, dtype=torch.int64).to(device)
    weights = _class_weights(y, num_sources)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    per_epoch = max(1, -(-len(x) // batch_size))
    epochs = max(epochs, -(-min_steps // per_epoch))
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size].to(device)
            if len(idx) < 2:
                continue
            batch = x[idx]
            flip = (torch.rand(len(idx), generator=gen) < 0.5).to(device)  # left/right flips: sources are not sided
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            loss = F.cross_entropy(model(batch), y[idx], weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.inference_mode()
def cnn_probe_proba(model: SourceCNN, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    device = next(model.parameters()).device
    out = [torch.softmax(model(to_probe_input(images[i : i + batch_size]).to(device)), dim=1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def cnn_probe(images: np.ndarray, num_sources: int, *, epochs: int, min_steps: int, seed: int, device: torch.device | str,
              ) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """A fit-and-score function of the small CNN, trained for ``epochs`` but at least ``min_steps`` steps."""
    def fit_score(train: np.ndarray, targets: np.ndarray, test: np.ndarray) -> np.ndarray:
        model = train_cnn_probe(images[train], targets, num_sources, epochs=epochs, min_steps=min_steps, seed=seed,
                                device=device)
        return cnn_probe_proba(model, images[test])

    return fit_score


def train_linear_probe(
    features: np.ndarray, targets: np.ndarray, num_sources: int, *, weight_decay: float = 1e-3, steps: int = 300,
    seed: int = 0,
) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """Logistic regression (L2, sources weighted equally) on standardised features; returns it and the scaling."""
    torch.manual_seed(seed)
    x = torch.as_tensor(features, dtype=torch.float32)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = torch.as_tensor(targets, dtype=torch.int64)
    weights = _class_weights(y, num_sources)
    layer = nn.Linear(x.shape[1], num_sources)
    opt = torch.optim.LBFGS(layer.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(layer(x), y, weight=weights) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return layer, mean, std


@torch.inference_mode()
def linear_probe_proba(layer: nn.Linear, mean: torch.Tensor, std: torch.Tensor, features: np.ndarray) -> np.ndarray:
    x = (torch.as_tensor(features, dtype=torch.float32) - mean) / std
    return torch.softmax(layer(x), dim=1).numpy()


@torch.inference_mode()
def pooled_features(predictor: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Globally average-pooled ``forward_features`` of a TorchPredictor's frozen model, float32 (N, C)."""
    out = []
    for start in range(0, len(images), batch_size):
        x = predictor.inputs(np.ascontiguousarray(images[start : start + batch_size]))
        with predictor.runtime.autocast():
            out.append(predictor.model.forward_features(x).float().mean(dim=(2, 3)).cpu())
    return torch.cat(out).numpy()


def _source_targets(frame: Any, names: Sequence[str]) -> np.ndarray:
    index = {s: i for i, s in enumerate(names)}
    return np.array([index[s] for s in frame["source"]], dtype=np.int64)


def run_crossfit_probes(
    images: np.ndarray, frame: Any, *, probes: Sequence[str] = PROBES, epochs: int = 8,
    min_steps: int = MIN_CNN_STEPS, seed: int = 0, n_boot: int = 1000, device: torch.device | str = "cpu",
    inputs: dict[str, Any] | None = None, all_frame: Any = None,
) -> dict[str, Any]:
    """Cross-fitted source probes on ``images`` (rows of ``frame``: source, label, patient_id); the result.

    ``all_frame`` (default ``frame``) is every image of the data, for the class/source confound.
    """
    unknown = sorted(set(probes) - set(PROBES))
    if unknown or not probes:
        raise ValueError(f"probes must be some of {', '.join(PROBES)}; got {', '.join(probes) or 'none'}")
    frame = frame.reset_index(drop=True)
    names = sorted(set(frame["source"]))
    if len(names) < 2:
        raise DataError(f"the data holds one source only ({names[0]}); a source probe needs two or more")
    y = _source_targets(frame, names)
    parts = crossfit_parts(frame, seed=seed)
    by_probe, scored = {}, []
    for probe in probes:
        fit = (stats_probe(image_statistics(images), seed) if probe == "stats" else
               cnn_probe(images, len(names), epochs=epochs, min_steps=min_steps, seed=seed, device=device))
        probs = crossfit(fit, y, parts, len(names))
        by_probe[probe] = findings.probe_metrics(probs, frame, names, n_boot=n_boot, seed=seed)
        scored.append(probs)
    every = frame if all_frame is None else all_frame
    metrics: dict[str, Any] = {
        "mode": "crossfit", "probes": list(probes), "sources": names, "n_images": int(len(every)),
        "n_scored": int(len(frame)), "cv_folds": len(parts),
        **findings.probe_metrics(np.mean(scored, axis=0), frame, names, n_boot=n_boot, seed=seed),
        "by_probe": by_probe, "confounded_classes": findings.confounded_classes(every),
    }
    return make_result("source", inputs=inputs or {}, metrics=metrics, thresholds=findings.thresholds(),
                         flags=findings.source_flags(metrics, every), notes=findings.notes_for(metrics))


def run_linear_probe(
    predictor: Any, train_images: np.ndarray, train_frame: Any, test_images: np.ndarray, test_frame: Any, *,
    seed: int = 0, n_boot: int = 1000, inputs: dict[str, Any] | None = None, all_frame: Any = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """A logistic regression on the checkpoint's frozen features, trained on the pool and tested on test."""
    names = sorted(set(train_frame["source"]) | set(test_frame["source"]))
    if len(set(train_frame["source"])) < 2:
        raise DataError(f"the training pool holds one source only ({names[0]}); a source probe needs two or more")
    y_train = _source_targets(train_frame, names)
    train_x = pooled_features(predictor, train_images, batch_size)
    layer, mean, std = train_linear_probe(train_x, y_train, len(names), seed=seed)
    probs = linear_probe_proba(layer, mean, std, pooled_features(predictor, test_images, batch_size))
    every = all_frame if all_frame is not None else pd.concat([train_frame, test_frame], ignore_index=True)
    metrics: dict[str, Any] = {
        "mode": "linear-probe", "sources": names, "n_train": int(len(y_train)), "n_test": int(len(test_frame)),
        **findings.probe_metrics(probs, test_frame.reset_index(drop=True), names, n_boot=n_boot, seed=seed),
        "confounded_classes": findings.confounded_classes(every),
    }
    return make_result("source", inputs=inputs or {}, metrics=metrics, thresholds=findings.thresholds(),
                         flags=findings.source_flags(metrics, every), notes=findings.notes_for(metrics))


def fold_images(prepared: PreparedData, fold: int) -> pd.DataFrame:
    """Every image of ``fold`` (training pool and test), with the splitter's groups: patients merged where they
    share a byte-identical file (by the sha256 the prepared cache recorded), kept whole by the probes' parts."""
    pool = training_pool(prepared, fold)  # checks the fold
    every = pd.concat([pool, prepared.fold(fold).test], ignore_index=True).drop_duplicates("image_id")
    every = every.reset_index(drop=True)
    if every["source"].nunique() < 2:
        raise DataError(f"{prepared.root}: fold {fold} holds one source only ({every['source'].iloc[0]}); a source "
                        "probe needs images from two sources or more")
    return every.assign(**{GROUP: patient_groups(every, prepared.root)})


def audit_source(
    data: Path | None, settings: InferenceSettings = InferenceSettings(), *, fold: int | None = None,
    checkpoint: Path | None = None, epochs: int = 8, seed: int = 0, probes: Sequence[str] = PROBES,
    min_steps: int = MIN_CNN_STEPS, out_dir: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """``covid-cxr audit source``: the probes on a prepared fold; writes ``source.json``.

    Without ``checkpoint`` the cross-fitted probes run on every image of the fold (sampled down
    to :data:`~covid_cxr.audit.probes.MAX_PER_CELL` per source and class) and the result goes to
    ``DATA/audit/fold<K>/``; with one, the linear probe runs on its features and the result goes
    beside the checkpoint's other audits.
    """
    if checkpoint is None:
        if data is None:
            raise DataError("which prepared data? give DATA (the folder 'covid-cxr prepare' wrote)")
        prepared, fold_k = PreparedData(data), 1 if fold is None else fold
        every = fold_images(prepared, fold_k)
        scored = every.iloc[cap_cells(every, seed=seed)].reset_index(drop=True)
        # Not a model's input: the probes read image statistics of the prepared cache, as prepared.
        cache = prepared.cache()
        images = probe_images(cache, scored["image_id"], size=STATS_SIZE)
        inputs = {"data": str(Path(data).resolve()), "fold": fold_k, "checkpoint": None, "probe": "crossfit",
                  "probes": list(probes), "seed": seed, "epochs": epochs, "min_steps": min_steps,
                  "resize": cache.resize}
        result = run_crossfit_probes(images, scored, probes=probes, epochs=epochs, min_steps=min_steps, seed=seed,
                                     device=choose_runtime(settings.device, "fp32").device, inputs=inputs,
                                     all_frame=every)
        return result, write_result(result, out_dir or Path(data) / "audit" / f"fold{fold_k}")
    t = resolve_target(checkpoint, data, fold)
    prepared = PreparedData(t.data)
    test = split_images(prepared, t)
    pre = t.checkpoint.preprocessing
    cache = cache_for(prepared, pre.image_size, t.checkpoint_path, pre.resize)  # the model's input, as test's
    pool = training_pool(prepared, t.fold)
    if pool["source"].nunique() < 2:
        raise DataError(f"{t.data}: the training pool of fold {t.fold} holds one source only "
                        f"({pool['source'].iloc[0]}); a source probe needs images from two sources or more")
    predictor = TorchPredictor(t.checkpoint, device=settings.device, precision=settings.precision)
    inputs = {**t.inputs(), "data": str(Path(t.data).resolve()), "checkpoint": str(checkpoint), "probe": "linear-probe", "seed": seed, "epochs": None, "image_size": pre.image_size,
              "resize": pre.resize}
    tested = test.frame.assign(**{GROUP: patient_groups(test.frame, prepared.root)})
    result = run_linear_probe(predictor, rows_of(cache, pool["image_id"]), pool, test.images, tested, seed=seed,
                              inputs=inputs, batch_size=settings.batch_size)
    return result, write_result(result, out_dir or audit_dir_for(checkpoint))
