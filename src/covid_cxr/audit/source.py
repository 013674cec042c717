"""Source probe: can a classifier tell which collection an image came from?

Two probes, both trained on the fold's training pool (all phases and the validation set) to
predict ``source`` instead of the class, and tested on the fold's test set:

- without a checkpoint, a small CNN trained from scratch on the cached images (downscaled to
  :data:`PROBE_SIZE`): it asks "is the source visible in the pixels at all?";
- with a checkpoint, a logistic regression on the checkpoint's frozen, globally pooled features:
  "does the trained model's representation carry the source?".

Because classes and sources are confounded in this field's data (every COVID-19 image from one
collection), a probe can predict the source from the disease itself. So the finding that
matters is measured WITHIN a class that more than one source provides (e.g. pneumonia, from both
covid-chestxray and RSNA): there the disease cannot explain the source. Sources are weighted
equally in training (RSNA outnumbers covid-chestxray a hundredfold), and balanced accuracy and
AUC are reported beside plain accuracy, which a majority guess would make near-perfect.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from covid_cxr.audit import results as R
from covid_cxr.audit.data import SplitImages
from covid_cxr.errors import DataError

PROBE_SIZE = 64
"""Side the CNN probe sees images at: enough for markers, text and borders, and fast on a CPU."""

NEAR_PERFECT_AUC = 0.95
"""Within-class source AUC at or above this is flagged ("near-perfect")."""

MIN_LOWER_AUC = 0.80
"""...provided the lower end of its 95% interval is at least this (not a lucky small sample)."""

MIN_PER_SOURCE = 5
"""A class enters the within-class figures only with at least this many test images from each of two sources."""


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
    """Cached images of ``image_ids`` downscaled to the probe's size, a chunk at a time (never all at 300 px)."""
    from covid_cxr.audit.data import rows_of

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
    lr: float = 3e-3, seed: int = 0, device: torch.device | str = "cpu",
) -> SourceCNN:
    """Train :class:`SourceCNN` on uint8 images and integer source targets, sources weighted equally."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SourceCNN(num_sources).to(device)
    x = to_probe_input(images).to(device)
    y = torch.as_tensor(targets, dtype=torch.int64).to(device)
    weights = _class_weights(y, num_sources)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, -(-len(x) // batch_size))
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


# ----------------------------------------------------------------------------- metrics and flags


def source_metrics(
    probs: np.ndarray, sources: Sequence[str], source_names: Sequence[str], groups: Sequence[str] | None = None,
    *, n_boot: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """Accuracy (Wilson), balanced accuracy, and AUC (patient bootstrap) of source predictions."""
    from covid_cxr.audit.ablation import wilson
    from covid_cxr.evaluate.metrics import bootstrap_auc_ci, roc_auc

    index = {s: i for i, s in enumerate(source_names)}
    true = np.array([index[s] for s in sources], dtype=np.int64)
    pred = probs.argmax(axis=1)
    present = np.unique(true)
    recalls = [float((pred[true == k] == k).mean()) for k in present]
    groups_arr = None if groups is None else np.asarray(groups)
    # Two sources: AUC of the score of the second. More: mean one-vs-rest AUC (its interval: of the first pair).
    aucs, lows, highs = [], [], []
    for k in present if len(present) > 2 else present[1:]:
        positive = true == k
        aucs.append(roc_auc(positive, probs[:, k]))
        low, high = bootstrap_auc_ci(positive, probs[:, k], groups_arr, n_boot=n_boot, seed=seed)
        lows.append(low)
        highs.append(high)
    auc = {"value": float(np.mean(aucs)) if aucs else None, "low": float(np.mean(lows)) if lows else None,
           "high": float(np.mean(highs)) if highs else None, "n": int(len(true)),
           "method": "bootstrap by patient" if groups is not None else "bootstrap"}
    return {
        "n": int(len(true)),
        "counts": {source_names[k]: int((true == k).sum()) for k in present},
        "accuracy": wilson(int((pred == true).sum()), int(len(true))),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "auc": auc if len(present) > 1 else None,
    }


def source_flags(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """Near-perfect within-class source prediction, and classes that come from one source only."""
    flags = []
    for cls, w in (metrics.get("within_class") or {}).items():
        auc = w.get("auc") or {}
        if auc.get("value") is not None and auc["value"] >= NEAR_PERFECT_AUC and (auc.get("low") or 0) >= MIN_LOWER_AUC:
            flags.append(R.flag(
                "source-predictable",
                f"The source is predictable from the image: among {R.class_name(cls)} images alone the probe tells "
                f"{' from '.join(w['counts'])} with AUC {R.with_ci(auc, as_pct=False)} and accuracy "
                f"{R.with_ci(w['accuracy'])}. The disease cannot explain that; since the class labels are "
                "confounded with source, a classifier can score by recognising the source.",
            ))
    if not metrics.get("within_class"):
        overall = metrics["overall"].get("auc") or {}
        if overall.get("value") is not None and overall["value"] >= NEAR_PERFECT_AUC:
            flags.append(R.flag(
                "source-predictable-confounded",
                f"The source is predictable from the image (AUC {R.with_ci(overall, as_pct=False)}), and no class "
                "comes from two sources with enough test images to tell whether the disease or something else "
                "gives the source away.",
            ))
    return flags


def run_source_probe(
    train_images: np.ndarray, train_frame: Any, test_images: np.ndarray, test_frame: Any, *,
    mode: str = "cnn", predictor: Any = None, epochs: int = 8, seed: int = 0, n_boot: int = 1000,
    device: torch.device | str = "cpu", inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the probe on the training pool, test it, and return the ``source`` audit result.

    The frames need ``source``, ``label`` and ``patient_id`` columns in the images' row order.
    """
    if mode not in ("cnn", "linear-probe"):
        raise ValueError(f"mode must be 'cnn' or 'linear-probe'; got {mode!r}")
    names = sorted(set(train_frame["source"]) | set(test_frame["source"]))
    if len(set(train_frame["source"])) < 2:
        raise DataError(f"the training pool holds one source only ({names[0]}); a source probe needs two or more")
    index = {s: i for i, s in enumerate(names)}
    y_train = np.array([index[s] for s in train_frame["source"]], dtype=np.int64)
    if mode == "cnn":
        model = train_cnn_probe(train_images, y_train, len(names), epochs=epochs, seed=seed, device=device)
        probs = cnn_probe_proba(model, test_images)
    else:
        layer, mean, std = train_linear_probe(pooled_features(predictor, train_images), y_train, len(names), seed=seed)
        probs = linear_probe_proba(layer, mean, std, pooled_features(predictor, test_images))
    src = np.asarray(test_frame["source"]).astype(str)
    lab = np.asarray(test_frame["label"]).astype(str)
    pid = np.asarray(test_frame["patient_id"]).astype(str)
    metrics: dict[str, Any] = {
        "mode": mode, "sources": names, "n_train": int(len(y_train)), "n_test": int(len(src)),
        "overall": source_metrics(probs, src, names, pid, n_boot=n_boot, seed=seed),
        "within_class": {}, "confounded_classes": {},
    }
    all_labels = np.concatenate([lab, np.asarray(train_frame["label"]).astype(str)])
    all_sources = np.concatenate([src, np.asarray(train_frame["source"]).astype(str)])
    for cls in sorted(set(all_labels)):
        where = lab == cls
        counts = {s: int((src[where] == s).sum()) for s in names}
        if sum(c >= MIN_PER_SOURCE for c in counts.values()) >= 2:
            keep = where & np.isin(src, [s for s, c in counts.items() if c >= MIN_PER_SOURCE])
            metrics["within_class"][cls] = source_metrics(probs[keep], src[keep], names, pid[keep], n_boot=n_boot,
                                                          seed=seed)
        seen = set(all_sources[all_labels == cls])
        if len(seen) == 1:
            metrics["confounded_classes"][cls] = next(iter(seen))
    thresholds = {
        "near_perfect_auc": R.threshold(NEAR_PERFECT_AUC, "within-class source AUC at or above this is near-perfect: "
                                        "the probe separates the sources almost without error, by something "
                                        "other than the disease"),
        "min_lower_auc": R.threshold(MIN_LOWER_AUC, "and the interval's lower end must reach this, so a lucky "
                                     "handful of test images does not raise the flag"),
        "min_per_source": R.threshold(MIN_PER_SOURCE, "test images needed from each of two sources for a class "
                                      "to enter the within-class figures"),
    }
    notes = ["Plain accuracy is dominated by the largest source; read balanced accuracy and AUC."]
    if not metrics["within_class"]:
        notes.append("No class has enough test images from two sources: class and source cannot be told apart.")
    return R.make_result("source", inputs=inputs or {}, metrics=metrics, thresholds=thresholds,
                         flags=source_flags(metrics), notes=notes)


def audit_source(
    data: Path | None, *, fold: int | None = None, checkpoint: Path | None = None, epochs: int = 8, seed: int = 0,
    device: str = "auto", precision: str = "auto", out_dir: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """``covid-cxr audit source``: the probe on a prepared fold; writes ``source.json``.

    Without ``checkpoint`` the CNN probe runs on the cache as prepared and the result goes to
    ``DATA/audit/fold<K>/``; with one, the linear probe runs on its features and the result goes
    beside the checkpoint's other audits.
    """
    from covid_cxr.audit.data import open_prepared, resolve_target, rows_of, split_images, training_pool
    from covid_cxr.inference import TorchPredictor

    from covid_cxr.runtime import choose_runtime

    predictor, probe_device = None, choose_runtime(device, "fp32").device
    if checkpoint is not None:
        t = resolve_target(checkpoint, data, fold)
        prepared, fold_k, data_path = open_prepared(t.data), t.fold, t.data
        test = split_images(prepared, t)
        cache = prepared.cache(image_size=t.checkpoint.preprocessing.image_size)
        predictor = TorchPredictor(t.checkpoint, device=device, precision=precision)
        mode, default_out = "linear-probe", R.audit_dir_for(checkpoint)
    else:
        if data is None:
            raise DataError("which prepared data? give DATA (the folder 'covid-cxr prepare' wrote)")
        prepared, fold_k, data_path = open_prepared(data), fold or 1, Path(data)
        if not 1 <= fold_k <= prepared.num_folds:
            raise DataError(f"{data}: fold {fold_k} does not exist; the prepared data has folds 1..{prepared.num_folds}")
        cache = prepared.cache()
        test_frame = prepared.fold(fold_k).test.reset_index(drop=True)
        test = SplitImages(test_frame, probe_images(cache, test_frame["image_id"]))
        mode, default_out = "cnn", Path(data) / "audit" / f"fold{fold_k}"
    pool = training_pool(prepared, fold_k)
    if pool["source"].nunique() < 2:
        raise DataError(f"{data_path}: the training pool of fold {fold_k} holds one source only "
                        f"({pool['source'].iloc[0]}); a source probe needs images from two sources or more")
    pool_images = rows_of(cache, pool["image_id"]) if mode == "linear-probe" else probe_images(cache, pool["image_id"])
    inputs = {"data": str(Path(data_path).resolve()), "fold": fold_k,
              "checkpoint": str(checkpoint) if checkpoint is not None else None, "probe": mode, "seed": seed,
              "epochs": epochs if mode == "cnn" else None}
    result = run_source_probe(pool_images, pool, test.images, test.frame, mode=mode,
                              predictor=predictor, epochs=epochs, seed=seed, device=probe_device, inputs=inputs)
    return result, R.write_result(result, out_dir or default_out)
