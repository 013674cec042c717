"""From X-ray files or uploads to decided classes: the pipeline ``predict`` and ``serve`` both run.

:class:`Classifier` is the one step both use: an image is decoded by its content (PNG, JPEG or DICOM)
and resized by the method the model records (``area`` for ours, ``bilinear`` for the authors' imported
Keras models), a batch of them runs through the predictor, and each image gets the class its model's
operating point decides (argmax when it has none).

:func:`predict_inputs` runs it over files: they are decoded in worker threads while the previous batch
runs through the network; every input gets a row, written as the run goes (a CSV is flushed after every
batch, so an interrupted or killed run keeps what was done): first the inputs that name no file to read
(a missing file, a pattern that matches nothing, a folder named like an image) with the reason, then
every file in input order, with its prediction or the reason it was refused (unreadable, truncated,
multi-frame). The web service (:mod:`covid_cxr.deploy.server`) runs the same
step over uploads that arrive together.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_cxr.data.images import load_image, resize_gray
from covid_cxr.data.names import display_path
from covid_cxr.errors import ImageDecodeError
from covid_cxr.gradcam import COMBINED, GradCam, save_overlay
from covid_cxr.inference.inputs import Inputs
from covid_cxr.inference.protocol import Predictor
from covid_cxr.inference.sink import PredictionSink
from covid_cxr.operating_point import OperatingPoint, of_predictor
from covid_cxr.preprocess import Preprocessing
from covid_cxr.progress import progress_bar

GRADCAM_BATCH = 4  # a backward pass keeps every activation: small batches bound its memory


@dataclass(frozen=True)
class Classified:
    """A batch's answer: probabilities (N, C) in the order of the model's classes, and the class index
    (N,) the operating point decided for each image."""

    probabilities: np.ndarray
    decided: np.ndarray

    def rows(self) -> list[tuple[np.ndarray, int]]:
        """(probabilities, decided class index) per image."""
        return [(p, int(k)) for p, k in zip(self.probabilities, self.decided)]


class Classifier:
    """A predictor and the decision rule its model carries: decode -> predict -> decide."""

    def __init__(self, predictor: Predictor, decision: OperatingPoint | None = None) -> None:
        self.predictor = predictor
        self.decision = of_predictor(predictor) if decision is None else decision  # argmax when it has none

    @property
    def classes(self) -> tuple[str, ...]:
        return self.predictor.classes

    @property
    def preprocessing(self) -> Preprocessing:
        return self.predictor.preprocessing

    def read(self, path: Path) -> np.ndarray:
        """A file decoded by its content and resized as the model records; :class:`ImageDecodeError` if refused."""
        return load_image(path, self.preprocessing.image_size, resize=self.preprocessing.resize)

    def fit(self, image: np.ndarray) -> np.ndarray:
        """An image decoded elsewhere (an upload, within the server's limits) resized as the model records."""
        return resize_gray(image, self.preprocessing.image_size, self.preprocessing.resize)

    def __call__(self, images: np.ndarray) -> Classified:
        """Probabilities and decided classes for a uint8 batch (N, S, S) at the model's size."""
        probs = self.predictor.predict_proba(images)
        return Classified(probs, self.decision.decide(probs, self.classes))


class Overlays:
    """Grad-CAM overlay PNGs for a ``predict`` run: ``<stem>.png`` per image (``<stem>-2.png``, ``-3`` ... when that
    name is taken in this run, also by a file whose own stem is ``<stem>-2``), and ``<stem>.<backbone>.png`` per
    backbone of a network with several."""

    def __init__(self, cam: GradCam, folder: Path, *, target: str | None = None, method: str | None = None) -> None:
        self.cam = cam.with_method(method) if method else cam
        if target:
            self.cam.class_index(target)  # refuse a bad class name before any work
        self.folder = folder
        self.target = target or None  # None: explain the class decided for each image
        self._taken: set[str] = set()

    def write(self, images: np.ndarray, paths: list[Path], decided: np.ndarray) -> None:
        """The overlays of a batch of model-sized images, ``GRADCAM_BATCH`` backward passes at a time."""
        targets: list[int | str] = [self.target or int(k) for k in decided]
        for start in range(0, len(images), GRADCAM_BATCH):
            chunk = slice(start, start + GRADCAM_BATCH)
            for path, image, result in zip(paths[chunk], images[chunk], self.cam(images[chunk], targets[chunk])):
                stem = self._free_stem(path.stem)
                save_overlay(self.folder / f"{stem}.png", image, result.map)
                if len(result.maps) > 1:
                    for layer, heat in result.maps.items():
                        if layer != COMBINED:
                            save_overlay(self.folder / f"{stem}.{layer}.png", image, heat)


    def _free_stem(self, stem: str) -> str:
        """``stem``, or ``stem-2``, ``stem-3`` ...: the first not yet written in this run."""
        name, k = stem, 1
        while name in self._taken:
            k += 1
            name = f"{stem}-{k}"
        self._taken.add(name)
        return name


def predict_inputs(
    classifier: Classifier,
    inputs: Inputs,
    out: Path | None,
    *,
    batch_size: int = 16,
    workers: int = 2,
    overlays: Overlays | None = None,
) -> PredictionSink:
    """A row per input to ``out`` (.csv or .json; None: stdout), refusals first, then the files in order.

    The summary (where the rows went, every refusal with its reason, the counts) goes to stderr also when
    the run is interrupted, after the output is closed with what was done.
    """
    width = max((len(display_path(f)) for f in inputs.files), default=4)
    sink = PredictionSink(out, classifier.classes, path_width=width)
    complete = False
    try:
        for path, reason in inputs.failures:
            sink.fail(path, reason)
        predict_files(classifier, inputs.files, sink, batch_size=batch_size, workers=workers, overlays=overlays)
        complete = True
    finally:
        sink.close(complete=complete)
        summarise(sink, out, complete, notes=inputs.notes)
    return sink


def summarise(sink: PredictionSink, out: Path | None, complete: bool, *, notes: Sequence[str] = ()) -> None:
    """The stderr epilogue: what the folders held that was passed over, where the rows went, every refused
    input with its reason, the counts."""
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if out is not None:
        print(f"wrote {sink.predicted} predictions and {len(sink.failed)} refusals to {display_path(out)}",
              file=sys.stderr)
    for path, reason in sink.failed:
        print(f"failed: {path}: {reason}", file=sys.stderr)
    summary = ", ".join(f"{c} {sink.counts.get(c, 0)}" for c in sink.classes)
    state = "" if complete else "interrupted: "
    print(f"{state}predicted {sink.predicted} images ({summary}); {len(sink.failed)} failed", file=sys.stderr)


def predict_files(
    classifier: Classifier,
    files: list[Path],
    sink: PredictionSink,
    *,
    batch_size: int = 16,
    workers: int = 2,
    overlays: Overlays | None = None,
) -> None:
    """Decode and classify ``files`` a batch at a time, each row to ``sink`` as its batch is done."""
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch size and workers must be >= 1; got {batch_size} and {workers}")
    batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    pool = ThreadPoolExecutor(workers)

    def decode(batch: list[Path]) -> list[Future[np.ndarray]]:
        return [pool.submit(classifier.read, f) for f in batch]

    try:
        with progress_bar("predict", len(files), enabled=len(batches) >= 2 and sys.stderr.isatty(), transient=True,
                          rate_unit="img") as advance:
            upcoming = decode(batches[0]) if batches else []
            for k, batch in enumerate(batches):
                current, upcoming = upcoming, decode(batches[k + 1]) if k + 1 < len(batches) else []
                _predict_batch(classifier, batch, [_decoded(future) for future in current], sink, overlays)
                advance(len(batch))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _predict_batch(classifier: Classifier, paths: list[Path], decoded: list[np.ndarray | str], sink: PredictionSink,
                   overlays: Overlays | None) -> None:
    """One batch's rows in input order (refusals where they fell), its overlays, then a flush."""
    good = [(path, image) for path, image in zip(paths, decoded) if isinstance(image, np.ndarray)]
    stack = np.stack([image for _, image in good]) if good else None
    answer = classifier(stack) if stack is not None else None
    found = iter(answer.rows() if answer is not None else [])
    for path, image in zip(paths, decoded):
        if isinstance(image, str):
            sink.fail(display_path(path), image)
        else:
            sink.add(display_path(path), *next(found))
    if stack is not None and answer is not None and overlays is not None:
        overlays.write(stack, [path for path, _ in good], answer.decided)
    sink.flush()


def _decoded(future: Future[np.ndarray]) -> np.ndarray | str:
    """The decoded image, or the reason its file is refused."""
    try:
        return future.result()
    except ImageDecodeError as exc:
        return exc.reason
    except Exception as exc:  # an unforeseen failure of one file is that file's row, not the end of the run
        return f"unexpected error while decoding ({type(exc).__name__}: {exc})"
