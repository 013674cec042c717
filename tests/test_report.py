"""Report: the paper's tables shipped in the package, fold averages equal the paper's, self-contained HTML, plots."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covid_cxr.cli import main
from covid_cxr.errors import DataError
from covid_cxr.evaluate import paper, plots
from covid_cxr.evaluate.metrics import confusion_matrix, roc_auc, table3_row
from covid_cxr.evaluate.predictions import validate_predictions, write_predictions
from covid_cxr.evaluate.run import write_evaluation
from covid_cxr.labels import CLASSES
from covid_cxr.report.report import render_audit_section, write_report
from tests.test_metrics import predictions_from_confusion

OUR_NAME = {v: k for k, v in paper.NETWORK_NAMES.items()}


def _eval_dir(folder: Path, frame: pd.DataFrame, network: str, fold: int, split: str = "test") -> Path:
    """An evaluation folder as 'evaluate' leaves it, minus the plots (not needed to read it back)."""
    write_predictions(frame, folder / "predictions.csv")
    info = {"network": network, "fold": fold, "split": split}
    (folder / "metrics.json").write_text(json.dumps({"evaluation": info}))
    return folder


def _with_probs(n: tuple[int, int, int], seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    true = np.repeat([0, 1, 2], n)
    logits = rng.normal(size=(len(true), 3))
    logits[np.arange(len(true)), true] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = pd.DataFrame({"image_id": [f"img{i}" for i in range(len(true))],
                          "patient_id": [f"pat{i // 2}" for i in range(len(true))],
                          "source": "synthetic", "label": np.array(CLASSES)[true]})
    for k, c in enumerate(CLASSES):
        frame[f"p_{c}"] = probs[:, k]
    frame["pred"] = np.array(CLASSES)[probs.argmax(axis=1)]
    return frame


@pytest.mark.fixtures
def test_shipped_paper_tables_equal_the_fixtures(fixtures_dir: Path) -> None:
    for name, shipped in (("table3.csv", paper.table3()), ("table4.csv", paper.table4())):
        fixture = pd.read_csv(fixtures_dir / "paper_tables" / name, dtype={"fold": str})
        pd.testing.assert_frame_equal(shipped, fixture, check_exact=True)


def test_confusion_from_counts_reproduces_every_table3_row() -> None:
    t3 = paper.table3()
    for _, row in t3.iterrows():
        cm = paper.confusion_from_counts(row)
        assert (cm >= 0).all()
        assert table3_row(cm) == {k: int(row[k]) for k in t3.columns[2:]}
    assert paper.paper_network_name("concat") == "Concatenated"
    assert paper.paper_network_name("ResNet50V2") == "ResNet50V2"
    assert paper.paper_average("xception")["covid_recall"] == 73.35
    assert paper.paper_average("densenet") is None


def test_report_over_five_folds_gives_the_papers_average_rows(tmp_path: Path) -> None:
    runs = []
    for _, row in paper.table3().iterrows():
        frame = predictions_from_confusion(paper.confusion_from_counts(row))
        runs.append(_eval_dir(tmp_path / f"{row['network']}-{row['fold']}", frame, OUR_NAME[row["network"]],
                              int(row["fold"])))
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"xception-test", "resnet50v2-test", "concat-test"}
    for slug, network in (("xception-test", "Xception"), ("resnet50v2-test", "ResNet50V2"),
                          ("concat-test", "Concatenated")):
        want = paper.paper_average(network)
        assert summary[slug]["paper_average"] == want
        for key, value in want.items():
            assert abs(summary[slug]["mean"][key] - value) < 0.01, (network, key)
        # Pooled Table 3 is the sum of the folds' counts.
        t3 = paper.table3()
        assert summary[slug]["pooled_table3"]["covid_correct"] == t3[t3["network"] == network]["covid_correct"].sum()
    text = (out / "report.md").read_text()
    assert "paper avg (Concatenated, 5 folds) | mean − paper |" in text and "80.53" in text and "35.27" in text
    assert "Did it learn the disease?" not in text  # no audit results given: no section at all
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page), "the HTML page must not load anything"
    assert "<style>" in page and "<link" not in page and "<script" not in page


def test_report_with_probabilities_embeds_all_plots(tmp_path: Path) -> None:
    runs = [_eval_dir(tmp_path / f"f{k}", _with_probs((8, 30, 40), seed=k), "resnet50v2", k) for k in (1, 2)]
    path = write_report(runs, tmp_path / "report", network_label="My ResNet", n_boot=50)
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 3  # pooled confusion, ROC, calibration
    assert "My ResNet" in page and "paper avg (ResNet50V2, 5 folds)" in page
    assert "mean of 2 folds − paper's 5" in (tmp_path / "report" / "report.md").read_text()
    files = sorted(p.name for p in (tmp_path / "report" / "report_files").iterdir())
    assert files == ["resnet50v2-test-calibration.png", "resnet50v2-test-confusion_matrix.png",
                     "resnet50v2-test-roc.png"]
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["resnet50v2-test"]
    assert summary["pooled"]["n"] == 2 * 78
    pooled = summary["pooled"]
    assert pooled["covid_auc_ci_low"] < pooled["covid_auc"] < pooled["covid_auc_ci_high"]


def test_report_refuses_a_fold_given_twice_and_nothing(tmp_path: Path) -> None:
    frame = _with_probs((3, 5, 5), seed=0)
    a = _eval_dir(tmp_path / "a", frame, "concat", 1)
    b = _eval_dir(tmp_path / "b", frame, "concat", 1)
    with pytest.raises(DataError, match="fold 1"):
        write_report([a, b], tmp_path / "out", n_boot=0)
    with pytest.raises(DataError, match="no runs"):
        write_report([], tmp_path / "out")
    with pytest.raises(DataError, match="evaluate"):
        write_report([tmp_path], tmp_path / "out")  # a folder with no predictions.csv
    prepared = tmp_path / "data"
    prepared.mkdir()
    (prepared / "prepare.json").write_text("{}")
    (prepared / "manifest.csv").write_text("image_id,label\n")
    with pytest.raises(DataError, match=r"data is a prepared data folder, not a run: give the run folders"):
        write_report([prepared], tmp_path / "out")


def test_audit_plug_in_point() -> None:
    assert render_audit_section(None) == ("", "")
    assert render_audit_section({}) == ("", "")
    seen = {"sources": ["cohen"], "n": 30, "recall": {"value": 0.8, "low": 0.6, "high": 0.9}}
    unseen = {"n": 20, "recall": {"value": 0.2, "low": 0.1, "high": 0.4}}
    result = {"audit": "cross_source", "flags": [{"code": "x", "message": "recall drops on the new source"}],
              "metrics": {"class": "covid", "source": "new-hospital", "in_source": seen, "unseen_source": unseen}}
    md, page = render_audit_section({"cross_source": result})
    assert "Did it learn the disease?" in md and "recall drops on the new source" in page


def test_plots_show_what_they_say(tmp_path: Path) -> None:
    cm = np.array([[26, 2, 3], [40, 398, 39], [61, 56, 622]])
    fig = plots.confusion_figure(cm)
    counts_ax, normed_ax = fig.axes
    assert sorted(int(t.get_text()) for t in counts_ax.texts) == sorted(cm.ravel().tolist())
    assert "83.9%" in [t.get_text() for t in normed_ax.texts]  # 26/31 on the covid diagonal
    frame = _with_probs((10, 40, 50), seed=5)
    preds = validate_predictions(frame, "test")
    fig = plots.roc_figure(preds.true_idx, preds.probs)
    covid = [line for line in fig.axes[0].lines if line.get_label().startswith("COVID-19")][0]
    x, y = covid.get_data()
    assert np.trapezoid(y, x) == pytest.approx(roc_auc(preds.true_idx == 0, preds.probs[:, 0]))
    paths = plots.save_figure(fig, tmp_path / "roc.png", tmp_path / "roc.pdf")
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"
    assert plots.figure_png(plots.calibration_figure(preds.true_idx, preds.probs))[:4] == b"\x89PNG"


def test_the_roc_mark_says_when_the_decisions_may_lie_off_the_curve() -> None:
    """A threshold on p(COVID-19) is a point of the COVID-19 curve; argmax, or folds at different thresholds, are
    not, and the label says so instead of letting the mark read as a point of the curve."""
    from sklearn.metrics import roc_curve

    from covid_cxr.evaluate.metrics import compute_metrics
    from covid_cxr.evaluate.run import roc_marks
    from covid_cxr.operating_point import OperatingPoint

    frame = _with_probs((40, 60, 80), seed=3)
    probs = frame[[f"p_{c}" for c in CLASSES]].to_numpy()
    true = frame["label"].map(CLASSES.index).to_numpy()
    rule = OperatingPoint(rule="sensitivity", target=0.9, threshold=0.3).to_dict()
    decided = np.array(CLASSES)[OperatingPoint.from_dict(rule).decide(probs, CLASSES)]
    metrics = compute_metrics(confusion_matrix(frame["label"], decided), n_boot=0)
    (mark,) = roc_marks(metrics, [rule])
    fpr, tpr, thresholds = roc_curve(true == 0, probs[:, 0])
    at = np.flatnonzero(thresholds >= 0.3)[-1]  # the curve's point at that threshold
    assert (mark.fpr, mark.tpr) == pytest.approx((fpr[at], tpr[at]))
    assert mark.label.startswith("sensitivity=0.9: sens ") and "off the" not in mark.label
    argmax = compute_metrics(confusion_matrix(frame["label"], frame["pred"]), n_boot=0)
    label = roc_marks(argmax, [None])[0].label
    assert label.startswith("argmax: sens") and "may lie off the curve" in label
    assert "thresholds differ" in roc_marks(metrics, [rule, None])[0].label


def test_write_evaluation_writes_every_file(tmp_path: Path) -> None:
    frame = _with_probs((5, 20, 25), seed=6)
    metrics = write_evaluation(validate_predictions(frame, "t"), tmp_path, {"network": "concat", "fold": 2,
                                                                             "split": "val"}, n_boot=20)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"metrics.json", "table3.csv", "table4.csv", "confusion_matrix.png", "confusion_matrix.pdf",
                     "roc.png", "calibration.png"}
    t3 = pd.read_csv(tmp_path / "table3.csv")
    cm = confusion_matrix(frame["label"], frame["pred"])
    assert t3.iloc[0]["covid_correct"] == cm[0, 0] and t3.iloc[0]["fold"] == 2
    t4 = pd.read_csv(tmp_path / "table4.csv")
    assert t4.iloc[0]["accuracy"] == pytest.approx(round(metrics["accuracy"], 2))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["evaluation"]["split"] == "val" and saved["covid_correct"] == cm[0, 0]


def test_an_evaluation_stopped_part_way_leaves_no_figures_beside_new_predictions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate wrote predictions.csv, then the bootstrap and plots, then metrics.json: a Ctrl-C in between left a
    threshold rule's predictions beside argmax's metrics.json, and the report mixed the two. Now metrics.json goes
    first and comes back last, and a run's evaluation folder without it is refused, not read as a bare file."""
    from covid_cxr.runs.folder import RunFolder, RunInfo

    run = tmp_path / "run"
    RunFolder(run).write_info(RunInfo(network="concat", fold=1, protocol="strict", status="finished"))
    info = {"network": "concat", "fold": 1, "split": "test"}
    first = _with_probs((6, 6, 6), seed=1)
    write_evaluation(validate_predictions(first, "t"), run / "eval-test", info, table=first, n_boot=0)
    write_report([run], tmp_path / "report-1", n_boot=0)  # a whole evaluation reads

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("covid_cxr.evaluate.run.plots.save_figure", stop)
    second = _with_probs((6, 6, 6), seed=2)
    with pytest.raises(KeyboardInterrupt):
        write_evaluation(validate_predictions(second, "t"), run / "eval-test", info, table=second, n_boot=0)
    assert not (run / "eval-test" / "metrics.json").exists()
    written = pd.read_csv(run / "eval-test" / "predictions.csv")
    assert np.allclose(written["p_covid"], second["p_covid"], atol=1e-5)
    assert not np.allclose(written["p_covid"], first["p_covid"], atol=1e-5)
    with pytest.raises(DataError, match=r"eval-test: an evaluation that did not finish .*covid-cxr evaluate .*run"):
        write_report([run], tmp_path / "report-2", n_boot=0)
    assert not (tmp_path / "report-2").exists()


def test_plots_module_leaves_matplotlib_global_state_alone() -> None:
    code = ("import sys; import covid_cxr.evaluate.plots as p; p.figure_png(p.confusion_figure([[1, 0], [0, 1]], "
            "['covid', 'normal'])); assert 'matplotlib.pyplot' not in sys.modules; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_validation_figures_get_no_paper_column_and_an_undefined_fold_leaves_mean_and_sd_undefined(
        tmp_path: Path) -> None:  # fmt: skip
    """The paper's averages are of its test sets; and mean and sd are taken over the same folds: a fold where COVID-19
    precision is undefined (it never predicts COVID-19) makes both n/a, not the sd of the other folds beside n/a."""
    frames = [_with_probs((8, 30, 40), seed=k) for k in (1, 2, 3)]
    frames[1]["pred"] = frames[1]["pred"].replace("covid", "normal")
    runs = [_eval_dir(tmp_path / f"f{k}", frame, "concat", k, split="val") for k, frame in enumerate(frames, 1)]
    write_report(runs, tmp_path / "report", n_boot=0)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "paper avg" not in text and "mean − paper" not in text
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["concat-val"]
    assert summary["paper_average"] is None
    assert summary["mean"]["covid_precision"] is None and summary["sd"]["covid_precision"] is None
    assert summary["sd"]["covid_recall"] is not None  # defined in every fold (0 in fold 2): both are numbers
    row = next(line for line in text.splitlines() if line.startswith("| COVID-19 precision |"))
    assert "n/a ± " not in row and " ± n/a" not in row


def test_report_on_bare_predictions_files(tmp_path: Path) -> None:
    """Files from elsewhere (no metrics.json): folds are named by their folders, no paper row is invented."""
    paths = []
    for name, seed in (("site-a", 1), ("site-b", 2)):
        frame = _with_probs((4, 6, 6), seed=seed)[["label", "pred"]]
        paths.append(write_predictions(frame, tmp_path / name / "predictions.csv"))
    page = write_report(paths, tmp_path / "out", n_boot=0).read_text()
    assert "fold site-a" in page and "fold site-b" in page and "paper avg" not in page
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["unknown-test"]
    assert summary["folds"] == ["site-a", "site-b"] and summary["paper_average"] is None


def test_a_folder_name_that_is_not_utf8_is_written_escaped_not_a_crash(tmp_path: Path) -> None:
    """A fold's folder (or a data path in metrics.json) holding bytes that are not UTF-8 used to stop the report
    with "surrogates not allowed"; it is now shown with the byte escaped, and every other file is written."""
    site = os.fsdecode(b"site-\xe9")
    paths = [write_predictions(_with_probs((4, 6, 6), seed=k)[["label", "pred"]], tmp_path / name / "predictions.csv")
             for k, name in enumerate((site, "site-b"))]
    page = write_report(paths, tmp_path / "out", n_boot=0).read_text(encoding="utf-8")
    assert "fold site-\\xe9" in page and "fold site-b" in page
    assert "site-\\xe9" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]"])
def test_a_damaged_metrics_file_is_named_with_the_fix(tmp_path: Path, damage: str) -> None:
    """A broken metrics.json beside the predictions stops the report with the file and the command that rewrites it."""
    folder = _eval_dir(tmp_path / "eval-test", _with_probs((6, 6, 6), seed=1), "concat", 1)
    (folder / "metrics.json").write_text(damage)
    with pytest.raises(DataError, match=r"metrics\.json: .*re-run 'covid-cxr evaluate'"):
        write_report([folder], tmp_path / "report", n_boot=0)


def _run_folder(root: Path, fold: int, seed: int, epochs: int, frame: pd.DataFrame) -> Path:
    """A run folder as training and evaluation leave it, as far as the report reads it: config.yaml, run.json and
    eval-test/ (the weights are not read)."""
    from covid_cxr.config import dump_config, make_config
    from covid_cxr.runs.folder import RunFolder, RunInfo

    config = make_config("cpu", network="xception", fold=fold, epochs_per_phase=epochs, seed=seed, image_size=71,
                         batch_size=3, data=str(root / "data"), out=str(root), name=f"run{fold}")
    dump_config(config, root / f"run{fold}" / "config.yaml")
    RunFolder(root / f"run{fold}").write_info(RunInfo(network="xception", fold=fold, protocol="strict",
                                                      status="finished"))
    _eval_dir(root / f"run{fold}" / "eval-test", frame, "xception", fold)
    return root / f"run{fold}"


def test_report_refuses_folds_trained_with_other_settings_unless_allowed(tmp_path: Path) -> None:
    """The reviewer's scenario: 2 vs 1 epochs a phase and seeds 11 vs 0 in one report beside the paper's average."""
    runs = [_run_folder(tmp_path, 1, 11, 2, _with_probs((6, 6, 6), 1)),
            _run_folder(tmp_path, 2, 0, 1, _with_probs((6, 6, 6), 2))]
    out = tmp_path / "report"
    with pytest.raises(DataError, match=r"xception runs were trained with different settings \(epochs_per_phase: "
                       r"fold 1 \(.*run1\) 2, fold 2 \(.*run2\) 1\).*--allow-mixed-settings") as refused:
        write_report(runs, out, n_boot=0)
    assert "seed:" not in str(refused.value)  # a seed per fold is no other recipe
    assert not out.exists()  # refused before a byte is written
    assert main(["report", *map(str, runs), "--out", str(out), "--bootstrap", "0", "--allow-mixed-settings"]) == 0
    text = (out / "report.md").read_text()
    assert "mean ± sd (mixed settings)" in text and "Mixed settings: these folds differ in epochs_per_phase" in text
    settings = text.split("### Training settings")[1].split("###")[0]
    assert "| fold 1 | cpu | none | 2 | 71 | 3 | 0.0001 | 11 |" in settings
    assert "| fold 2 | cpu | none | 1 | 71 | 3 | 0.0001 | 0 |" in settings
    assert "| paper (Table 2) | paper | imagenet | 100 | 300 | 30 | 0.0001 | n/a |" in settings
    summary = json.loads((out / "summary.json").read_text())["xception-test"]
    assert summary["mixed_settings"] == ["epochs_per_phase"] and summary["settings"]["2"]["epochs_per_phase"] == 1


def test_report_takes_folds_that_differ_only_in_seed_as_one_recipe(tmp_path: Path) -> None:
    runs = [_run_folder(tmp_path, k, seed, 1, _with_probs((6, 6, 6), k)) for k, seed in ((1, 11), (2, 0))]
    path = write_report([*runs, _eval_dir(tmp_path / "bare", _with_probs((6, 6, 6), 3), "xception", 3)],
                        tmp_path / "report", n_boot=0)  # a bare evaluation folder: no settings to compare
    text = path.with_suffix(".md").read_text()
    assert "(mixed settings)" not in text and "Mixed settings" not in text
    settings = text.split("### Training settings")[1].split("###")[0]
    assert "| fold 1 | cpu | none | 1 |" in settings and "| fold 3 |" not in settings


def test_one_fold_pooled_keeps_evaluates_auc_intervals_and_says_how_many_resamples(tmp_path: Path) -> None:
    """The report's pooled AUC interval for one fold was a second bootstrap (the report's 1000 resamples against
    evaluate's 200), so the card (evaluate's) and the report differed in the third decimal for the same figure."""
    frame = _with_probs((10, 30, 30), seed=3)
    folder = tmp_path / "eval-test"
    write_predictions(frame, folder / "predictions.csv")
    saved = write_evaluation(validate_predictions(frame, "t"), folder, {"network": "concat", "fold": 1,
                                                                        "split": "test"}, n_boot=200, seed=5)
    report = write_report([folder], tmp_path / "report", n_boot=1000)
    pooled = json.loads((report.parent / "summary.json").read_text())["concat-test"]["pooled"]
    for c in CLASSES:
        for end in ("", "_ci_low", "_ci_high"):
            assert pooled[f"{c}_auc{end}"] == saved[f"{c}_auc{end}"]
    assert pooled["auc_bootstrap"]["resamples"] == 200
    assert "CI from a bootstrap over patients, 200 resamples" in report.with_suffix(".md").read_text()
