"""Where ``predict`` puts its rows: written as the run goes, so an interrupt keeps what was done.

One row per input, in input order: a prediction (``path``, ``class``, one ``p_<class>`` per
output) or a refusal (``path`` and ``error``, the reason). A CSV is flushed after every batch, so
even a killed run leaves every finished row on disk; a JSON document streams its predictions
and is closed (with ``"complete": false``) when the run is interrupted; the terminal gets each
batch as it is done. Paths are printable whatever bytes the file name holds
(:func:`~covid_cxr.data.names.printable`).
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path
from typing import IO, Any

from covid_cxr.data.names import printable

SUFFIXES = (".csv", ".json")


class PredictionSink:
    """Rows to a .csv or .json file (``out``), or to stdout as an aligned table (``out=None``)."""

    def __init__(self, out: Path | None, classes: tuple[str, ...], *, path_width: int = 4) -> None:
        if out is not None and out.suffix.lower() not in SUFFIXES:
            raise ValueError(f"--out must end in .csv or .json; got {out}")
        self.out = out
        self.classes = classes
        self.counts: Counter[str] = Counter()
        self.failed: list[tuple[str, str]] = []
        self._width = max(path_width, 4)
        self._json = out is not None and out.suffix.lower() == ".json"
        self._first_json_row = True
        self._fh: IO[str]
        if out is None:
            self._fh = sys.stdout
            print(f"{'path':<{self._width}}  {'class':<9}  " + "  ".join(f"{'p_' + c:>11}" for c in classes),
                  file=self._fh)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            self._fh = out.open("w", encoding="utf-8", newline="")
            if self._json:
                self._fh.write('{\n  "predictions": [')
            else:
                self._csv = csv.writer(self._fh)
                self._csv.writerow(["path", "class", *(f"p_{c}" for c in classes), "error"])
        self._fh.flush()

    @property
    def predicted(self) -> int:
        return sum(self.counts.values())

    def add(self, path: str, probs: Any, decided: int | None = None) -> None:
        """One prediction: ``probs`` in the order of :attr:`classes`; ``decided``, the class index the
        model's operating point chose (argmax when ``None``)."""
        path = printable(path)
        values = [float(v) for v in probs]
        best = self.classes[int(decided) if decided is not None else max(range(len(values)), key=values.__getitem__)]
        self.counts[best] += 1
        if self.out is None:
            print(f"{path:<{self._width}}  {best:<9}  " + "  ".join(f"{v:>11.4f}" for v in values), file=self._fh)
        elif self._json:
            row = {"path": path, "class": best, **{f"p_{c}": v for c, v in zip(self.classes, values)}}
            self._fh.write(("\n    " if self._first_json_row else ",\n    ") + json.dumps(row))
            self._first_json_row = False
        else:
            self._csv.writerow([path, best, *(repr(v) for v in values), ""])

    def fail(self, path: str, reason: str) -> None:
        """One refused input, named with its reason."""
        path, reason = printable(path), printable(reason)
        self.failed.append((path, reason))
        if self.out is None:
            print(f"{path:<{self._width}}  error: {reason}", file=self._fh)
        elif not self._json:  # a JSON document lists the refusals after the predictions, at close
            self._csv.writerow([path, "", *([""] * len(self.classes)), reason])

    def flush(self) -> None:
        """End of a batch: what is written so far reaches the file."""
        self._fh.flush()

    def close(self, *, complete: bool) -> None:
        """Finish the output; ``complete=False`` marks a run that was interrupted."""
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
