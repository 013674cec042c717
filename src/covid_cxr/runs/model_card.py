"""``MODEL_CARD.md``: what a model is, what it was trained and evaluated on, and what it must not be used for.

The card follows the Hugging Face model-card layout: YAML front matter (license, tags, datasets,
metrics, base_model, model-index with the evaluation results), then Markdown sections. It is built
only from what the model and its run folder hold: the checkpoint (or ONNX metadata), ``run.json``,
``config.yaml``, ``splits/`` (training data per source and class), ``eval-*/metrics.json`` and
``external-*/metrics.json`` (the evaluations of this very checkpoint file, by its sha256, at its current decision
rule, internal or external, each external one beside the internal test evaluation of the same model file and rule;
those of an earlier file of the same name or of another rule apart, never as its figures) and ``audit/*.json``
(the audits' verdicts).
What is absent is said to be absent, never filled in. Written by every finished training run and
by ``export``; ``serve`` shows it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from covid_cxr import __version__, fmt
from covid_cxr.atomic import file_sha256, write_text
from covid_cxr.data.names import printable
from covid_cxr.data.sources.covidx import PREFIX as COVIDX_PREFIX
from covid_cxr.errors import CheckpointError, DataError
from covid_cxr.labels import CLASSES, DISPLAY_NAMES
from covid_cxr.runs.card_text import (
    CITATIONS,
    DATASET_IDS,
    INTENDED_USE,
    LIMITATIONS,
    evaluation_section,
    operating_point_lines,
)
from covid_cxr.runs.checkpoint import FORMAT as CHECKPOINT_FORMAT
from covid_cxr.runs.checkpoint import load_checkpoint
from covid_cxr.runs.evaluations import evaluations, of_this_model
from covid_cxr.runs.folder import CARD_NAME, RunFolder, RunInfo
from covid_cxr.runs.own_images import describe as own_text
from covid_cxr.runs.own_images import split_rows
from covid_cxr.runs.results import load_results

BASE_MODELS = {
    "concat": ["keras.applications.Xception (ImageNet)", "keras.applications.ResNet50V2 (ImageNet)"],
    "xception": ["keras.applications.Xception (ImageNet)"],
    "resnet50v2": ["keras.applications.ResNet50V2 (ImageNet)"],
}


@dataclass
class ModelFacts:
    """What the model file itself says: enough for a card without a run folder."""

    network: str
    classes: tuple[str, ...]
    preprocessing: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    operating_point: dict[str, Any] | None = None
    files: list[tuple[str, str]] = field(default_factory=list)  # (file name, sha256)
    checkpoint: Path | None = None
    sha256: str = ""  # of ``checkpoint``: which evaluations are this model's (hashed by the card when not given)


def _operating_point(value: Any) -> dict[str, Any] | None:
    """The stored decision rule as a dict (JSON text from ONNX metadata is parsed); anything else is argmax."""
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {"rule": value}
    return dict(value) if isinstance(value, dict) and value else None


def facts_from_checkpoint(path: Path, ckpt: Any = None) -> ModelFacts:
    """Facts from a checkpoint file; its weights are memory-mapped, not read, unless ``ckpt`` is given loaded."""
    path = Path(path)
    if ckpt is not None:
        raw = {"operating_point": getattr(ckpt, "operating_point", None)}
        network, classes = ckpt.network, tuple(ckpt.classes)
        pre, meta = ckpt.preprocessing.to_dict(), dict(ckpt.meta)
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # torch raises many types for a file that is not a checkpoint: let the loader say which
            raw = None
        if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
            load_checkpoint(path)  # raises the checkpoint loader's error, which names the fix
            raise CheckpointError(f"{path}: not a covid-cxr checkpoint")
        network, classes = str(raw["network"]), tuple(raw["classes"])
        pre, meta = dict(raw["preprocessing"]), dict(raw.get("meta", {}))
    op = _operating_point(raw.get("operating_point") or meta.get("operating_point"))
    return ModelFacts(network, classes, pre, meta, op, checkpoint=path.resolve())


def facts_from_onnx(metadata: dict[str, str], network: str, classes: tuple[str, ...], preprocessing: dict[str, Any]
                    ) -> ModelFacts:  # fmt: skip
    """Facts from an exported model's metadata (``covid_cxr.*`` keys, prefix removed)."""
    meta = {"covid_cxr_version": metadata.get("version", ""), "source_sha256": metadata.get("source_sha256", "")}
    op = _operating_point(metadata.get("operating_point"))
    return ModelFacts(network, tuple(classes), dict(preprocessing), meta, op)


def run_folder_of(path: Path) -> Path | None:
    """The run folder a checkpoint belongs to (``run.json`` beside it), or the folder itself when it is one."""
    home = RunFolder.containing(path)
    return home.root if home is not None else None


def _run_info(run_dir: Path | None) -> RunInfo | None:
    """The run's run.json, or None without a run folder or when it cannot be read (the card then says so)."""
    if run_dir is None:
        return None
    try:
        return RunFolder(run_dir).info()
    except DataError:
        return None


def _config(run_dir: Path | None) -> dict[str, Any]:
    """The run's resolved settings (config.yaml), or {} without them."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return {}
    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    return data if isinstance(data, dict) else {}


def training_data(rows: pd.DataFrame | None) -> pd.DataFrame | None:
    """Distinct images per source and split part (training phases, validation, test) and class, from split rows."""
    if rows is None:
        return None
    table = pd.crosstab([rows["part"], rows["source"]], rows["label"]).reindex(columns=list(CLASSES), fill_value=0)
    order = {"training": 0, "validation": 1, "test": 2}
    return table.sort_index(level=0, key=lambda idx: idx.map(order), sort_remaining=True)


def audit_verdicts(run_dir: Path | None) -> list[tuple[str, list[str]]]:
    """Per audit run: its flags' messages (empty when it flagged nothing)."""
    if run_dir is None:
        return []
    try:
        results = load_results(run_dir) or {}
    except DataError as exc:
        return [("audit", [f"the audit results cannot be read: {exc}"])]
    return [(name, [str(f.get("message", f.get("code", ""))) for f in res.get("flags", [])])
            for name, res in results.items()]


def front_matter(facts: ModelFacts, sources: list[str], evals: list[dict[str, Any]], config: dict[str, Any]) -> str:
    """The YAML header; it is parsed back before use, so a card never carries YAML that does not load."""
    pretrained = config.get("pretrained")
    kind = (facts.meta.get("source") or {}).get("kind") if isinstance(facts.meta.get("source"), dict) else None
    if kind == "keras-import":
        base = ["Rahimzadeh & Attar (2020) published Keras model (github.com/mr7495/covid19)"]
    elif pretrained == "none":
        base = ["none (trained from random initialisation)"]
    else:
        base = BASE_MODELS.get(facts.network, [facts.network])
    header: dict[str, Any] = {
        "license": "other",
        "license_name": "research-only",
        "library_name": "covid-cxr",
        "pipeline_tag": "image-classification",
        "tags": ["medical-imaging", "chest-x-ray", "covid-19", "pneumonia", "pytorch", "onnx", "research-only",
                 f"covid-cxr-{facts.network}"],
        "datasets": sorted({DATASET_IDS.get(s, s) for s in sources}),
        "metrics": ["accuracy", "recall", "specificity", "precision", "roc_auc"],
        "base_model": base if len(base) > 1 else base[0],
    }
    # only this model file's figures at its current rule: the Hub shows the index without the card's headings
    results = [entry for entry in map(_index_entry, of_this_model(evals)) if entry is not None]
    if results:  # the Hub reads evaluation results from here; an empty list would claim there were none to read
        header["model-index"] = [{"name": f"covid-cxr-{facts.network}", "results": results}]
    text = yaml.safe_dump(header, sort_keys=False, allow_unicode=True)
    if yaml.safe_load(text) != header:
        raise ValueError("the model card's front matter does not read back as written")
    return f"---\n{text}---\n"


def _index_entry(e: dict[str, Any]) -> dict[str, Any] | None:
    """The Hub's model-index entry of one evaluation; None when its metrics.json holds none of the figures
    (unreadable: the card's body says so)."""
    m, info = e["metrics"], e["info"]
    metrics = [{"type": kind, "value": round(float(m[key]), 2), "name": label}
               for key, kind, label in (("accuracy", "accuracy", "accuracy (%)"),
                                        ("covid_recall", "recall", "COVID-19 sensitivity (%)"),
                                        ("covid_specificity", "specificity", "COVID-19 specificity (%)"),
                                        ("covid_precision", "precision", "COVID-19 PPV (%)"))
               if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]  # fmt: skip
    if not metrics:
        return None
    kind = "not external" if own_text(info.get("own_images")) else "external" if e["external"] else "internal"
    warned = [w for w in info.get("warnings") or [] if isinstance(w, str)]  # a reader of the index alone sees it too
    name = f"{kind}: {e['name']}" + (f" (evaluate warned: {'; '.join(warned)})" if warned else "")
    return {"task": {"type": "image-classification", "name": "COVID-19 / pneumonia / normal chest X-ray"},
            "dataset": {"name": name, "type": Path(str(info.get("data", "unknown"))).name or "unknown",
                        "split": str(info.get("split", ""))}, "metrics": metrics}


def build_card(facts: ModelFacts, run_dir: Path | None = None) -> str:
    """The whole card as text: front matter, then the sections."""
    run = _run_info(run_dir)
    config = _config(run_dir)
    rows = split_rows(run_dir)
    table = training_data(rows)
    evals = evaluations(run_dir, facts.checkpoint, sha256=_checkpoint_sha256(facts),
                        operating_point=facts.operating_point)
    sources = sorted(set(table.index.get_level_values("source"))) if table is not None else []
    covidx = rows is not None and bool(rows["image_id"].str.startswith(f"{COVIDX_PREFIX}/").any())
    title = f"covid-cxr {facts.network}" + (f" ({run_dir.name})" if run_dir else "")
    out = [front_matter(facts, sources, evals, config), f"# Model card: {title}", ""]
    out += _details(facts, run, config)
    out += ["## Intended use", "", INTENDED_USE, ""]
    out += _training_section(table, run)
    out += evaluation_section(evals)
    out += ["## Operating point", "", *operating_point_lines(facts.operating_point, facts.classes), ""]
    out += _audit_section(audit_verdicts(run_dir))
    out += ["## Limitations", "", *_limitations(table), ""]
    out += ["## How to cite", "", "```bibtex", *[CITATIONS[k] for k in _citations(sources, covidx)], "```", ""]
    return "\n".join(out)


def _checkpoint_sha256(facts: ModelFacts) -> str | None:
    """The sha256 of the checkpoint the card describes (an export's card: the one it was exported from), hashed
    here only when the caller did not already; None without a checkpoint file (no evaluation is then its)."""
    if facts.sha256:
        return facts.sha256
    if facts.checkpoint is None or not facts.checkpoint.is_file():
        return None
    facts.sha256 = file_sha256(facts.checkpoint)
    return facts.sha256


def _details(facts: ModelFacts, run: RunInfo | None, config: dict[str, Any]) -> list[str]:
    """The model: network, classes, input, versions, the run that made it, its files."""
    pre = facts.preprocessing
    lines = ["## Model details", "",
             f"- Network: `{facts.network}` (Rahimzadeh & Attar 2020: Keras-exact Xception / ResNet50V2 in PyTorch)",
             f"- Classes, in output order: {', '.join(DISPLAY_NAMES.get(c, c) for c in facts.classes)}",
             f"- Input: grayscale X-ray resized to {pre.get('image_size')} x {pre.get('image_size')}"
             + (f" ({pre['resize']} resize)" if pre.get("resize") else "") + f", scaling `{pre.get('scaling')}`",
             f"- Written by covid-cxr {__version__} (model made with {facts.meta.get('covid_cxr_version', 'unknown')})"]
    if run is not None and run.to_json():
        said = [f"{label} {getattr(run, key)}" for key, label in (("fold", "fold"), ("data", "of"),
                ("protocol", "protocol"), ("preset", "preset"), ("num_phases", "phases:"),
                ("epochs_per_phase", "epochs a phase:"), ("status", "status"))
                if getattr(run, key) is not None]  # fmt: skip
        if facts.meta.get("global_epoch") is not None:  # the file's own record: run.json may name another checkpoint
            said.append(f"checkpoint of epoch {facts.meta['global_epoch']}")
        if run.best_val_accuracy is not None:
            said.append(f"best validation accuracy {fmt.percent(run.best_val_accuracy, fraction=True, na='unknown')}"
                        + (f" at epoch {run.best_epoch}" if run.best_epoch is not None else ""))
        lines.append("- Training run: " + ", ".join(said))
    if config.get("pretrained"):
        lines.append(f"- Initial weights: `{config['pretrained']}`; seed {config.get('seed')}")
    for name, sha in facts.files:
        lines.append(f"- File `{name}`: sha256 `{sha}`")
    return lines + [""]


def _training_section(table: pd.DataFrame | None, run: RunInfo | None) -> list[str]:
    """Images per split part, source and class, from the run's own split files."""
    lines = ["## Training data", ""]
    if table is None:
        return lines + ["Not recorded with this model: it was not trained by a covid-cxr run folder at hand (an "
                        "imported or moved checkpoint). Ask whoever made it what it was trained on.", ""]
    lines += ["Distinct images per split part, source and class (the run's own split files):", "",
              "| part | source | " + " | ".join(DISPLAY_NAMES[c] for c in table.columns) + " | total |",
              "|---|---|" + "---:|" * (len(table.columns) + 1)]
    for (part, source), row in table.iterrows():
        lines.append(f"| {part} | {source} | " + " | ".join(str(int(v)) for v in row) + f" | {int(row.sum())} |")
    if run is not None and run.protocol == "paper":
        lines += ["", "Protocol `paper`: the validation set that chose this checkpoint was drawn from the test set "
                  "(the authors' s_test), so the test figures below are optimistic."]
    return lines + [""]


def _audit_section(verdicts: list[tuple[str, list[str]]]) -> list[str]:
    lines = ["## Did it learn the disease? (audits)", ""]
    if not verdicts:
        return lines + ["No audit results are at hand for this model. `covid-cxr audit source|ablation|"
                        "cross-source|cam` shows whether it reads the image source instead of disease.", ""]
    for name, flags in verdicts:
        lines.append(f"- **{name}**: " + ("; ".join(flags) if flags else "nothing flagged (an audit can show a "
                                          "shortcut; none can prove there is none)"))
    return lines + [""]


def _limitations(table: pd.DataFrame | None) -> list[str]:
    """The fixed limitations, and those the training data shows (confounded sources, few COVID-19 images)."""
    lines = [f"- {text}" for text in LIMITATIONS]
    if table is not None and "training" in table.index.get_level_values("part"):
        train = table.loc["training"]
        covid_sources = set(train.index[train["covid"] > 0])
        other_sources = set(train.index[(train["normal"] > 0)])
        if covid_sources and other_sources and not covid_sources & other_sources:
            lines.append(f"- Every COVID-19 training image comes from {', '.join(sorted(covid_sources))} and every "
                         f"normal one from {', '.join(sorted(other_sources))}: source and class are confounded, and "
                         "the model may have learned the source. See the audits.")
        n_covid = int(train["covid"].sum())
        if n_covid < 200:
            lines.append(f"- Only {n_covid} COVID-19 training images: intervals on COVID-19 figures are wide.")
    return lines


def _citations(sources: list[str], covidx: bool) -> list[str]:
    """The works to cite: the paper, this package, the public collections trained on, and COVIDx (COVID-Net)
    only when the images came through the COVIDx adapter (``covidx`` true); a hospital's own folder cites none."""
    keys = ["paper", "covid-cxr"]
    keys += [s for s in ("covid-chestxray", "rsna") if s in sources]
    if covidx:
        keys.append("covidx")
    return keys


def write_model_card(facts: ModelFacts, out: Path, run_dir: Path | None = None) -> Path:
    """Write the card to ``out`` (a file, or a folder to hold ``MODEL_CARD.md``) through a temporary file."""
    out = Path(out)
    path = out / CARD_NAME if out.is_dir() else out
    return write_text(path, printable(build_card(facts, run_dir)))  # a path may hold bytes that are not UTF-8


def write_export_card(ckpt: Any, checkpoint: Path, files: list[Path]) -> Path:
    """The card of an exported model, beside its files: the checkpoint's facts, its run folder, the files' hashes."""
    facts = facts_from_checkpoint(checkpoint, ckpt)
    facts.sha256 = file_sha256(checkpoint)  # the exported weights' evaluations are the checkpoint's: matched by it
    facts.files = [(Path(f).name, file_sha256(f)) for f in files] + [(Path(checkpoint).name, facts.sha256)]
    return write_model_card(facts, Path(files[0]).parent / CARD_NAME, run_folder_of(checkpoint))


def write_run_card(run_dir: Path) -> Path:
    """The card of a finished run, in the run folder, naming its best.pt by hash."""
    folder = RunFolder(run_dir)
    facts = facts_from_checkpoint(folder.best)
    facts.sha256 = file_sha256(folder.best)
    facts.files = [(folder.best.name, facts.sha256)]
    return write_model_card(facts, folder.card, folder.root)


def served_card(path: Path, sha256: str, checkpoint: Any, predictor: Any) -> str:
    """The card ``serve`` shows: the one beside the model file when it names that file's hash, else one built now."""
    path = Path(path)
    beside = path.parent / CARD_NAME
    if sha256 and beside.is_file():
        text = beside.read_text(encoding="utf-8")
        if sha256 in text:
            return text
    if checkpoint is None and hasattr(predictor, "metadata"):  # an exported ONNX model: its metadata is all there is
        facts = facts_from_onnx(predictor.metadata, predictor.network, predictor.classes,
                                predictor.preprocessing.to_dict())
        run_dir = None
    else:
        facts, run_dir = facts_from_checkpoint(path, checkpoint), run_folder_of(path)
        facts.sha256 = sha256  # the served file is the checkpoint
    facts.files = [(path.name, sha256)]
    return build_card(facts, run_dir)


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """The card's YAML header as a dict, and the Markdown after it."""
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError("the model card's front matter has no closing '---' line")
    header = yaml.safe_load(text[4 : end + 1])
    return (header if isinstance(header, dict) else {}), text[end + 5 :]
