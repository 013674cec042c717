"""The evaluations a run folder holds: ``eval-<split>/`` and ``external-<name>/`` (each a ``metrics.json``
and a ``predictions.csv``), as the model card and the report list them, and which internal evaluation an
external one is compared with.

An external evaluation's drop means something only against the internal test figures of the same model
file (its sha256: a calibrated or retrained ``best.pt`` is another file), the same fold and the same
decision rule; :func:`pairs_with` says whether two evaluations are such a pair, and where none is at hand
the card, the report and ``evaluate --external`` say so (:func:`no_internal_text`) instead of a drop.

The same test decides which evaluations are a model's own figures (:func:`not_this_model`): the model card
lists as its figures only those of its very file (by sha256) at its current rule, and sets the others apart.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from covid_cxr import fmt
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


def rule_text(op: Any, *, exact: bool = False) -> str:
    """A rule in a few words: ``argmax``, ``youden (p_covid >= 0.3127)``; ``exact``: every digit of the threshold
    (two rules that differ only there must not print alike)."""
    rule, positive, target, threshold = rule_key(op)
    name = rule if target is None or rule == "argmax" else f"{rule}={target:g}"
    if threshold is None:
        return name
    return f"{name} (p_{positive} >= {fmt.exact(threshold) if exact else f'{threshold:.4g}'})"


def not_this_model(info: dict[str, Any], sha256: str | None, op: Any) -> str | None:
    """Why an evaluation (its ``evaluation`` block) is not of the model file ``sha256`` at the rule ``op``; None
    when it is. The one test of "the same model": the card's figures and every drop (:func:`pairs_with`) use it."""
    recorded = str(info.get("model_sha256") or "")
    if not recorded:
        return ("it records no model sha256 (written by an older covid-cxr), so it is not known to be of this "
                "model file")
    if not sha256:
        return "this model file's sha256 is not known, so no evaluation can be matched to it"
    if recorded != sha256:
        name = Path(model_file(info)).name or "a model file"
        return f"of another model file: {name} with sha256 {recorded[:12]}..., not this one's {sha256[:12]}..."
    if rule_key(info.get("operating_point")) != rule_key(op):
        return (f"of this model file at another decision rule: {rule_text(info.get('operating_point'), exact=True)}, "
                f"not the model's {rule_text(op, exact=True)}")
    return None


def pairs_with(external: dict[str, Any], internal: dict[str, Any]) -> bool:
    """True when ``internal`` (an evaluation's ``evaluation`` block) is the test evaluation to compare
    ``external`` with: the same model file by sha256, the same fold where both record one, the same rule."""
    if internal.get("kind") == EXTERNAL or internal.get("split") != "test" or not external.get("model_sha256"):
        return False
    folds = external.get("fold"), internal.get("fold")
    if None not in folds and str(folds[0]) != str(folds[1]):
        return False
    return not_this_model(internal, str(external["model_sha256"]), external.get("operating_point")) is None


_PRECISION = re.compile(r"\bprecision=(\w+)")
_BACKEND = re.compile(r"^(?:\S+ on )?(torch|onnx)\b")


def measured_with(info: dict[str, Any]) -> str:
    """The precision and backend an evaluation ran in (``bf16 torch``, ``fp32 onnx``, ``int8 onnx``), from its
    record: bf16 probabilities differ slightly from the fp32 ONNX export's, so a figure says which it is. ``evaluate``
    records both (``precision``, ``backend``); an older ``metrics.json`` has only its ``runtime`` line to read."""
    runtime = str(info.get("runtime") or "")
    found = _BACKEND.match(runtime)
    backend = str(info.get("backend") or (found.group(1) if found else ""))
    precision = str(info.get("precision") or "") if info.get("precision") != "auto" else ""
    if not precision and (found := _PRECISION.search(runtime)):
        precision = found.group(1)
    if not precision and backend == "onnx":  # an ONNX file runs as stored: int8 for a quantized export
        int8 = ".int8." in Path(model_file(info)).name or "int8-weights" in runtime
        precision = "int8" if int8 else "fp32"
    if not precision:
        return f"{backend}, precision not recorded" if backend else "precision not recorded"
    return f"{precision} {backend}".strip()


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


def evaluations(run_dir: Path | None, checkpoint: Path | None, *, sha256: str | None = None,
                operating_point: Any = None) -> list[dict[str, Any]]:
    """Every ``metrics.json`` of an evaluation of ``checkpoint`` (by file name, or by ``sha256`` under any name) in
    the run folder, internal ones first; each read once.

    Each entry: ``name`` (the folder), ``metrics``, ``info`` (its ``evaluation`` block), ``external`` (made by
    ``evaluate --external``, or on data other than the run's own) and ``not_this_model``: None for an evaluation
    of the file ``sha256`` at the rule ``operating_point`` (the model's current one), else why it is not
    (:func:`not_this_model`: an earlier file of the same name, another rule, no sha256 recorded).
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
        same_file = bool(sha256) and info.get("model_sha256") == sha256
        if checkpoint is not None and evaluated and Path(evaluated).name != checkpoint.name and not same_file:
            continue  # an evaluation of another model file of the run (last.pt, an export); names survive a move
        found.append({"name": path.parent.name, "metrics": metrics, "info": info, "external": _is_external(info, run),
                      "not_this_model": not_this_model(info, sha256, operating_point)})
    return sorted(found, key=lambda e: (e["external"], e["info"].get("split") != "test", e["name"]))


def of_this_model(evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of :func:`evaluations` that are the model's own figures (its file, its current rule)."""
    return [e for e in evals if e.get("not_this_model") is None]


def external_evaluations(path: Path) -> list[Path]:
    """The external evaluations a run folder holds (``RUN/external-NAME/``, written by ``evaluate --external``)."""
    folder = RunFolder(path)
    if not folder.root.is_dir() or not folder.exists():
        return []
    return sorted(p for p in folder.root.glob("external-*") if (p / "predictions.csv").is_file())
