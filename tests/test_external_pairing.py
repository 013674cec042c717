"""External evaluation as users meet it: where it is written, what it is compared with, and what the card,
the report and the console say. Real runs: synthetic data prepared at 72 px, an untrained checkpoint in a run
folder, ``evaluate_run`` and ``evaluate_external`` on real PNG files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.errors import BytesLengthException

import covid_cxr.evaluate.external as external_module
from covid_cxr.atomic import file_sha256
from covid_cxr.cli import main
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.sources.covidx import read_covidx
from covid_cxr.data.sources.folder import read_folder
from covid_cxr.data.splits import SplitSettings
from covid_cxr.deploy import calibration
from covid_cxr.errors import DataError
from covid_cxr.evaluate.external import evaluate_external
from covid_cxr.evaluate.predictions import (
    predictions_frame,
    read_predictions,
    validate_predictions,
    write_predictions,
)
from covid_cxr.evaluate.run import calibrate, evaluate_run
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.labels import CLASSES
from covid_cxr.preprocess import Preprocessing
from covid_cxr.report.report import load_evaluation, write_report
from covid_cxr.runs.evaluations import evaluations
from covid_cxr.runs.model_card import build_card, facts_from_checkpoint
from covid_cxr.synth import make_synthetic
from tests.test_evaluate import SIZE, _checkpoint, _run_folder
from tests.test_evaluate import data as evaluate_data  # noqa: F401 - test_evaluate's prepared set, shared
from tests.test_model_card import _checkpoint as header_checkpoint

TORCH = InferenceSettings(device="cpu", precision="fp32", backend="torch")
NO_INTERNAL = ("no internal test evaluation of this model file (best.pt) at this rule: "
               "run `covid-cxr evaluate RUN` first")


@pytest.fixture(scope="module")
def evaluated(evaluate_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A run folder (an untrained resnet50v2 of fold 1 of test_evaluate's synthetic data) and its internal test
    evaluation."""
    root = tmp_path_factory.mktemp("pairing")
    run = _run_folder(root / "run", evaluate_data, 1, PreparedData(evaluate_data).fold(1).split_hash)
    evaluate_run(run, TORCH, n_boot=20, progress=False)
    return run


@pytest.fixture()
def run(evaluated: Path, tmp_path: Path) -> Path:
    """A copy of the evaluated run this test may change (calibrate, evaluate again)."""
    return Path(shutil.copytree(evaluated, tmp_path / "run"))


def _hospital(folder: Path, n: int = 9, seed: int = 0) -> Path:
    """Another hospital's images: real PNG files in ``folder`` and its ``labels.csv`` (the README's layout)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        image = np.clip(rng.normal(120 + 10 * (k % 3), 40, (96, 96)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"img{k}.png")
        rows.append({"path": f"img{k}.png", "label": CLASSES[k % 3], "patient_id": f"p{k}"})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv"


def _section(md: str) -> list[str]:
    return md.split("## External validation", 1)[1].splitlines()


# --- 1: the card and the report show what 'evaluate --external' writes, beside the right internal figures ---


def test_the_card_and_the_report_show_an_external_evaluation_with_its_drop(run: Path, tmp_path: Path) -> None:
    result = evaluate_external(run, _hospital(tmp_path / "hospital-b"), TORCH, n_boot=20, progress=False)
    assert result.out_dir == run / "external-hospital-b"
    assert result.info["internal"] == str((run / "eval-test").resolve())
    assert [e["name"] for e in evaluations(run, run / "best.pt")] == ["eval-test", "external-hospital-b"]
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    assert next(x for x in card.splitlines() if x.startswith("| external-hospital-b |")).startswith(
        "| external-hospital-b | external | external:hospital-b | 9 (3) |")
    drop = next(x for x in card.splitlines() if x.startswith("External (external-hospital-b) minus internal test"))
    assert "(eval-test, the same model file and rule)" in drop and drop.count("[") == 4  # [95% CI] and three
    html = write_report([run], tmp_path / "report", n_boot=0)
    section = _section(html.with_suffix(".md").read_text())
    assert any(x.startswith("### resnet50v2 fold 1 on hospital-b (N = 9)") for x in section)
    row = next(x for x in section if x.startswith("| accuracy |"))
    assert row.count("[") == 3  # internal [CI], external [CI], drop [CI]


# --- 2: the drop is measured against the same model file, fold and rule, or not at all ---


def test_a_rule_chosen_after_the_internal_evaluation_gets_no_drop_until_evaluated_again(run: Path,
                                                                                        tmp_path: Path) -> None:
    saved = json.loads((run / "eval-test" / "metrics.json").read_text())["evaluation"]
    assert saved["model_sha256"] == file_sha256(run / "best.pt") and saved["operating_point"]["rule"] == "argmax"
    calibrate(run, "specificity=0.5", TORCH, progress=False)  # rewrites best.pt with a threshold in it
    csv = _hospital(tmp_path / "hospital-b")
    first = evaluate_external(run, csv, TORCH, n_boot=0, progress=False)
    assert first.info["operating_point"]["rule"] == "specificity"
    assert first.info["internal"] is None and first.info["internal_missing"] == NO_INTERNAL
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    assert f"External (external-hospital-b): no drop: {NO_INTERNAL}." in card
    assert "External (external-hospital-b) minus internal test" not in card
    md = write_report([run], tmp_path / "report", n_boot=0).with_suffix(".md").read_text()
    section = _section(md)
    assert NO_INTERNAL in md
    assert next(x for x in section if x.startswith("| metric |")).startswith("| metric | internal (not given) |")

    evaluate_run(run, TORCH, n_boot=0, progress=False)  # now at the stored rule, of this very file
    again = evaluate_external(run, csv, TORCH, n_boot=0, progress=False)
    assert again.info["internal"] == str((run / "eval-test").resolve()) and "internal_missing" not in again.info
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    assert "External (external-hospital-b) minus internal test (eval-test" in card


def test_the_report_sets_each_fold_beside_its_own_internal_figures(run: Path, tmp_path: Path) -> None:
    data = Path(json.loads((run / "run.json").read_text())["data"])
    second = tmp_path / "run2"  # the same weights as fold 2's model: the same file, another fold
    second.mkdir()
    shutil.copy(run / "best.pt", second / "best.pt")
    fold2 = PreparedData(data).fold(2).split_hash
    info = {**json.loads((run / "run.json").read_text()), "fold": 2, "split_hash": fold2}
    (second / "run.json").write_text(json.dumps(info))
    evaluate_run(second, TORCH, n_boot=0, progress=False)
    evaluate_external(run, _hospital(tmp_path / "hospital-b"), TORCH, n_boot=0, progress=False)
    md = write_report([run, second], tmp_path / "report", n_boot=0).with_suffix(".md").read_text()
    header = next(x for x in _section(md) if x.startswith("| metric |"))
    n1 = len(PreparedData(data).fold(1).test)
    assert f"| internal: ResNet50V2 fold 1 test (N = {n1}) |" in header and "pooled" not in header


# --- 3: a model file inside a run folder writes into the run, and another model file never replaces best.pt's ---


def test_a_model_file_of_a_run_writes_into_the_run_folder(run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # the console's lines unwrapped
    csv = _hospital(tmp_path / "hospital-b")
    _checkpoint(run / "last.pt")  # other weights: another model file of the run
    argv = ["--external", str(csv), "--device", "cpu", "--precision", "fp32", "--backend", "torch", "--bootstrap",
            "0", "--no-progress"]
    assert main(["evaluate", str(run / "best.pt"), *argv]) == 0
    assert f"wrote {run / 'external-hospital-b'}\n" in capsys.readouterr().out
    assert main(["evaluate", str(run / "last.pt"), *argv]) == 0
    best = json.loads((run / "external-hospital-b" / "metrics.json").read_text())["evaluation"]
    last = json.loads((run / "external-hospital-b-last.pt" / "metrics.json").read_text())["evaluation"]
    assert Path(best["model"]).name == "best.pt" and Path(last["model"]).name == "last.pt"
    assert best["internal"] is not None and last["internal"] is None  # last.pt was never evaluated internally
    assert not list(run.glob("best-external-*"))
    md = write_report([run], tmp_path / "report", n_boot=0).with_suffix(".md").read_text()
    headings = [x for x in _section(md) if x.startswith("### ") and "hospital-b" in x]
    assert [h.split(" (N = ")[0] for h in headings] == ["### resnet50v2 fold 1 on hospital-b",
                                                         "### resnet50v2 fold 1 (last.pt) on hospital-b"]
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    assert "| external-hospital-b |" in card and "external-hospital-b-last.pt" not in card


# --- 4: two hospitals' labels.csv get two names; another set never silently replaces an evaluation ---


def test_each_hospitals_labels_csv_gets_its_folders_name(run: Path, tmp_path: Path, capsys) -> None:
    b = evaluate_external(run, _hospital(tmp_path / "hospital-b", seed=1), TORCH, n_boot=0, progress=False)
    c = evaluate_external(run, _hospital(tmp_path / "hospital-c", n=6, seed=2), TORCH, n_boot=0, progress=False)
    assert (b.out_dir.name, c.out_dir.name) == ("external-hospital-b", "external-hospital-c")
    assert json.loads((b.out_dir / "metrics.json").read_text())["n"] == 9
    other = _hospital(tmp_path / "elsewhere" / "hospital-b", n=6, seed=3)  # another set, the same folder name
    with pytest.raises(DataError, match=r"holds the evaluation on .*hospital-b/labels\.csv.*--name") as err:
        evaluate_external(run, other, TORCH, n_boot=0, progress=False)
    assert str(other) in str(err.value)
    assert json.loads((b.out_dir / "metrics.json").read_text())["n"] == 9  # untouched
    capsys.readouterr()
    replaced = evaluate_external(run, other, TORCH, name="hospital-b", n_boot=0, progress=False)
    first_set = (tmp_path / "hospital-b" / "labels.csv").resolve()
    assert replaced.out_dir == b.out_dir and replaced.info["replaced"] == str(first_set)
    assert f"replaced the evaluation on {first_set} in {b.out_dir}" in capsys.readouterr().err
    assert json.loads((b.out_dir / "metrics.json").read_text())["n"] == 6


# --- 5: a file the decoder fails on in an unforeseen way is that file's error; the others are evaluated ---


def _failing_on(name: str, real):
    """``load_image`` that raises pydicom's BytesLengthException (not an ImageDecodeError) for the file ``name``."""
    def load(path, *args, **kwargs):
        if Path(path).name == name:
            raise BytesLengthException("Expected total bytes to be an even multiple of bytes per value")
        return real(path, *args, **kwargs)
    return load


def test_an_unforeseen_decoding_error_skips_that_file_only(run: Path, tmp_path: Path, monkeypatch) -> None:
    csv = _hospital(tmp_path / "hospital-b")
    monkeypatch.setattr(external_module, "load_image", _failing_on("img4.png", external_module.load_image))
    result = evaluate_external(run, csv, TORCH, n_boot=0, progress=False)
    assert result.metrics["n"] == 8 and "img4" not in " ".join(result.predictions["image_id"])
    [failed] = result.info["failed"]
    assert Path(failed["path"]).name == "img4.png" and "BytesLengthException" in failed["reason"]


def test_an_unforeseen_decoding_error_skips_that_calibration_file_only(tmp_path: Path, monkeypatch) -> None:
    folder = _hospital(tmp_path / "calibration", n=4).parent
    monkeypatch.setattr(calibration, "load_image", _failing_on("img1.png", calibration.load_image))
    failures: list[tuple[str, str]] = []
    images = calibration.load_calibration_files([str(folder)], Preprocessing(SIZE), 10, failures)
    assert images.shape == (3, SIZE, SIZE)
    assert [Path(p).name for p, _ in failures] == ["img1.png"] and "BytesLengthException" in failures[0][1]


# --- 6: the AUC the report shows is the one evaluate computed ---


def test_tiny_probabilities_keep_their_order_through_predictions_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p_covid = np.r_[10 ** rng.uniform(-10, -6.5, 300), 10 ** rng.uniform(-7.5, 0, 24)]  # a confident model
    probs = np.c_[p_covid, (1 - p_covid) / 2, (1 - p_covid) / 2].astype(np.float32)
    split = pd.DataFrame({"image_id": [f"i{k}" for k in range(len(probs))], "patient_id": "p", "source": "s",
                          "label": ["normal"] * 300 + ["covid"] * 24})
    table = predictions_frame(split, probs, CLASSES)
    write_predictions(table, tmp_path / "p.csv")
    again = read_predictions(tmp_path / "p.csv")
    np.testing.assert_array_equal(again.probs.astype(np.float32), probs)  # every float32 comes back exactly
    before = validate_predictions(table, "t").metrics(n_boot=0)["covid_auc"]
    assert again.metrics(n_boot=0)["covid_auc"] == before


def test_the_report_takes_the_auc_interval_evaluate_computed(evaluated: Path, tmp_path: Path) -> None:
    folder = tmp_path / "eval"
    evaluate_run(evaluated, TORCH, out_dir=folder, n_boot=40, seed=7, progress=False)
    saved = json.loads((folder / "metrics.json").read_text())
    loaded = load_evaluation(folder, n_boot=0).metrics  # the report's own bootstrap: none
    for c in CLASSES:
        for key in (f"{c}_auc", f"{c}_auc_ci_low", f"{c}_auc_ci_high"):
            assert loaded[key] == saved[key]
    assert loaded["auc_bootstrap"] == saved["auc_bootstrap"]
    assert (loaded["auc_bootstrap"]["resamples"], loaded["auc_bootstrap"]["seed"]) == (40, 7)
    table = pd.read_csv(folder / "predictions.csv")  # predictions changed since: metrics.json no longer theirs
    table.loc[0, "pred"] = next(c for c in CLASSES if c != table.loc[0, "pred"])
    table.to_csv(folder / "predictions.csv", index=False)
    assert load_evaluation(folder, n_boot=0).metrics["auc_bootstrap"]["resamples"] == 0


# --- 7: COVIDx is cited for images that came through the COVIDx adapter only ---


def _card_of_run_trained_on(rows: pd.DataFrame, tmp_path: Path) -> str:
    folder = tmp_path / "cited"
    (folder / "splits").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"network": "resnet50v2", "fold": 1, "status": "finished"}))
    columns = ["image_id", "label", "patient_id", "source"]
    for name, part in (("phase1", rows.iloc[2:]), ("val", rows.iloc[:1]), ("test", rows.iloc[1:2])):
        part[columns].to_csv(folder / "splits" / f"{name}.csv", index=False)
    return build_card(facts_from_checkpoint(header_checkpoint(folder / "best.pt")), folder)


def test_covidx_is_cited_only_for_covidx_images(tmp_path: Path) -> None:
    tree = tmp_path / "hospital-b-images"
    for k, label in enumerate(CLASSES * 2):
        (tree / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 64), 40 * k, np.uint8)).save(tree / label / f"x{k}.png")
    hospital, _ = read_folder(tree, "hospital-b")  # as 'prepare --folder hospital-b=DIR' reads it
    card = build_card(facts_from_checkpoint(header_checkpoint(tmp_path / "plain.pt")), None)
    assert "wang2020covidnet" not in card
    card = _card_of_run_trained_on(hospital, tmp_path / "a")
    assert set(hospital["source"]) == {"hospital-b"} and "wang2020covidnet" not in card
    (tmp_path / "covidx").mkdir()
    lines = {"train": "p1 a.png COVID-19 sirm\np2 b.png normal ricord\np3 c.png pneumonia bimcv\n",
             "test": "p4 d.png COVID-19 sirm\np5 e.png normal ricord\n"}
    for split, text in lines.items():
        (tmp_path / "covidx" / f"{split}_COVIDx5.txt").write_text(text)
    covidx, _ = read_covidx([tmp_path / "covidx" / "train_COVIDx5.txt", tmp_path / "covidx" / "test_COVIDx5.txt"], None)
    assert "wang2020covidnet" in _card_of_run_trained_on(covidx, tmp_path / "b")


# --- 8: a set holding the model's own images is flagged wherever its figures appear ---


def test_a_set_of_the_models_own_images_is_flagged_everywhere(run: Path, tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    data = PreparedData(json.loads((run / "run.json").read_text())["data"])
    fold = data.fold(1)
    own = data.manifest[["path", "label"]].copy()  # the run's own prepared images, as a CSV of another 'hospital'
    own = pd.concat([own, pd.read_csv(_hospital(tmp_path / "new", n=3))
                      .assign(path=lambda f: [str(tmp_path / "new" / p) for p in f["path"]])[["path", "label"]]])
    (tmp_path / "mixed").mkdir()
    own.to_csv(tmp_path / "mixed" / "set.csv", index=False)
    monkeypatch.setenv("COLUMNS", "400")  # the console's warning on one line
    assert main(["evaluate", str(run), "--external", str(tmp_path / "mixed" / "set.csv"), "--device", "cpu",
                 "--precision", "fp32", "--backend", "torch", "--bootstrap", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    n = len(data.manifest)
    train = len(set().union(*(set(p["image_id"]) for p in fold.phases)))
    counts = {"training": train, "validation": len(fold.val), "test": len(fold.test)}
    assert sum(counts.values()) == n  # strict protocol: every prepared image is in one part of fold 1
    heading = (f"not external: {n} of {n + 3} images are the model's own data ({train} training, "
               f"{len(fold.val)} validation, {len(fold.test)} test)")
    assert "NOT EXTERNAL" in out and f"warning: {heading}" in out
    info = json.loads((run / "external-set" / "metrics.json").read_text())["evaluation"]
    assert (info["precision"], info["backend"]) == ("fp32", "torch")  # recorded, for the card's rows to name
    assert info["own_images"] == {"images": n, "of": n + 3, **counts, "compared_by": info["own_images"]["compared_by"]}
    assert info["own_images"]["compared_by"].startswith("sha256 of the file and image id")
    md = write_report([run], tmp_path / "report", n_boot=0).with_suffix(".md").read_text()
    assert f"### resnet50v2 fold 1 on set (N = {n + 3}): {heading}" in md
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    assert f"| external-set | **not external** ({n} own images) |" in card and f"external-set: {heading}" in card
    fresh = evaluate_external(run, _hospital(tmp_path / "hospital-b"), TORCH, n_boot=0, progress=False)
    assert fresh.info["own_images"]["images"] == 0 and fresh.info["warnings"] == []


def test_an_id_names_the_runs_image_only_where_the_files_agree(run: Path, tmp_path: Path) -> None:
    """A prepared folder of other images under the same ids (another set's img001.png) is not the model's own."""
    data = PreparedData(json.loads((run / "run.json").read_text())["data"])
    same = evaluate_external(run, data.root, TORCH, name="same", n_boot=0, progress=False)
    assert same.info["own_images"]["images"] == len(data.manifest)
    root = tmp_path / "other"  # the same generator and layout, other pixels: the same image ids, other files
    make_synthetic(root / "raw", seed=9, n_covid=10, n_pneumonia=12, n_normal=10, size=96, workers=1)
    prepare_dataset(PrepareSettings(out=root / "data", covid_chestxray=root / "raw" / "covid-chestxray-dataset",
                                    rsna=root / "raw" / "rsna", split=SplitSettings(folds=2, phases=2), image_size=SIZE,
                                    workers=1), progress=False)
    other = PreparedData(root / "data")
    shared_ids = set(other.manifest["image_id"]) & set(data.manifest["image_id"])
    assert shared_ids  # the test means something only if ids coincide
    result = evaluate_external(run, other.root, TORCH, name="other", n_boot=0, progress=False)
    assert result.info["own_images"]["images"] == 0


def test_a_model_with_no_record_of_its_training_is_not_checked(tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path / "loose.pt")
    result = evaluate_external(ckpt, _hospital(tmp_path / "hospital-b"), TORCH, n_boot=0, progress=False)
    assert result.out_dir == tmp_path / "loose-external-hospital-b"
    assert result.info["own_images"] is None and "was not checked" in capsys.readouterr().err.replace("\n", " ")


def test_a_skipped_file_whose_name_is_not_utf8_is_shown_as_the_other_commands_show_it(run: Path, tmp_path: Path,
                                                                                     capsys) -> None:
    """'bad\\xff.png' as predict and prepare print it, not Python's 'bad\\udcff.png'."""
    labels = _hospital(tmp_path / "hospital-c")
    tree = tmp_path / "tree"
    for k, label in enumerate(("covid", "pneumonia", "normal") * 2):
        (tree / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(labels.parent / f"img{k}.png", tree / label / f"img{k}.png")
    bad = os.fsdecode(bytes(tree / "covid") + b"/bad\xff.png")
    Path(bad).touch()
    evaluate_external(run, tree, TORCH, n_boot=0, progress=False)
    err = capsys.readouterr().err
    assert f"external: skipped {tree / 'covid'}/bad\\xff.png: file is empty" in err and "\\udcff" not in err
