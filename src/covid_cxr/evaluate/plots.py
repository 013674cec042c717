"""Evaluation plots: confusion matrices, one-vs-rest ROC curves, reliability diagrams.

Figures are built as :class:`matplotlib.figure.Figure` objects, never through ``pyplot``: no
global backend switch at import, no figure registry to leak, safe in a server or a notebook.
``savefig`` picks the file format's own renderer (Agg for PNG, the PDF backend for PDF).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from covid_cxr import fmt
from covid_cxr.atomic import atomic_path
from covid_cxr.evaluate.metrics import calibration_bins, roc_curve
from covid_cxr.labels import CLASSES, DISPLAY_NAMES

_COLOURS = {"covid": "#d62728", "pneumonia": "#1f77b4", "normal": "#2ca02c"}


def _names(classes: Sequence[str]) -> list[str]:
    return [DISPLAY_NAMES.get(c, c) for c in classes]


def confusion_figure(cm: np.ndarray, classes: Sequence[str] = CLASSES, title: str = "") -> Figure:
    """Two panels: raw counts, and counts divided by the true-class total (each row sums to 1)."""
    cm = np.asarray(cm, dtype=np.int64)
    support = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normed = np.where(support > 0, cm / np.maximum(support, 1), np.nan)
    fig = Figure(figsize=(10.5, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    names = _names(classes)
    for ax, data, panel in ((axes[0], cm, "counts"), (axes[1], normed, "row-normalised (recall on the diagonal)")):
        shown = np.log1p(cm) if panel == "counts" else np.nan_to_num(normed)  # log: 31 covid beside 6851 normal
        ax.imshow(shown, cmap="Blues", vmin=0)
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title("counts (colour on a log scale)" if panel == "counts" else panel)
        top = shown.max() if shown.size else 0
        for i in range(len(names)):
            for j in range(len(names)):
                text = f"{data[i, j]:d}" if panel == "counts" else fmt.percent(float(data[i, j]), fraction=True)
                dark = shown[i, j] > 0.6 * top
                ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black", fontsize=11)
    fig.suptitle(title or f"Confusion matrix (N = {int(cm.sum())})")
    return fig


@dataclass(frozen=True)
class RocMark:
    """A decision drawn on a class's ROC curve: its false- and true-positive rates (fractions)."""

    name: str
    fpr: float
    tpr: float
    label: str


def roc_figure(true_idx: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES,
               aucs: dict[str, tuple[float, float, float]] | None = None, title: str = "",
               marks: Sequence[RocMark] = ()) -> Figure:
    """One-vs-rest ROC curve per class; ``aucs`` maps a class to (auc, ci_low, ci_high) for the legend.

    ``marks`` puts the operating point(s) on the curve of their class, so a reader sees which
    trade-off the decisions in the tables were made at.
    """
    true_idx = np.asarray(true_idx)
    probs = np.asarray(probs, dtype=np.float64)
    fig = Figure(figsize=(5.8, 5.4), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    for k, name in enumerate(classes):
        positive = true_idx == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, k])
        label = f"{DISPLAY_NAMES.get(name, name)} (n={int(positive.sum())})"
        if aucs and name in aucs:
            auc, low, high = aucs[name]
            label += f": AUC {fmt.interval(auc, low, high, 3)}"
        ax.plot(fpr, tpr, color=_COLOURS.get(name), linewidth=1.8, label=label, drawstyle="default")
    for mark, marker in zip(marks, ("o", "s", "D", "^")):
        ax.plot([mark.fpr], [mark.tpr], marker=marker, markersize=9, markerfacecolor="none", markeredgewidth=2,
                linestyle="none", color=_COLOURS.get(mark.name, "black"), label=mark.label)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false-positive rate (1 - specificity)")
    ax.set_ylabel("true-positive rate (recall)")
    ax.set_title(title or "ROC, one class vs the rest")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def calibration_figure(true_idx: np.ndarray, probs: np.ndarray, n_bins: int = 15, title: str = "") -> Figure:
    """Reliability diagram of the top-class probability, with the images per bin underneath."""
    bins = calibration_bins(probs, true_idx, n_bins=n_bins)
    centres = (bins.edges[:-1] + bins.edges[1:]) / 2
    width = bins.edges[1] - bins.edges[0]
    filled = bins.count > 0
    fig = Figure(figsize=(5.8, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    top.bar(centres[filled], bins.accuracy[filled], width=width * 0.9, color="#1f77b4", alpha=0.75,
            edgecolor="#1f77b4", label="accuracy in bin")
    top.plot(bins.confidence[filled], bins.accuracy[filled], "o", color="#d62728", markersize=4,
             label="(mean confidence, accuracy)")
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy")
    top.set_title(title or f"Calibration: ECE {fmt.percent(bins.ece, 2)}")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(centres, bins.count, width=width * 0.9, color="0.5")
    if bins.count.max(initial=0) > 0:
        bottom.set_yscale("log")  # thousands of confident images beside a handful of doubtful ones
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        bottom.yaxis.set_minor_formatter(NullFormatter())
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("top-class probability (confidence)")
    bottom.set_ylabel("images")
    return fig


def save_figure(fig: Figure, *paths: str | Path, dpi: int = 120) -> list[Path]:
    """Write ``fig`` to each path (the suffix picks the format), atomically: an old plot stays whole until replaced."""
    out = []
    for path in paths:
        path = Path(path)
        with atomic_path(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp, dpi=dpi)
        out.append(path)
    return out


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of a figure, for embedding in the HTML report."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
