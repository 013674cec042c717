"""Grad-CAM statistics: how much of the heatmap lies inside the lung fields, per true class.

For every test image, the Grad-CAM map of the class the model predicts (from
:mod:`covid_cxr.gradcam`) is compared with the image's lung fields: the share of the map's mass
inside them, beside the share of the image they cover, which is what a uniform map would give.
A ratio at or below 1 means the model's evidence is no more on the lungs than anywhere else; a class
is flagged only when the upper end of its share's 95% interval is at or below the lung area, so a
handful of maps that fall below it by chance raise nothing.
A high ratio is NOT proof that the model reads the disease: Grad-CAM maps are coarse (a 10x10
map at 300 px) and show where one layer's gradient is large, not what the decision rests on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from covid_cxr import fmt
from covid_cxr.audit import results as R
from covid_cxr.audit.data import load_test_images_and_lungs
from covid_cxr.audit.lungs import LungFields
from covid_cxr.gradcam import GradCam
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.operating_point import OperatingPoint, audit_note
from covid_cxr.runs.results import audit_dir_for, make_result, write_result
from covid_cxr.runtime import choose_runtime

MIN_RATIO = 1.0
"""Flag a class when the upper end of the 95% interval of its mean mass share in the lungs is at most this multiple
of the lung area."""

MIN_MAPS = 5
"""...provided at least this many of its images have a non-empty map (an all-zero map says nothing)."""


def mass_in_lungs(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image, the share of the map's mass inside the mask (NaN for an all-zero map)."""
    total = cams.reshape(len(cams), -1).sum(axis=1)
    inside = (cams * masks).reshape(len(cams), -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def mean_interval(values: np.ndarray) -> dict[str, Any]:
    """Mean with a Student-t 95% interval (clipped to [0, 1]): shares of many images are near normal, and with
    a few maps the t quantile (2.78 for 5) keeps the interval honest where 1.96 would make it too narrow."""
    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return {"value": None, "low": None, "high": None, "n": 0, "method": "t"}
    mean = float(values.mean())
    half = float(student_t.ppf(0.975, n - 1)) * float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    low, high = (max(0.0, mean - half), min(1.0, mean + half)) if n > 1 else (None, None)
    return {"value": mean, "low": low, "high": high, "n": n, "method": "t"}


def compute_cams(model: Any, preprocessing: Any, classes: Sequence[str], images: np.ndarray,
                 batch_size: int = 16, op: OperatingPoint | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (N, S, S) of the class decided by ``op`` (the model's rule; None: the predicted class), and
    the decided class indices."""
    cam = GradCam(model, preprocessing, classes)
    maps = np.empty(images.shape, dtype=np.float32)
    preds = np.empty(len(images), dtype=np.int64)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        results = cam(batch)
        if op is not None and op.rule != "argmax":  # a threshold rule may decide another class: map that one
            decided = op.decide(np.stack([r.probabilities for r in results]), classes)
            if any(int(k) != r.target for k, r in zip(decided, results)):
                results = cam(batch, [int(k) for k in decided])
        for i, res in enumerate(results):
            maps[start + i] = res.map
            preds[start + i] = res.target
    return maps, preds


def run_cam_stats(
    cams: np.ndarray, labels: Sequence[str], lungs: LungFields, classes: Sequence[str], *,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per true class: mean share of CAM mass in the lungs (with interval), lung area, and their ratio."""
    labels_arr = np.asarray(labels).astype(str)
    shares = mass_in_lungs(cams, lungs.masks)
    areas = lungs.masks.reshape(len(lungs.masks), -1).mean(axis=1)
    per_class: dict[str, Any] = {}
    flags = []
    for cls in classes:
        where = labels_arr == cls
        if not where.any():
            continue
        iv = mean_interval(shares[where])
        area = float(areas[where].mean())
        ratio = iv["value"] / area if iv["value"] is not None and area > 0 else None
        per_class[cls] = {"n": int(where.sum()), "mass_in_lungs": iv, "lung_area": area, "ratio": ratio,
                          "empty_maps": int(np.isnan(shares[where]).sum())}
        if iv["high"] is not None and area > 0 and iv["high"] <= MIN_RATIO * area and iv["n"] >= MIN_MAPS:
            flags.append(R.flag(
                "cam-outside-lungs",
                f"For {R.class_name(cls)} images the Grad-CAM heatmap is no more on the lungs than chance: "
                f"{fmt.record(iv)} of its mass lies in lung fields that cover {fmt.percent(area, fraction=True)} of "
                "the image.",
            ))
    metrics = {"target": "predicted", "per_class": per_class, "mask_source": lungs.method,
               "mask_description": lungs.description}
    thresholds = {"min_ratio": R.threshold(MIN_RATIO, "mass share in the lungs whose 95% interval lies at or below "
                                           "the lungs' share of the image means the map favours the lungs no more "
                                           "than a uniform map"),
                  "min_maps": R.threshold(MIN_MAPS, "non-empty maps a class needs before it can be flagged")}
    notes = ["A heatmap that sits on the lungs is not proof that the model reads the disease."]
    return make_result("cam", inputs=inputs or {}, metrics=metrics, thresholds=thresholds, flags=flags, notes=notes)


def audit_cam(
    target: Path, settings: InferenceSettings = InferenceSettings(batch_size=16), *, data: Path | None = None,
    fold: int | None = None, masks: Path | None = None, out_dir: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """``covid-cxr audit cam``: Grad-CAM over the fold's test set; writes ``cam.json``.

    Grad-CAM runs in fp32 whatever ``settings.precision`` says (autocast would blur the gradients it maps).
    """
    t, test, lungs = load_test_images_and_lungs(target, data, fold, masks)
    runtime = choose_runtime(settings.device, "fp32", False)  # Grad-CAM runs in fp32 whatever the hardware
    model = t.checkpoint.build_model().to(runtime.device)
    pre = t.checkpoint.preprocessing
    op = OperatingPoint.from_dict(t.checkpoint.operating_point)
    cams, _ = compute_cams(model, pre, t.checkpoint.classes, test.images, settings.batch_size, op)
    inputs = {**t.inputs(), "split": "test",
              "image_size": pre.image_size, "resize": pre.resize, "masks": str(masks) if masks is not None else None,
              "runtime": runtime.describe()}
    result = run_cam_stats(cams, [str(v) for v in test.frame["label"]], lungs, t.checkpoint.classes, inputs=inputs)
    result["metrics"]["operating_point"] = op.to_dict()
    result["notes"] = [*result.get("notes", []), *audit_note(op)]
    return result, write_result(result, out_dir or audit_dir_for(target))
