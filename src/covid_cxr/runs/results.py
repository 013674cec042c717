"""Audit result files: one JSON file per audit, in ``RUN/audit/`` (or the folder the user names).

Each file has this shape::

    {"audit": "source", "schema_version": 1, "created": "...", "inputs": {...},
     "metrics": {...}, "thresholds": {"name": {"value": x, "why": "..."}}, "flags": [
        {"code": "source-predictable", "message": "plain-language finding"}], "notes": [...]}

An interval is ``{"value": x, "low": l, "high": h, "n": n, "method": "wilson"|"bootstrap"}``.
Undefined figures (NaN) are written as null. How results read in a report is the audit area's
(:mod:`covid_cxr.audit.results`); this module only makes, writes, finds and reads them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from covid_cxr import __version__
from covid_cxr.atomic import read_json_object, write_json
from covid_cxr.errors import DataError
from covid_cxr.runs.folder import RunFolder, now

AUDITS: tuple[str, ...] = ("source", "ablation", "cross_source", "cam")
SCHEMA_VERSION = 1


def make_result(
    audit: str,
    *,
    inputs: Mapping[str, Any],
    metrics: Mapping[str, Any],
    thresholds: Mapping[str, Any],
    flags: Sequence[Mapping[str, str]],
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """One audit's result, stamped with the schema, package version and time."""
    if audit not in AUDITS:
        raise ValueError(f"unknown audit {audit!r}; one of {', '.join(AUDITS)}")
    return {
        "audit": audit,
        "schema_version": SCHEMA_VERSION,
        "covid_cxr_version": __version__,
        "created": now(),
        "inputs": dict(inputs),
        "metrics": dict(metrics),
        "thresholds": dict(thresholds),
        "flags": [dict(f) for f in flags],
        "notes": list(notes),
    }


def write_result(result: Mapping[str, Any], out_dir: Path) -> Path:
    """Write ``<out_dir>/<audit>.json`` atomically, so a crash never leaves half a file."""
    return write_json(Path(out_dir) / f"{result['audit']}.json", result)


def audit_dir_for(target: Path) -> Path:
    """Where audit results of ``target`` go: ``RUN/audit`` for a run folder or a checkpoint inside one."""
    target = Path(target)
    if target.is_dir():
        return RunFolder(target).audit
    home = RunFolder.containing(target)
    return home.audit if home is not None else target.parent / f"{target.stem}-audit"


def load_results(folder: Path) -> dict[str, dict[str, Any]] | None:
    """Read every ``<audit>.json`` in ``folder`` (a run folder or its ``audit/``); None when there is none."""
    folder = Path(folder)
    if (folder / "audit").is_dir():
        folder = folder / "audit"
    found: dict[str, dict[str, Any]] = {}
    for name in AUDITS:
        path = folder / f"{name}.json"
        if not path.is_file():
            continue
        fix = "rerun 'covid-cxr audit' to rewrite it"
        data = read_json_object(path, what="a covid-cxr audit result", fix=fix)
        if data.get("audit") != name:
            raise DataError(f"{path}: not a covid-cxr audit result; {fix}")
        found[name] = data
    return found or None
