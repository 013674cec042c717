"""MODEL_CARD.md: built from what a checkpoint and its run folder hold, in the Hugging Face layout."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from covid_cxr.audit.results import flag
from covid_cxr.cli import main
from covid_cxr.deploy.server import render_card_html
from covid_cxr.evaluate.metrics import compute_metrics
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.card_text import difference
from covid_cxr.runs.checkpoint import Checkpoint
from covid_cxr.runs.model_card import (
    CARD_NAME,
    build_card,
    facts_from_checkpoint,
    facts_from_onnx,
    split_front_matter,
    write_export_card,
    write_run_card,
)
from covid_cxr.runs.results import make_result, write_result

OP = {"rule": "sensitivity", "target": 0.95, "positive_class": "covid", "threshold": 0.0731,
      "validation": {"sensitivity": 96.2, "specificity": 81.0, "images": 120}}


def _checkpoint(path: Path, operating_point: dict | None = None) -> Path:
    """A checkpoint file with no weights: the card reads only its header."""
    data = Checkpoint("concat", ("covid", "pneumonia", "normal"), Preprocessing(96, "unit"), {}).to_dict()
    if operating_point is not None:
        data["operating_point"] = operating_point
    torch.save(data, path)
    return path


def _evaluation(folder: Path, cm: list[list[int]], *, data: Path, split: str, checkpoint: Path, **info: object) -> dict:
    """metrics.json as 'evaluate' writes it (``info`` adds to its evaluation block: kind, sha256, rule ...)."""
    metrics = compute_metrics(np.array(cm), n_boot=0)
    metrics["evaluation"] = {"data": str(data), "split": split, "checkpoint": str(checkpoint.resolve()), **info}
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, default=float).replace("NaN", "null"))
    return metrics


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A run folder with config, splits, an internal and an external evaluation, an audit and a COVIDx evaluation."""
    run_dir, data = tmp_path / "runs" / "concat-fold1", tmp_path / "data"
    (run_dir / "splits").mkdir(parents=True)
    data.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"network": "concat", "fold": 1, "data": str(data), "status": "finished",
                                                  "protocol": "strict", "best_epoch": 7, "best_val_accuracy": 0.91}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"network": "concat", "pretrained": "imagenet", "seed": 3}))
    parts = {"phase1": [("covid-chestxray", "covid", 12), ("rsna", "normal", 20), ("rsna", "pneumonia", 15)],
             "phase2": [("covid-chestxray", "covid", 12), ("rsna", "normal", 9)],  # the same COVID-19 images again
             "val": [("covid-chestxray", "covid", 3), ("rsna", "normal", 4)], "test": [("rsna", "pneumonia", 6)]}
    for name, groups in parts.items():
        rows = [{"image_id": f"{source}-{label}-{k}", "label": label, "patient_id": f"p{k}", "source": source}
                for source, label, n in groups for k in range(n)]
        pd.DataFrame(rows).to_csv(run_dir / "splits" / f"{name}.csv", index=False)
    best = _checkpoint(run_dir / "best.pt", OP)
    model = {"model_sha256": hashlib.sha256(best.read_bytes()).hexdigest(), "operating_point": OP, "fold": 1}
    _evaluation(run_dir / "eval-test", [[25, 3, 2], [4, 80, 16], [1, 9, 90]], data=data, split="test", checkpoint=best,
                kind="internal", **model)
    # where and as 'evaluate RUN --external hospital/' writes it (tests/test_external_pairing.py makes real ones)
    _evaluation(run_dir / "external-hospital", [[14, 4, 2], [6, 30, 4], [6, 4, 50]], data=tmp_path / "hospital",
                split="external:hospital", checkpoint=best, kind="external", name="hospital",
                model=str(best.resolve()), **model)
    _evaluation(run_dir / "last-eval-test", [[1, 1, 1], [1, 1, 1], [1, 1, 1]], data=data, split="test",
                checkpoint=run_dir / "last.pt")
    covidx = tmp_path / "covidx-data"
    covidx.mkdir()
    (covidx / "splits").mkdir()
    (covidx / "splits" / "summary.json").write_text(json.dumps({"settings": {"covidx_version": "4"}}))
    _evaluation(run_dir / "eval-covidx4", [[88, 7, 5], [3, 90, 7], [2, 6, 92]], data=covidx, split="test",
                checkpoint=best, model_sha256=model["model_sha256"], operating_point=OP)  # this file, at its rule
    write_result(make_result("source", inputs={}, metrics={}, thresholds={},
                             flags=[flag("source-predictable", "a linear probe tells the source from features")]),
                 run_dir / "audit")
    return run_dir


def test_card_front_matter_and_sections(run: Path) -> None:
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    header, body = split_front_matter(card)
    assert header["license"] == "other" and "research-only" in header["tags"]
    assert header["datasets"] == ["ieee8023/covid-chestxray-dataset", "rsna-pneumonia-detection-challenge"]
    assert header["base_model"] == ["keras.applications.Xception (ImageNet)", "keras.applications.ResNet50V2 (ImageNet)"]
    assert {"accuracy", "recall", "precision"} <= set(header["metrics"])
    results = header["model-index"][0]["results"]
    assert [r["dataset"]["name"] for r in results] == ["internal: eval-test", "external: eval-covidx4",
                                                       "external: external-hospital"]
    assert results[0]["metrics"][0] == {"type": "accuracy", "value": round(100 * 195 / 230, 2), "name": "accuracy (%)"}
    assert yaml.safe_load(yaml.safe_dump(header)) == header
    for section in ("## Intended use", "## Training data", "## Evaluation", "## Operating point",
                    "## Did it learn the disease? (audits)", "## Limitations", "## How to cite"):
        assert section in body
    assert "**Not a diagnostic device**" in body
    # training images are counted once, however many phases repeat them
    assert "| training | covid-chestxray | 12 | 0 | 0 | 12 |" in body
    assert "| training | rsna | 0 | 15 | 20 | 35 |" in body
    assert "| test | rsna | 0 | 6 | 0 | 6 |" in body
    assert "last-eval-test" not in body  # an evaluation of another checkpoint of the run
    assert "a linear probe tells the source from features" in body
    assert "Every COVID-19 training image comes from covid-chestxray and every normal one from rsna" in body
    assert "@article{rahimzadeh2020modified" in body and "@article{shih2019augmenting" in body


def test_a_data_path_that_is_not_utf8_is_written_escaped_not_a_crash(run: Path) -> None:
    """Training on a prepared folder whose name is not UTF-8 ended with "surrogates not allowed" at the card."""
    info = json.loads((run / "run.json").read_text())
    info["data"] = os.fsdecode(b"/data/prepared-\xff")
    (run / "run.json").write_text(json.dumps(info))
    card = write_run_card(run).read_text(encoding="utf-8")
    assert "/data/prepared-\\xff" in card


def test_an_evaluation_of_the_runs_own_splits_from_a_copied_folder_stays_internal(run: Path, tmp_path: Path) -> None:
    """evaluate RUN --data COPY (the prepared folder copied or moved: run.json keeps the old absolute path) was
    listed as external, and the card said "no internal test evaluation: run evaluate first" about that very one.
    The fold's split hash says whose data it is; a path says so only where no hash is recorded."""
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "split_hash": "f" * 64, "data": "/elsewhere/data"}))
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    metrics["evaluation"]["split_hash"] = "f" * 64
    (run / "eval-test" / "metrics.json").write_text(json.dumps(metrics))
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    assert next(x for x in card.splitlines() if x.startswith("| eval-test |")).startswith("| eval-test | internal |")
    assert "External (external-hospital) minus internal test" in card  # paired with it
    assert "| eval-covidx4 | external |" in card  # no hash recorded there: its other data path says external
    metrics["evaluation"]["split_hash"] = "0" * 64  # other splits (prepared again): not the run's own test set
    (run / "eval-test" / "metrics.json").write_text(json.dumps(metrics))
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    assert next(x for x in card.splitlines() if x.startswith("| eval-test |")).startswith("| eval-test | external |")


def test_what_evaluate_warned_of_is_on_the_card(run: Path) -> None:
    """evaluate --split val at a threshold chosen on that split stored "optimistic by construction" in metrics.json,
    and the card showed the figures as an ordinary internal result."""
    warning = ("the threshold (sensitivity=0.95) was chosen on this validation split and is scored on the same "
               "images: the figures at it are optimistic by construction; evaluate on test for honest ones")
    best = run / "best.pt"
    _evaluation(run / "eval-val", [[3, 0, 0], [0, 4, 1], [0, 1, 4]], data=run.parent.parent / "data", split="val",
                checkpoint=best, kind="internal", warnings=[warning], operating_point=OP,
                model_sha256=hashlib.sha256(best.read_bytes()).hexdigest())
    card = build_card(facts_from_checkpoint(best), run)
    assert f"- eval-val: warning: {warning}" in card
    header, _ = split_front_matter(card)  # the Hub shows the index alone: the warning travels with the figures
    names = [r["dataset"]["name"] for r in header["model-index"][0]["results"]]
    assert f"internal: eval-val (evaluate warned: {warning})" in names and "internal: eval-test" in names


def test_card_evaluation_figures_with_intervals(run: Path) -> None:
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    internal = compute_metrics(np.array([[25, 3, 2], [4, 80, 16], [1, 9, 90]]), n_boot=0)
    acc = f"{internal['accuracy']:.1f} [{internal['accuracy_ci_low']:.1f}, {internal['accuracy_ci_high']:.1f}]"
    line = next(x for x in card.splitlines() if x.startswith("| eval-test |"))
    assert line.startswith(f"| eval-test | internal | test | 230 (30) | {acc} | 83.3 [")  # 25 of 30 COVID-19
    row = next(x for x in card.splitlines() if x.startswith("| external-hospital |"))
    assert row.startswith("| external-hospital | external | external:hospital | 120 (20) |")
    drop = next(x for x in card.splitlines() if x.startswith("External (external-hospital) minus internal test"))
    assert "(eval-test, the same model file and rule)" in drop
    assert "COVID-19 sensitivity -13.3 [" in drop  # 14/20 - 25/30 = -13.3 points
    # an evaluation that records no model sha256 (an older metrics.json) is not this model's: set apart, no drop
    _evaluation(run / "external-old", [[1, 1, 1], [1, 1, 1], [1, 1, 1]], data=run / "old", split="external:old",
                checkpoint=run / "best.pt", kind="external")
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    earlier = card[card.index("### Earlier evaluations"):]
    assert "| external-old | external (not this model's) |" in earlier and "External (external-old)" not in card
    assert "- external-old: not this model's: it records no model sha256" in earlier
    covidx = card[card.index("On the COVIDx4 test set"):]
    assert "| COVIDNet-CXR4-A (published) | 95.0 [88.8, 97.8] | 99.0 | 94.3 |" in covidx
    assert "| this model | 88.0 [" in covidx


def test_an_unreadable_metrics_json_is_left_out_of_the_index_not_a_crash(run: Path) -> None:
    """A truncated metrics.json (a disk that filled up, a hand edit) costs its own row, never the card, which is
    written at the end of every training run and by export."""
    (run / "external-hospital" / "metrics.json").write_text('{"n": 3')
    header, body = split_front_matter(build_card(facts_from_checkpoint(run / "best.pt"), run))
    names = [r["dataset"]["name"] for r in header["model-index"][0]["results"]]
    assert names == ["internal: eval-test", "external: eval-covidx4"]
    assert "## Evaluation" in body


def test_difference_interval_is_newcombe() -> None:
    a = compute_metrics(np.array([[14, 6], [2, 18]]), classes=("covid", "normal"), n_boot=0)
    b = compute_metrics(np.array([[25, 5], [3, 27]]), classes=("covid", "normal"), n_boot=0)
    text = difference(a, b, "covid_recall")
    d, low, high = (float(x) for x in text.replace("[", "").replace("]", "").replace(",", "").split())
    assert d == pytest.approx(100 * (14 / 20 - 25 / 30), abs=0.05)
    assert low < d < high and low == pytest.approx(d - np.hypot(a["covid_recall"] - a["covid_recall_ci_low"],
                                                                b["covid_recall_ci_high"] - b["covid_recall"]), abs=0.05)


def test_operating_point_from_checkpoint_onnx_or_argmax(run: Path, tmp_path: Path) -> None:
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    assert "Decision rule: **sensitivity**, target 0.95, for COVID-19." in card
    assert "Threshold on the COVID-19 probability: 0.0731." in card and "sensitivity 96.2" in card
    onnx = facts_from_onnx({"operating_point": json.dumps(OP), "version": "0.1.0"}, "concat",
                           ("covid", "pneumonia", "normal"), {"image_size": 96, "scaling": "unit", "channels": 3})
    assert onnx.operating_point == OP
    plain = build_card(facts_from_checkpoint(_checkpoint(tmp_path / "plain.pt")), None)
    assert "Decision rule: **argmax**" in plain and "Not recorded with this model" in plain
    assert "No evaluation of this model is at hand" in plain and "No audit results are at hand" in plain


def test_export_card_and_cli_refresh(run: Path, tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    model = deploy / "concat.onnx"
    model.write_bytes(b"not really onnx, only hashed")
    ckpt = facts_from_checkpoint(run / "best.pt")  # an exported model's card: the checkpoint's facts + file hashes
    path = write_export_card(_Loaded(ckpt), run / "best.pt", [model])
    assert path == deploy / CARD_NAME
    text = path.read_text()
    assert hashlib.sha256(model.read_bytes()).hexdigest() in text and "| eval-test | internal |" in text
    assert main(["model-card", str(run)]) == 0
    assert (run / CARD_NAME).read_text().startswith("---\nlicense: other\n")


class _Loaded:
    """What ``export`` holds: a loaded checkpoint's fields (weights not needed for the card)."""

    def __init__(self, facts) -> None:
        self.network, self.classes, self.meta = facts.network, facts.classes, facts.meta
        self.preprocessing = Preprocessing(**facts.preprocessing)
        self.operating_point = facts.operating_point


def test_rendered_card_escapes_html() -> None:
    card = "---\nlicense: other\n---\n# Card\n\n<script>alert(1)</script>\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    html = render_card_html(card)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<table>" in html and "<h1>Card</h1>" in html and "license: other" in html


def test_server_answers_the_card_as_markdown_and_html(run: Path) -> None:
    import httpx

    from covid_cxr.deploy.server import create_app
    from covid_cxr.runs.model_card import served_card
    from tests.test_server import serve

    class Still:
        backend = "torch"
        classes = ("covid", "pneumonia", "normal")
        preprocessing = Preprocessing(96, "unit")

        def predict_proba(self, images: np.ndarray) -> np.ndarray:
            return np.full((len(images), 3), 1 / 3, np.float32)

    sha = hashlib.sha256((run / "best.pt").read_bytes()).hexdigest()
    card = served_card(run / "best.pt", sha, None, None)  # built now from the run folder: no card beside it yet
    assert sha in card and "| eval-test | internal |" in card
    with serve(create_app(Still(), network="concat", model_card=card)) as url:
        md = httpx.get(f"{url}/model-card")
        assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown") and md.text == card
        page = httpx.get(f"{url}/model-card.html")
        assert page.status_code == 200 and "<h2>Evaluation</h2>" in page.text and "<table>" in page.text
    with serve(create_app(Still(), network="concat")) as url:
        assert httpx.get(f"{url}/model-card").status_code == 404


@pytest.mark.slow
def test_export_writes_the_card_beside_the_model_and_serve_finds_it(tmp_path: Path) -> None:
    """``covid-cxr export`` (as the demo calls it) leaves MODEL_CARD.md beside the ONNX file, naming its hash."""
    from covid_cxr.inference.backends import load_model
    from covid_cxr.runs.model_card import served_card
    from tests.test_server import tiny_checkpoint

    run_dir = tmp_path / "runs" / "xception-fold1"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"network": "xception", "fold": 1, "status": "finished"}))
    ckpt = tiny_checkpoint(run_dir / "best.pt", "xception", size=71)
    onnx_path = tmp_path / "deploy" / "xception.onnx"
    onnx_path.parent.mkdir()
    assert main(["export", str(ckpt), "--out", str(onnx_path)]) == 0
    card = (onnx_path.parent / CARD_NAME).read_text()
    onnx_sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert f"File `xception.onnx`: sha256 `{onnx_sha}`" in card and "Training run: fold 1" in card
    loaded = load_model(onnx_path)
    assert served_card(onnx_path, loaded.sha256, loaded.checkpoint, loaded.predictor) == card
    (onnx_path.parent / CARD_NAME).write_text("---\nlicense: other\n---\n# a card of another model\n")
    rebuilt = served_card(onnx_path, loaded.sha256, loaded.checkpoint, loaded.predictor)  # from the ONNX metadata
    assert onnx_sha in rebuilt and "Decision rule: **argmax**" in rebuilt


@pytest.mark.parametrize("buffered", [True, False])
def test_a_reader_that_goes_away_ends_the_command_quietly(run: Path, buffered: bool) -> None:
    """``covid-cxr model-card RUN | head``: the pipe is closed before anything is written. The line went out at
    print (unbuffered) or at the interpreter's exit (buffered), a BrokenPipeError traceback either way."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "covid_cxr", "model-card", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    proc.stdout.close()  # before the interpreter has even imported the verb: every write meets a closed pipe
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()
    assert (run / "MODEL_CARD.md").is_file()  # the work itself was done
