"""Report sections about decisions: the operating point, and internal against external validation.

Both are built from confusion matrices (the decisions actually made, ``pred`` in the predictions
files), so they hold for any rule, argmax included. Proportions carry Wilson intervals, adjusted for
patients where the matrices are one per patient (P, C, C) and a patient has several images (the cell
then names the patients behind it); a drop between two independent sets carries Newcombe's hybrid
score interval built from those; an AUC drop carries a normal approximation from the two
patient-bootstrap intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from covid_cxr import fmt
from covid_cxr.evaluate.metrics import (
    binary_figures,
    decision_summary,
    overall_accuracy,
    pooled_confusion,
    rate_proportions,
)
from covid_cxr.fmt import Table
from covid_cxr.labels import CLASSES, DISPLAY_NAMES
from covid_cxr.operating_point import OperatingPoint
from covid_cxr.stats import Proportion, difference_interval

ABSENT = "absent (no images)"


def describe_rules(infos: Sequence[dict[str, Any]]) -> str:
    """The rule(s) behind a set of evaluations, one line each when they differ."""
    lines = sorted({OperatingPoint.from_dict(i.get("operating_point")).describe() for i in infos})
    return "; ".join(lines) if lines else OperatingPoint().describe()


def rate_cell(rate: Proportion) -> str:
    """``89.2 [73.1, 96.0] (66/74, 22 patients)``: :func:`covid_cxr.fmt.proportion`, naming the patients behind n
    where they are fewer than the images (the interval is then adjusted for them)."""
    return fmt.proportion(rate, patients=rate.patients if rate.clustered else None)


def ci_header(rates: Sequence[Proportion], unit: str = "% [95% CI] (k/n)") -> str:
    """``% [95% Wilson CI] (k/n)``, or ``% [95% CI: Wilson, adjusted for patients] (k/n, patients)`` where a rate
    of ``rates`` has several images of one patient."""
    if any(r.clustered for r in rates):
        return unit.replace("CI]", "CI: Wilson, adjusted for patients]").replace("(k/n)", "(k/n, patients)")
    return unit.replace("CI]", "Wilson CI]")


def operating_tables(cm: np.ndarray, positive_class: str, prevalences: Sequence[float]) -> tuple[Table, Table]:
    """(sensitivity, specificity, PPV, NPV with CIs; PPV and NPV at each prevalence) for the decisions in ``cm``
    (pooled, or one matrix per patient for intervals that allow for patients with several images)."""
    k = CLASSES.index(positive_class)
    fig = binary_figures(cm, k)
    name = DISPLAY_NAMES[positive_class]
    figures = Table(["figure", ci_header([fig.sensitivity, fig.specificity, fig.ppv, fig.npv])], [
        [f"{name} sensitivity", rate_cell(fig.sensitivity)],
        [f"{name} specificity", rate_cell(fig.specificity)],
        ["PPV (at this set's own prevalence)", rate_cell(fig.ppv)],
        ["NPV (at this set's own prevalence)", rate_cell(fig.npv)],
    ])
    summary = decision_summary(cm, k, prevalences)
    own = fmt.percent(summary["test_prevalence"], 2, fraction=True)
    rows = [[f"{own} (this set)", rate_cell(fig.ppv), rate_cell(fig.npv)]]
    for at in summary["at_prevalence"]:
        rows.append([fmt.percent(at["prevalence"], None, fraction=True),
                     fmt.interval(at["ppv"], at["ppv_ci_low"], at["ppv_ci_high"], 2),
                     fmt.interval(at["npv"], at["npv_ci_low"], at["npv_ci_high"], 2)])
    at_prev = Table([f"{name} prevalence", "PPV % [CI]", "NPV % [CI]"], rows)
    return figures, at_prev


def _proportions(cm: np.ndarray) -> dict[str, Proportion]:
    """Every proportion of the comparison, by metric key (adjusted for patients where ``cm`` is one per patient)."""
    out = {"accuracy": overall_accuracy(cm)}
    props = {c: rate_proportions(cm, k) for k, c in enumerate(CLASSES)}
    for c in CLASSES:
        out.update({f"{c}_{rate}": prop for rate, prop in props[c].items() if rate not in ("accuracy", "npv")})
    out["covid_npv"] = props["covid"]["npv"]
    return out


def _label(key: str) -> str:
    cls, _, rate = key.partition("_")
    if not rate:
        return key
    return f"{DISPLAY_NAMES[cls]} {'NPV' if rate == 'npv' else 'AUC' if rate == 'auc' else rate}"


def _auc_drop(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    """External minus internal AUC, with a normal approximation from the two bootstrap intervals."""
    va, vb = a.get(key, math.nan), b.get(key, math.nan)
    if any(v is None or math.isnan(v) for v in (va, vb)):
        return fmt.NA
    halves = [(m.get(f"{key}_ci_high", math.nan) - m.get(f"{key}_ci_low", math.nan)) / 2 for m in (a, b)]
    half = math.nan if any(h is None or math.isnan(h) for h in halves) else math.hypot(*halves)
    return fmt.interval(vb - va, vb - va - half, vb - va + half, 3, sign=True)


def comparison_table(internal: tuple[str, np.ndarray, dict[str, Any]] | None,
                     external: tuple[str, np.ndarray, dict[str, Any]]) -> Table:
    """Metrics as rows; internal, external and the drop (external − internal) [95% CI] as columns.

    Each side is (column title, confusion matrix, metrics); a matrix per patient (P, C, C,
    :meth:`~covid_cxr.evaluate.predictions.Predictions.confusion` with ``by_patient=True``) makes the rates'
    intervals, and the drops built from them, allow for patients with several images. A class with no image in
    a set is shown as absent there, and has no drop, rather than a recall of zero.
    """
    ext_name, ext_cm, ext_m = external
    int_name, int_cm, int_m = internal if internal is not None else ("internal (not given)", None, {})
    headers = ["metric", int_name, ext_name, "drop: external − internal [95% CI] (rates in points, AUC on 0-1)"]
    ext_p = _proportions(ext_cm)
    int_p = _proportions(int_cm) if int_cm is not None else {}
    ext_cm = pooled_confusion(ext_cm)
    int_cm = pooled_confusion(int_cm) if int_cm is not None else None
    absent_ext = {c for k, c in enumerate(CLASSES) if not ext_cm[k].sum()}
    absent_int = {c for k, c in enumerate(CLASSES) if int_cm is not None and not int_cm[k].sum()}
    rows = []
    for key, ep in ext_p.items():
        cls = key.split("_")[0] if "_" in key else None
        absent = lambda s: cls is not None and cls in s and not key.endswith(("specificity", "npv"))  # noqa: E731
        ip = int_p.get(key)
        int_cell = ABSENT if absent(absent_int) else (fmt.NA if ip is None else rate_cell(ip))
        ext_cell = ABSENT if absent(absent_ext) else rate_cell(ep)
        drop = fmt.NA
        if ip is not None and not absent(absent_int) and not absent(absent_ext):
            d, lo, hi = difference_interval(ip, ep)
            drop = fmt.interval(d, lo, hi, 1, sign=True)
        rows.append([_label(key), int_cell, ext_cell, drop])
    for c in CLASSES:
        key = f"{c}_auc"
        if key not in ext_m:
            continue
        cells = []
        for m, gone, given in ((int_m, c in absent_int, internal is not None), (ext_m, c in absent_ext, True)):
            v = m.get(key, math.nan)
            cells.append(fmt.NA if not given else ABSENT if gone else
                         fmt.interval(v, m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high"), 3))
        gone = c in absent_ext or c in absent_int
        rows.append([_label(key), *cells, fmt.NA if gone or internal is None else _auc_drop(int_m, ext_m, key)])
    return Table(headers, rows)
