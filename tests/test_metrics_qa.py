"""QA s13 on ``metrics`` and ``calibrate``: intervals that cannot vary, printed intervals that miss their value,
probability sums at the tolerance, thresholds printed too short, and a model whose outputs are not finite.

Each test fails on the code the QA pass found.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covid_cxr import fmt
from covid_cxr.cli import main
from covid_cxr.errors import ConfigError, DataError
from covid_cxr.evaluate.metrics import (
    bootstrap_auc_values,
    bootstrap_can_vary,
    bootstrap_strata,
    compute_metrics,
    confusion_matrix,
)
from covid_cxr.labels import CLASSES
from covid_cxr.operating_point import OperatingPoint, choose


def _predictions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` images: true class indices (every class present), softmax probabilities, argmax predictions."""
    rng = np.random.default_rng(seed)
    true = np.arange(n) % 3
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[true]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return true, probs, probs.argmax(axis=1)


def _metrics(true: np.ndarray, probs: np.ndarray, pred: np.ndarray, groups: np.ndarray | None) -> dict:
    names = np.asarray(CLASSES)
    cm = confusion_matrix(names[true], names[pred])
    return compute_metrics(cm, probs=probs, true_idx=true, groups=groups, n_boot=200, seed=0)


def _csv(path: Path, true: np.ndarray, probs: np.ndarray, pred: np.ndarray, patients: list[str] | None) -> Path:
    names = np.asarray(CLASSES)
    frame = pd.DataFrame({"image_id": [f"img{i}" for i in range(len(true))]})
    if patients is not None:
        frame["patient_id"] = patients
    frame["label"] = names[true]
    for k, name in enumerate(CLASSES):
        frame[f"p_{name}"] = probs[:, k]
    frame["pred"] = names[pred]
    frame.to_csv(path, index=False, float_format="%.9g")
    return path


# --- 1. an interval whose every resample is the data itself is no interval ---


def test_one_patient_gives_no_auc_interval_and_a_note_says_why() -> None:
    """Every image of one patient ("ANON"): each resample draws that patient once, and the old interval was the
    estimate repeated (``covid_auc 0.682 [0.682, 0.682]``)."""
    true, probs, pred = _predictions(60)
    m = _metrics(true, probs, pred, np.full(60, "ANON"))
    for name in CLASSES:
        assert 0.0 < m[f"{name}_auc"] < 1.0
        assert math.isnan(m[f"{name}_auc_ci_low"]) and math.isnan(m[f"{name}_auc_ci_high"])
    assert m["auc_bootstrap"]["units"] == 1
    said = [n for n in m["notes"] if "1 patient: a patient bootstrap cannot vary" in n]
    assert len(said) == 1 and all(f"{name}_auc" in said[0] for name in CLASSES)
    assert "leave the patient_id column out to resample images" in said[0]
    # The same images without patient ids are drawn one by one, and do get an interval.
    by_image = _metrics(true, probs, pred, None)
    assert all(by_image[f"{name}_auc_ci_low"] < by_image[f"{name}_auc_ci_high"] for name in CLASSES)
    assert not any("cannot vary" in n or "is the data itself" in n for n in by_image["notes"])


def test_the_rule_is_one_unit_per_stratum_not_one_patient() -> None:
    """Four patients, each the only one with its mix of classes, are four strata of one: no resample differs from
    the data either. Two patients alike in their classes make a resample that can, and the interval returns."""
    true = np.array([0, 1, 2, 0, 2, 1, 1, 2])
    patients = np.array(["a", "a", "a", "b", "b", "c", "c", "d"])  # {c,p,n}, {c,n}, {p}, {n}: one each
    positives = [true == k for k in range(3)]
    assert not bootstrap_can_vary(bootstrap_strata(positives, patients))
    _, probs, pred = _predictions(len(true), seed=1)
    m = _metrics(true, probs, pred, patients)
    assert all(math.isnan(m[f"{n}_auc_ci_low"]) for n in CLASSES)
    assert any("each of the 4 patients is the only one with its mix of classes" in n for n in m["notes"])
    assert np.isnan(bootstrap_auc_values(positives, [probs[:, k] for k in range(3)], patients, n_boot=50)).all()

    patients[7] = "e"  # two more patients with pneumonia alone: that stratum has 2 now
    patients = np.append(patients, "f")
    true = np.append(true, 1)
    positives = [true == k for k in range(3)]
    assert bootstrap_can_vary(bootstrap_strata(positives, patients))
    _, probs, pred = _predictions(len(true), seed=1)
    m = _metrics(true, probs, pred, patients)
    assert not any("undefined: each of" in n or "cannot vary" in n for n in m["notes"])
    assert all(not math.isnan(m[f"{n}_auc_ci_low"]) for n in CLASSES)


def test_images_without_patients_one_of_each_class_give_no_interval() -> None:
    true, probs, pred = _predictions(3, seed=2)
    m = _metrics(true, probs, pred, None)
    assert all(not math.isnan(m[f"{n}_auc"]) and math.isnan(m[f"{n}_auc_ci_low"]) for n in CLASSES)
    assert any("each of the 3 images is the only one of its class" in n for n in m["notes"])


def test_no_bootstrap_asked_for_needs_no_note() -> None:
    true, probs, pred = _predictions(6)
    names = np.asarray(CLASSES)
    m = compute_metrics(confusion_matrix(names[true], names[pred]), probs=probs, true_idx=true,
                        groups=np.full(6, "ANON"), n_boot=0)
    assert not any("bootstrap" in n for n in m["notes"])


def test_the_metrics_verb_says_undefined_in_the_table_the_note_and_the_json(tmp_path: Path, capsys,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two images of one patient printed ``AUC 1.000 [1.000, 1.000]``."""
    monkeypatch.setenv("COLUMNS", "200")  # each cell on one line
    true, pred = np.array([1, 2]), np.array([1, 1])
    probs = np.array([[0.36, 0.39, 0.25], [0.59, 0.11, 0.30]])
    csv = _csv(tmp_path / "p.csv", true, probs, pred, ["pt0", "pt0"])
    out = tmp_path / "m.json"
    assert main(["metrics", str(csv), "--json", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "1.000 [1.000, 1.000]" not in printed and "[1.000," not in printed
    assert "1.000 [n/a]" in printed
    assert "1 patient: a patient bootstrap cannot vary" in printed
    got = json.loads(out.read_text())
    assert got["normal_auc"] == 1.0 and got["normal_auc_ci_low"] is None and got["normal_auc_ci_high"] is None
    assert got["auc_bootstrap"]["units"] == 1


def test_source_probe_auc_shares_the_rule() -> None:
    """The source audit's AUC is bootstrapped by :func:`bootstrap_auc_values` too: one patient, no interval."""
    from covid_cxr.audit.source_findings import source_metrics

    rng = np.random.default_rng(0)
    sources = np.array(["a", "b"] * 10)
    probs = rng.dirichlet([1, 1], size=20)
    got = source_metrics(probs, list(sources), ["a", "b"], groups=["ANON"] * 20, n_boot=100)
    assert got["auc"]["value"] is not None and got["auc"]["low"] is None and got["auc"]["high"] is None


def test_ablation_balanced_accuracy_shares_the_rule() -> None:
    from covid_cxr.audit.ablation import balanced_accuracy_interval

    labels = np.array(["covid", "pneumonia", "normal"] * 4)
    preds = np.array(["covid", "normal", "normal"] * 4)
    got = balanced_accuracy_interval(labels, preds, np.full(12, "ANON"), n_boot=100)
    assert got["low"] is None and got["high"] is None


# --- 2. a printed interval holds its printed value ---


def test_a_bound_a_rounding_away_is_printed_as_the_value() -> None:
    """``normal_auc 0.8374999999999999 [0.8375, 0.8375]`` printed ``0.837 [0.838, 0.838]``."""
    assert fmt.interval(0.8374999999999999, 0.8375, 0.8375, 3) == "0.837 [0.837, 0.838]"
    assert fmt.with_ci(0.8374999999999999, 0.8375, 0.8375, as_percent=False) == "0.837 (95% CI 0.837-0.838)"
    assert fmt.with_ci(0.083749, 0.08375, 0.09, fraction=True, digits=2) == "8.37% (95% CI 8.37-9.00%)"
    assert fmt.interval(1.25, 1.2, 1.2500000001, 1, sign=True) == "+1.2 [+1.2, +1.3]"
    # A bound that truly lies past the value (by a printed digit or more) is written as it is.
    assert fmt.interval(0.830, 0.838, 0.9, 3) == "0.830 [0.838, 0.900]"
    assert fmt.interval(89.4, 87.5, 91.0) == "89.4 [87.5, 91.0]"  # the usual case, untouched


def test_a_bootstrap_bound_a_float_off_the_auc_is_the_auc(monkeypatch: pytest.MonkeyPatch) -> None:
    """The JSON held ``normal_auc 0.8374999999999999`` with ``_ci_low 0.8375``: the bootstrap's own AUC and
    scikit-learn's add in another order. A bound that far off is the estimate; one truly past it is kept."""
    import covid_cxr.evaluate.metrics as metrics

    true, probs, pred = _predictions(30)
    aucs = [metrics.roc_auc(true == k, probs[:, k]) for k in range(3)]
    off = [(float(np.nextafter(aucs[0], 2.0)), 0.99), (0.1, float(np.nextafter(aucs[1], -1.0))), (aucs[2] + 1e-3, 0.99)]
    monkeypatch.setattr(metrics, "bootstrap_auc_cis", lambda *args, **kwargs: off)
    m = _metrics(true, probs, pred, None)
    assert m["covid_auc_ci_low"] == m["covid_auc"] and m["pneumonia_auc_ci_high"] == m["pneumonia_auc"]
    assert m["normal_auc_ci_low"] == aucs[2] + 1e-3


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_printed_intervals_hold_their_printed_values(digits: int) -> None:
    rng = np.random.default_rng(digits)
    unit = 10.0 ** -digits
    # Values on and near rounding edges, bounds a float's width to a third of a digit away on either side.
    values = np.round(rng.random(2000), digits + 1) + unit / 2
    for v, dl, dh in zip(values, rng.uniform(-unit / 3, unit / 3, 2000), rng.uniform(-unit / 3, unit / 3, 2000)):
        for low, high in ((v + dl, v + dh), (np.nextafter(v, 2.0), np.nextafter(v, -1.0))):
            shown, lo, hi = map(float, re.findall(r"-?\d+\.\d+", fmt.interval(v, low, high, digits)))
            assert lo <= shown <= hi, (v, low, high, digits)
            said = re.findall(r"\d+\.\d+", fmt.with_ci(v, low, high, digits, as_percent=False))
            assert float(said[1]) <= float(said[0]) <= float(said[2]), (v, low, high, digits)


# --- 3. probabilities written with 3 decimals ---


def _three_rows(path: Path, rows: list[tuple[float, float, float]]) -> Path:
    lines = ["image_id,label,p_covid,p_pneumonia,p_normal,pred"]
    lines += [f"img{i},covid,{a},{b},{c},covid" for i, (a, b, c) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_row_summing_to_the_tolerance_is_read(tmp_path: Path) -> None:
    from covid_cxr.evaluate.predictions import read_predictions

    preds = read_predictions(_three_rows(tmp_path / "p.csv", [(0.589, 0.377, 0.033), (0.6, 0.3, 0.1)]))
    assert preds.has_probs and len(preds.frame) == 2


def test_a_rounded_row_beyond_the_tolerance_is_refused_with_the_fix(tmp_path: Path) -> None:
    from covid_cxr.evaluate.predictions import read_predictions

    with pytest.raises(DataError, match=r"row 2: probabilities sum to 0\.990000.*renormalise.*more decimals"):
        read_predictions(_three_rows(tmp_path / "p.csv", [(0.15, 0.41, 0.43)]))


# --- 4. thresholds printed in full ---


def test_two_rules_print_two_thresholds_that_read_back_exactly() -> None:
    """0.33270611 and 0.33270641 both printed ``p_covid >= 0.332706``."""
    a = OperatingPoint(rule="youden", threshold=0.33270611)
    b = OperatingPoint(rule="sensitivity", target=0.95, threshold=0.33270640671253204)
    assert a.describe() != b.describe().replace("sensitivity=0.95", "youden")
    for op in (a, b):
        printed = re.search(r">= (\S+)", op.describe()).group(1)
        assert float(printed) == op.threshold
    # An image between the old printed threshold and the stored one: the printed rule now says what decide does.
    p = 0.3327063
    printed = float(re.search(r">= (\S+)", b.describe()).group(1))
    decided = b.decide(np.array([[p, 0.5, 1 - p - 0.5]]), CLASSES)[0]
    assert (decided == 0) == (p >= printed)


def test_float32_probabilities_are_decided_as_the_threshold_was_chosen() -> None:
    """The threshold lies halfway between two neighbouring float32 scores; against float32 probabilities NumPy
    compared it in float32, where it rounds onto the lower score, so that image was called COVID-19 although the
    validation record (and the printed rule) said it was not."""
    low = np.float32(0.3327061)
    high = np.nextafter(low, np.float32(1.0))
    scores = np.array([0.9, high, low, 0.1], dtype=np.float32)
    positive = np.array([True, True, False, False])
    op = choose("youden", positive, scores)
    assert float(low) < op.threshold < float(high)
    probs = np.stack([scores, (1 - scores) / 2, (1 - scores) / 2], axis=1).astype(np.float32)
    decided = op.decide(probs, CLASSES) == 0
    assert decided.tolist() == [True, True, False, False]
    assert op.validation["specificity"] == 1.0 and op.validation["sensitivity"] == 1.0


# --- 5. a model whose outputs are not finite ---


def test_non_finite_validation_probabilities_are_refused_in_our_words() -> None:
    scores = np.array([0.9, np.nan, 0.2, 0.1])
    with pytest.raises((ConfigError, DataError), match="not finite"):
        choose("youden", np.array([True, True, False, False]), scores)
