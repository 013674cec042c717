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

import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_cxr.atomic import temporary_name_room
from covid_cxr.data.images import load_image, resize_gray
from covid_cxr.data.names import display_path, name_bytes
from covid_cxr.data.sources.folder import IMAGE_SUFFIXES
from covid_cxr import fmt
from covid_cxr.errors import ConfigError, ImageDecodeError
from covid_cxr.gradcam import GradCam, is_overlay, save_overlay
from covid_cxr.inference.inputs import Inputs
from covid_cxr.inference.protocol import Predictor, finite
from covid_cxr.inference.sink import PredictionSink, check_writable_folder, kind_of
from covid_cxr.labels import DISPLAY_NAMES
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
        probs = finite(self.predictor.predict_proba(images))
        return Classified(probs, self.decision.decide(probs, self.classes))

    def decided_by(self) -> dict[str, object]:
        """What decides the class, for a response or a page: the rule, its threshold on which class, and a line
        saying it (with a threshold rule the class need not be the most probable one)."""
        op = self.decision
        return {"rule": op.name, "threshold": op.threshold,
                "positive_class": None if op.rule == "argmax" else op.positive_class, "text": decision_line(op)}


def decision_line(op: OperatingPoint) -> str:
    """``decided by sensitivity=0.95: COVID-19 when p(COVID-19) >= 0.2, otherwise ...``: what the page and
    ``serve`` show under a prediction."""
    if op.rule == "argmax":
        return "decided by argmax: the class with the highest probability"
    name = DISPLAY_NAMES.get(op.positive_class, op.positive_class)
    return (f"decided by {op.name}: {name} when p({name}) >= {fmt.exact(op.threshold)}, otherwise the more probable "
            "of the other classes")


class Overlays:
    """Grad-CAM overlay PNGs for a ``predict`` run: ``<stem>.png`` per image and, for a network with several
    backbones, ``<stem>.<backbone>.png`` per backbone; the stem is the file's name less an image suffix (``.png``,
    ``.dcm`` ...: a DICOM named by its UID keeps every component).

    A name is used only when it is free: not taken in this run (by a file of the same stem in another folder, or
    by another file's backbone map: ``x.xception.png`` is both the map of ``x.png`` and the overlay of
    ``x.xception.png``), not one of the run's input files, and either absent or an overlay an earlier run wrote
    (each carries :data:`~covid_cxr.gradcam.OVERLAY_MARK`). So a rerun into the same folder replaces its earlier
    overlays, and nothing else is ever replaced (an X-ray, a picture of the user's own, a folder): the stem
    becomes ``<stem>-2``, ``-3`` ..., the first whose every name is free. A name too long for the folder's file
    system keeps its start and ends in ``~`` and a hash of the whole stem. Each file is written atomically."""

    def __init__(self, cam: GradCam, folder: Path, *, target: str | None = None, method: str | None = None) -> None:
        self.cam = cam.with_method(method) if method else cam
        if target:
            self.cam.class_index(target)  # refuse a bad class name before any work
        check_overlay_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.target = target or None  # None: explain the class decided for each image
        self.backbones = tuple(self.cam.layers) if len(self.cam.layers) > 1 else ()
        self._taken: set[str] = set()
        self._inputs: set[Path] = set()
        self._where = folder.resolve()  # where an input would be, were it in this folder
        self._name_max = _name_max(folder)

    @property
    def columns(self) -> tuple[str, ...]:
        """The prediction rows' columns naming the files: ``overlay`` and one ``overlay_<backbone>`` per backbone."""
        return ("overlay", *(f"overlay_{b}" for b in self.backbones))

    def keep(self, inputs: Iterable[Path]) -> None:
        """Never write over these files (the run's inputs), whatever their names."""
        self._inputs.update(p.resolve() for p in inputs)

    def write(self, images: np.ndarray, paths: list[Path], decided: np.ndarray) -> list[Written]:
        """The overlays of a batch of model-sized images, ``GRADCAM_BATCH`` backward passes at a time; per image,
        the files written, in the order of :attr:`columns`, and why any was not (that image's, never the run's end)."""
        targets: list[int | str] = [self.target or int(k) for k in decided]
        written: list[Written] = []
        for start in range(0, len(images), GRADCAM_BATCH):
            chunk = slice(start, start + GRADCAM_BATCH)
            for path, image, result in zip(paths[chunk], images[chunk], self.cam(images[chunk], targets[chunk])):
                maps = [result.map, *(result.maps[b] for b in self.backbones)]
                written.append(self._save(path, image, maps))
        return written

    def _save(self, path: Path, image: np.ndarray, maps: list[np.ndarray]) -> Written:
        """The overlay files of the image read from ``path``; one that cannot be written is named in the error."""
        files = [self.folder / name for name in self._free_names(overlay_stem(path.name))]
        saved: list[Path | None] = []
        errors: list[str] = []
        for file, cam in zip(files, maps):
            try:
                saved.append(save_overlay(file, image, cam))
            except OSError as exc:  # a full disk, a folder made read-only: this image's overlay, not the run
                saved.append(None)
                errors.append(f"cannot write {display_path(file)} ({exc.strerror or exc})")
        error = f"overlay not written: {'; '.join(errors)}; {_OVERLAY_FIX}" if errors else ""
        return Written(tuple(saved), error)

    def _names(self, stem: str) -> list[str]:
        return [f"{stem}.png", *(f"{stem}.{b}.png" for b in self.backbones)]

    def _free_names(self, stem: str) -> list[str]:
        """The file names of ``stem``, or of ``stem-2``, ``stem-3`` ...: the first none of whose names this run
        has written or reserved, none an input, and each absent or an earlier overlay."""
        k = 1
        names = self._names(self._fit(stem))
        while self._taken.intersection(names) or not all(map(self._replaceable, names)):
            k += 1
            names = self._names(self._fit(f"{stem}-{k}"))
        self._taken.update(names)
        return names

    def _replaceable(self, name: str) -> bool:
        file = self.folder / name
        if not os.path.lexists(file):
            return True
        return self._where / name not in self._inputs and is_overlay(file)  # a link is never an overlay

    def _fit(self, stem: str) -> str:
        """``stem``, or, where its longest name is over the file system's limit, its start, ``~`` and a hash of it."""
        over = max(len(name_bytes(n)) for n in self._names(stem)) - self._name_max
        if over <= 0:
            return stem
        tag = "~" + hashlib.sha256(name_bytes(stem)).hexdigest()[:10]
        keep = stem
        while keep and len(name_bytes(keep)) > len(name_bytes(stem)) - over - len(tag):
            keep = keep[:-1]  # by characters: a name is never cut inside a UTF-8 sequence
        return keep + tag


_OVERLAY_FIX = "the prediction stands; check that the --gradcam folder is writable and has room"


@dataclass(frozen=True)
class Written:
    """One image's overlay files (None where one could not be written), and why, or ``""``."""

    files: tuple[Path | None, ...]
    error: str = ""


def overlay_stem(name: str) -> str:
    """A file's name less its image suffix (any case): ``a.png`` -> ``a``, a DICOM's UID ``1.2.840.5`` kept whole."""
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix and suffix.lower() in IMAGE_SUFFIXES and len(suffix) < len(name) else name


def check_overlay_folder(folder: Path) -> None:
    """Refuse, before the model is loaded, a --gradcam that is a file or cannot be made or written into."""
    if os.path.lexists(folder) and not folder.is_dir():
        raise ConfigError(f"--gradcam {display_path(folder)}: {kind_of(folder)}, not a folder; give --gradcam a "
                          "folder for the overlays (it is made if missing)")
    check_writable_folder(folder, f"--gradcam {display_path(folder)}")


def _name_max(folder: Path) -> int:
    """The longest overlay name, in bytes, the folder's file system takes with its temporary name (255 bytes
    where the system does not say)."""
    try:
        longest = int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # not every platform or file system answers
        longest = 255
    return longest - temporary_name_room()  # overlays are written atomically, through a longer temporary name


def predict_inputs(
    classifier: Classifier,
    inputs: Inputs,
    out: Path | None,
    *,
    batch_size: int = 16,
    workers: int = 2,
    overlays: Overlays | None = None,
    model_sha256: str = "",
) -> PredictionSink:
    """A row per input to ``out`` (.csv or .json; None: stdout), refusals first, then the files in order; each
    prediction names the rule that decided it and ``model_sha256``, the model file that made it.

    The summary (where the rows went, every refusal with its reason, the counts) goes to stderr also when
    the run is interrupted or stopped by an error, after the output is closed with what was done; not when the
    reader of stdout has gone (``| head``): the closed pipe ends the run quietly, as it would any Unix tool.
    """
    width = max((len(display_path(f)) for f in inputs.files), default=4)
    sink = PredictionSink(out, classifier.classes, path_width=width, decision=classifier.decision,
                          model_sha256=model_sha256, overlay_columns=overlays.columns if overlays else ())
    ended: str | None = "stopped by an error"  # what the summary says of a run that did not finish
    try:
        for path, reason in inputs.failures:
            sink.fail(path, reason)
        predict_files(classifier, inputs.files, sink, batch_size=batch_size, workers=workers, overlays=overlays)
        ended = ""
    except KeyboardInterrupt:
        ended = "interrupted"
        raise
    except BrokenPipeError:
        ended = None  # the reader has gone: nothing more to say
        raise
    finally:
        if ended is not None or out is not None:  # a closed stdout takes nothing more, a file its end
            sink.close(complete=ended == "")
        if ended is not None:
            summarise(sink, out, ended, notes=inputs.notes)
    return sink


def summarise(sink: PredictionSink, out: Path | None, ended: str = "", *, notes: Sequence[str] = ()) -> None:
    """The stderr epilogue: what the folders held that was passed over, where the rows went, every refused
    input with its reason, the counts; ``ended`` says why a run that did not finish ended (``interrupted``)."""
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if out is not None and sink.error is None:
        print(f"wrote {sink.predicted} predictions and {len(sink.failed)} refusals to {display_path(out)}",
              file=sys.stderr)
    for path, reason in sink.failed:
        print(f"failed: {path}: {reason}", file=sys.stderr)
    for path, reason in sink.overlay_errors:
        print(f"warning: {path}: {reason}", file=sys.stderr)
    summary = ", ".join(f"{c} {sink.counts.get(c, 0)}" for c in sink.classes)
    state = f"{ended}: " if ended else ""
    missing = f"; {len(sink.overlay_errors)} without their overlay" if sink.overlay_errors else ""
    print(f"{state}predicted {sink.predicted} images ({summary}); {len(sink.failed)} failed{missing}",
          file=sys.stderr)


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
    if overlays is not None:
        overlays.keep(files)  # an overlay never takes an input's name: --gradcam may be the input folder itself
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
    """One batch's overlays, then its rows in input order (refusals where they fell), then a flush."""
    good = [(path, image) for path, image in zip(paths, decoded) if isinstance(image, np.ndarray)]
    stack = np.stack([image for _, image in good]) if good else None
    answer = classifier(stack) if stack is not None else None
    rows = answer.rows() if answer is not None else []
    files = [Written(())] * len(rows)
    if stack is not None and answer is not None and overlays is not None:
        files = overlays.write(stack, [path for path, _ in good], answer.decided)
    found = iter(zip(rows, files))
    for path, image in zip(paths, decoded):
        if isinstance(image, str):
            sink.fail(display_path(path), image)
        else:
            (probs, decided), written = next(found)
            names = ["" if f is None else display_path(f) for f in written.files]
            sink.add(display_path(path), probs, decided, names, error=written.error)
    sink.flush()


def _decoded(future: Future[np.ndarray]) -> np.ndarray | str:
    """The decoded image, or the reason its file is refused."""
    try:
        return future.result()
    except ImageDecodeError as exc:
        return exc.reason
    except Exception as exc:  # an unforeseen failure of one file is that file's row, not the end of the run
        return f"unexpected error while decoding ({type(exc).__name__}: {exc})"
