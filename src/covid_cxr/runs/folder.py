"""A run folder and what ``run.json`` holds: the one place that knows a run folder's file names.

``RUNS/<name>/`` holds ``config.yaml`` (resolved settings and the runtime), ``run.json``
(:class:`RunInfo`: status, data, fold, best epoch), ``log.csv`` (one row per epoch), ``tb/``
(TensorBoard), ``splits/`` (the fold's split files), ``best.pt`` and ``last.pt``, and, once
evaluated or audited, ``eval-<split>/``, ``external-<name>/``, ``audit/`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from covid_cxr.atomic import read_json_object, write_json
from covid_cxr.data.names import display_path
from covid_cxr.errors import CheckpointError

RUN_FILE = "run.json"
BEST = "best.pt"
LAST = "last.pt"
CONFIG = "config.yaml"
LOG = "log.csv"
CARD_NAME = "MODEL_CARD.md"


def now() -> str:
    """The local time as run.json records it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass(frozen=True)
class RunInfo:
    """What ``run.json`` holds. Every field may be absent in an old or foreign run (None then).

    Keys this version does not know are kept in ``extra`` and written back unchanged, so a run
    made by a newer covid-cxr survives being resumed or re-carded by an older one.
    """

    network: str | None = None
    fold: int | None = None
    data: str | None = None
    protocol: str | None = None
    split_hash: str | None = None
    image_size: int | None = None
    preset: str | None = None
    batch_size: int | None = None
    world_size: int | None = None
    runtime: str | None = None
    num_phases: int | None = None
    epochs_per_phase: int | None = None
    total_epochs: int | None = None
    status: str | None = None
    epochs_done: int | None = None
    best_epoch: int | None = None
    best_val_accuracy: float | None = None
    started: str | None = None
    finished: str | None = None
    warnings: list[str] | None = None  # settings that train but deserve a word (e.g. ImageNet weights' scaling)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunInfo:
        """From a parsed run.json; unknown keys go to ``extra``."""
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        """The dict run.json holds: unset fields left out, unknown keys written back."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **{k: v for k, v in out.items() if v is not None}}

    def replace(self, **changes: Any) -> RunInfo:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


class RunFolder:
    """The paths of one run folder, and its run.json read and written as a :class:`RunInfo`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    @property
    def name(self) -> str:
        return self.root.name

    run_file = property(lambda self: self.root / RUN_FILE, doc="run.json")
    best = property(lambda self: self.root / BEST, doc="best.pt: the best checkpoint by validation accuracy")
    last = property(lambda self: self.root / LAST, doc="last.pt: the latest epoch, with the state to resume")
    config = property(lambda self: self.root / CONFIG, doc="config.yaml: resolved settings")
    log = property(lambda self: self.root / LOG, doc="log.csv: one row per epoch")
    tensorboard = property(lambda self: self.root / "tb", doc="TensorBoard event files")
    splits = property(lambda self: self.root / "splits", doc="the fold's split files")
    audit = property(lambda self: self.root / "audit", doc="audit results")
    card = property(lambda self: self.root / CARD_NAME, doc="MODEL_CARD.md")

    def eval_dir(self, split: str) -> Path:
        """Where ``evaluate`` writes the evaluation of best.pt on ``split``."""
        return self.root / f"eval-{split}"

    def external_dir(self, name: str) -> Path:
        """Where ``evaluate --external`` writes the evaluation on the external set ``name``."""
        return self.root / f"external-{name}"

    def exists(self) -> bool:
        """True when the folder holds a run (its run.json)."""
        return self.run_file.is_file()

    def info(self) -> RunInfo:
        """run.json as a :class:`RunInfo`; a damaged file raises :class:`DataError` naming it."""
        return read_run_file(self.run_file)

    def best_or_hint(self) -> Path:
        """best.pt, for the commands that take a run folder as its best model; a run that has not saved one yet
        raises :class:`CheckpointError` saying how to go on (last.pt by path, or ``train --resume``)."""
        if self.best.is_file():
            return self.best
        status = self.info().status if self.exists() else None
        root = display_path(self.root)
        hint = (f"give {display_path(self.last)} by path, or continue the run with 'covid-cxr train --resume {root}'"
                if self.last.is_file() else
                f"it has not finished an epoch; continue it with 'covid-cxr train --resume {root}'")
        raise CheckpointError(f"{display_path(self.best)}: no such file; the run has not saved a best checkpoint yet "
                              f"(status {status or 'unknown'!r}): {hint}")

    def write_info(self, info: RunInfo) -> Path:
        """Replace run.json atomically."""
        return write_json(self.run_file, info.to_json())

    @classmethod
    def containing(cls, path: str | Path) -> RunFolder | None:
        """The run folder ``path`` is (a folder with run.json) or lies in (a checkpoint beside run.json); else None."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        return cls(folder) if (folder / RUN_FILE).is_file() else None


def read_run_file(path: Path) -> RunInfo:
    """A run.json as a :class:`RunInfo`; a damaged file raises :class:`DataError` naming it."""
    data = read_json_object(path, what="a run description",
                            fix="the run folder is damaged; train it again or restore run.json")
    return RunInfo.from_json(data)
