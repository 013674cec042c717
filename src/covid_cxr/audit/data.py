"""What every audit reads: a checkpoint (or a run folder) and the images of a fold's split.

Resolution of run folder / checkpoint / data / fold and the split and cache checks are the run
folder's (:mod:`covid_cxr.runs.resolve`), as evaluation's are, so an audit and ``covid-cxr evaluate``
can never disagree about which images a model is tested on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_cxr.audit.lungs import LungFields, estimate_lung_fields, load_user_masks
from covid_cxr.data.prepared import ImageCache, PreparedData
from covid_cxr.data.splits import merge_identical
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.inference.torch_model import TorchPredictor
from covid_cxr.operating_point import OperatingPoint, decision_precision
from covid_cxr.runs import resolve
from covid_cxr.runs.checkpoint import Checkpoint, load_checkpoint_sha256
from covid_cxr.runs.folder import RunInfo
from covid_cxr.runs.own_images import prepared_digests


@dataclass(frozen=True)
class AuditTarget:
    """The audited checkpoint (loaded), its file, and the prepared data and fold it was trained on."""

    checkpoint: Checkpoint
    checkpoint_path: Path
    data: Path
    fold: int
    run: RunInfo
    sha256: str = ""  # of the very bytes the weights were read from (a best.pt replaced meanwhile cannot mislead)

    def inputs(self) -> dict[str, Any]:
        """What every audit result records of the model it audited and the data: the file, its sha256, the data
        and fold."""
        return {"checkpoint": str(self.checkpoint_path), "model_sha256": self.sha256, "data": str(self.data),
                "fold": self.fold}

    def predictor(self, settings: InferenceSettings) -> TorchPredictor:
        """The model as an audit that decides by its rule runs it: in fp32 under ``--precision auto`` when the
        rule is a threshold (:func:`~covid_cxr.operating_point.decision_precision`), as ``evaluate`` does, so
        that the audit's "as is" figures are ``evaluate``'s."""
        rule = OperatingPoint.from_dict(self.checkpoint.operating_point).name
        return TorchPredictor(self.checkpoint, device=settings.device,
                              precision=decision_precision(settings.precision, rule))


@dataclass(frozen=True)
class SplitImages:
    """One split's table and its cached uint8 images (N, S, S), in the same row order."""

    frame: pd.DataFrame
    images: np.ndarray


def resolve_target(target: Path, data: Path | None, fold: int | None) -> AuditTarget:
    """Checkpoint, prepared data and fold of a run folder or a ``.pt`` (run.json fills what is not given)."""
    t = resolve.resolve_target(Path(target), data, fold, "test", None)
    checkpoint, sha256 = load_checkpoint_sha256(t.checkpoint)
    return AuditTarget(checkpoint, t.checkpoint, t.data, t.fold, t.run, sha256)


def split_images(prepared: PreparedData, target: AuditTarget, split: str = "test") -> SplitImages:
    """The fold's ``split`` table and its images at the checkpoint's input size, after every check.

    The images are resized by the checkpoint's own method (:func:`covid_cxr.runs.resolve.open_split`):
    an audit measures the model on what ``predict`` would feed it, never on images it does not see in use.
    """
    opened = resolve.open_split(prepared, target.fold, split, target.run, target.checkpoint, target.checkpoint_path)
    return SplitImages(frame=opened.frame, images=rows_of(opened.cache, opened.frame["image_id"]))


def load_test_images_and_lungs(
    target: Path, data: Path | None, fold: int | None, masks: Path | None
) -> tuple[AuditTarget, SplitImages, LungFields]:
    """The audited checkpoint, its fold's test images, and their lung fields (the user's masks or the estimate).

    Both kinds of field line up with the images whatever the checkpoint's resize method: the estimate
    is made on the resized images themselves, and a user's mask, like its image, is stretched from
    the whole original frame to the whole square (by nearest neighbour, so that it stays a mask).
    """
    t = resolve_target(target, data, fold)
    test = split_images(PreparedData(t.data), t)
    size = t.checkpoint.preprocessing.image_size
    image_ids = [str(i) for i in test.frame["image_id"]]
    lungs = load_user_masks(masks, image_ids, size) if masks is not None else estimate_lung_fields(test.images)
    return t, test, lungs


def rows_of(cache: ImageCache, image_ids: pd.Series | list[str]) -> np.ndarray:
    """Copy the cached images of ``image_ids`` into memory, in that order."""
    rows = np.asarray(cache.rows(list(image_ids)), dtype=np.int64)
    return np.ascontiguousarray(cache.images[np.sort(rows)][np.argsort(np.argsort(rows))])


def patient_groups(frame: pd.DataFrame, data: Path) -> pd.Series:
    """Each image's patient (``source:patient_id``), patients that share a byte-identical file merged (by the
    sha256 the prepared cache of ``data`` recorded), as the splitter groups them: what a bootstrap draws whole."""
    return merge_identical(frame, prepared_digests(Path(data)))
