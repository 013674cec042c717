"""evaluate_run end to end: synthetic data prepared at 72 px, an untrained checkpoint, every artefact written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covid_cxr.cli import main
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.data.splits import SplitSettings
from covid_cxr.data.prepared import PreparedData
from covid_cxr.errors import DataError
from covid_cxr.evaluate.predictions import COLUMNS, predictions_frame, read_predictions
from covid_cxr.evaluate.run import evaluate_run
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.inference.torch_model import TorchPredictor
from covid_cxr.labels import CLASSES, KERAS_AUTHORS_ORDER
from covid_cxr.models import build_model
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.checkpoint import Checkpoint, save_checkpoint
from covid_cxr.synth import make_synthetic

SIZE = 72
CPU = InferenceSettings(device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    make_synthetic(root / "raw", seed=1, n_covid=10, n_pneumonia=12, n_normal=10, size=96, workers=1)
    prepare_dataset(PrepareSettings(out=root / "data", covid_chestxray=root / "raw" / "covid-chestxray-dataset",
                                    rsna=root / "raw" / "rsna", split=SplitSettings(folds=2, phases=2), image_size=SIZE,
                                    workers=1),
                    progress=False)
    return root / "data"


def _checkpoint(path: Path, classes: tuple[str, ...] = CLASSES, size: int = SIZE, resize: str = "area") -> Path:
    torch.manual_seed(0)
    model = build_model("resnet50v2", num_classes=3, image_size=size)
    pre = Preprocessing(image_size=size, resize=resize)
    ckpt = Checkpoint(network="resnet50v2", classes=classes, preprocessing=pre,
                      model_state=model.state_dict())  # records no training: fold and data are given
    return save_checkpoint(ckpt, path)


def _run_folder(folder: Path, data: Path, fold: int, split_hash: str) -> Path:
    _checkpoint(folder / "best.pt", classes=KERAS_AUTHORS_ORDER)
    run = {"network": "resnet50v2", "fold": fold, "data": str(data), "protocol": "strict",
           "split_hash": split_hash, "image_size": SIZE, "status": "finished", "best_epoch": 3}
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def test_evaluate_a_run_folder_writes_every_file(data: Path, tmp_path: Path) -> None:
    prepared = PreparedData(data)
    fold = prepared.fold(2)
    run = _run_folder(tmp_path / "run", data, 2, fold.split_hash)
    how = InferenceSettings(batch_size=16, device="cpu", precision="fp32", backend="torch")
    result = evaluate_run(run, how, n_boot=50, progress=False)  # compared with TorchPredictor below, to float rounding
    assert result.out_dir == run / "eval-test"
    assert {p.name for p in result.out_dir.iterdir()} == {
        "predictions.csv", "metrics.json", "table3.csv", "table4.csv", "confusion_matrix.png",
        "confusion_matrix.pdf", "roc.png", "calibration.png"}
    preds = read_predictions(result.out_dir / "predictions.csv")
    frame = preds.frame
    assert list(frame.columns) == list(COLUMNS)
    assert frame["image_id"].tolist() == fold.test["image_id"].tolist()
    assert frame["label"].tolist() == fold.test["label"].tolist()
    # The checkpoint's units are in the authors' Keras order; the file is in ours, and matches the model.
    cache = prepared.cache(SIZE)
    some = [0, len(frame) // 2, len(frame) - 1]
    images = cache.images[cache.rows(fold.test["image_id"].iloc[some])]
    direct = TorchPredictor(_load(run / "best.pt"), device="cpu", precision="fp32").predict_proba(images)
    # The file keeps 9 significant digits, and batches of 16 against 3 may take other kernels (AVX2 against AVX-512 CPUs
    # differ there); a column in the wrong order would be off by far more than 1e-5.
    for k, name in enumerate(KERAS_AUTHORS_ORDER):
        np.testing.assert_allclose(frame[f"p_{name}"].iloc[some], direct[:, k], atol=1e-5)
    saved = json.loads((result.out_dir / "metrics.json").read_text())
    assert saved["n"] == len(fold.test) and saved["evaluation"]["fold"] == 2
    assert saved["evaluation"]["split_hash"] == fold.split_hash and saved["evaluation"]["images_per_second"] > 0
    assert (saved["evaluation"]["precision"], saved["evaluation"]["backend"]) == ("fp32", "torch")
    assert saved["covid_n"] == int((fold.test["label"] == "covid").sum())
    t3 = pd.read_csv(result.out_dir / "table3.csv")
    assert t3.iloc[0][[f"{c}_correct" for c in CLASSES]].sum() == (frame["label"] == frame["pred"]).sum()


def _load(path: Path) -> Checkpoint:
    from covid_cxr.runs.checkpoint import load_checkpoint

    return load_checkpoint(path)


def test_evaluate_a_checkpoint_from_the_command_line(data: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "model.pt")
    assert main(["evaluate", str(ckpt), "--data", str(data), "--fold", "1", "--split", "val", "--batch-size", "4",
                 "--device", "cpu", "--no-progress", "--bootstrap", "20", "--prevalence", "0.05"]) == 0
    out = tmp_path / "model-eval-val"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == len(PreparedData(data).fold(1).val)
    assert "covid_ppv_at_prevalence" in metrics and metrics["evaluation"]["split"] == "val"


def test_evaluate_refuses_what_it_cannot_evaluate(data: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "model.pt")
    with pytest.raises(DataError, match="--fold"):
        evaluate_run(ckpt, data=data)
    with pytest.raises(DataError, match="--data"):
        evaluate_run(ckpt, fold=1)
    with pytest.raises(DataError, match="folds 1-2"):
        evaluate_run(ckpt, data=data, fold=3)
    with pytest.raises(DataError, match="split"):
        evaluate_run(ckpt, data=data, fold=1, split="train")
    with pytest.raises(DataError, match="not a run folder"):
        evaluate_run(tmp_path, data=data, fold=1)
    with pytest.raises(DataError, match="--image-size 80"):
        evaluate_run(_checkpoint(tmp_path / "big.pt", size=80), data=data, fold=1, progress=False)
    run = _run_folder(tmp_path / "run", data, 1, "0" * 64)  # trained on other splits than these
    with pytest.raises(DataError, match="may hold training images"):
        evaluate_run(run, progress=False)
    with pytest.raises(DataError, match="may hold training images"):  # by path: still the run's data and fold
        evaluate_run(run / "best.pt", progress=False)
    assert main(["evaluate", str(tmp_path / "nothing.pt"), "--data", str(data), "--fold", "1"]) == 2
    (tmp_path / "afile").write_text("")
    with pytest.raises(DataError, match="--out .*afile is a file; give a folder"):  # before the evaluation, not after
        evaluate_run(ckpt, data=data, fold=1, out_dir=tmp_path / "afile", progress=False)


def test_predictions_frame_reorders_units_to_our_class_order() -> None:
    split = pd.DataFrame({"image_id": ["a", "b"], "patient_id": ["1", "2"], "source": ["s", "s"],
                          "label": ["COVID-19", "normal"]})
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])  # covid, normal, pneumonia
    frame = predictions_frame(split, probs, KERAS_AUTHORS_ORDER)
    assert frame["p_normal"].tolist() == [0.2, 0.6] and frame["p_pneumonia"].tolist() == [0.1, 0.3]
    assert frame["pred"].tolist() == ["covid", "normal"] and frame["label"].tolist() == ["covid", "normal"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("label,p_covid\ncovid,1\n", r"lacks the column\(s\) pred \(it has label, p_covid\)"),
        ("label,pred\n", "no rows"),
        ("", "is empty; it needs a header row"),
        ("label,pred\ncovid,covid\nflu,normal\n", "row 3: unknown class 'flu'"),
        ("label,pred,p_covid,p_pneumonia,p_normal\ncovid,covid,0.5,0.2,0.2\n", "row 2: probabilities sum to 0.9"),
        ("label,pred,p_covid,p_pneumonia\ncovid,covid,0.5,0.5\n", "not p_normal"),
        ("label,pred,p_covid,p_pneumonia,p_normal\ncovid,covid,x,0.5,0.5\n", "numbers in"),
    ],
)
def test_bad_predictions_files_get_clear_messages(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_predictions(path)
    assert str(path) in str(info.value)


def test_pred_is_authoritative_and_spellings_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    # pred disagrees with the argmax on purpose (a user's threshold): pred counts.
    path.write_text("label,pred,p_covid,p_pneumonia,p_normal\nCOVID-19,normal,0.6,0.1,0.3\nNo Finding,normal,0,0,1\n")
    preds = read_predictions(path)
    assert preds.frame["label"].tolist() == ["covid", "normal"]
    assert preds.confusion()[0, 2] == 1 and preds.groups is None


def test_the_patient_bootstrap_keeps_patients_of_two_sources_apart(tmp_path: Path) -> None:
    # Patient "3" of NIH and patient "3" of covid-chestxray are two people: two resampling groups.
    path = tmp_path / "p.csv"
    path.write_text("image_id,patient_id,source,label,pred\na,3,nih,normal,normal\nb,3,covid-chestxray,covid,covid\n"
                    "c,3,nih,normal,normal\n")
    assert read_predictions(path).groups.tolist() == ["nih:3", "covid-chestxray:3", "nih:3"]
    path.write_text("patient_id,label,pred\n3,normal,normal\n3,covid,covid\n")  # no sources: the ids as given
    assert read_predictions(path).groups.tolist() == ["3", "3"]


def test_a_checkpoint_that_resizes_otherwise_is_fed_images_resized_its_way(data: Path, tmp_path: Path, capsys) -> None:
    """An authors'-style (bilinear) checkpoint never sees the area cache: the images are decoded again, once."""
    from covid_cxr.data.images import load_image

    ckpt = _checkpoint(tmp_path / "bilinear.pt", resize="bilinear")
    result = evaluate_run(ckpt, CPU, data=data, fold=1, n_boot=20, progress=False)
    assert "built by 'area'" in capsys.readouterr().err
    prepared = PreparedData(data)
    cache = prepared.cache(SIZE, "bilinear")
    assert cache.resize == "bilinear" and Path(result.info["cache"]) == cache.folder.resolve()
    assert result.info["resize"] == "bilinear" and prepared.cache(SIZE).resize == "area"
    test = prepared.fold(1).test.iloc[:4]
    paths = prepared.manifest.set_index("image_id").loc[test["image_id"], "path"]
    images = np.stack([load_image(p, SIZE, resize="bilinear") for p in paths])
    np.testing.assert_array_equal(cache.images[cache.rows(test["image_id"])], images)
    assert not np.array_equal(images, prepared.cache(SIZE).images[prepared.cache(SIZE).rows(test["image_id"])])
    direct = TorchPredictor(_load(ckpt), device="cpu", precision="fp32").predict_proba(images)
    np.testing.assert_allclose(result.predictions[[f"p_{c}" for c in CLASSES]].to_numpy()[:4], direct, atol=2e-6)
    evaluate_run(ckpt, CPU, data=data, fold=1, n_boot=20, progress=False)
    assert "decoding them again" not in capsys.readouterr().err  # the second run reuses the bilinear cache


def test_a_resize_mismatch_without_the_source_files_is_refused(tmp_path: Path) -> None:
    root = tmp_path
    make_synthetic(root / "raw", seed=2, n_covid=10, n_pneumonia=12, n_normal=10, size=96, workers=1)
    prepare_dataset(PrepareSettings(out=root / "data", covid_chestxray=root / "raw" / "covid-chestxray-dataset",
                                    rsna=root / "raw" / "rsna", split=SplitSettings(folds=2, phases=2), image_size=SIZE,
                                    workers=1),
                    progress=False)
    gone = Path(PreparedData(root / "data").manifest["path"].iloc[0])
    gone.unlink()
    ckpt = _checkpoint(tmp_path / "bilinear.pt", resize="bilinear")
    with pytest.raises(DataError, match="built by 'area'.*cannot be decoded again") as err:
        evaluate_run(ckpt, InferenceSettings(device="cpu"), data=root / "data", fold=1, n_boot=20, progress=False)
    assert gone.name in str(err.value)


# --- external validation: the real fixture images as another hospital's, for a model trained on synthetic data ---


@pytest.fixture(scope="module")
def trained_run(data: Path) -> Path:
    """A tiny Xception trained for a few steps (2 phases x 1 epoch) on the synthetic fold 1, then evaluated."""
    from covid_cxr.config import make_config
    from covid_cxr.train.runner import train_fold

    config = make_config("cpu", data=str(data), network="xception", fold=1, image_size=SIZE, epochs_per_phase=1,
                         batch_size=4, precision="fp32", deterministic=True, seed=5, out=str(data.parent / "runs"),
                         name="tiny")
    run = train_fold(config, live=False)
    evaluate_run(run, CPU, n_boot=20, progress=False)
    return run


@pytest.mark.slow
def test_external_evaluation_on_real_images_and_the_report_shows_both_columns(
        trained_run: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    labels = fixtures_dir / "real_cxr" / "labels.csv"
    argv = ["evaluate", str(trained_run), "--external", str(labels), "--name", "real-cxr", "--device", "cpu",
            "--precision", "fp32", "--bootstrap", "20", "--no-progress"]
    assert main(argv) == 0
    out = trained_run / "external-real-cxr"
    saved = json.loads((out / "metrics.json").read_text())
    truth = pd.read_csv(labels)
    assert saved["evaluation"]["kind"] == "external" and saved["n"] == len(truth)
    assert saved["evaluation"]["internal"] == str((trained_run / "eval-test").resolve())
    assert saved["evaluation"]["sources"] == truth["source"].value_counts().to_dict()
    for c in CLASSES:  # every figure with its interval, as for the internal test set
        assert saved[f"{c}_n"] == (truth["label"] == c).sum()
        assert saved[f"{c}_recall_ci_low"] <= saved[f"{c}_recall"] <= saved[f"{c}_recall_ci_high"]
    assert {p.name for p in out.iterdir()} >= {"predictions.csv", "metrics.json", "roc.png", "confusion_matrix.png"}

    report = tmp_path / "report"
    assert main(["report", str(trained_run), "--out", str(report), "--bootstrap", "20"]) == 0
    md = (report / "report.md").read_text()
    assert "External validation" in md and "Operating point" in md
    external = md.split("## External validation", 1)[1].splitlines()
    header = next(line for line in external if line.startswith("| metric | internal: "))
    assert "external: real-cxr (N = 219)" in header and "drop: external − internal" in header
    recall_row = next(line for line in external if line.startswith("| COVID-19 recall |"))
    assert recall_row.count("[") == 3  # internal [CI], external [CI], drop [CI]
    assert "real-cxr" in (report / "report.html").read_text()
    summary = json.loads((report / "summary.json").read_text())
    assert summary["external"][0]["name"] == "real-cxr"


@pytest.mark.slow
def test_a_class_absent_from_the_external_set_is_reported_absent_not_zero(
        trained_run: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    from covid_cxr.evaluate.external import evaluate_external
    from covid_cxr.report.report import write_report

    truth = pd.read_csv(fixtures_dir / "real_cxr" / "labels.csv")
    subset = truth[truth["label"] != "covid"].groupby("label").head(6).copy()
    subset["path"] = [str(fixtures_dir / "real_cxr" / p) for p in subset["path"]]
    csv = tmp_path / "no-covid.csv"
    subset.to_csv(csv, index=False)
    result = evaluate_external(trained_run, csv, CPU, name="no-covid", out_dir=tmp_path / "ext", n_boot=20,
                               progress=False)
    assert result.metrics["absent_classes"] == ["covid"] and result.info["classes_absent"] == ["covid"]
    html_path = write_report([trained_run / "eval-test", tmp_path / "ext"], tmp_path / "report", n_boot=20)
    md = html_path.with_suffix(".md").read_text()
    external = md.split("## External validation", 1)[1].splitlines()
    recall_row = next(line for line in external if line.startswith("| COVID-19 recall |"))
    assert "absent (no images)" in recall_row and "| n/a |" in recall_row  # no drop either
    assert "Absent from this set" in md


def test_external_refuses_labels_the_model_does_not_predict(tmp_path: Path) -> None:
    from covid_cxr.evaluate.external import evaluate_external

    ckpt = _checkpoint(tmp_path / "model.pt")
    (tmp_path / "set" / "tuberculosis").mkdir(parents=True)
    with pytest.raises(DataError, match="tuberculosis"):
        evaluate_external(ckpt, tmp_path / "set", progress=False)
    with pytest.raises(DataError, match="no such folder or CSV"):
        evaluate_external(ckpt, tmp_path / "missing.csv", progress=False)


def test_external_on_a_prepared_folder_reads_its_whole_manifest_from_the_cache(data: Path, tmp_path: Path) -> None:
    from covid_cxr.evaluate.external import evaluate_external

    ckpt = _checkpoint(tmp_path / "model.pt")
    result = evaluate_external(ckpt, data, CPU, name="all of it", n_boot=10, progress=False)
    manifest = PreparedData(data).manifest
    assert result.out_dir == tmp_path / "model-external-all_of_it"
    assert result.predictions["image_id"].tolist() == manifest["image_id"].tolist()
    cache = PreparedData(data).cache(SIZE)
    direct = TorchPredictor(_load(ckpt), device="cpu", precision="fp32").predict_proba(
        cache.images[cache.rows(manifest["image_id"].iloc[:3])])
    np.testing.assert_allclose(result.predictions[[f"p_{c}" for c in CLASSES]].to_numpy()[:3], direct, atol=2e-6)
    assert result.info["classes_absent"] == [] and result.metrics["absent_classes"] == []
