"""Audit results' contents (flags, thresholds) and the report's "Did it learn the disease?" section.

Every audit writes ``<audit>.json`` (``source``, ``ablation``, ``cross_source``, ``cam``) through
:mod:`covid_cxr.runs.results`, which owns the files and their shape. :func:`render_section` turns
the loaded results into Markdown or HTML for the report. The section says what the figures mean
and what they do not: the audits can show a shortcut; no audit can prove there is none.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from typing import Any

from covid_cxr import fmt
from covid_cxr.labels import DISPLAY_NAMES
from covid_cxr.runs.results import AUDITS

SECTION_TITLE = "Did it learn the disease?"

Block = tuple[Any, ...]  # ("h", text) | ("p", text) | ("ul", [text]) | ("table", header, rows)


def flag(code: str, message: str) -> dict[str, str]:
    """A finding for the user: a stable ``code`` for programs, a ``message`` for people."""
    return {"code": code, "message": message}


def threshold(value: float, why: str) -> dict[str, Any]:
    """A threshold an audit applied, with the reason for its value."""
    return {"value": value, "why": why}


# ----------------------------------------------------------------------------- the report section


def class_name(key: str) -> str:
    """'covid' -> 'COVID-19'; a name that is no class stays as it is."""
    return DISPLAY_NAMES.get(key, key)


_GENERAL_CAVEATS: tuple[str, ...] = (
    "These audits can show that a model uses something other than the disease; none of them can prove "
    "that it does not. Passing every audit does not make a model fit for diagnosis.",
    "A Grad-CAM heatmap that looks right is not proof: the maps are coarse, they show where the gradient "
    "of one layer is large, not what the decision rests on, and a map can sit on the lungs while the "
    "score comes from a marker elsewhere.",
    "A source probe that fails to predict the source does not prove the absence of shortcuts: another "
    "probe, more data or a cue this probe cannot see may still separate the sources.",
    "A score that falls when the lungs are hidden shows the model needs the lung region; it does not show "
    "that it reads the disease there. The built-in lung fields are a coarse estimate, not a segmentation.",
    "Small test sets give wide intervals: read the interval, not the point estimate.",
)


def section_blocks(results: Mapping[str, Mapping[str, Any]] | None) -> list[Block]:
    """The section as neutral blocks, rendered by :func:`render_section` to Markdown or HTML."""
    blocks: list[Block] = [("h", SECTION_TITLE)]
    if not results:
        blocks.append(
            (
                "p",
                "No audit was run for this model. Accuracy alone cannot tell whether a model learned the "
                "disease or the source of the images: run 'covid-cxr audit source', 'audit ablation', "
                "'audit cross-source' and 'audit cam' and rebuild the report.",
            )
        )
        blocks.append(("ul", list(_GENERAL_CAVEATS)))
        return blocks
    all_flags = [f for name in AUDITS for f in (results.get(name) or {}).get("flags", [])]
    if all_flags:
        blocks.append(("p", f"Warning: {len(all_flags)} finding(s) suggest the model may rely on the dataset, not the disease:"))
        blocks.append(("ul", [f["message"] for f in all_flags]))
    else:
        ran = ", ".join(name.replace("_", "-") for name in AUDITS if name in results)
        blocks.append(("p", f"No audit raised a flag (audits run: {ran}). That is the absence of evidence of a "
                            "shortcut, not evidence of its absence; see below."))
    for name in AUDITS:
        if name in results:
            blocks.extend(_RENDERERS[name](results[name]))
    blocks.append(("h3", "What these results do not show"))
    blocks.append(("ul", list(_GENERAL_CAVEATS)))
    return blocks


def _probe_row(label: str, figures: Mapping[str, Any]) -> list[str]:
    """One row of the source table: images, n, accuracy, balanced accuracy, AUC."""
    return [label, str(figures["n"]), fmt.record(figures.get("accuracy")),
            fmt.percent(figures.get("balanced_accuracy"), fraction=True),
            fmt.record(figures.get("auc"), as_percent=False)]


def _source_blocks(res: Mapping[str, Any]) -> list[Block]:
    m = res["metrics"]
    crossfit = m.get("mode") == "crossfit"
    scope = "all images" if crossfit else "all test images"
    rows = [_probe_row(f"{scope}{' (mean of the probes)' if len(m.get('probes', [])) > 1 else ''}", m["overall"])]
    for cls, w in (m.get("within_class") or {}).items():
        rows.append(_probe_row(f"{class_name(cls)} images only", w))
    for probe, pm in (m.get("by_probe") or {}).items() if len(m.get("by_probe") or {}) > 1 else ():
        rows.append(_probe_row(f"{scope}, {probe} probe alone", pm["overall"]))
    if crossfit:
        how = (f"Probes ({', '.join(m.get('probes', []))}: image statistics with a logistic regression, a small CNN "
               f"trained from scratch) were trained to tell the image's source ({', '.join(m.get('sources', []))}) "
               f"instead of its class, cross-fitted over {m.get('cv_folds')} patient-grouped parts so that every "
               f"image is scored by probes that never saw its patient ({m.get('n_scored')} of "
               f"{m.get('n_images')} images scored).")
    else:
        how = ("A linear probe on the checkpoint's frozen pooled features was trained to tell the image's source "
               f"({', '.join(m.get('sources', []))}) instead of its class, on the training pool, and tested on the "
               "test set.")
    out: list[Block] = [
        ("h3", "Can the source of an image be predicted from its pixels?"),
        ("p", f"{how} Within one class the disease cannot explain the source: high accuracy there means the sources "
              "differ in something else (markers, scanners, processing) that a classifier can use as a shortcut."),
        ("table", ["images", "n", "accuracy", "balanced accuracy", "AUC"], rows),
    ]
    if m.get("confounded_classes"):
        pairs = ", ".join(f"{class_name(c)} only from {s}" for c, s in m["confounded_classes"].items())
        out.append(("p", f"Class and source are confounded: {pairs}. For these classes a classifier can score by "
                         "recognising the source, and no figure on this data can rule that out."))
    return out


def _ablation_blocks(res: Mapping[str, Any]) -> list[Block]:
    m = res["metrics"]
    labels = {"as_is": "as is", "lungs_hidden": "lung fields hidden", "only_lungs": "only lung fields shown"}
    classes = list(m["conditions"]["as_is"].get("recall", {}))
    rows = []
    for key, label in labels.items():
        c = m["conditions"][key]
        interval = c.get("balanced_accuracy_interval")  # results written before it had one: the estimate alone
        balanced = fmt.record(interval) if interval else fmt.percent(c.get("balanced_accuracy"), fraction=True)
        rows.append([label, str(c["n"]), fmt.record(c["accuracy"]), balanced,
                     *(fmt.record(c["recall"][k]) for k in classes)])
    return [
        ("h3", "Does the score survive when the lungs are hidden?"),
        ("p", f"The test set was evaluated three times: as is, with the lung fields (grown by "
              f"{fmt.percent(m.get('hide_margin', 0.0), fraction=True)} of the image side) filled with "
              f"{m.get('fill_description', 'the image mean')}, and with everything but the lung fields so filled. "
              f"Lung fields: {m.get('mask_description', m.get('mask_source', ''))}. Chance balanced accuracy is "
              f"{fmt.percent(m.get('chance_balanced_accuracy'), fraction=True)}. A model that reads the disease should "
              "fall to chance without the lungs."),
        ("table", ["images", "n", "accuracy", "balanced accuracy"] + [f"{class_name(k)} recall" for k in classes], rows),
    ]


def _cross_source_blocks(res: Mapping[str, Any]) -> list[Block]:
    m = res["metrics"]
    cls = class_name(m["class"])
    rows = [
        [f"seen sources ({', '.join(m['in_source']['sources'])})", str(m["in_source"]["n"]), fmt.record(m["in_source"]["recall"])],
        [f"unseen source {m['source']}", str(m["unseen_source"]["n"]), fmt.record(m["unseen_source"]["recall"])],
    ]
    own = m["unseen_source"].get("left_out_own") or 0
    left_out = (f" {own} {cls} images of {m['source']} were left out: their files are byte-identical to images "
                "the model trained on." if own else "")
    return [
        ("h3", f"Does {cls} recall hold on a source the model never saw for that class?"),
        ("p", f"{cls} images from {m['source']}, a source with no {cls} image in the training pool, against "
              f"{cls} test images from the sources the model was trained on. A model that learned the disease "
              f"keeps its recall on a new source; one that learned the source loses it.{left_out}"),
        ("table", ["test images", "n", f"{cls} recall"], rows),
    ]


def _cam_blocks(res: Mapping[str, Any]) -> list[Block]:
    m = res["metrics"]
    rows = [[class_name(k), str(v["n"]), str(v.get("empty_maps", 0)), fmt.record(v["mass_in_lungs"]),
             fmt.percent(v["lung_area"], fraction=True), fmt.number(v.get("ratio"), 2)]
            for k, v in m["per_class"].items()]
    return [
        ("h3", "Where does the Grad-CAM heatmap lie?"),
        ("p", f"Share of Grad-CAM mass (for the {m.get('target', 'predicted')} class) inside the lung fields, over the "
              f"test set by true class, beside the share of the image the lung fields cover (what a uniform map "
              f"would give). Lung fields: {m.get('mask_description', '')}. A ratio near 1 means the map is no "
              "more on the lungs than chance."),
        ("table", ["true class", "n", "empty maps", "mass in lung fields", "lung area", "ratio"], rows),
    ]


_RENDERERS = {"source": _source_blocks, "ablation": _ablation_blocks, "cross_source": _cross_source_blocks,
              "cam": _cam_blocks}


def render_section(results: Mapping[str, Mapping[str, Any]] | None, form: str = "html") -> str:
    """The "Did it learn the disease?" section as an HTML or Markdown fragment."""
    blocks = section_blocks(results)
    if form == "markdown":
        return "\n\n".join(_MARKDOWN[block[0]](block) for block in blocks) + "\n"
    if form == "html":
        body = [_HTML[block[0]](block) for block in blocks]
        return "\n".join(['<section class="audit" id="did-it-learn-the-disease">', *body, "</section>"]) + "\n"
    raise ValueError(f"format must be 'html' or 'markdown'; got {form!r}")


_MARKDOWN: dict[str, Callable[[Block], str]] = {
    "h": lambda b: f"## {b[1]}",
    "h3": lambda b: f"### {b[1]}",
    "p": lambda b: b[1],
    "ul": lambda b: "\n".join(f"- {item}" for item in b[1]),
    "table": lambda b: fmt.table_of(b[1], b[2]).markdown(),
}
_HTML: dict[str, Callable[[Block], str]] = {
    "h": lambda b: f"<h2>{html.escape(b[1])}</h2>",
    "h3": lambda b: f"<h3>{html.escape(b[1])}</h3>",
    "p": lambda b: f"<p>{html.escape(b[1])}</p>",
    "ul": lambda b: "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in b[1]) + "</ul>",
    "table": lambda b: fmt.table_of(b[1], b[2]).html(),
}
