"""Cross-fold report: per-fold tables, mean ± sd over folds, pooled figures, the paper beside ours.

The paper averages the per-fold figures of Table 4; we show that (mean ± sample sd over folds)
and also the pooled figures (one confusion matrix over the concatenated predictions of all
folds) with Wilson intervals (adjusted for patients with several images, where patient ids are
known), since the mean of five rates hides how few COVID-19 images stand behind them. Output:
``report.md`` (+ ``report_files/*.png``), one self-contained ``report.html`` (inline CSS, plots as
base64 PNG, no external URL) and ``summary.json``.

Everything is checked and rendered before the first byte is written; then each file is written
atomically, and only the images an earlier report left and this one no longer links are removed.
A refused report leaves the previous one as it was.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from covid_cxr import fmt
from covid_cxr.atomic import read_json_object, write_bytes, write_json, write_text
from covid_cxr.audit.results import render_section
from covid_cxr.config import TrainConfig, load_config
from covid_cxr.data.manifest import safe_name
from covid_cxr.data.names import printable
from covid_cxr.errors import DataError
from covid_cxr.evaluate import plots
from covid_cxr.evaluate.metrics import CLUSTER_NOTE, COUNTS, RATES, table3_row, table4_row
from covid_cxr.evaluate.paper import paper_average, paper_network_name
from covid_cxr.evaluate.predictions import (
    Predictions,
    read_predictions,
    validate_predictions,
)
from covid_cxr.evaluate.run import roc_marks
from covid_cxr.fmt import Table
from covid_cxr.labels import CLASSES, DISPLAY_NAMES
from covid_cxr.networks import NETWORK_NAMES, network_entry
from covid_cxr.operating_point import OperatingPoint, where_chosen
from covid_cxr.report.sections import comparison_table, describe_rules, operating_tables
from covid_cxr.runs.evaluations import (
    external_evaluations,
    model_file,
    no_internal_text,
    pairs_with,
)
from covid_cxr.runs.folder import BEST, RunFolder
from covid_cxr.runs.own_images import describe as describe_own
from covid_cxr.stats import DEFAULT_PREVALENCES

TABLE4_KEYS: tuple[str, ...] = ("accuracy", *(f"{c}_{r}" for r in RATES for c in CLASSES))
EXTRA_KEYS: tuple[str, ...] = (
    "balanced_accuracy", *(f"{c}_f1" for c in CLASSES), *(f"{c}_auc" for c in CLASSES), "ece",
)
PLOT_FILES: tuple[str, ...] = ("confusion_matrix.png", "roc.png", "calibration.png")
COUNT_KEYS: tuple[str, ...] = ("n", *(f"{c}_{k}" for c in CLASSES for k in ("correct", "missed", "false")))
AUC_KEYS: tuple[str, ...] = (*(f"{c}_auc{end}" for c in CLASSES for end in ("", "_ci_low", "_ci_high")),
                             "auc_bootstrap")
# The settings that make a fold's model what it is (config.yaml, and run.json's split protocol): folds averaged
# into one mean must share them, as the paper's five folds share Table 2. The seed may differ per fold (another
# draw of the same recipe), as may how a run was executed (device, precision, workers) and where the data lay.
TRAINING_KEYS: tuple[str, ...] = ("preset", "pretrained", "epochs_per_phase", "image_size", "batch_size", "lr",
                                  "nadam_eps", "nadam_momentum_decay", "drop_rate", "bn_momentum", "scaling",
                                  "augment", "protocol")
SETTINGS_SHOWN: tuple[str, ...] = ("preset", "pretrained", "epochs_per_phase", "image_size", "batch_size", "lr",
                                   "seed")
MIXED_FLAG = "--allow-mixed-settings"


@dataclass
class FoldResult:
    """One evaluated fold: its predictions, figures and where they came from."""

    network: str
    fold: int | str
    split: str
    eval_dir: Path | None
    preds: Predictions
    metrics: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] | None = None  # the training settings of the run around it (None: no run folder)

    @property
    def external(self) -> bool:
        return self.info.get("kind") == "external"


_WORDS = {"auc": "AUC", "f1": "F1", "ece": "ECE (calibration error)"}


def _label(key: str) -> str:
    """'covid_recall' -> 'COVID-19 recall'."""
    for c in CLASSES:
        if key.startswith(c + "_"):
            rest = key[len(c) + 1:]
            return f"{DISPLAY_NAMES[c]} {_WORDS.get(rest, rest.replace('_', ' '))}"
    return _WORDS.get(key, key.replace("_", " "))


def load_evaluation(path: Path, *, n_boot: int = 1000) -> FoldResult:
    """Read one evaluation: a run folder (its ``eval-test/``), an eval folder, or a predictions CSV."""
    path = Path(path)
    run_eval = path / "eval-test" / "predictions.csv"
    if path.is_dir() and not (path / "predictions.csv").is_file() and run_eval.is_file():
        path = run_eval.parent
    if path.is_dir():
        eval_dir, csv = path, path / "predictions.csv"
    elif path.is_file():
        eval_dir, csv = path.parent, path
    else:
        raise DataError(f"{path}: no such run, evaluation folder or predictions file")
    if not csv.is_file():
        if (path / "prepare.json").is_file() and (path / "manifest.csv").is_file():
            raise DataError(f"{path} is a prepared data folder, not a run: give the run folders that 'covid-cxr train "
                            f"{path}' made (runs/NETWORK-foldK by default), after 'covid-cxr evaluate RUN'")
        raise DataError(f"{path}: no predictions.csv; run 'covid-cxr evaluate {path}' first")
    info: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    meta_file = eval_dir / "metrics.json"
    if csv.name == "predictions.csv" and not meta_file.is_file() and RunFolder(eval_dir.parent).exists():
        # evaluate writes metrics.json last: without it, this folder's evaluation stopped part-way
        again = f"covid-cxr evaluate {eval_dir.parent}" + (" --external DATA" if eval_dir.name.startswith(
            "external-") else "")
        raise DataError(f"{eval_dir}: an evaluation that did not finish (predictions.csv but no metrics.json: it "
                        f"was stopped part-way); run '{again}' again, or remove {eval_dir}")
    if meta_file.is_file() and csv.name == "predictions.csv":
        saved = read_json_object(meta_file, what="an evaluation's metrics", fix="re-run 'covid-cxr evaluate'")
        info = saved.get("evaluation", {}) or {}
    preds = read_predictions(csv)
    # Recomputed from the predictions, the one source of truth, rather than trusted from metrics.json; the AUCs
    # alone are evaluate's, with the interval of its bootstrap (resamples, seed) on the unwritten probabilities.
    metrics = _with_saved_auc(preds.metrics(n_boot=n_boot), saved)
    # Without metrics.json a fold is named by its folder (RUN/eval-test/predictions.csv) or its file name.
    fold = info.get("fold") or (csv.parent.name if csv.name == "predictions.csv" else csv.stem)
    return FoldResult(network=str(info.get("network") or "unknown"), fold=fold,
                      split=str(info.get("split") or "test"), eval_dir=eval_dir if info else None,
                      preds=preds, metrics=metrics, info=info, settings=run_settings(eval_dir) if info else None)


def run_settings(eval_dir: Path) -> dict[str, Any] | None:
    """The training settings of the run folder an evaluation lies in (its config.yaml, and run.json's split
    protocol); None where no run folder holds it (an evaluation written elsewhere), so nothing to compare."""
    folder = RunFolder(eval_dir.parent)
    if not folder.config.is_file():
        return None
    data = load_config(folder.config).to_dict()  # a damaged file raises ConfigError naming it
    protocol = folder.info().protocol if folder.exists() else None
    return {"run": str(folder.root), **{k: data.get(k) for k in (*TRAINING_KEYS, "seed") if k != "protocol"},
            "protocol": protocol}


def _with_saved_auc(metrics: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with the AUCs, their intervals and the bootstrap record from ``saved`` (metrics.json), where it
    describes these very predictions (the same counts); else ``metrics`` as they are."""
    if not saved or any(saved.get(k) != metrics.get(k) for k in COUNT_KEYS) or any(k not in saved for k in AUC_KEYS):
        return metrics
    taken = {k: math.nan if saved[k] is None else saved[k] for k in AUC_KEYS}
    return {**metrics, **taken}


def _fold_order(r: FoldResult) -> tuple[int, int, str]:
    """Folds 1, 2, ..., 10 in numeric order; named ones after them."""
    text = str(r.fold)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _pooled(results: Sequence[FoldResult], n_boot: int) -> tuple[Predictions, dict[str, Any]]:
    frames = []
    for r in results:
        frame = r.preds.frame.copy()
        if "patient_id" not in frame.columns:
            frame["patient_id"] = [f"fold{r.fold}-row{i}" for i in range(len(frame))]  # images as their own group
        frames.append(frame)
    has_probs = all(r.preds.has_probs for r in results)
    pooled = pd.concat(frames, ignore_index=True)
    if not has_probs:
        pooled = pooled.drop(columns=[c for c in pooled.columns if c.startswith("p_")])
    preds = validate_predictions(pooled, "pooled predictions")
    if len(results) == 1 and all(k in results[0].metrics for k in AUC_KEYS):
        # One fold pooled is that fold: its AUC intervals are evaluate's (as the model card shows them), not a second
        # bootstrap of the same predictions with other resamples, which would differ in the third decimal.
        return preds, _with_saved_auc(preds.metrics(n_boot=0), results[0].metrics)
    return preds, preds.metrics(n_boot=n_boot)


def summarize(results: Sequence[FoldResult], *, paper_network: str | None = None, n_boot: int = 1000) -> dict[str, Any]:
    """Per-fold rows, mean and sample sd over folds, pooled figures with CIs, and the paper's average row."""
    per_fold = pd.DataFrame([{"fold": r.fold, **{k: r.metrics.get(k, math.nan) for k in (*TABLE4_KEYS, *EXTRA_KEYS)}}
                             for r in results])
    numeric = per_fold.drop(columns=["fold"]).astype(float)
    pooled_preds, pooled = _pooled(results, n_boot)
    return {
        "folds": [r.fold for r in results],
        "table3": [{"fold": r.fold, **table3_row(r.preds.confusion())} for r in results],
        "per_fold": per_fold.to_dict(orient="records"),
        "mean": numeric.mean(skipna=False).to_dict(),
        # Over the same folds as the mean: a fold where a figure is undefined leaves both undefined.
        "sd": (numeric.std(ddof=1, skipna=False).to_dict() if len(results) > 1
               else {k: math.nan for k in numeric.columns}),
        "pooled": pooled,
        "pooled_table3": table3_row(pooled_preds.confusion()),
        "pooled_table4": table4_row(pooled_preds.confusion()),
        "paper_network": paper_network,
        "paper_average": paper_average(paper_network) if paper_network else None,
        "_pooled_preds": pooled_preds,
    }


def render_audit_section(audit: dict[str, Any] | None) -> tuple[str, str]:
    """AUDIT PLUG-IN POINT: the "Did it learn the disease?" section, as (Markdown, HTML).

    ``audit`` is what :func:`covid_cxr.audit.results.load_results` returns (one entry per audit
    run: source, ablation, cross_source, cam); the audit area renders it. Renders nothing at
    all when there are no audit results.
    """
    if not audit:
        return "", ""
    return render_section(audit, "markdown"), render_section(audit, "html")


def _counts_table(summary: dict[str, Any]) -> Table:
    keys = [f"{c}_{k}" for c in CLASSES for k in COUNTS]
    rows = [[str(row["fold"]), *(str(row[k]) for k in keys)] for row in summary["table3"]]
    rows.append(["pooled", *(str(summary["pooled_table3"][k]) for k in keys)])
    return Table(["fold", *(_label(k) for k in keys)], rows)


def _rates_table(summary: dict[str, Any], keys: Sequence[str], with_paper: bool) -> Table:
    """Metrics as rows; folds, mean ± sd, pooled [95% CI] and the paper's average as columns."""
    mean_sd = "mean ± sd (mixed settings)" if summary.get("mixed_settings") else "mean ± sd"
    headers = ["metric", *(f"fold {f}" for f in summary["folds"]), mean_sd, "pooled [95% CI]"]
    if with_paper:
        n = len(summary["folds"])
        headers += [f"paper avg ({summary['paper_network']}, 5 folds)",
                    "mean − paper" if n == 5 else f"mean of {n} fold{'s' if n > 1 else ''} − paper's 5"]
    rows = []
    for key in keys:
        values = [r[key] for r in summary["per_fold"]] + [summary["pooled"].get(key, math.nan)]
        if all(v is None or math.isnan(v) for v in values):
            continue  # e.g. AUC and ECE when the predictions carry no probabilities
        digits = 3 if key.endswith("_auc") else 2
        row = [_label(key), *(fmt.number(r[key], digits) for r in summary["per_fold"])]
        mean, sd = summary["mean"][key], summary["sd"][key]
        row.append(fmt.mean_sd(mean, sd, digits))
        pooled = summary["pooled"]
        row.append(fmt.interval(pooled.get(key), pooled.get(f"{key}_ci_low"), pooled.get(f"{key}_ci_high"), digits))
        if with_paper:
            paper = summary["paper_average"].get(key) if summary["paper_average"] else None
            # The mean rounding to zero from below is no difference: "+0.00", not "-0.00".
            diff = (fmt.NA if paper is None or math.isnan(mean) else
                    fmt.signed(mean - paper, 2).replace("-0.00", "+0.00"))
            row += [fmt.number(paper), diff]
        rows.append(row)
    return Table(headers, rows)


def _network_figures(summary: dict[str, Any], title: str, ops: Sequence[dict[str, Any] | None] = ()
                     ) -> dict[str, bytes]:  # fmt: skip
    """The pooled plots as PNG bytes (ROC, with the folds' decisions marked, and calibration only with probabilities);
    ``ops``: each fold's operating point."""
    preds: Predictions = summary["_pooled_preds"]
    cm = preds.confusion()
    figs = {"confusion_matrix": plots.confusion_figure(cm, title=f"{title}: pooled over folds (N = {int(cm.sum())})")}
    if preds.has_probs:
        m = summary["pooled"]
        aucs = {c: (m[f"{c}_auc"], m[f"{c}_auc_ci_low"], m[f"{c}_auc_ci_high"]) for c in CLASSES}
        figs["roc"] = plots.roc_figure(preds.true_idx, preds.probs, aucs=aucs, title=f"{title}: ROC, pooled",
                                       marks=roc_marks(m, ops))
        ece = fmt.percent(m["ece"], 2)
        figs["calibration"] = plots.calibration_figure(preds.true_idx, preds.probs,
                                                       title=f"{title}: calibration, pooled (ECE {ece})")
    return {name: plots.figure_png(fig) for name, fig in figs.items()}


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#1b1b1b}table{border-collapse:collapse;margin:.8rem 0;font-size:.86rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}th{background:#f2f4f7}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee;margin:.3rem}
.note{color:#6b4e00;background:#fff7e0;padding:.4rem .7rem;border-left:3px solid #e0a800}
details{margin:.6rem 0}summary{cursor:pointer;font-weight:600}"""


class _Doc:
    """The report's Markdown and HTML, written side by side."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.body: list[str] = []

    def heading(self, level: int, text: str) -> None:
        self.md += ["#" * level + " " + text, ""]
        self.body.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str, css: str = "") -> None:
        self.md += [text, ""]
        self.body.append(f"<p class='{css}'>{html.escape(text)}</p>" if css else f"<p>{html.escape(text)}</p>")

    def table(self, table: Table) -> None:
        self.md += [table.markdown(), ""]
        self.body.append(table.html())


def _decision_section(doc: _Doc, cm: Any, infos: Sequence[dict[str, Any]], prevalences: Sequence[float],
                      level: int = 3) -> None:
    """The operating point: its rule, and sensitivity, specificity, PPV, NPV at it, also at other prevalences."""
    op = OperatingPoint.from_dict(infos[0].get("operating_point") if infos else None)
    figures, at_prev = operating_tables(cm, op.positive_class, prevalences)
    doc.heading(level, "Operating point")
    chosen = where_chosen([OperatingPoint.from_dict(i.get("operating_point")) for i in infos])
    chosen = f" {chosen}" if chosen else ""
    doc.para(f"Decision rule: {describe_rules(infos)}.{chosen} {DISPLAY_NAMES[op.positive_class]} against the rest "
             "at the decisions made, with 95% Wilson intervals (adjusted for patients where one patient has "
             "several images: the cell then names the patients); PPV and NPV at other prevalences follow from "
             "sensitivity and specificity by Bayes' rule, their intervals from theirs.")
    doc.table(figures)
    doc.table(at_prev)


def _external_key(r: FoldResult) -> tuple[str, str, str, str]:
    """(network, fold, set name, model file) of an external evaluation; fold is "" when the run did not record one,
    the model file "" for a run's best.pt (its exported or last model evaluated on the same set is another)."""
    fold = r.info.get("fold")
    model = Path(model_file(r.info)).name
    return (r.network, "" if fold is None else str(fold), str(r.info.get("name") or r.fold),
            "" if model in ("", BEST) else model)


def _internal_beside(r: FoldResult, internals: Sequence[FoldResult], network_label: str | None
                     ) -> tuple[str, Any, dict[str, Any]] | None:  # fmt: skip
    """The internal test figures of the same model file, fold and rule as external ``r``: that fold's own, never
    pooled over folds (other models); None when none of the evaluations given is such a pair."""
    match = next((i for i in internals if pairs_with(r.info, i.info)), None)
    if match is None:
        return None
    cm = match.preds.confusion(by_patient=True)
    label = network_label or paper_network_name(match.network) or match.network
    return f"internal: {label} fold {match.fold} test (N = {int(cm.sum())})", cm, match.metrics


def _external_section(doc: _Doc, r: FoldResult, internal: tuple[str, Any, dict[str, Any]] | None,
                      prevalences: Sequence[float], images: dict[str, bytes]) -> dict[str, Any]:
    """One external evaluation beside the internal test figures of the same model: the drop, with intervals.

    Each fold of a cross-validated network is evaluated on the external set separately, so the heading
    and the image files name the network, the fold (and a model file other than best.pt): one section, and
    one set of files, per model. A set holding the model's own images says so in its heading.
    """
    network, fold, name, model = _external_key(r)
    which = f"{network} fold {fold}" if fold else network
    which += f" ({model})" if model else ""
    cm = r.preds.confusion(by_patient=True)  # one per patient where ids are known: the intervals allow for them
    absent = [DISPLAY_NAMES[c] for c in r.info.get("classes_absent", r.metrics.get("absent_classes", []))]
    own = describe_own(r.info.get("own_images"))
    doc.heading(3, f"{which} on {name} (N = {int(cm.sum())})" + (f": {own}" if own else ""))
    text = f"Model {r.info.get('model', '')}; data {r.info.get('data', r.preds.path)}."
    if own:
        text += f" {own[0].upper()}{own[1:]}: these figures are not external validation; leave those images out."
    if absent:
        text += f" Absent from this set (no images, so no recall or AUC; not zero): {', '.join(absent)}."
    if internal is None:
        text += f" No drop: {no_internal_text(r.info)} (and give its run or eval-test folder to the report)."
    ci_record = r.metrics.get("rate_intervals") or {}
    if ci_record.get("method", "wilson") != "wilson":
        text += (f" Its {ci_record['images']} images come from {ci_record['patients']} patients: the rates' "
                 "intervals allow for that (Wilson's on a design-effect-adjusted sample size).")
    doc.para(text)
    ext_title = f"external: {name} (N = {int(cm.sum())})"
    doc.table(comparison_table(internal, (ext_title, cm, r.metrics)))
    _decision_section(doc, cm, [r.info], prevalences, level=4)
    parts = (f"external-{network}", f"fold{fold}" if fold else "", name, safe_name(model) if model else "")
    slug = "-".join(p for p in parts if p)
    for plot in ("confusion_matrix.png", "roc.png"):
        if r.eval_dir is not None and (r.eval_dir / plot).is_file():
            png = (r.eval_dir / plot).read_bytes()
            target = f"{slug}-{plot}"
            images[target] = png
            doc.md += [f"![{which} on {name} {plot}](report_files/{target})", ""]
            doc.body.append(_img(png, f"{which} on {name} {plot}"))
    return {"name": name, "info": r.info, "metrics": r.metrics, "internal": internal[0] if internal else None}


def _gather(runs: Sequence[Path], n_boot: int) -> tuple[list[FoldResult], list[FoldResult]]:
    """(internal, external) evaluations: those named, and the external-*/ ones inside named run folders."""
    results = [load_evaluation(Path(r), n_boot=n_boot) for r in runs]
    named = {r.eval_dir.resolve() for r in results if r.eval_dir is not None}
    for run in runs:
        for ext in external_evaluations(Path(run)):
            if ext.resolve() not in named:
                named.add(ext.resolve())
                results.append(load_evaluation(ext, n_boot=n_boot))
    return [r for r in results if not r.external], [r for r in results if r.external]


def _check(groups: dict[tuple[str, str], list[FoldResult]], externals: Sequence[FoldResult],
           network_label: str | None) -> None:
    """Refuse what would make a wrong report, before anything is written: one label for several networks,
    a fold given twice (the mean over folds would count it twice), an external evaluation given twice."""
    if network_label and len(groups) > 1:
        raise DataError(f"--network-label names one network, but the runs hold {len(groups)}: "
                        f"{', '.join(f'{n} ({s})' for n, s in groups)}; report them separately")
    for (network, _), members in groups.items():
        folds = [str(r.fold) for r in members]
        twice = sorted({f for f in folds if folds.count(f) > 1})
        if twice:
            raise DataError(f"two evaluations of {network} on fold {twice[0]}; give each fold once")
    keys = [_external_key(r) for r in externals]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        network, fold, name, model = twice
        raise DataError(f"two external evaluations of {network}{f' fold {fold}' if fold else ''}"
                        f"{f' ({model})' if model else ''} on {name}; give each once")


def _mixed_settings(groups: dict[tuple[str, str], list[FoldResult]],
                    allow_mixed: bool) -> dict[tuple[str, str], list[str]]:
    """Per network group, the training settings its folds differ in; refused (before anything is written) unless
    ``allow_mixed``: the mean over folds, and the paper's figures beside it, stand for one training recipe."""
    mixed: dict[tuple[str, str], list[str]] = {}
    for (network, split), members in groups.items():
        known = [(f"fold {r.fold} ({r.settings['run']})", r.settings) for r in members if r.settings]
        differ = [k for k in TRAINING_KEYS if len({_same(settings.get(k)) for _, settings in known}) > 1]
        mixed[(network, split)] = differ
        if differ and not allow_mixed:
            detail = "; ".join(f"{k}: " + ", ".join(f"{run} {settings.get(k)!r}" for run, settings in known)
                               for k in differ)
            raise DataError(f"the {network} runs were trained with different settings ({detail}); a mean over them "
                            "is no figure of one training recipe (the paper's folds share one; the seed alone may "
                            f"differ per fold). Report them separately, or pass {MIXED_FLAG} to report them together "
                            "(each fold's settings are then listed and the mean is marked mixed)")
    return mixed


def _same(value: Any) -> str:
    """A setting's value in a form that compares equal exactly when the values do (dicts included)."""
    return yaml.safe_dump(value, sort_keys=True)


def _setting(value: Any) -> str:
    if value is None:
        return fmt.NA
    return f"{value:g}" if isinstance(value, float) else str(value)


def _settings_table(members: Sequence[FoldResult], network: str, with_paper: bool) -> Table | None:
    """Each fold's training settings (config.yaml), and the paper's Table 2 beside them; None without any."""
    rows = [[f"fold {r.fold}", *(_setting(r.settings.get(k)) for k in SETTINGS_SHOWN)] for r in members if r.settings]
    if not rows:
        return None
    if with_paper and network in NETWORK_NAMES:
        paper, entry = TrainConfig(), network_entry(network)
        rows.append(["paper (Table 2)", "paper", paper.pretrained, str(paper.epochs_per_phase), str(entry.image_size),
                     str(entry.paper_batch_size), _setting(paper.lr), fmt.NA])
    return Table(["run", *(k.replace("_", " ") for k in SETTINGS_SHOWN)], rows)


def _settings_section(doc: _Doc, members: Sequence[FoldResult], network: str, summary: dict[str, Any]) -> None:
    """The folds' training settings beside the paper's, and a warning where the mean is over mixed settings."""
    table = _settings_table(members, network, with_paper=summary["paper_average"] is not None)
    if table is None:
        return
    doc.heading(3, "Training settings (config.yaml of each run)")
    doc.table(table)
    if summary["mixed_settings"]:
        doc.para(f"Mixed settings: these folds differ in {', '.join(summary['mixed_settings'])} (reported together "
                 f"by {MIXED_FLAG}): the mean over them is not one training recipe's, as the paper's is.", "note")


def _publish(out: Path, images: dict[str, bytes], md: str, summary: dict[str, Any], page: str) -> Path:
    """Write the rendered report, each file atomically: images first, so report.md never links a missing one;
    then remove the images an earlier report left that this one no longer links. Returns report.html."""
    files_dir = out / "report_files"
    for name, png in images.items():
        write_bytes(files_dir / name, png)
    write_text(out / "report.md", printable(md))  # a data folder's path may hold bytes that are not UTF-8
    write_json(out / "summary.json", summary)
    path = write_text(out / "report.html", printable(page))
    if files_dir.is_dir():
        for old in files_dir.glob("*.png"):
            if old.name not in images:
                old.unlink()
    return path


def write_report(runs: Sequence[Path], out: Path, *, network_label: str | None = None,
                 audit: dict[str, Any] | None = None, n_boot: int = 1000,
                 prevalences: Sequence[float] = DEFAULT_PREVALENCES, allow_mixed_settings: bool = False,
                 remarks: Sequence[str] = ()) -> Path:
    """Write report.md, report.html and summary.json for evaluated runs; return the HTML path.

    Runs are grouped by network (and split); two runs of one network on the same fold are
    refused, since the mean over folds would count that fold twice, and so are folds trained with
    different settings (their run folders' config.yaml) unless ``allow_mixed_settings``, which lists
    each fold's settings and marks the mean mixed. ``remarks`` are said under the introduction
    (``cv`` says there which folds it ran and which it found finished). External evaluations (named,
    or found as ``RUN/external-NAME*/``) are shown beside the internal test figures of the same model
    file, fold and rule among those given, or say that none was given.
    """
    if not runs:
        raise DataError("no runs given; pass the run folders (or eval folders / predictions files) to report on")
    results, externals = _gather(runs, n_boot)
    groups: dict[tuple[str, str], list[FoldResult]] = {}
    for r in results:
        groups.setdefault((r.network, r.split), []).append(r)
    _check(groups, externals, network_label)
    mixed = _mixed_settings(groups, allow_mixed_settings)
    images: dict[str, bytes] = {}  # report_files/NAME -> PNG bytes, written once everything is rendered
    intro = ("Per fold, the paper's Table 3 counts and Table 4 percentages. 'mean ± sd' averages the per-fold "
             "figures as the paper does (sd: sample standard deviation over folds); 'pooled' counts all folds' "
             "predictions in one confusion matrix, with a 95% Wilson interval. Where patient ids are known, a rate "
             "with several images of one patient (or one image tested in several folds, as the paper's protocol "
             "tests most RSNA images) gets Wilson's interval on a design-effect-adjusted sample size, and a note "
             "gives the patients behind each rate; without them the pooled intervals treat such images as "
             "independent and are too narrow. The AUC bootstrap resamples whole patients where patient ids are "
             "known.")
    doc = _Doc()
    doc.heading(1, "Evaluation report")
    doc.para(intro)
    for remark in remarks:
        doc.para(remark)
    md, body = doc.md, doc.body
    summary_json: dict[str, Any] = {}
    for (network, split), members in groups.items():
        members.sort(key=_fold_order)
        label = network_label or paper_network_name(network) or network
        # The paper's averages are of its 5 folds' test sets: nothing to set beside validation or external figures.
        paper_name = ((paper_network_name(network_label or "") or paper_network_name(network))
                      if split == "test" else None)
        summary = summarize(members, paper_network=paper_name, n_boot=n_boot)
        summary["mixed_settings"] = mixed[(network, split)]
        summary["settings"] = {str(r.fold): r.settings for r in members if r.settings is not None}
        slug = f"{network}-{split}"
        title = f"{label} ({split} split, {len(members)} fold{'s' if len(members) > 1 else ''})"
        counts = _counts_table(summary)
        rates = _rates_table(summary, TABLE4_KEYS, with_paper=summary["paper_average"] is not None)
        extras = _rates_table(summary, EXTRA_KEYS, with_paper=False)
        boot = summary["pooled"].get("auc_bootstrap", {})
        resamples = f", {boot['resamples']} resamples" if boot.get("resamples") else ""
        extras_title = (f"More figures (AUC on 0-1, CI from a bootstrap over {boot.get('unit', 'patient')}s"
                        f"{resamples}; ECE in %)")
        # The per-fold columns carry no interval: only the pooled figures' note on patients applies.
        notes = sorted(set(summary["pooled"]["notes"]) | {n for r in members for n in r.metrics["notes"]
                                                          if not n.startswith(CLUSTER_NOTE)})
        ci_record = summary["pooled"].get("rate_intervals", {})
        table4_ci = (f"with 95% CI: {ci_record['label']}" if ci_record.get("method", "wilson") != "wilson"
                     else "with Wilson 95% CI")
        infos = [r.info for r in members]
        figures = _network_figures(summary, label, [info.get("operating_point") for info in infos])
        sources = ", ".join(f"fold {r.fold}: {r.eval_dir or r.preds.path}" for r in members)
        md += [f"## {title}", "", f"Evaluations: {sources}", "",
               "### Table 3: counts per fold", "", counts.markdown(), ""]
        body += [f"<h2>{html.escape(title)}</h2>", f"<p>Evaluations: {html.escape(sources)}</p>",
                 "<h3>Table 3: counts per fold</h3>", counts.html()]
        _settings_section(doc, members, network, summary)
        table4_title = f"Table 4: percentages (mean ± sd over folds, as the paper averages; pooled {table4_ci})"
        md += [f"### {table4_title}", "", rates.markdown(), "", f"### {extras_title}", "",
               extras.markdown(), ""]
        body += [f"<h3>{html.escape(table4_title)}</h3>", rates.html(), f"<h3>{html.escape(extras_title)}</h3>",
                 extras.html()]
        if notes:
            md += ["Notes: " + "; ".join(notes), ""]
            body.append(f"<p class='note'>{html.escape('; '.join(notes))}</p>")
        pooled_cm = summary["_pooled_preds"].confusion(by_patient=True)
        _decision_section(doc, pooled_cm, infos, prevalences)
        md += ["### Plots (pooled over folds)", ""]
        body.append("<h3>Plots (pooled over folds)</h3>")
        for name, png in figures.items():
            images[f"{slug}-{name}.png"] = png
            md.append(f"![{name}](report_files/{slug}-{name}.png)")
            body.append(_img(png, f"{label} {name}"))
        md.append("")
        per_fold_imgs = [(r, p) for r in members if r.eval_dir for p in PLOT_FILES if (r.eval_dir / p).is_file()]
        if per_fold_imgs:
            md += ["### Per-fold plots", ""]
            body.append("<details><summary>Per-fold plots</summary>")
            for r, name in per_fold_imgs:
                png = (r.eval_dir / name).read_bytes()  # type: ignore[operator]
                target = f"{slug}-fold{r.fold}-{name}"
                images[target] = png
                md.append(f"![fold {r.fold} {name}](report_files/{target})")
                body.append(_img(png, f"fold {r.fold} {name}"))
            body.append("</details>")
            md.append("")
        summary_json[slug] = {k: v for k, v in summary.items() if not k.startswith("_")}
    if externals:
        doc.heading(2, "External validation: internal and external side by side")
        doc.para("Each external evaluation stands beside the internal test figures of the same model file (by its "
                 "sha256), fold and decision rule: that fold's own test set, not the folds pooled. The drop is "
                 "external minus internal, in percentage points, with Newcombe's hybrid score interval for two "
                 "independent proportions, built from the two sides' intervals (adjusted for patients where a "
                 "cell names them; AUC: a normal approximation from the two bootstrap intervals). A class "
                 "absent from a set is marked absent: its recall and AUC are undefined there, not zero.")
        summary_json["external"] = [
            _external_section(doc, r, _internal_beside(r, results, network_label), prevalences, images)
            for r in externals]
    audit_md, audit_html = render_audit_section(audit)  # the audit plug-in point
    if audit_md:
        md.append(audit_md)
        body.append(audit_html)
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>covid-cxr evaluation report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
    return _publish(Path(out), images, "\n".join(md) + "\n", summary_json, page)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


__all__ = ["FoldResult", "load_evaluation", "render_audit_section", "summarize", "write_report"]
