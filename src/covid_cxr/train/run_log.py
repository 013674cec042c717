"""``log.csv`` (one row per epoch) and TensorBoard scalars of a training run.

Rows are appended and fsynced; on resume the log is cut back to the rows ``last.pt`` vouches for
(later ones were written after the last save and are replayed).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch

from covid_cxr.atomic import write_text
from covid_cxr.train.engine import EpochStats

LOG_COLUMNS = (
    "phase", "epoch", "global_epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "lr", "images_per_s", "seconds", "phase_images", "phase_ids_sha1",
)  # fmt: skip
SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "images_per_s")


def truncate_log(path: Path, rows: int) -> None:
    """Keep the header and the first ``rows`` epoch rows (later ones are from after the last save)."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    keep = lines[: 1 + rows] if lines else []
    write_text(path, "".join(keep) or (",".join(LOG_COLUMNS) + "\n"))


def append_log(path: Path, row: dict[str, Any]) -> None:
    """Append one epoch's row and make it durable."""
    with path.open("a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=LOG_COLUMNS).writerow(row)
        fh.flush()
        os.fsync(fh.fileno())


def log_row(phase_idx: int, epoch_idx: int, done: int, train: EpochStats, val: EpochStats,
            optimizer: torch.optim.Optimizer, phase_images: int, phase_ids_sha1: str) -> dict[str, Any]:  # fmt: skip
    """One epoch's row of log.csv (0-based phase and epoch in; 1-based out)."""
    return {
        "phase": phase_idx + 1, "epoch": epoch_idx + 1, "global_epoch": done,
        "train_loss": f"{train.loss:.6f}", "train_accuracy": f"{train.accuracy:.6f}",
        "val_loss": f"{val.loss:.6f}", "val_accuracy": f"{val.accuracy:.6f}",
        "lr": optimizer.param_groups[0]["lr"], "images_per_s": f"{train.images_per_s:.2f}",
        "seconds": f"{train.seconds + val.seconds:.2f}", "phase_images": phase_images,
        "phase_ids_sha1": phase_ids_sha1,
    }  # fmt: skip


def write_scalars(writer: Any, row: dict[str, Any], step: int) -> None:
    """A log row's figures to TensorBoard (``writer`` None: not the main process)."""
    if writer is None:
        return
    for key in SCALARS:
        writer.add_scalar(key.replace("_", "/", 1), float(row[key]), step)
    writer.flush()
