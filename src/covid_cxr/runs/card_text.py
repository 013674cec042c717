"""The model card's fixed text (intended use, limitations, citations) and its evaluation and decision-rule sections."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from covid_cxr import __version__, fmt
from covid_cxr.atomic import read_json
from covid_cxr.data.sources.covidx import (
    COVID_NET_CITATION,
    PUBLISHED_WHERE,
    published_rows,
)
from covid_cxr.errors import DataError
from covid_cxr.labels import DISPLAY_NAMES
from covid_cxr.operating_point import OperatingPoint, where_chosen
from covid_cxr.runs.evaluations import measured_with, no_internal_text, of_this_model, pairs_with, rule_text
from covid_cxr.runs.own_images import describe as describe_own

INTENDED_USE = (
    "Research on chest X-ray classification (COVID-19, pneumonia, normal): reproducing Rahimzadeh & Attar (2020), "
    "studying shortcut learning and external validity, benchmarking. **Not a diagnostic device**: it has no "
    "regulatory clearance and must not be used to diagnose, treat, triage or screen patients, nor in place of a "
    "laboratory test or a radiologist's reading. Out of scope: lateral views, children, CT, any finding other than "
    "the three classes, and any image source not measured below."
)
LIMITATIONS = (
    "Trained and tested on public research collections whose images differ by source (hospital, scanner, "
    "processing, burnt-in text) in ways that go with the class. Figures on another hospital's images are unknown "
    "until measured: evaluate the model on them (external validation) before trusting any figure here.",
    "Three classes only: an X-ray of any other condition (tuberculosis, effusion, tumour, ...) is put in one of them.",
    "Sensitivity and specificity hold at the test set's mix of classes only so far as the images resemble it; PPV "
    "and NPV change with prevalence, and a test set's prevalence is rarely a clinic's.",
    "A chest X-ray is often normal early in COVID-19: no image classifier can rule the disease out.",
)
DATASET_IDS = {
    "covid-chestxray": "ieee8023/covid-chestxray-dataset", "rsna": "rsna-pneumonia-detection-challenge",
    "actualmed": "agchung/Actualmed-COVID-chestxray-dataset", "figure1": "agchung/Figure1-COVID-chestxray-dataset",
    "sirm": "SIRM COVID-19 database", "ricord": "MIDRC-RICORD-1c", "bimcv": "BIMCV-COVID19+",
    "stonybrook": "COVID-19-NY-SBU", "folder": "user-supplied images", "covidx-unknown": "COVIDx",
}  # fmt: skip
CITATIONS = {
    "paper": """@article{rahimzadeh2020modified,
  title   = {A modified deep convolutional neural network for detecting {COVID-19} and pneumonia from chest X-ray
             images based on the concatenation of {Xception} and {ResNet50V2}},
  author  = {Rahimzadeh, Mohammad and Attar, Abolfazl},
  journal = {Informatics in Medicine Unlocked},
  volume  = {19},
  pages   = {100360},
  year    = {2020},
  doi     = {10.1016/j.imu.2020.100360}
}""",
    "covid-cxr": f"""@software{{covid_cxr,
  title   = {{covid-cxr: chest X-ray classifiers reproducing Rahimzadeh \\& Attar (2020)}},
  version = {{{__version__}}},
  year    = {{2026}}
}}""",
    "covid-chestxray": """@article{cohen2020covid,
  title   = {{COVID-19} Image Data Collection: Prospective Predictions Are the Future},
  author  = {Cohen, Joseph Paul and Morrison, Paul and Dao, Lan and Roth, Karsten and Duong, Tim Q. and
             Ghassemi, Marzyeh},
  journal = {arXiv:2006.11988},
  year    = {2020}
}""",
    "rsna": """@article{shih2019augmenting,
  title   = {Augmenting the National Institutes of Health Chest Radiograph Dataset with Expert Annotations of
             Possible Pneumonia},
  author  = {Shih, George and Wu, Carol C. and Halabi, Safwan S. and others},
  journal = {Radiology: Artificial Intelligence},
  volume  = {1},
  number  = {1},
  pages   = {e180041},
  year    = {2019},
  doi     = {10.1148/ryai.2019180041}
}""",
    "covidx": """@article{wang2020covidnet,
  title   = {{COVID-Net}: a tailored deep convolutional neural network design for detection of {COVID-19} cases
             from chest X-ray images},
  author  = {Wang, Linda and Lin, Zhong Qiu and Wong, Alexander},
  journal = {Scientific Reports},
  volume  = {10},
  pages   = {19549},
  year    = {2020},
  doi     = {10.1038/s41598-020-76550-z}
}""",
}
COLUMNS = (("accuracy", "accuracy"), ("covid_recall", "COVID-19 sensitivity"),
           ("covid_specificity", "COVID-19 specificity"), ("covid_precision", "COVID-19 PPV"),
           ("covid_auc", "COVID-19 AUC"))  # fmt: skip


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(float(value)) else None


def with_ci(metrics: dict[str, Any], key: str) -> str:
    """``90.0 [82.6, 94.5]`` (percent; AUC as a fraction), ``-`` when undefined."""
    low, high = _number(metrics.get(f"{key}_ci_low")), _number(metrics.get(f"{key}_ci_high"))
    return fmt.interval(_number(metrics.get(key)), low, high, 3 if key.endswith("_auc") else 1, na="-")


def difference(external: dict[str, Any], internal: dict[str, Any], key: str) -> str:
    """External minus internal, in points, with Newcombe's 95% interval built from the two intervals in metrics.json
    (Wilson's, adjusted for patients where one has several images)."""
    e, i = _number(external.get(key)), _number(internal.get(key))
    el, eh = _number(external.get(f"{key}_ci_low")), _number(external.get(f"{key}_ci_high"))
    il, ih = _number(internal.get(f"{key}_ci_low")), _number(internal.get(f"{key}_ci_high"))
    if None in (e, i, el, eh, il, ih):
        return "-"
    d = e - i  # type: ignore[operator]
    low = d - math.hypot(e - el, ih - i)  # type: ignore[operator]
    high = d + math.hypot(eh - e, i - il)  # type: ignore[operator]
    return fmt.interval(d, low, high, 1, sign=True)


def _covidx_version(data: str) -> str | None:
    """The COVIDx version of a folder made by ``prepare --covidx`` (its splits' settings record it)."""
    try:
        settings = read_json(Path(data) / "splits" / "summary.json").get("settings", {})
    except (DataError, AttributeError):
        return None
    version = settings.get("covidx_version") if isinstance(settings, dict) else None
    return str(version).upper() if version else None


EARLIER_HEADING = "### Earlier evaluations, of another model file or rule: not this model's figures"


def evaluation_section(evals: list[dict[str, Any]]) -> list[str]:
    """The model's own evaluations (its file by sha256, its current rule: :func:`of_this_model`) with their
    intervals, rule and precision; internal beside external with the drop; COVID-Net's figures on COVIDx. The run
    folder's other evaluations (an earlier best.pt, another rule) follow under their own heading, never as its."""
    lines = ["## Evaluation", ""]
    own = of_this_model(evals)
    earlier = [e for e in evals if e.get("not_this_model") is not None]
    if not evals:
        return lines + ["No evaluation of this model is at hand (none in its run folder, or no run folder). "
                        "`covid-cxr evaluate RUN` scores the run's test split (`--split val` its validation split); "
                        "`covid-cxr model-card RUN` then rewrites this card with the figures.", ""]
    if not own:
        lines += ["No evaluation of this model file at its current decision rule is at hand: those in its run folder "
                  "(below) are of another file of the same name (a `calibrate` or a training since wrote a new "
                  "one), of another rule, or do not record which file they are of. `covid-cxr evaluate RUN` scores "
                  "this one; `covid-cxr model-card RUN` then rewrites this card with the figures.", ""]
    else:
        lines += ["Percent with 95% intervals (Wilson for proportions, adjusted for patients where one has several "
                  "images, as each metrics.json's rate_intervals records; patient bootstrap for AUC). Only evaluations "
                  "of this very model file (by its sha256) at its current decision rule are listed here; each row "
                  "names that rule and the precision and backend it ran in (bf16 probabilities differ slightly from "
                  "the fp32 ONNX export's).", "", *_table(own)]
        lines += _drop_lines(own)
        lines += _notes(own, [])
        lines += _covidx_lines(own)
        lines.append("")
    if earlier:
        lines += [EARLIER_HEADING, "",
                  "The run folder holds these as well. They were measured on another model file or at another "
                  "decision rule, so they are not this model's figures and are not in the model-index; "
                  "`covid-cxr evaluate RUN` (with `--external` for another set) measures this one.", "",
                  *_table(earlier, " (not this model's)")]
        lines += _notes(earlier, [f"{e['name']}: not this model's: {e['not_this_model']}" for e in earlier])
        lines.append("")
    return lines


def _table(evals: list[dict[str, Any]], note: str = "") -> list[str]:
    """One row per evaluation: kind (``note`` after it), split, images, rule and precision, the figures."""
    lines = ["| evaluation | kind | split | images (COVID-19) | " + " | ".join(t for _, t in COLUMNS)
             + " | rule, precision |", "|---|---|---|---:|" + "---:|" * len(COLUMNS) + "---|"]
    for e in evals:
        m, info = e["metrics"], e["info"]
        own = info.get("own_images") if describe_own(info.get("own_images")) else None
        kind = f"**not external** ({own['images']} own images)" if own else "external" if e["external"] else "internal"
        count = f"{m.get('n', '-')} ({m.get('covid_n', '-')})"
        rule = f"{rule_text(info.get('operating_point'), exact=True)}, {measured_with(info)}"
        lines.append(f"| {e['name']} | {kind}{note} | {info.get('split', '-')} | {count} | "
                     + " | ".join(with_ci(m, k) for k, _ in COLUMNS) + f" | {rule} |")
    return lines


def _notes(evals: list[dict[str, Any]], first: list[str]) -> list[str]:
    """``first``, then what a reader of the rows must know: no COVID-19 images, the model's own images, what
    evaluate warned of when it ran (a threshold chosen on the very split it scored: optimistic by construction)."""
    notes = first + [f"{e['name']}: no {DISPLAY_NAMES['covid']} images, so its sensitivity is not defined"
                     for e in evals if _number(e["metrics"].get("covid_n")) == 0]
    notes += [f"{e['name']}: {describe_own(e['info'].get('own_images'))}; these figures are not external validation"
              for e in evals if describe_own(e["info"].get("own_images"))]
    notes += [f"{e['name']}: warning: {w}" for e in evals for w in (e["info"].get("warnings") or [])
              if isinstance(w, str)]
    return [""] + [f"- {n}" for n in notes] if notes else []


def _drop_lines(evals: list[dict[str, Any]]) -> list[str]:
    """Each external evaluation minus the internal test evaluation of the same model file, fold and rule; where
    none is at hand, why there is no drop and the command that gives one. ``evals``: the model's own, so a drop
    is never made against an earlier file's figures and the table never shows one this says is absent."""
    lines: list[str] = []
    for e in (x for x in evals if x["external"]):
        internal = next((x for x in evals if not x["external"] and pairs_with(e["info"], x["info"])), None)
        if internal is None:
            lines += ["", f"External ({e['name']}): no drop: {no_internal_text(e['info'])}."]
            continue
        lines += ["", f"External ({e['name']}) minus internal test ({internal['name']}, the same model file and "
                  f"rule), in points [95% CI]: accuracy {difference(e['metrics'], internal['metrics'], 'accuracy')}, "
                  f"COVID-19 sensitivity {difference(e['metrics'], internal['metrics'], 'covid_recall')}, COVID-19 "
                  f"specificity {difference(e['metrics'], internal['metrics'], 'covid_specificity')}."]
    return lines


def _covidx_lines(evals: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for e in evals:
        version = _covidx_version(str(e["info"].get("data", ""))) if e["info"].get("split") == "test" else None
        rows = published_rows(e["metrics"], version) if version else []
        if rows:
            out += ["", f"On the COVIDx{version} test set, beside COVID-Net's published figures ({PUBLISHED_WHERE}; "
                    f"{COVID_NET_CITATION}):", "",
                    "| model | COVID-19 sensitivity | COVID-19 PPV | accuracy |", "|---|---:|---:|---:|"]
            out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def operating_point_lines(op: dict[str, Any] | None, classes: tuple[str, ...]) -> list[str]:
    """The decision rule in words: argmax when none is stored."""
    if not op or str(op.get("rule", "argmax")) == "argmax":
        return ["Decision rule: **argmax**, the class with the highest probability (the paper's rule). No threshold "
                "was chosen on validation data for this model; `covid-cxr` can choose one (a target sensitivity, "
                "specificity or Youden's J) without retraining."]
    positive = str(op.get("positive_class", "covid"))
    target = f", target {op['target']}" if op.get("target") is not None else ""
    lines = [f"Decision rule: **{op.get('rule')}**{target}, for {DISPLAY_NAMES.get(positive, positive)}."]
    if op.get("threshold") is not None:
        name = DISPLAY_NAMES.get(positive, positive)
        lines.append(f"- Threshold on the {name} probability: {fmt.exact(float(op['threshold']))}.")
    validation = op.get("validation")
    if isinstance(validation, dict) and validation:
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in validation.items()
                          if not isinstance(v, (dict, list)))
        lines.append(f"- {where_chosen([OperatingPoint.from_dict(op)])} Validation record: {shown}.")
    elif validation:
        lines.append(f"- Chosen on: {validation}.")
    else:  # a rule made by hand or by another tool: say so rather than print an empty record
        lines.append("- Where this rule was chosen is not recorded with the model: its validation figures are unknown.")
    return lines
