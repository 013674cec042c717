"""Operating points mean the same on every CPU and are never fitted on test unawares.

- ``calibrate`` and ``evaluate --operating-point`` choose on fp32 probabilities, whatever ``--precision``;
- a validation split that shares images with test (``--protocol paper``) is refused unless acknowledged,
  and then every output says so; ``evaluate --split val`` at a rule chosen there warns;
- ``--prevalence-class`` and ``--seed`` reach ``metrics.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covid_cxr import runtime
from covid_cxr.cli import main
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.splits import SplitSettings
from covid_cxr.errors import ConfigError
from covid_cxr.evaluate.run import calibrate, evaluate_run
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.inference.torch_model import TorchPredictor
from covid_cxr.operating_point import OperatingPoint, choose_from_probs, where_chosen
from covid_cxr.report.report import write_report
from covid_cxr.runs.card_text import operating_point_lines
from covid_cxr.runs.checkpoint import load_checkpoint
from covid_cxr.synth import make_synthetic
from tests.test_evaluate import SIZE, data  # noqa: F401 - the prepared synthetic set (72 px), shared
from tests.test_report import _eval_dir, _with_probs
from tests.test_server import tiny_checkpoint

FP32_CPU = InferenceSettings(device="cpu", precision="fp32", backend="torch")
BF16_CPU = InferenceSettings(device="cpu", precision="bf16", backend="torch")


def _run(folder: Path, data: Path, seed: int = 3) -> Path:
    """A tiny random network with spread-out outputs, in a run folder over ``data`` (fold 1)."""
    tiny_checkpoint(folder / "best.pt", "xception", size=SIZE, scaling="unit", seed=seed)
    fold = PreparedData(data).fold(1)
    (folder / "run.json").write_text(json.dumps({"network": "xception", "fold": 1, "data": str(data),
                                                 "split_hash": fold.split_hash, "status": "finished"}))
    return folder


def _val_probs(run: Path, data: Path, precision: str) -> tuple[np.ndarray, list[str], tuple[str, ...]]:
    """The validation split's probabilities from a predictor forced to ``precision`` on the CPU."""
    ckpt = load_checkpoint(run / "best.pt")
    val = PreparedData(data).fold(1).val
    cache = PreparedData(data).cache(SIZE)
    probs = TorchPredictor(ckpt, device="cpu", precision=precision).predict_proba(cache.images[cache.rows(val["image_id"])])
    return probs, val["label"].tolist(), ckpt.classes


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data prepared with --protocol paper: validation holds the test COVID-19 images."""
    root = tmp_path_factory.mktemp("paperdata")
    make_synthetic(root / "raw", seed=1, n_covid=10, n_pneumonia=12, n_normal=10, size=96, workers=1)
    prepare_dataset(PrepareSettings(out=root / "data", covid_chestxray=root / "raw" / "covid-chestxray-dataset",
                                    rsna=root / "raw" / "rsna", image_size=SIZE, workers=1,
                                    split=SplitSettings(folds=2, phases=2, protocol="paper")),
                    progress=False)
    return root / "data"


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["youden", "sensitivity=0.95"])
def test_calibrate_chooses_on_fp32_probabilities_even_when_bf16_is_asked(data: Path, tmp_path: Path,  # noqa: F811
                                                                         rule: str) -> None:
    run = _run(tmp_path / "run", data)
    fp32, labels, classes = _val_probs(run, data, "fp32")
    expected = choose_from_probs(rule, fp32, labels, classes)
    bf16 = choose_from_probs(rule, _val_probs(run, data, "bf16")[0], labels, classes)
    # bf16 rounding moves the midpoint threshold: without that the test could not tell the two apart.
    assert abs(bf16.threshold - expected.threshold) > 1e-4
    op, _ = calibrate(run, rule, BF16_CPU, progress=False)
    assert op.threshold == pytest.approx(expected.threshold, abs=1e-5)
    assert (op.validation["tp"], op.validation["tn"]) == (expected.validation["tp"], expected.validation["tn"])
    assert op.validation["precision"] == "fp32" and op.validation["backend"] == "torch"
    assert "fp32 torch" in op.describe()
    assert OperatingPoint.from_dict(load_checkpoint(run / "best.pt").operating_point) == op
    # evaluate --operating-point chooses the same way, while the test split itself runs in bf16.
    result = evaluate_run(run, BF16_CPU, operating_point=rule, n_boot=0, progress=False, compile="off",
                          out_dir=tmp_path / "ev")
    assert result.info["operating_point"]["threshold"] == pytest.approx(expected.threshold, abs=1e-5)
    assert "bf16" in result.info["runtime"]


@pytest.mark.slow
def test_evaluate_applies_a_threshold_rule_to_fp32_probabilities_under_auto(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """On a bf16 CPU (stood in, as tests/test_deploy_review.py does) auto evaluates an argmax model in bf16, and a
    threshold rule, given or stored, on fp32 probabilities: the ones it was chosen on, as predict and serve do."""
    for name in ("COVID_CXR_BACKEND", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # a capped oneDNN says no bf16
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(runtime, "_onednn_supports_bf16", lambda: True)
    run = _run(tmp_path / "run", data)
    auto = InferenceSettings(device="cpu")
    argmax = evaluate_run(run, auto, n_boot=0, progress=False, compile="off", out_dir=tmp_path / "argmax")
    assert "bf16" in argmax.info["runtime"]
    calibrate(run, "sensitivity=0.95", FP32_CPU, progress=False)
    for given in (None, "youden"):
        ruled = evaluate_run(run, auto, operating_point=given, n_boot=0, progress=False, compile="off",
                             out_dir=tmp_path / f"ruled-{given}")
        runtime_line = ruled.info["runtime"]
        assert runtime_line.startswith("onnx") and "precision=bf16" not in runtime_line, runtime_line
        table = pd.read_csv(tmp_path / f"ruled-{given}" / "predictions.csv")
        ckpt = load_checkpoint(run / "best.pt")
        cache = PreparedData(data).cache(SIZE)
        exact = TorchPredictor(ckpt, device="cpu", precision="fp32").predict_proba(
            cache.images[cache.rows(table["image_id"])])
        got = table[[f"p_{c}" for c in ckpt.classes]].to_numpy()
        np.testing.assert_allclose(got, exact, atol=1e-4)


@pytest.mark.slow
def test_a_validation_split_holding_test_images_is_refused_unless_acknowledged(
        paper_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fold = PreparedData(paper_data).fold(1)
    shared = int(fold.val["image_id"].isin(set(fold.test["image_id"])).sum())
    assert shared > 0  # the paper's protocol: the test COVID-19 images are validation images too
    run = _run(tmp_path / "run", paper_data)
    before = (run / "best.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"shares \d+ of its \d+ images with the test split") as err:
        calibrate(run, "youden", FP32_CPU, progress=False)
    assert "--protocol strict" in str(err.value) and "--allow-test-overlap" in str(err.value)
    assert (run / "best.pt").read_bytes() == before  # nothing written
    argv = ["evaluate", str(run), "--operating-point", "youden", "--device", "cpu", "--precision", "fp32",
            "--bootstrap", "0", "--no-progress", "--out", str(tmp_path / "refused")]
    assert main(argv) != 0
    assert "--allow-test-overlap" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "metrics.json").exists()

    assert calibrate(run, "argmax", FP32_CPU, progress=False)[0] == OperatingPoint()  # no threshold: nothing fitted
    assert main(["calibrate", str(run), "--operating-point", "youden", "--device", "cpu", "--allow-test-overlap",
                 "--no-progress"]) == 0
    assert "includes test images" in capsys.readouterr().out
    op = OperatingPoint.from_dict(load_checkpoint(run / "best.pt").operating_point)
    assert op.validation["test_images_shared"] == shared and op.fitted_on_test
    assert main(["evaluate", str(run), "--device", "cpu", "--precision", "fp32", "--bootstrap", "0",
                 "--no-progress", "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "includes test images" in out and "never on test" not in out
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["decision"]["fitted_on_test"] is True
    assert any(f"includes {shared} of these test images" in w for w in saved["evaluation"]["warnings"])
    page = write_report([tmp_path / "ev"], tmp_path / "report", n_boot=0).read_text()
    assert "includes test images" in page and "never on test" not in page
    card = "\n".join(operating_point_lines(op.to_dict(), ("covid", "normal", "pneumonia")))
    assert "includes test images" in card and "never on test" not in card


@pytest.mark.slow
def test_strict_validation_is_checked_against_test_and_said_to_share_nothing(data: Path,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    run = _run(tmp_path / "run", data)
    op, _ = calibrate(run, "youden", FP32_CPU, progress=False)
    assert op.validation["test_images_shared"] == 0 and op.validation["test_images"] > 0
    assert op.chosen_on() == "Its threshold was chosen on the validation split, which shares no image with the test split."


def test_the_never_on_test_claim_follows_the_records() -> None:
    base = {"rule": "youden", "threshold": 0.4, "validation": {"sensitivity": 0.9, "specificity": 0.8,
                                                                 "n_positive": 10, "n_negative": 20}}
    clean = OperatingPoint.from_dict({**base, "validation": {**base["validation"], "test_images_shared": 0}})
    fitted = OperatingPoint.from_dict({**base, "validation": {**base["validation"], "test_images_shared": 7,
                                                              "test_images": 30}})
    unchecked = OperatingPoint.from_dict(base)
    assert "shares no image" in where_chosen([clean, clean])
    assert "includes test images (7 of 30" in where_chosen([clean, fitted])
    assert "not recorded" in where_chosen([clean, unchecked])
    assert where_chosen([OperatingPoint()]) == ""
    assert not clean.fitted_on_test and fitted.fitted_on_test and not unchecked.fitted_on_test
    # A rule with no validation record (made by hand or by another tool) says so in the card, not "Chosen on: {}."
    for bare in ({"rule": "specificity", "target": 0.9, "threshold": 0.3, "validation": {}},
                 {"rule": "specificity", "target": 0.9, "threshold": 0.3}):
        card = "\n".join(operating_point_lines(bare, ("covid", "normal", "pneumonia")))
        assert "{}" not in card and "None" not in card
        assert card.endswith("- Where this rule was chosen is not recorded with the model: its validation figures are "
                             "unknown.")


def test_report_says_where_the_threshold_was_chosen(tmp_path: Path) -> None:
    """The report's sentence is the record's: no "never on test" for a threshold fitted on test images."""
    pages = {}
    for name, shared in (("clean", 0), ("fitted", 12)):
        op = {"rule": "youden", "threshold": 0.3, "validation": {"test_images_shared": shared, "test_images": 40}}
        folder = _eval_dir(tmp_path / name, _with_probs((8, 30, 40), seed=1), "resnet50v2", 1)
        info = {"network": "resnet50v2", "fold": 1, "split": "test", "operating_point": op}
        (folder / "metrics.json").write_text(json.dumps({"evaluation": info}))
        pages[name] = write_report([folder], tmp_path / f"report-{name}", n_boot=0).read_text()
    assert "shares no image with the test split" in pages["clean"]
    assert "includes test images (12 of 40" in pages["fitted"] and "shares no image" not in pages["fitted"]


@pytest.mark.slow
def test_evaluating_val_at_a_rule_chosen_on_val_warns(data: Path, tmp_path: Path,  # noqa: F811
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "run", data)
    for split in ("val", "test"):
        argv = ["evaluate", str(run), "--split", split, "--operating-point", "youden", "--device", "cpu",
                "--precision", "fp32", "--bootstrap", "0", "--no-progress", "--out", str(tmp_path / split)]
        assert main(argv) == 0
        out = capsys.readouterr().out
        warnings = json.loads((tmp_path / split / "metrics.json").read_text())["evaluation"]["warnings"]
        optimistic = [w for w in warnings if "optimistic by construction" in w]
        assert bool(optimistic) == (split == "val"), split
        assert ("optimistic by construction" in out) == (split == "val"), split


@pytest.mark.slow
def test_prevalence_class_and_seed_reach_metrics_json(data: Path, tmp_path: Path) -> None:  # noqa: F811
    run = _run(tmp_path / "run", data)
    common = ["--device", "cpu", "--precision", "fp32", "--backend", "torch", "--compile", "off", "--no-progress",
              "--prevalence", "0.1", "--bootstrap", "200"]
    saved = {}
    for name, extra in (("pneu", ["--prevalence-class", "pneumonia", "--seed", "1"]),
                        ("pneu-again", ["--prevalence-class", "pneumonia", "--seed", "1"]),
                        ("covid", ["--seed", "2"])):
        assert main(["evaluate", str(run), "--out", str(tmp_path / name), *common, *extra]) == 0
        saved[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert "pneumonia_ppv_at_prevalence" in saved["pneu"] and "covid_ppv_at_prevalence" not in saved["pneu"]
    assert "covid_ppv_at_prevalence" in saved["covid"] and "pneumonia_ppv_at_prevalence" not in saved["covid"]
    intervals = lambda m: [m[f"{c}_auc_ci_{s}"] for c in ("covid", "normal", "pneumonia") for s in ("low", "high")]  # noqa: E731
    assert intervals(saved["pneu"]) == intervals(saved["pneu-again"])  # the seed fixes the bootstrap
    assert intervals(saved["pneu"]) != intervals(saved["covid"])  # and another seed draws other resamples
    # --external passes both on too.
    val = PreparedData(data).fold(1).test
    manifest = PreparedData(data).manifest.set_index("image_id")
    csv = tmp_path / "set.csv"
    pd.DataFrame({"path": manifest.loc[val["image_id"], "path"].to_numpy(), "label": val["label"].to_numpy()}
                 ).to_csv(csv, index=False)
    argv = ["evaluate", str(run), "--external", str(csv), "--name", "x", "--out", str(tmp_path / "ext"), *common,
            "--prevalence-class", "normal", "--seed", "1"]
    assert main(argv) == 0
    ext = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert "normal_ppv_at_prevalence" in ext and "covid_ppv_at_prevalence" not in ext


def test_an_fp32_predictor_runs_in_true_fp32_on_a_gpu_too(tmp_path: Path) -> None:
    """PyTorch lets cuDNN use TF32 for fp32 by default; an fp32 predictor turns it off for its forward pass (the
    flags are global and read on the GPU; here the hook reads what the forward ran under) and restores it after."""
    ckpt = load_checkpoint(tiny_checkpoint(tmp_path / "m.pt", "xception", size=SIZE, seed=1))
    seen: list[tuple[bool, bool]] = []
    for precision in ("fp32", "bf16"):
        predictor = TorchPredictor(ckpt, device="cpu", precision=precision)
        predictor.model.register_forward_hook(
            lambda *_: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)))
        before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        try:
            predictor.predict_proba(np.zeros((1, SIZE, SIZE), dtype=np.uint8))
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert seen == [(False, False), (True, True)]  # fp32: no TF32; bf16 autocast is left as it is


def test_an_undefined_npv_at_a_prevalence_prints_as_such(capsys: pytest.CaptureFixture[str]) -> None:
    """A model that calls every image COVID-19 has no NPV: "NPV n/a", not "NPV nan% [0.00, 100.00]"."""
    from rich.console import Console

    from covid_cxr.cli.evaluate import print_decision
    from covid_cxr.evaluate.metrics import decision_summary

    cm = np.array([[5, 0, 0], [2, 0, 0], [2, 0, 0]])  # rows: true covid, pneumonia, normal; every image called covid
    decision = {**decision_summary(cm, 0, (0.01, 0.2)), "operating_point": {"rule": "argmax"}}
    print_decision(decision, Console(width=400))
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "NPV n/a" in out
    assert "at prevalence 1%: PPV 1.00% [" in out and out.count("NPV n/a") == 3  # the test set's and two prevalences'
    at = decision["at_prevalence"][0]  # and metrics.json keeps no interval around it either
    assert all(math.isnan(at[k]) for k in ("npv", "npv_ci_low", "npv_ci_high")) and not math.isnan(at["ppv_ci_low"])
