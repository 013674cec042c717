"""Metrics: the paper's Table 4 from its Table 3, Wilson intervals, AUC, bootstrap, calibration, PPV."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covid_cxr.cli import main
from covid_cxr.evaluate import paper
from covid_cxr.evaluate.metrics import (
    bootstrap_auc_ci,
    calibration_bins,
    class_counts,
    compute_metrics,
    confusion_matrix,
    roc_auc,
    roc_curve,
    table3_row,
    table4_row,
)
from covid_cxr.labels import CLASSES


def predictions_from_confusion(cm: np.ndarray) -> pd.DataFrame:
    """One row per image with exactly the counts of ``cm`` (rows true, columns predicted)."""
    labels, preds = [], []
    for i, true in enumerate(CLASSES):
        for j, pred in enumerate(CLASSES):
            labels += [true] * int(cm[i, j])
            preds += [pred] * int(cm[i, j])
    return pd.DataFrame({"label": labels, "pred": preds})


def test_confusion_matrix_and_counts() -> None:
    labels = ["covid", "covid", "pneumonia", "normal", "normal", "normal"]
    preds = ["covid", "normal", "pneumonia", "covid", "normal", "pneumonia"]
    cm = confusion_matrix(labels, preds)
    assert cm.tolist() == [[1, 0, 1], [0, 1, 0], [1, 1, 1]]
    c = class_counts(cm, 0)
    assert (c.tp, c.fn, c.fp, c.tn) == (1, 1, 1, 3)
    assert table3_row(cm)["normal_missed"] == 2 and table3_row(cm)["pneumonia_false"] == 1
    row = table4_row(cm)
    assert row["accuracy"] == pytest.approx(50.0)
    assert row["covid_specificity"] == pytest.approx(75.0)
    assert row["covid_accuracy"] == pytest.approx(100 * 4 / 6)
    assert list(row) == ["accuracy", *(f"{c}_{r}" for r in ("recall", "specificity", "accuracy", "precision")
                                       for c in CLASSES)]
    with pytest.raises(ValueError, match="unknown class"):
        confusion_matrix(["covid"], ["flu"])


@pytest.mark.fixtures
def test_every_paper_table3_row_gives_its_table4_row(fixtures_dir: Path, tmp_path: Path) -> None:
    """Prediction files with exactly the counts of each Table 3 row reproduce Table 4 (to 0.01) via the CLI."""
    t3 = pd.read_csv(fixtures_dir / "paper_tables" / "table3.csv", dtype={"fold": str})
    t4 = pd.read_csv(fixtures_dir / "paper_tables" / "table4.csv", dtype={"fold": str})
    for _, row in t3.iterrows():
        csv, out = tmp_path / "p.csv", tmp_path / "m.json"
        predictions_from_confusion(paper.confusion_from_counts(row)).to_csv(csv, index=False)
        assert main(["metrics", str(csv), "--json", str(out)]) == 0
        got = json.loads(out.read_text())
        for key in t3.columns[2:]:
            assert got[key] == row[key], (row["fold"], row["network"], key)
        want = t4[(t4["fold"] == row["fold"]) & (t4["network"] == row["network"])].iloc[0]
        for key in t4.columns[2:]:
            assert abs(got[key] - want[key]) < 0.01, (row["fold"], row["network"], key, got[key], want[key])
            assert got[f"{key}_ci_low"] <= got[key] <= got[f"{key}_ci_high"]


def test_json_keys_are_stable_and_nan_is_null(tmp_path: Path) -> None:
    # Nothing is predicted covid: covid precision is 0/0.
    frame = pd.DataFrame({"label": ["covid", "pneumonia", "normal", "normal"],
                          "pred": ["normal", "pneumonia", "normal", "pneumonia"]})
    csv, out = tmp_path / "p.csv", tmp_path / "m.json"
    frame.to_csv(csv, index=False)
    assert main(["metrics", str(csv), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    for c in CLASSES:
        for k in ("correct", "missed", "false"):
            assert isinstance(got[f"{c}_{k}"], int)
        for r in ("recall", "specificity", "accuracy", "precision"):
            assert {f"{c}_{r}", f"{c}_{r}_ci_low", f"{c}_{r}_ci_high"} <= set(got)
    assert got["covid_precision"] is None and got["covid_precision_ci_low"] is None
    assert any("covid_precision" in note for note in got["notes"])
    assert got["accuracy"] == pytest.approx(50.0)
    assert "covid_auc" not in got  # no probabilities in this file


def test_roc_auc_matches_pair_counting_with_ties() -> None:
    rng = np.random.default_rng(1)
    positive = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + 0.4 * positive, 1)  # coarse: many ties
    pairs = [(a > b) + 0.5 * (a == b) for a in scores[positive] for b in scores[~positive]]
    assert roc_auc(positive, scores) == pytest.approx(np.mean(pairs))
    fpr, tpr, _ = roc_curve(positive, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(positive, scores))
    assert roc_auc(np.array([1, 1, 0, 0], bool), np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    assert roc_auc(np.array([1, 1, 0, 0], bool), np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert math.isnan(roc_auc(np.ones(4, bool), np.arange(4.0)))


def test_bootstrap_by_patient_is_seeded_and_wider_for_duplicated_patients() -> None:
    rng = np.random.default_rng(2)
    positive = rng.random(120) < 0.3
    scores = rng.random(120) + 0.5 * positive
    # Every patient contributes four identical images: images are not independent.
    pos4, scores4 = np.repeat(positive, 4), np.repeat(scores, 4)
    patients = np.repeat(np.arange(120), 4)
    by_image = bootstrap_auc_ci(pos4, scores4, None, n_boot=400, seed=3)
    by_patient = bootstrap_auc_ci(pos4, scores4, patients, n_boot=400, seed=3)
    assert by_patient == bootstrap_auc_ci(pos4, scores4, patients, n_boot=400, seed=3)
    auc = roc_auc(pos4, scores4)
    assert by_patient[0] < auc < by_patient[1]
    assert (by_patient[1] - by_patient[0]) > 1.5 * (by_image[1] - by_image[0])


def test_the_bootstrap_keeps_every_patients_classes_in_every_resample() -> None:
    """Stratified by the classes of each patient's images: with 2 COVID-19 patients of 40, an unstratified draw has
    no COVID-19 patient in about 1 resample in 8 (0.95^40), which was dropped while the record still said 1000."""
    from covid_cxr.evaluate.metrics import _strata, stratified_draws

    patients = np.repeat(np.arange(40), 3)
    true = np.where(patients < 2, 0, np.where(patients < 20, 1, 2))
    true[5] = 2  # patient 1 also has a normal study: a stratum of its own
    positives = [true == k for k in range(3)]
    strata = _strata(positives, patients)
    assert sorted(map(len, strata)) == [1, 1, 18, 20]
    draws = stratified_draws(np.random.default_rng(0), strata, 1000)
    for members in strata:
        assert (draws[:, members].sum(axis=1) == len(members)).all()
    with_covid = draws[:, :2].sum(axis=1)
    assert (with_covid == 2).all()
    rng = np.random.default_rng(1)
    scores = rng.random(len(true)) + 0.6 * positives[0]
    low, high = bootstrap_auc_ci(positives[0], scores, patients, n_boot=1000, seed=0)
    assert low < roc_auc(positives[0], scores) < high


def test_the_bootstraps_own_auc_equals_scikit_learns_on_random_data() -> None:
    # The bootstrap keeps its own AUC for speed (benchmarks/metrics_speed.py); it must be scikit-learn's.
    from sklearn.metrics import roc_auc_score

    from covid_cxr.evaluate.metrics import _AucPlan

    rng = np.random.default_rng(7)
    for n in (5, 40, 500):
        positive = rng.random(n) < 0.3
        positive[:2] = [True, False]
        scores = np.round(rng.random(n), 2)  # rounded: ties
        plan = _AucPlan.of(positive, scores)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=20).astype(float)
        weights[:, :2] += 1.0  # every resample keeps a positive and a negative
        ours = plan.weighted(np.vstack([np.ones(n), weights]))
        theirs = [roc_auc_score(positive, scores)] + [roc_auc_score(positive, scores, sample_weight=w) for w in weights]
        assert ours == pytest.approx(theirs, abs=1e-12)
        assert roc_auc(positive, scores) == pytest.approx(theirs[0], abs=1e-12)


def test_calibration_bins_are_scikit_learns_with_counts() -> None:
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(3)
    probs = rng.dirichlet([0.5, 0.5, 0.5], 400).astype(np.float32)
    true = rng.integers(0, 3, 400)
    bins = calibration_bins(probs, true, n_bins=10)
    confidence = probs.max(axis=1).astype(np.float64)
    hit, conf = calibration_curve(probs.argmax(axis=1) == true, confidence, n_bins=10)
    filled = bins.count > 0
    assert bins.count.sum() == 400 and np.isnan(bins.accuracy[~filled]).all()
    assert bins.accuracy[filled] == pytest.approx(hit) and bins.confidence[filled] == pytest.approx(conf)
    edges = np.linspace(0, 1, 11)
    assert bins.count.tolist() == [int(((confidence > lo) & (confidence <= hi)).sum()) + int(lo == 0) * int(
        (confidence == 0).sum()) for lo, hi in zip(edges[:-1], edges[1:])]


def test_calibration_error() -> None:
    # Confidence 0.9 on every image, right on 90% of them: perfectly calibrated.
    probs = np.tile([0.9, 0.05, 0.05], (100, 1))
    true = np.r_[np.zeros(90, int), np.ones(10, int)]
    assert calibration_bins(probs, true).ece == pytest.approx(0.0, abs=1e-9)
    # Certain on every image, right on half: 50 points of overconfidence.
    probs = np.tile([1.0, 0.0, 0.0], (10, 1))
    true = np.r_[np.zeros(5, int), np.full(5, 2)]
    bins = calibration_bins(probs, true)
    assert bins.ece == pytest.approx(50.0)
    assert bins.count.sum() == 10 and bins.count[-1] == 10


def test_ppv_at_prevalence_of_the_test_sets_own_mix_is_its_precision() -> None:
    # At the test set's own prevalence, Bayes' rule gives back the test set's precision.
    cm = np.array([[26, 2, 3], [40, 3983, 397], [61, 567, 6223]])
    share = cm[0].sum() / cm.sum()
    m = compute_metrics(cm, prevalence=float(share))
    assert m["covid_ppv_at_prevalence"] == pytest.approx(m["covid_precision"])
    assert m["covid_ppv_at_prevalence_ci_low"] < m["covid_ppv_at_prevalence"] < m["covid_ppv_at_prevalence_ci_high"]
    assert compute_metrics(cm, prevalence=0.2)["covid_ppv_at_prevalence"] > m["covid_precision"]


def test_compute_metrics_with_probabilities() -> None:
    rng = np.random.default_rng(4)
    true = np.repeat([0, 1, 2], [20, 60, 80])
    logits = rng.normal(size=(160, 3))
    logits[np.arange(160), true] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    cm = confusion_matrix(np.array(CLASSES)[true], np.array(CLASSES)[probs.argmax(axis=1)])
    m = compute_metrics(cm, probs=probs, true_idx=true, groups=np.arange(160) // 2, n_boot=200)
    for c in CLASSES:
        assert 0.8 < m[f"{c}_auc"] <= 1.0
        assert m[f"{c}_auc_ci_low"] < m[f"{c}_auc"] < m[f"{c}_auc_ci_high"]
        assert 0 <= m[f"{c}_f1"] <= 100
    recalls = [m[f"{c}_recall"] for c in CLASSES]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert m["auc_bootstrap"]["unit"] == "patient"
    assert 0 <= m["ece"] < 100


def test_binary_figures_read_sensitivity_specificity_ppv_npv_off_the_matrix() -> None:
    from covid_cxr.evaluate.metrics import binary_figures

    cm = np.array([[25, 4, 2], [30, 4000, 390], [50, 300, 6501]])  # rows true covid, pneumonia, normal
    fig = binary_figures(cm, 0)
    assert (fig.sensitivity.k, fig.sensitivity.n) == (25, 31)
    assert (fig.specificity.k, fig.specificity.n) == (4000 + 390 + 300 + 6501, 4420 + 6851)
    assert (fig.ppv.k, fig.ppv.n) == (25, 105) and (fig.npv.k, fig.npv.n) == (fig.specificity.k, fig.specificity.k + 6)


def test_absent_classes_are_listed_and_their_figures_undefined() -> None:
    cm = np.array([[0, 0, 0], [1, 5, 0], [0, 2, 7]])  # no COVID-19 image; one pneumonia image called COVID-19
    m = compute_metrics(cm)
    assert m["absent_classes"] == ["covid"]
    assert compute_metrics(np.eye(3, dtype=int))["absent_classes"] == []
    # Recall and F1 of the absent class are undefined (not 0: a model cannot miss a class that is not there),
    # precision is defined: 0 of its 1 COVID-19 call was right.
    assert math.isnan(m["covid_recall"]) and math.isnan(m["covid_f1"]) and m["covid_precision"] == 0.0
    assert any(note.startswith("covid_f1 is undefined") for note in m["notes"])
    assert m["pneumonia_f1"] == pytest.approx(100 * 2 * 5 / (2 * 5 + 2 + 1))


def _spreadsheet_rows() -> list[list[str]]:
    rows = [["IMAGE_ID", " Patient_ID ", "Label", "P_COVID", "p_pneumonia", "p_normal", "Pred"]]
    for i, (label, pred, p) in enumerate([("covid", "covid", (0.7, 0.2, 0.1)), ("normal", "normal", (0.1, 0.2, 0.7)),
                                          ("pneumonia", "covid", (0.5, 0.4, 0.1)), ("normal", "pneumonia", (0.1, 0.5, 0.4)),
                                          ("covid", "covid", (0.8, 0.1, 0.1)), ("pneumonia", "pneumonia", (0.1, 0.8, 0.1))]):
        rows.append([f"img{i}", f"pat{i // 2}", label, *(f"{v:g}" for v in p), pred])
    return rows


def test_a_predictions_file_saved_by_a_spreadsheet_reads_as_the_plain_one(tmp_path: Path) -> None:
    """metrics read predictions more strictly than prepare reads labels: semicolons, headers in capitals and a
    separator closing every row gave "missing column(s) label, pred" (or shifted every column)."""
    from covid_cxr.evaluate.predictions import read_predictions

    rows = _spreadsheet_rows()
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(",".join(r) for r in [[c.strip().lower() for c in rows[0]], *rows[1:]]) + "\n")
    excel = tmp_path / "excel.csv"
    excel.write_bytes(("\r\n".join(";".join(r) + ";" for r in rows) + "\r\n").encode("utf-8-sig"))
    a, b = read_predictions(plain), read_predictions(excel)
    assert list(b.frame["label"]) == list(a.frame["label"]) and np.array_equal(a.probs, b.probs)
    assert list(b.groups) == list(a.groups) == ["pat0", "pat0", "pat1", "pat1", "pat2", "pat2"]
    assert a.metrics(n_boot=0) == b.metrics(n_boot=0)


@pytest.mark.parametrize(("edit", "said"), [
    (lambda rows: rows[3].__setitem__(2, "NA"), r"row 4: unknown class 'NA' in column 'label'"),  # a word, not a hole
    (lambda rows: rows[5].__setitem__(0, "img1"), r"image 'img1' is on rows 3, 6 \(1 repeated rows in all\); every "
                                                  r"row counts as an image"),
    (lambda rows: rows[0].__setitem__(2, "truth"), r"lacks the column\(s\) label \(it has image_id, patient_id, truth"),
])
def test_a_predictions_file_that_cannot_be_counted_is_named_with_the_fix(tmp_path: Path, edit: object,
                                                                          said: str) -> None:
    from covid_cxr.errors import DataError
    from covid_cxr.evaluate.predictions import read_predictions

    rows = _spreadsheet_rows()
    edit(rows)  # type: ignore[operator]
    path = tmp_path / "p.csv"
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=said):
        read_predictions(path)


def test_a_row_without_a_patient_id_is_a_patient_of_its_own(tmp_path: Path) -> None:
    """One empty patient_id switched the whole bootstrap from patients to images, without a word."""
    from covid_cxr.evaluate.predictions import read_predictions

    rows = _spreadsheet_rows()
    rows[2][1] = ""
    path = tmp_path / "p.csv"
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    groups = read_predictions(path).groups
    assert groups is not None and len(set(groups)) == 4  # pat0 (one row left), the row alone, pat1, pat2
    assert list(groups[[0, 2, 3]]) == ["pat0", "pat1", "pat1"] and groups[1] not in {"pat0", "pat1", "pat2"}
