"""Where ``predict`` puts its rows: written as the run goes, so an interrupt keeps what was done.

One row per input, in input order: a prediction (``path``, ``class``, one ``p_<class>`` per
output, the ``rule`` and ``threshold`` that decided the class, the model file's ``model_sha256`` and, with
Grad-CAM, the ``overlay`` file(s) written for it) or a refusal (``path``, ``model_sha256`` and ``error``, the
reason). A prediction whose overlay could not be written keeps its class and probabilities and says why in
``error`` (a JSON prediction has an ``error`` key only then). The class is the operating point's, which with a
threshold rule need not be the largest probability: the rule beside it says why. A CSV is flushed after every
batch, so even a killed run leaves every finished row on disk; a JSON document streams its predictions
and is closed (with ``"complete": false``) when the run is interrupted; the terminal gets each
batch as it is done. Paths are printable whatever bytes the file name holds
(:func:`~covid_cxr.data.names.printable`).

Where the rows go is checked before any work (:func:`check_out`): not a folder, in a folder that exists or can be
made, and writable. A write the system refuses later (a full disk) ends the run with an ``OSError`` naming the
file; a closed stdout (``| head``) raises ``BrokenPipeError`` unchanged, for the command line to end quietly.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import stat
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from covid_cxr.data.names import display_path, printable
from covid_cxr.errors import ConfigError
from covid_cxr.operating_point import OperatingPoint

SUFFIXES = (".csv", ".json")


def check_out(out: Path) -> None:
    """Refuse, before the model is loaded, an ``--out`` that cannot take the rows: another suffix than .csv or
    .json, a folder or a device, a place under a file, a folder that cannot be written into, a read-only file."""
    if out.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"--out must end in .csv or .json; got {display_path(out)}")
    if out.is_dir():
        raise ConfigError(f"--out {display_path(out)}: a folder; name a file in it, e.g. "
                          f"--out {display_path(out / 'predictions.csv')}")
    if os.path.lexists(out) and not out.is_file():
        raise ConfigError(f"--out {display_path(out)}: {kind_of(out)}, not a file; give a .csv or .json file name")
    check_writable_folder(out.parent, f"--out {display_path(out)}")
    if out.exists():
        try:
            os.close(os.open(out, os.O_WRONLY))  # opened, not truncated: a refused run leaves the old rows
        except OSError as exc:
            raise ConfigError(f"--out {display_path(out)}: cannot be written ({exc.strerror or exc}); make it "
                              "writable, or give another file") from exc


def check_writable_folder(folder: Path, what: str) -> None:
    """Refuse a ``folder`` that is no folder, or that cannot be made or written into, naming ``what`` (the option
    and its value). Nothing is made here: a run refused later leaves nothing behind."""
    place = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), Path("."))
    if not place.is_dir():
        raise ConfigError(f"{what}: {display_path(place)} is {kind_of(place)}, not a folder; give a path in a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".covid-cxr-probe-", dir=place)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write in {display_path(place)} ({exc.strerror or exc}); give a folder "
                          "you can write to") from exc
    os.close(fd)
    os.unlink(probe)


def kind_of(path: Path) -> str:
    """What is at ``path``, for a message: ``a file``, ``a folder``, ``a device`` ..."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken symbolic link" if path.is_symlink() else "nothing"
    return ("a folder" if stat.S_ISDIR(mode) else "a file" if stat.S_ISREG(mode) else "a named pipe"
            if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


class PredictionSink:
    """Rows to a .csv or .json file (``out``), or to stdout as an aligned table (``out=None``)."""

    def __init__(self, out: Path | None, classes: tuple[str, ...], *, path_width: int = 4,
                 decision: OperatingPoint | None = None, model_sha256: str = "",
                 overlay_columns: Sequence[str] = ()) -> None:
        """``decision``: the rule the classes are decided by (argmax when None); ``overlay_columns``: the
        names of the overlay files' columns (``overlay``, one per backbone after it), none without Grad-CAM."""
        if out is not None and out.suffix.lower() not in SUFFIXES:
            raise ValueError(f"--out must end in .csv or .json; got {out}")
        self.out = out
        self.classes = classes
        decision = decision or OperatingPoint()
        self.rule, self.threshold = decision.name, decision.threshold
        self.model_sha256 = model_sha256
        self.overlay_columns = tuple(overlay_columns)
        self.counts: Counter[str] = Counter()
        self.failed: list[tuple[str, str]] = []
        self.overlay_errors: list[tuple[str, str]] = []  # predictions whose overlay was not written, and why
        self.error: OSError | None = None  # what stopped the writes to ``out``, if anything did
        self._width = max(path_width, 4)
        self._json = out is not None and out.suffix.lower() == ".json"
        self._first_json_row = True
        self._fh: IO[str]
        if out is None:
            self._fh = sys.stdout
            print(f"{'path':<{self._width}}  {'class':<9}  " + "  ".join(f"{'p_' + c:>11}" for c in classes),
                  file=self._fh)
        else:
            with self._writing():
                out.parent.mkdir(parents=True, exist_ok=True)
                self._fh = out.open("w", encoding="utf-8", newline="")
                if self._json:
                    self._fh.write('{\n  "predictions": [')
                else:
                    self._csv = csv.writer(self._fh)
                    self._csv.writerow(["path", "class", *(f"p_{c}" for c in classes), "rule", "threshold",
                                        "model_sha256", *self.overlay_columns, "error"])
        self.flush()

    @property
    def predicted(self) -> int:
        return sum(self.counts.values())

    def add(self, path: str, probs: Any, decided: int | None = None, overlays: Sequence[str] = (), *,
            error: str = "") -> None:
        """One prediction: ``probs`` in the order of :attr:`classes`; ``decided``, the class index the
        model's operating point chose (argmax when ``None``); ``overlays``, its Grad-CAM files, in the order of
        :attr:`overlay_columns` (``""`` for one not written); ``error``, why an overlay was not written."""
        path, error = printable(path), printable(error)
        values = [float(v) for v in probs]
        best = self.classes[int(decided) if decided is not None else max(range(len(values)), key=values.__getitem__)]
        self.counts[best] += 1
        if error:
            self.overlay_errors.append((path, error))
        written = dict(zip(self.overlay_columns, (printable(o) for o in overlays)))
        if self.out is None:  # a closed pipe (| head) raises BrokenPipeError here, for the command line to end
            print(f"{path:<{self._width}}  {best:<9}  " + "  ".join(f"{v:>11.4f}" for v in values), file=self._fh)
            return
        with self._writing():
            if self._json:
                row = {"path": path, "class": best, **{f"p_{c}": v for c, v in zip(self.classes, values)},
                       "rule": self.rule, "threshold": self.threshold, "model_sha256": self.model_sha256,
                       **written, **({"error": error} if error else {})}
                self._fh.write(("\n    " if self._first_json_row else ",\n    ") + json.dumps(row))
                self._first_json_row = False
            else:
                threshold = "" if self.threshold is None else repr(self.threshold)
                self._csv.writerow([path, best, *(repr(v) for v in values), self.rule, threshold, self.model_sha256,
                                    *(written.get(c, "") for c in self.overlay_columns), error])

    def fail(self, path: str, reason: str) -> None:
        """One refused input, named with its reason."""
        path, reason = printable(path), printable(reason)
        self.failed.append((path, reason))
        if self.out is None:
            print(f"{path:<{self._width}}  error: {reason}", file=self._fh)
        elif not self._json:  # a JSON document lists the refusals after the predictions, at close
            with self._writing():
                self._csv.writerow([path, "", *([""] * len(self.classes)), "", "", self.model_sha256,
                                    *([""] * len(self.overlay_columns)), reason])

    def flush(self) -> None:
        """End of a batch: what is written so far reaches the file."""
        with self._writing():
            self._fh.flush()

    def close(self, *, complete: bool) -> None:
        """Finish the output; ``complete=False`` marks a run that did not finish. After a refused write
        (:attr:`error`) the file is already closed: there is nothing more it could take."""
        if self.error is not None:
            return
        with self._writing():
            if self._json:
                doc_tail = {
                    "failed": [{"path": p, "reason": r} for p, r in self.failed],
                    "summary": {c: self.counts.get(c, 0) for c in self.classes},
                    "complete": complete,
                }
                tail = json.dumps(doc_tail, indent=2)[1:]  # the rest of the object after "predictions"
                self._fh.write(("\n  ]," if not self._first_json_row else "],") + tail + "\n")
            self._fh.flush()
            if self.out is not None:
                self._fh.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Writes to ``out``: one the system refuses (a full disk, a file system gone read-only) closes the file
        and raises an ``OSError`` that names it, once. stdout's errors pass unchanged (a closed pipe: see above)."""
        if self.out is None or self.error is not None:
            yield
            return
        try:
            yield
        except OSError as exc:
            self.error = exc
            with contextlib.suppress(OSError):  # the same refusal again, for what is still buffered: already raised
                if getattr(self, "_fh", None) is not None:
                    self._fh.close()
            message = (f"cannot write {display_path(self.out)} ({exc.strerror or exc}); free space there or give "
                       "--out another place, and run again")
            raise (OSError(exc.errno, message) if exc.errno else OSError(message)) from exc
