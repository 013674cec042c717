"""The evaluations a run folder holds: ``eval-<split>/`` and ``external-<name>/`` (each a ``metrics.json``
and a ``predictions.csv``), as the model card and the report list them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covid_cxr.atomic import read_json_object
from covid_cxr.errors import DataError
from covid_cxr.runs.folder import RunFolder


def _metrics_or_empty(path: Path) -> dict[str, Any]:
    """A metrics.json, or {} when it cannot be read (a card says what is absent instead of failing)."""
    try:
        return read_json_object(path)
    except DataError:
        return {}


def evaluations(run_dir: Path | None, checkpoint: Path | None) -> list[dict[str, Any]]:
    """Every ``metrics.json`` of an evaluation of ``checkpoint`` in the run folder, internal ones first.

    Each entry: ``name`` (the folder), ``metrics``, ``info`` (its ``evaluation`` block) and
    ``external`` (made on data other than the run's own).
    """
    if run_dir is None:
        return []
    try:
        run = RunFolder(run_dir).info()
    except DataError:
        run = None
    home = str(Path(run.data).resolve()) if run is not None and run.data else ""
    found = []
    for path in sorted(Path(run_dir).glob("*eval-*/metrics.json")):
        metrics = _metrics_or_empty(path)
        info = metrics.get("evaluation") if isinstance(metrics.get("evaluation"), dict) else {}
        if checkpoint is not None and info.get("checkpoint") and Path(info["checkpoint"]).name != checkpoint.name:
            continue  # an evaluation of another checkpoint of the run (e.g. last.pt); names survive a moved folder
        data = str(info.get("data", ""))
        external = bool(info.get("external")) or (bool(home) and bool(data) and str(Path(data).resolve()) != home)
        found.append({"name": path.parent.name, "metrics": metrics, "info": info, "external": external})
    return sorted(found, key=lambda e: (e["external"], e["info"].get("split") != "test", e["name"]))


def external_evaluations(path: Path) -> list[Path]:
    """The external evaluations a run folder holds (``RUN/external-NAME/``, written by ``evaluate --external``)."""
    folder = RunFolder(path)
    if not folder.root.is_dir() or not folder.exists():
        return []
    return sorted(p for p in folder.root.glob("external-*") if (p / "predictions.csv").is_file())
