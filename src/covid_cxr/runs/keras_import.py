"""Whole Keras models (and Keras backbone weights) -> our checkpoint format.

The weight mapping is the networks' own (:mod:`covid_cxr.models.keras_import`); this module adds
what a checkpoint records: classes, preprocessing and where the weights came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from covid_cxr.models.keras_import import load_keras_model
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.checkpoint import Checkpoint


def import_keras(
    path: str | Path | Sequence[str | Path],
    network: str | None = None,
    *,
    classes: Sequence[str] | None = None,
    image_size: int | None = None,
    scaling: str = "unit",
    resize: str | None = None,
) -> Checkpoint:
    """Convert Keras file(s) to our :class:`~covid_cxr.runs.checkpoint.Checkpoint`.

    ``path``, ``network``, ``classes`` and ``image_size`` are read as
    :func:`~covid_cxr.models.keras_import.load_keras_model` reads them.

    ``resize`` defaults to ``bilinear`` for a whole model: the authors evaluated theirs (Tables 3-4)
    on ``cv2.resize(cv2.imread(path), (300, 300))``, so their model meets their figures only on
    images shrunk the same way. Backbone weights, which our training goes on from, default to ``area``.
    """
    k = load_keras_model(path, network, classes=classes, image_size=image_size)
    meta = {
        "source": {
            "kind": "keras-import",
            "files": [str(p.resolve()) for p in k.paths],
            "formats": list(k.formats),
            "head": "imported" if k.whole else "initialised (the file has no head)",
            "architecture": k.architecture,
        }
    }
    pre = Preprocessing(image_size=k.image_size, scaling=scaling, resize=resize or ("bilinear" if k.whole else "area"))
    return Checkpoint(k.network, k.classes, pre, k.model.state_dict(), meta)
