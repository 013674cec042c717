"""evaluate_run end to end: synthetic data prepared at 72 px, an untrained checkpoint, every artefact written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covid_cxr.checkpoint import Checkpoint, save_checkpoint
from covid_cxr.cli import main
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.data.prepared import PreparedData
from covid_cxr.errors import DataError
from covid_cxr.evaluate import evaluate_run
from covid_cxr.evaluate.predictions import COLUMNS, predictions_frame, read_predictions
from covid_cxr.inference import TorchPredictor
from covid_cxr.labels import CLASSES, KERAS_AUTHORS_ORDER
from covid_cxr.models import build_model
from covid_cxr.preprocess import Preprocessing
from covid_cxr.synth import make_synthetic

SIZE = 72


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    make_synthetic(root / "raw", seed=1, n_covid=10, n_pneumonia=12, n_normal=10, size=96, workers=1)
    prepare_dataset(PrepareSettings(out=root / "data", covid_chestxray=root / "raw" / "covid-chestxray-dataset",
                                    rsna=root / "raw" / "rsna", folds=2, phases=2, image_size=SIZE, workers=1),
                    progress=False)
    return root / "data"


def _checkpoint(path: Path, classes: tuple[str, ...] = CLASSES, size: int = SIZE) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet50v2", num_classes=3, image_size=size)
    ckpt = Checkpoint(network="resnet50v2", classes=classes, preprocessing=Preprocessing(image_size=size),
                      model_state=model.state_dict(), meta={"fold": 1})
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
    result = evaluate_run(run, batch_size=16, device="cpu", precision="fp32", n_boot=50, progress=False)
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
    # The file keeps 6 decimals, and batches of 16 against 3 may take other kernels (AVX2 against AVX-512 CPUs
    # differ there); a column in the wrong order would be off by far more than 1e-5.
    for k, name in enumerate(KERAS_AUTHORS_ORDER):
        np.testing.assert_allclose(frame[f"p_{name}"].iloc[some], direct[:, k], atol=1e-5)
    saved = json.loads((result.out_dir / "metrics.json").read_text())
    assert saved["n"] == len(fold.test) and saved["evaluation"]["fold"] == 2
    assert saved["evaluation"]["split_hash"] == fold.split_hash and saved["evaluation"]["images_per_second"] > 0
    assert saved["covid_n"] == int((fold.test["label"] == "covid").sum())
    t3 = pd.read_csv(result.out_dir / "table3.csv")
    assert t3.iloc[0][[f"{c}_correct" for c in CLASSES]].sum() == (frame["label"] == frame["pred"]).sum()


def _load(path: Path) -> Checkpoint:
    from covid_cxr.checkpoint import load_checkpoint

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
    with pytest.raises(DataError, match="folds 1..2"):
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
        ("label,p_covid\ncovid,1\n", "missing column.*pred"),
        ("label,pred\n", "no rows"),
        ("", "empty file"),
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
