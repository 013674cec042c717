"""Operating points: rules parsed and stored, thresholds chosen on validation scores, decisions made by them.

The end-to-end test calibrates a tiny network on a prepared synthetic split and checks that
``predict`` (PyTorch and ONNX) and the web service give the same, thresholded answers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from covid_cxr.errors import ConfigError
from covid_cxr.evaluate.metrics import binary_figures, confusion_matrix
from covid_cxr.operating_point import (
    OperatingPoint,
    choose,
    choose_from_probs,
    parse_rule,
)
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.stats import Proportion, clustered_proportion, wilson_interval
from tests.test_evaluate import SIZE, data  # noqa: F401 - the prepared synthetic set (72 px), shared

# A known score distribution: COVID-19 scores ~ N(1, 1), the others ~ N(-1, 1), squashed to (0, 1).
MU = 1.0


def _scores(rng: np.random.Generator, n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    z = np.r_[rng.normal(MU, 1, n_pos), rng.normal(-MU, 1, n_neg)]
    return np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)], 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("text, expected", [
    ("argmax", ("argmax", None)), ("youden", ("youden", None)), (" Sensitivity=0.95 ", ("sensitivity", 0.95)),
    ("specificity=0.9", ("specificity", 0.9)), ("sensitivity=1", ("sensitivity", 1.0)),
])
def test_parse_rule_accepts_the_documented_forms(text: str, expected: tuple[str, float | None]) -> None:
    assert parse_rule(text) == expected


@pytest.mark.parametrize("text, hint", [
    ("threshold=0.5", "sensitivity=T"), ("sensitivity", "needs a number"), ("sensitivity=abc", "needs a number"),
    ("sensitivity=95", "0.95"), ("specificity=0", "(0, 1]"), ("youden=0.3", "takes no target"),
])
def test_parse_rule_errors_name_the_valid_forms(text: str, hint: str) -> None:
    with pytest.raises(ConfigError, match="argmax") as err:
        parse_rule(text)
    assert hint in str(err.value)


def test_round_trip_and_missing_means_argmax() -> None:
    op = OperatingPoint("sensitivity", 0.95, 0.3125, validation={"sensitivity": 0.96, "n_positive": 25})
    assert OperatingPoint.from_dict(op.to_dict()) == op
    assert OperatingPoint.from_json(op.to_json()) == op
    assert set(op.to_dict()) >= {"rule", "target", "positive_class", "threshold", "validation"}
    assert OperatingPoint.from_dict(None) == OperatingPoint() == OperatingPoint.from_json("")
    assert OperatingPoint().rule == "argmax" and OperatingPoint().threshold is None
    with pytest.raises(ConfigError, match="threshold"):
        OperatingPoint("youden")
    with pytest.raises(ConfigError, match="unknown keys"):
        OperatingPoint.from_dict({"rule": "argmax", "thresh": 0.5})


def test_the_rule_shows_its_validation_rates_with_counts_and_intervals() -> None:
    """"sensitivity 100.0% of 5" read as a 95% target met; 5/5 shows no more than [56.6, 100]."""
    op = OperatingPoint("sensitivity", 0.95, 0.02, validation={"sensitivity": 1.0, "n_positive": 5,
                                                               "specificity": 61 / 103, "n_negative": 103})
    low, high = wilson_interval(5, 5)
    assert f"sensitivity 100.0% (95% CI {100 * low:.1f}-100.0%), 5/5, " in op.describe() and f"{100 * low:.1f}" == "56.6"
    low, high = wilson_interval(61, 103)
    assert f"specificity 59.2% (95% CI {100 * low:.1f}-{100 * high:.1f}%), 61/103" in op.describe()


def test_decide_thresholds_covid_and_argmaxes_the_rest() -> None:
    classes = ("normal", "covid", "pneumonia")  # the positive class need not come first
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.25, 0.65], [0.6, 0.2, 0.2], [0.2, 0.7, 0.1]])
    assert OperatingPoint().decide(probs, classes).tolist() == [0, 2, 0, 1]
    op = OperatingPoint("sensitivity", 0.9, 0.25)
    assert op.decide(probs, classes).tolist() == [1, 1, 0, 1]  # p_covid >= 0.25 is COVID-19, else the larger other
    with pytest.raises(ConfigError, match="covid"):
        op.decide(probs[:, :2], ("normal", "pneumonia"))


def test_sensitivity_target_is_met_on_validation_and_test_sensitivity_has_its_interval() -> None:
    rng = np.random.default_rng(7)
    y_val, s_val = _scores(rng, 60, 600)
    op = choose("sensitivity=0.95", y_val, s_val)
    decided = s_val >= op.threshold
    assert decided[y_val].mean() >= 0.95 and op.validation["sensitivity"] == decided[y_val].mean()
    # The highest such threshold: moving it above the next validation score misses the target.
    above = np.sort(s_val[s_val > op.threshold])
    assert (s_val[y_val] >= above[1]).mean() < 0.95
    # Halfway between two validation scores, so a backend's rounding cannot move a validation image across it.
    gap = min(np.abs(s_val - op.threshold))
    assert gap > 0 and op.threshold == pytest.approx((above[0] + s_val[s_val < op.threshold].max()) / 2)
    # On test: the sensitivity reached is stated with its Wilson interval, which covers the true one of the rule.
    y_test, s_test = _scores(rng, 400, 400)
    probs = np.c_[s_test, 1 - s_test, np.zeros_like(s_test)]
    pred = op.decide(probs, ("covid", "normal", "pneumonia"))
    cm = confusion_matrix(np.where(y_test, "covid", "normal"), np.array(["covid", "normal", "pneumonia"])[pred])
    fig = binary_figures(cm, 0)
    assert fig.sensitivity == Proportion(int((s_test[y_test] >= op.threshold).sum()), 400)
    low, high = fig.sensitivity.ci
    assert (low, high) == tuple(100 * v for v in wilson_interval(fig.sensitivity.k, 400))
    true_sens = norm.sf(np.log(op.threshold / (1 - op.threshold)), loc=MU)
    assert low <= 100 * true_sens <= high


def test_specificity_target_and_youden() -> None:
    rng = np.random.default_rng(3)
    y, s = _scores(rng, 80, 300)
    op = choose("specificity=0.9", y, s)
    assert (s[~y] < op.threshold).mean() >= 0.9
    below = s[s < op.threshold].max()
    assert (s[~y] < below).mean() < 0.9  # the lowest threshold keeping it: at the next lower score it is lost
    youden = choose("youden", y, s)
    j = lambda t: (s[y] >= t).mean() + (s[~y] < t).mean() - 1  # noqa: E731
    assert j(youden.threshold) == pytest.approx(max(j(t) for t in np.unique(s)))
    assert choose("argmax", y, s) == OperatingPoint()


def test_choosing_needs_both_sides_on_validation() -> None:
    with pytest.raises(ConfigError, match="0 other"):
        choose("youden", np.ones(5, bool), np.linspace(0, 1, 5))
    with pytest.raises(ConfigError, match="no 'covid'"):
        choose_from_probs("youden", np.full((3, 2), 0.5), ["normal"] * 3, ("normal", "pneumonia"))


def test_a_target_of_one_is_met_and_stays_within_probabilities() -> None:
    y = np.array([True, True, False, False])
    s = np.array([0.9, 0.2, 0.5, 0.1])
    assert choose("sensitivity=1", y, s).validation["sensitivity"] == 1.0
    op = choose("specificity=1", y, s)
    assert op.validation["specificity"] == 1.0 and op.validation["tp"] == 1 and math.isfinite(op.threshold)
    json.dumps(op.to_dict(), allow_nan=False)


# --- end to end: calibrate on validation, then the same thresholded answers from predict, ONNX and serve ---


@pytest.fixture(scope="module")
def calibrated(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny random network (spread-out outputs) in a run folder over prepared synthetic data, calibrated."""
    from covid_cxr.cli import main
    from covid_cxr.data.prepared import PreparedData
    from tests.test_server import tiny_checkpoint

    root = tmp_path_factory.mktemp("op")
    run = root / "run"
    tiny_checkpoint(run / "best.pt", "xception", size=SIZE, scaling="unit", seed=3)
    fold = PreparedData(data).fold(1)
    (run / "run.json").write_text(json.dumps({"network": "xception", "fold": 1, "data": str(data),
                                              "split_hash": fold.split_hash, "status": "finished"}))
    argv = ["calibrate", str(run), "--operating-point", "sensitivity=0.95", "--device", "cpu", "--precision", "fp32",
            "--no-progress"]
    assert main(argv) == 0
    return {"run": run, "data": data, "fold": fold}


def _torch_probs(ckpt_path: Path, images: np.ndarray) -> np.ndarray:
    from covid_cxr.inference.torch_model import TorchPredictor
    from covid_cxr.runs.checkpoint import load_checkpoint

    return TorchPredictor(load_checkpoint(ckpt_path), device="cpu", precision="fp32").predict_proba(images)


@pytest.mark.slow
def test_calibrated_rule_meets_its_target_on_validation_and_is_used_on_test(calibrated: dict) -> None:
    from covid_cxr.data.prepared import PreparedData
    from covid_cxr.evaluate.predictions import read_predictions
    from covid_cxr.evaluate.run import evaluate_run
    from covid_cxr.runs.checkpoint import load_checkpoint

    ckpt = load_checkpoint(calibrated["run"] / "best.pt")
    op = OperatingPoint.from_dict(ckpt.operating_point)
    assert op.rule == "sensitivity" and op.target == 0.95 and op.positive_class == "covid"
    # Recomputed here on the validation split: the stored threshold reaches the target there.
    val = calibrated["fold"].val
    cache = PreparedData(calibrated["data"]).cache(SIZE)
    probs = _torch_probs(calibrated["run"] / "best.pt", cache.images[cache.rows(val["image_id"])])
    k = ckpt.classes.index("covid")
    is_covid = (val["label"] == "covid").to_numpy()
    assert (probs[is_covid, k] >= op.threshold).mean() >= 0.95
    assert op.validation["n_positive"] == is_covid.sum()
    assert op.validation["tp"] == (probs[is_covid, k] >= op.threshold).sum()
    # evaluate uses the stored rule on test and states the sensitivity reached with its Wilson interval, adjusted
    # for the COVID-19 patients with several test images.
    fp32_cpu = InferenceSettings(device="cpu", precision="fp32")
    result = evaluate_run(calibrated["run"], fp32_cpu, n_boot=20, progress=False)
    saved = json.loads((result.out_dir / "metrics.json").read_text())
    assert saved["evaluation"]["operating_point"] == op.to_dict()
    d = saved["decision"]
    preds = read_predictions(result.out_dir / "predictions.csv")
    frame = preds.frame
    positive = (frame["label"] == "covid").to_numpy()
    per_patient = pd.DataFrame({"patient": preds.groups[positive], "hit": (frame["pred"] == "covid")[positive]})
    per_patient = per_patient.groupby("patient")["hit"].agg(["sum", "size"])
    sens = clustered_proportion(d["sensitivity_k"], d["sensitivity_n"], per_patient["sum"].tolist(),
                                per_patient["size"].tolist())
    low, high = sens.interval()
    assert d["sensitivity_n"] == (calibrated["fold"].test["label"] == "covid").sum()
    assert d["sensitivity_patients"] == len(per_patient)
    assert (d["sensitivity_ci_low"], d["sensitivity_ci_high"]) == pytest.approx((100 * low, 100 * high))
    assert [a["prevalence"] for a in d["at_prevalence"]] == [0.01, 0.05, 0.2]
    assert ((frame["pred"] == "covid") == (frame["p_covid"] >= op.threshold - 1e-6)).all()


@pytest.mark.slow
def test_predict_serve_and_onnx_give_the_same_thresholded_answers(calibrated: dict, tmp_path: Path) -> None:
    import pandas as pd
    from fastapi.testclient import TestClient

    from covid_cxr.cli import main
    from covid_cxr.data.images import load_image
    from covid_cxr.deploy.server import create_app
    from covid_cxr.inference.backends import load_model
    from covid_cxr.runs.checkpoint import load_checkpoint

    ckpt_path = calibrated["run"] / "best.pt"
    ckpt = load_checkpoint(ckpt_path)
    op = OperatingPoint.from_dict(ckpt.operating_point)
    from covid_cxr.data.prepared import PreparedData

    manifest = PreparedData(calibrated["data"]).manifest.set_index("image_id")
    files = [Path(p) for p in manifest.loc[calibrated["fold"].test["image_id"], "path"]]
    images = np.stack([load_image(f, SIZE) for f in files])
    probs = _torch_probs(ckpt_path, images)
    expected = np.asarray(ckpt.classes)[op.decide(probs, ckpt.classes)]
    argmax = np.asarray(ckpt.classes)[probs.argmax(axis=1)]
    assert (expected != argmax).any(), "the rule must change some answers for this test to mean anything"

    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(ckpt_path), "--format", "onnx", "--out", str(onnx_path), "--dynamic-batch"]) == 0
    onnx_model = load_model(onnx_path)
    assert json.loads(onnx_model.predictor.metadata["operating_point"]) == op.to_dict()

    answers = {}
    for name, model in (("torch", ckpt_path), ("onnx", onnx_path)):
        out = tmp_path / f"{name}.csv"
        extra = ["--precision", "fp32", "--device", "cpu"] if name == "torch" else []
        assert main(["predict", str(model), *map(str, files), "--out", str(out), *extra]) == 0
        answers[name] = pd.read_csv(out).set_index("path").loc[[str(f) for f in files], "class"].to_numpy()
    loaded = load_model(ckpt_path, InferenceSettings(device="cpu", precision="fp32"))
    with TestClient(create_app(loaded.predictor, network=loaded.network, sha256=loaded.sha256)) as client:
        assert client.get("/health").json()["model"]["operating_point"] == op.to_dict()
        answers["serve"] = np.array([client.post("/predict", files={"file": (f.name, f.read_bytes())}).json()["class"]
                                     for f in files])
    # External validation of the exported model on the same images, as a CSV: the same decisions again.
    from covid_cxr.evaluate.external import evaluate_external

    csv = tmp_path / "set.csv"
    pd.DataFrame({"path": [str(f) for f in files], "label": calibrated["fold"].test["label"]}).to_csv(csv, index=False)
    result = evaluate_external(onnx_path, csv, name="same", n_boot=10, progress=False)
    assert result.info["operating_point"] == op.to_dict() and result.info["backend"] == "onnx"
    answers["evaluate --external (onnx)"] = result.predictions["pred"].to_numpy()
    for name, got in answers.items():
        assert got.tolist() == expected.tolist(), name


@pytest.mark.slow
def test_evaluate_option_and_calibrate_copies_leave_the_run_alone(calibrated: dict, tmp_path: Path, capsys) -> None:
    from covid_cxr.cli import main
    from covid_cxr.runs.checkpoint import load_checkpoint

    run = calibrated["run"]
    stored = load_checkpoint(run / "best.pt").operating_point
    assert main(["calibrate", str(run), "--operating-point", "sensitivity=95"]) == 2
    assert "0.95" in capsys.readouterr().err
    argv = ["evaluate", str(run), "--operating-point", "youden", "--out", str(tmp_path / "ev"), "--device", "cpu",
            "--precision", "fp32", "--bootstrap", "10", "--no-progress", "--prevalences", "2%,10%"]
    assert main(argv) == 0
    assert "operating point: youden" in capsys.readouterr().out
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["evaluation"]["operating_point"]["rule"] == "youden"
    assert [a["prevalence"] for a in saved["decision"]["at_prevalence"]] == [0.02, 0.1]
    copy = tmp_path / "argmax.pt"
    assert main(["calibrate", str(run), "--operating-point", "argmax", "--out", str(copy), "--no-progress"]) == 0
    assert load_checkpoint(copy).operating_point is None  # argmax: no stored rule, as before operating points
    assert load_checkpoint(run / "best.pt").operating_point == stored
