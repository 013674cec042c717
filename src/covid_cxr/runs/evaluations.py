"""The evaluations a run folder holds: ``eval-<split>/`` and ``external-<name>/`` (each a ``metrics.json``
and a ``predictions.csv``), as the model card and the report list them, and which internal evaluation an
external one is compared with.

An external evaluation's drop means something only against the internal test figures of the same model
file (its sha256: a calibrated or retrained ``best.pt`` is another file), the same fold and the same
decision rule; :func:`pairs_with` says whether two evaluations are such a pair, and where none is at hand
the card, the report and ``evaluate --external`` say so (:func:`no_internal_text`) instead of a drop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covid_cxr.atomic import read_json_object
from covid_cxr.errors import DataError
from covid_cxr.runs.folder import RunFolder, RunInfo

EXTERNAL = "external"


def _metrics_or_empty(path: Path) -> dict[str, Any]:
    """A metrics.json, or {} when it cannot be read (a card says what is absent instead of failing)."""
    try:
        return read_json_object(path)
    except DataError:
        return {}


def model_file(info: dict[str, Any]) -> str:
    """The evaluated model file's path as recorded ("checkpoint" internal, "model" external; "" when absent)."""
    return str(info.get("model") or info.get("checkpoint") or "")


def rule_key(op: Any) -> tuple[str, str, float | None, float | None]:
    """What makes two decision rules the same: rule, positive class, target and threshold (argmax when absent)."""
    op = op if isinstance(op, dict) else {}
    threshold, target = op.get("threshold"), op.get("target")
    return (str(op.get("rule", "argmax")), str(op.get("positive_class", "covid")),
            None if target is None else float(target), None if threshold is None else float(threshold))


def pairs_with(external: dict[str, Any], internal: dict[str, Any]) -> bool:
    """True when ``internal`` (an evaluation's ``evaluation`` block) is the test evaluation to compare
    ``external`` with: the same model file by sha256, the same fold where both record one, the same rule."""
    if internal.get("kind") == EXTERNAL or internal.get("split") != "test":
        return False
    sha = external.get("model_sha256")
    if not sha or internal.get("model_sha256") != sha:
        return False
    folds = external.get("fold"), internal.get("fold")
    if None not in folds and str(folds[0]) != str(folds[1]):
        return False
    return rule_key(external.get("operating_point")) == rule_key(internal.get("operating_point"))


def no_internal_text(info: dict[str, Any]) -> str:
    """Why an external evaluation has no drop beside it, and the command that gives one."""
    model = Path(model_file(info)).name or "this model file"
    if model.endswith(".onnx"):
        fix = ("internal evaluation reads .pt checkpoints: compare the external evaluation of the checkpoint this "
               "model was exported from")
    else:
        fix = "run `covid-cxr evaluate RUN` first"
    return f"no internal test evaluation of this model file ({model}) at this rule: {fix}"


def internal_for(folder: Path, info: dict[str, Any]) -> Path | None:
    """The evaluation folder in ``folder`` (a run folder, or a loose checkpoint's folder) that ``info`` pairs with."""
    for path in sorted(Path(folder).glob("*eval-*/metrics.json")):
        evaluation = _metrics_or_empty(path).get("evaluation")
        if isinstance(evaluation, dict) and pairs_with(info, evaluation):
            return path.parent
    return None


def _is_external(info: dict[str, Any], run: RunInfo | None) -> bool:
    """Made by ``evaluate --external``, or on data other than the run's own: by the fold's split hash where both
    record one (a prepared folder copied or moved elsewhere is still the run's own data), else by the data path."""
    if info.get("kind") == EXTERNAL:
        return True
    if run is None:
        return False
    if run.split_hash and info.get("split_hash"):
        return info["split_hash"] != run.split_hash
    data = str(info.get("data", ""))
    return bool(run.data) and bool(data) and str(Path(data).resolve()) != str(Path(run.data).resolve())


def evaluations(run_dir: Path | None, checkpoint: Path | None) -> list[dict[str, Any]]:
    """Every ``metrics.json`` of an evaluation of ``checkpoint`` in the run folder, internal ones first.

    Each entry: ``name`` (the folder), ``metrics``, ``info`` (its ``evaluation`` block) and
    ``external`` (made by ``evaluate --external``, or on data other than the run's own).
    """
    if run_dir is None:
        return []
    try:
        run: RunInfo | None = RunFolder(run_dir).info()
    except DataError:
        run = None
    paths = {*Path(run_dir).glob("*eval-*/metrics.json"), *Path(run_dir).glob("external-*/metrics.json")}
    found = []
    for path in sorted(paths):
        metrics = _metrics_or_empty(path)
        info = metrics.get("evaluation") if isinstance(metrics.get("evaluation"), dict) else {}
        evaluated = model_file(info)
        if checkpoint is not None and evaluated and Path(evaluated).name != checkpoint.name:
            continue  # an evaluation of another model file of the run (last.pt, an export); names survive a move
        found.append({"name": path.parent.name, "metrics": metrics, "info": info, "external": _is_external(info, run)})
    return sorted(found, key=lambda e: (e["external"], e["info"].get("split") != "test", e["name"]))


def external_evaluations(path: Path) -> list[Path]:
    """The external evaluations a run folder holds (``RUN/external-NAME/``, written by ``evaluate --external``)."""
    folder = RunFolder(path)
    if not folder.root.is_dir() or not folder.exists():
        return []
    return sorted(p for p in folder.root.glob("external-*") if (p / "predictions.csv").is_file())
