"""Rate intervals that allow for several images of one patient (stats.clustered_proportion and its users)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from covid_cxr.evaluate.metrics import binary_figures, compute_metrics, confusion_matrix
from covid_cxr.evaluate.predictions import validate_predictions
from covid_cxr.report.sections import comparison_table, operating_tables
from covid_cxr.stats import Proportion, clustered_proportion, difference_interval, wilson_interval


def _clustered_set(rng: np.random.Generator, patients: int, mean: float = 0.7, spread: float = 1.5,
                   largest: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per patient (hits, images): each patient's own rate drawn from a Beta of the given mean, so one patient's
    images are strongly alike (intra-patient correlation 1 / (spread + 1) = 0.4)."""
    sizes = rng.integers(1, largest + 1, patients)
    rates = rng.beta(mean * spread, (1 - mean) * spread, patients)
    return rng.binomial(sizes, rates), sizes


def test_one_image_per_patient_is_exactly_wilson() -> None:
    hits, sizes = [1, 0, 1, 1, 0, 1, 1], [1] * 7
    prop = clustered_proportion(5, 7, hits, sizes)
    assert prop.interval() == wilson_interval(5, 7)
    assert prop.ci == Proportion(5, 7).ci and prop.design_effect == 1.0
    assert prop.patients == 7 and not prop.clustered and prop.method == "Wilson"
    assert clustered_proportion(5, 7) == Proportion(5, 7)
    # Patients with no image in this denominator (e.g. none of the class) do not count.
    assert clustered_proportion(5, 7, [*hits, 0], [*sizes, 0]).interval() == wilson_interval(5, 7)


def test_identical_images_of_a_patient_count_once() -> None:
    """Each patient's 4 images are copies of one: the design effect is 4 (up to the m/(m-1) correction), and the
    interval is about that of the patients alone."""
    rng = np.random.default_rng(1)
    once = rng.integers(0, 2, 60)
    prop = clustered_proportion(int(4 * once.sum()), 240, (4 * once).tolist(), [4] * 60)
    assert prop.design_effect == pytest.approx(4 * 60 / 59)
    assert prop.clustered and "adjusted for 60 patients" in prop.method
    low, high = prop.interval()
    w_low, w_high = wilson_interval(int(once.sum()), 60)
    assert abs((high - low) - (w_high - w_low)) < 0.01
    assert high - low > 1.9 * np.subtract(*wilson_interval(int(4 * once.sum()), 240)[::-1])


def test_all_right_or_all_wrong_counts_each_patient_once() -> None:
    """p = 1 (or 0) has no variance to measure clustering by: each patient is one observation."""
    prop = clustered_proportion(74, 74, [17, 18] + [2] * 19 + [1], [17, 18] + [2] * 19 + [1])
    assert prop.patients == 22 and prop.effective_n == pytest.approx(22)
    assert prop.interval() == pytest.approx(wilson_interval(22, 22))
    assert prop.interval()[1] == 1.0
    zero = clustered_proportion(0, 10, [0] * 5, [2] * 5)
    assert zero.interval() == pytest.approx(wilson_interval(0, 5)) and zero.interval()[0] == 0.0


def test_one_patient_is_one_observation() -> None:
    prop = clustered_proportion(3, 10, [3], [10])
    assert prop.effective_n == pytest.approx(1.0)
    assert prop.interval() == pytest.approx(wilson_interval(0.3, 1.0))
    low, high = prop.interval()
    assert low < 0.1 and high > 0.75


def test_the_design_effect_is_floored_at_one() -> None:
    """Patients alike in their rate (less spread than binomial): never narrower than plain Wilson."""
    prop = clustered_proportion(20, 40, [2] * 10, [4] * 10)
    assert prop.design_effect == 1.0 and prop.interval() == wilson_interval(20, 40)
    assert prop.clustered  # still says the images come from 10 patients


@pytest.mark.parametrize("hits,sizes,k,n", [([1, 2], [2, 2], 4, 4), ([1, 3], [2, 2], 4, 4), ([1, 1], [2, 2], 2, 5)])
def test_counts_that_do_not_add_up_are_refused(hits: list[int], sizes: list[int], k: int, n: int) -> None:
    with pytest.raises(ValueError, match="per-patient counts"):
        clustered_proportion(k, n, hits, sizes)
    with pytest.raises(ValueError, match="or neither"):
        clustered_proportion(1, 2, [1], None)


def test_close_to_a_patient_bootstrap_where_wilson_is_too_narrow() -> None:
    rng = np.random.default_rng(7)
    hits, sizes = _clustered_set(rng, 80)
    k, n = int(hits.sum()), int(sizes.sum())
    draws = rng.integers(0, len(hits), (4000, len(hits)))
    boot = hits[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    b_low, b_high = np.percentile(boot, [2.5, 97.5])
    low, high = clustered_proportion(k, n, hits.tolist(), sizes.tolist()).interval()
    w_low, w_high = wilson_interval(k, n)
    assert abs((high - low) / (b_high - b_low) - 1) < 0.2
    assert (w_high - w_low) < 0.75 * (b_high - b_low)


def test_coverage_by_simulation_is_near_95_percent_where_wilson_falls_short() -> None:
    """2000 simulated test sets of 40 patients with 1-8 strongly alike images each, true rate 0.7: plain Wilson
    covers about 76%, the adjusted interval about 94% (2000 replicates: a standard error of 0.5 point)."""
    rng = np.random.default_rng(0)
    truth, covered_wilson, covered = 0.7, 0, 0
    reps = 2000
    for _ in range(reps):
        hits, sizes = _clustered_set(rng, 40, mean=truth)
        k, n = int(hits.sum()), int(sizes.sum())
        low, high = wilson_interval(k, n)
        covered_wilson += low <= truth <= high
        low, high = clustered_proportion(k, n, hits.tolist(), sizes.tolist()).interval()
        covered += low <= truth <= high
    wilson_cov, adjusted_cov = covered_wilson / reps, covered / reps
    assert wilson_cov < 0.85
    assert 0.91 <= adjusted_cov <= 0.98
    assert abs(adjusted_cov - 0.95) + 0.08 < abs(wilson_cov - 0.95)


def _table(patients: list[str] | None) -> pd.DataFrame:
    """12 images: 4 COVID-19 patients with 2 images each (one all missed), 4 others with one each."""
    label = ["covid"] * 8 + ["normal"] * 2 + ["pneumonia"] * 2
    pred = ["covid", "covid", "covid", "covid", "covid", "covid", "normal", "normal",
            "normal", "covid", "pneumonia", "normal"]
    frame = pd.DataFrame({"label": label, "pred": pred})
    if patients is not None:
        frame["patient_id"] = patients
    return frame


PATIENTS = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "f", "g", "h"]


def test_metrics_adjust_clustered_rates_and_say_so() -> None:
    preds = validate_predictions(_table(PATIENTS), "t")
    by_patient = preds.confusion(by_patient=True)
    assert by_patient.shape == (8, 3, 3) and (by_patient.sum(axis=0) == preds.confusion()).all()
    m = preds.metrics(n_boot=0)
    plain = compute_metrics(preds.confusion())
    # COVID-19 recall 6/8 from 4 patients: wider than Wilson over images; specificity 3/4 (one image each): Wilson.
    assert m["covid_recall"] == plain["covid_recall"] == 75.0
    assert m["covid_recall_ci_high"] - m["covid_recall_ci_low"] > plain["covid_recall_ci_high"] - plain[
        "covid_recall_ci_low"]
    assert (m["covid_specificity_ci_low"], m["covid_specificity_ci_high"]) == (
        plain["covid_specificity_ci_low"], plain["covid_specificity_ci_high"])
    record = m["rate_intervals"]
    assert record["method"] == "wilson-design-effect" and record["patients"] == 8 and record["images"] == 12
    assert record["rates"]["covid_recall"]["patients"] == 4 and record["rates"]["covid_recall"]["design_effect"] > 1
    assert record["rates"]["covid_specificity"] == {"patients": 4, "design_effect": 1.0}
    assert "adjusted for 8 patients" in record["label"]
    said = [n for n in m["notes"] if n.startswith("rate intervals")]
    assert len(said) == 1 and "covid_recall 4/8" in said[0] and "covid_specificity" not in said[0]
    assert plain["rate_intervals"] == {**plain["rate_intervals"], "method": "wilson", "label": "Wilson",
                                       "patients": None}
    assert not [n for n in plain["notes"] if n.startswith("rate intervals")]


def test_one_image_per_patient_changes_nothing() -> None:
    preds = validate_predictions(_table([f"p{i}" for i in range(12)]), "t")
    m, plain = preds.metrics(n_boot=0), compute_metrics(preds.confusion())
    for key in ("accuracy", "covid_recall", "normal_precision", "pneumonia_specificity"):
        assert (m[f"{key}_ci_low"], m[f"{key}_ci_high"]) == (plain[f"{key}_ci_low"], plain[f"{key}_ci_high"])
    assert m["rate_intervals"]["method"] == "wilson" and m["rate_intervals"]["patients"] == 12
    assert m["notes"] == plain["notes"]


def test_decisions_drops_and_report_cells_carry_the_adjusted_interval() -> None:
    preds = validate_predictions(_table(PATIENTS), "t")
    cm, by_patient = preds.confusion(), preds.confusion(by_patient=True)
    fig, plain = binary_figures(by_patient, 0), binary_figures(cm, 0)
    decision = fig.as_dict()
    assert decision["sensitivity_patients"] == 4 and decision["sensitivity_design_effect"] > 1
    assert "sensitivity Wilson, adjusted for 4 patients" in decision["ci_method"]
    assert plain.as_dict()["ci_method"] == "Wilson" and "sensitivity_patients" not in plain.as_dict()
    # Newcombe's drop is built from the adjusted bounds, so it widens with them.
    other = Proportion(40, 50)
    _, lo, hi = difference_interval(fig.sensitivity, other)
    _, plain_lo, plain_hi = difference_interval(plain.sensitivity, other)
    assert hi - lo > plain_hi - plain_lo and math.isfinite(lo)
    figures, _ = operating_tables(by_patient, "covid", (0.05,))
    assert figures.headers[1] == "% [95% CI: Wilson, adjusted for patients] (k/n, patients)"
    assert figures.rows[0][1].endswith("(6/8, 4 patients)")
    assert operating_tables(cm, "covid", (0.05,))[0].headers[1] == "% [95% Wilson CI] (k/n)"
    table = comparison_table(None, ("external", by_patient, {}))
    cells = {row[0]: row[2] for row in table.rows}
    assert cells["COVID-19 recall"].endswith("(6/8, 4 patients)") and cells["COVID-19 specificity"].endswith("(3/4)")
    assert confusion_matrix(preds.frame["label"], preds.frame["pred"]).tolist() == cm.tolist()


def test_the_command_line_names_the_patients_and_the_interval(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    """evaluate's decision lines and metrics' Table 4 title say which interval the figures carry."""
    from rich.console import Console

    from covid_cxr.cli import main
    from covid_cxr.cli.evaluate import print_decision
    from covid_cxr.evaluate.metrics import decision_summary

    preds = validate_predictions(_table(PATIENTS), "t")
    decision = {**decision_summary(preds.confusion(by_patient=True), 0), "operating_point": {"rule": "argmax"}}
    print_decision(decision, Console(width=400))
    line = next(x for x in capsys.readouterr().out.splitlines() if "covid vs rest" in x)
    assert "(6/8, 4 patients)" in line and "specificity 75.0% [" in line and "(3/4)" in line
    path = tmp_path / "predictions.csv"
    _table(PATIENTS).to_csv(path, index=False)
    assert main(["metrics", str(path), "--bootstrap", "0"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # a table title may wrap at the console's width
    assert "[95% CI: Wilson, adjusted for 8 patients behind 12 images" in out
