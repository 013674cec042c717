"""The model card lists as a model's figures only the evaluations of that very file (by sha256) at its current
decision rule, and says the rule and precision each was measured in (QA s14 findings 1 and 6).

After a second ``calibrate`` (a new best.pt with another rule) the card, its YAML model-index and the card
``export`` writes beside the ONNX file (which ``serve`` shows) kept the earlier file's test figures as this
model's. No training here: checkpoints without real weights, metrics.json written as ``evaluate`` writes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import covid_cxr.runs.evaluations as evaluations_module
from covid_cxr.atomic import file_sha256
from covid_cxr.evaluate.metrics import compute_metrics
from covid_cxr.labels import CLASSES
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.card_text import EARLIER_HEADING
from covid_cxr.runs.checkpoint import Checkpoint, save_checkpoint
from covid_cxr.runs.evaluations import measured_with
from covid_cxr.runs.model_card import build_card, facts_from_checkpoint, split_front_matter, write_export_card

SENSITIVITY = {"rule": "sensitivity", "target": 0.95, "positive_class": "covid", "threshold": 0.01991915237158537,
               "validation": {"sensitivity": 1.0, "specificity": 0.35}}
YOUDEN = {"rule": "youden", "target": None, "positive_class": "covid", "threshold": 0.08270513266324997,
          "validation": {"sensitivity": 0.8, "specificity": 0.9}}
ARGMAX = {"rule": "argmax", "target": None, "positive_class": "covid", "threshold": None, "validation": {}}
# runtime lines as evaluate records them (copied from real metrics.json files)
ONNX_FP32 = ("onnx (auto: fp32 on CPU, ONNX Runtime is the fastest exact path; fp32, not bf16: the model decides by "
             "sensitivity=0.95, a threshold chosen on fp32 probabilities): onnxruntime providers=CPUExecutionProvider "
             "threads=2")
TORCH_BF16 = ("torch (auto: native bf16 CPU, bf16 autocast is fastest): device=cpu precision=bf16 "
              "memory=channels_last allocator=glibc-tuned threads=2/2 compile=off bn_folded=72")
STALE = [[10, 0, 0], [300, 40, 10], [70, 0, 330]]  # the earlier rule's test confusion matrix: 380/760 correct
FRESH = [[4, 3, 3], [40, 270, 40], [63, 0, 337]]


def _best(run: Path, operating_point: dict | None, weight: float) -> Path:
    """best.pt as calibrate writes it: the same network, other bytes (``weight``) and its rule stored in it."""
    ckpt = Checkpoint("concat", CLASSES, Preprocessing(96, "unit"), {"w": torch.tensor([weight])},
                      meta={"global_epoch": 7}, operating_point=operating_point)
    return save_checkpoint(ckpt, run / "best.pt")


def _evaluation(folder: Path, cm: list[list[int]], model: Path, operating_point: dict, runtime: str,
                *, sha256: str | None = "of the file", **info: object) -> None:
    """``folder/metrics.json`` as evaluate writes it: the figures and its ``evaluation`` block."""
    metrics = compute_metrics(np.array(cm), n_boot=0)
    external = str(info.get("kind")) == "external"
    block = {"kind": "internal", "network": "concat", "fold": 1, "split": "test", "data": str(folder.parent / "data"),
             "model" if external else "checkpoint": str(model.resolve()), "operating_point": operating_point,
             "runtime": runtime, "warnings": [], **info}
    if sha256 is not None:
        block["model_sha256"] = file_sha256(model) if sha256 == "of the file" else sha256
    metrics["evaluation"] = block
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, default=float).replace("NaN", "null"))


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A run calibrated to sensitivity=0.95 and evaluated (internal test, and a hospital's images) at that rule."""
    run = tmp_path / "runs" / "concat-fold1"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"network": "concat", "fold": 1, "status": "finished"}))
    best = _best(run, SENSITIVITY, 1.0)
    _evaluation(run / "eval-test", STALE, best, SENSITIVITY, ONNX_FP32)
    _evaluation(run / "external-hospital-b", [[20, 0, 0], [15, 5, 0], [10, 0, 10]], best, SENSITIVITY,
                "concat on onnx (auto): onnxruntime providers=CPUExecutionProvider threads=2", kind="external",
                split="external:hospital-b", backend="onnx", name="hospital-b")
    return run


def _index_names(card: str) -> list[str]:
    header, _ = split_front_matter(card)
    return [r["dataset"]["name"] for entry in header.get("model-index", []) for r in entry["results"]]


def _own_rows(card: str) -> list[str]:
    """The Evaluation section's rows that present figures as this model's (before the earlier evaluations)."""
    section = card.split("## Evaluation", 1)[1].split("\n## ", 1)[0].split(EARLIER_HEADING, 1)[0]
    return [x for x in section.splitlines() if x.startswith("| ") and not x.startswith("| evaluation |")]


def _earlier_rows(card: str) -> list[str]:
    section = card.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    if EARLIER_HEADING not in section:
        return []
    return [x for x in section.split(EARLIER_HEADING, 1)[1].splitlines() if x.startswith("| ")
            and not x.startswith("| evaluation |")]


def test_a_second_calibrate_takes_the_earlier_files_figures_off_the_card(run: Path, monkeypatch) -> None:
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    assert _index_names(card) == ["internal: eval-test", "external: external-hospital-b"]
    assert [x.split(" | ")[0] for x in _own_rows(card)] == ["| eval-test", "| external-hospital-b"]
    assert "External (external-hospital-b) minus internal test (eval-test" in card
    first = card

    _best(run, YOUDEN, 2.0)  # calibrate --operating-point youden: a new best.pt under the same name
    reads: list[Path] = []
    real = evaluations_module.read_json_object
    monkeypatch.setattr(evaluations_module, "read_json_object", lambda p: reads.append(Path(p)) or real(p))
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    assert sorted(p.parent.name for p in reads) == ["eval-test", "external-hospital-b"]  # each read once
    header, body = split_front_matter(card)
    assert "model-index" not in header  # the Hub shows no figure of the earlier file as this model's
    assert _own_rows(card) == []
    assert "No evaluation of this model file at its current decision rule is at hand" in body
    assert "Decision rule: **youden**" in body
    earlier = _earlier_rows(card)
    assert [x.split(" | ")[:2] for x in earlier] == [["| eval-test", "internal (not this model's)"],
                                                     ["| external-hospital-b", "external (not this model's)"]]
    old = json.loads((run / "eval-test" / "metrics.json").read_text())["evaluation"]["model_sha256"]
    assert (f"- eval-test: not this model's: of another model file: best.pt with sha256 {old[:12]}..., not this "
            f"one's {file_sha256(run / 'best.pt')[:12]}...") in body
    assert "minus internal test" not in body  # no drop against the earlier file's figures
    [row, _] = _own_rows(first)  # what the first card said, with the rule and precision it was measured at
    assert row.startswith("| eval-test | internal | test | 760 (10) | 50.0 [")
    assert row.endswith(" | sensitivity=0.95 (p_covid >= 0.01991915237158537), fp32 onnx |")

    _evaluation(run / "eval-test", FRESH, run / "best.pt", YOUDEN, TORCH_BF16)  # covid-cxr evaluate RUN, again
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    assert _index_names(card) == ["internal: eval-test"]
    header, _ = split_front_matter(card)
    accuracy = header["model-index"][0]["results"][0]["metrics"][0]
    assert accuracy["value"] == round(100 * (4 + 270 + 337) / 760, 2)  # the new file's figures, not 50.0
    [row] = _own_rows(card)
    assert row.startswith("| eval-test | internal | test | 760 (10) | 80.4 [")
    assert row.endswith(" | youden (p_covid >= 0.08270513266324997), bf16 torch |")
    # the hospital's evaluation is still of the earlier file: apart, and no drop is made up for it
    assert [x.split(" | ")[0] for x in _earlier_rows(card)] == ["| external-hospital-b"]
    assert "External (external-hospital-b)" not in card


def test_an_external_evaluation_of_the_new_file_has_no_drop_and_no_stale_internal_row(run: Path) -> None:
    """The card's drop line and its table make one decision: 'no internal test evaluation of this model file at
    this rule' is never printed beside an internal row presented as this model's."""
    best = _best(run, YOUDEN, 2.0)
    _evaluation(run / "external-hospital-b", [[20, 0, 0], [15, 5, 0], [10, 0, 10]], best, YOUDEN,
                "concat on torch (auto): device=cpu precision=fp32 memory=channels_last", kind="external",
                split="external:hospital-b", backend="torch", name="hospital-b")
    card = build_card(facts_from_checkpoint(best), run)
    assert ("External (external-hospital-b): no drop: no internal test evaluation of this model file (best.pt) at "
            "this rule") in card
    assert [x.split(" | ")[:2] for x in _own_rows(card)] == [["| external-hospital-b", "external"]]
    assert _own_rows(card)[0].endswith(" | youden (p_covid >= 0.08270513266324997), fp32 torch |")
    assert _index_names(card) == ["external: external-hospital-b"]
    assert [x.split(" | ")[0] for x in _earlier_rows(card)] == ["| eval-test"]


def test_the_same_file_at_another_rule_is_not_this_models_figure(tmp_path: Path) -> None:
    """evaluate --operating-point youden --out RUN/eval-youden on an argmax best.pt: two 'internal | test' rows that
    disagree; only the one at the model's own rule is its figure, and each row says its rule and precision."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"network": "concat", "fold": 1, "status": "finished"}))
    best = _best(run, None, 1.0)
    _evaluation(run / "eval-test", FRESH, best, ARGMAX, TORCH_BF16)
    _evaluation(run / "eval-youden", STALE, best, YOUDEN, ONNX_FP32)
    card = build_card(facts_from_checkpoint(best), run)
    assert _index_names(card) == ["internal: eval-test"]
    [row] = _own_rows(card)
    assert row.startswith("| eval-test | internal | test | 760 (10) | ") and row.endswith(" | argmax, bf16 torch |")
    [other] = _earlier_rows(card)
    assert other.startswith("| eval-youden | internal (not this model's) | test | 760 (10) | ")
    assert other.endswith(" | youden (p_covid >= 0.08270513266324997), fp32 onnx |")
    assert ("- eval-youden: not this model's: of this model file at another decision rule: youden (p_covid >= "
            "0.08270513266324997), not the model's argmax") in card


def test_an_evaluation_with_no_recorded_sha256_is_not_taken_as_this_models(run: Path) -> None:
    """A metrics.json from before evaluate recorded the file's sha256: the file name alone proves nothing."""
    _evaluation(run / "eval-test", STALE, run / "best.pt", SENSITIVITY, ONNX_FP32, sha256=None)
    card = build_card(facts_from_checkpoint(run / "best.pt"), run)
    assert "internal: eval-test" not in _index_names(card)
    assert not any(x.startswith("| eval-test |") for x in _own_rows(card))
    assert [x.split(" | ")[0] for x in _earlier_rows(card)] == ["| eval-test"]
    assert ("- eval-test: not this model's: it records no model sha256 (written by an older covid-cxr), so it is not "
            "known to be of this model file") in card


def test_the_export_card_shows_only_the_exported_checkpoints_figures(run: Path, tmp_path: Path) -> None:
    """export writes the card serve shows: matched by the sha256 of the checkpoint it was exported from."""
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    model = deploy / "m.onnx"
    model.write_bytes(b"an exported model, only hashed here")

    def export() -> str:
        ckpt = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
        loaded = Checkpoint("concat", CLASSES, Preprocessing(96, "unit"), ckpt["model_state"], meta=ckpt["meta"],
                            operating_point=ckpt.get("operating_point"))
        return write_export_card(loaded, run / "best.pt", [model]).read_text()

    first = export()
    assert _index_names(first) == ["internal: eval-test", "external: external-hospital-b"]
    _best(run, YOUDEN, 2.0)  # calibrated again, then exported again
    card = export()
    assert "model-index" not in split_front_matter(card)[0]
    assert _own_rows(card) == [] and len(_earlier_rows(card)) == 2
    assert _own_rows(first)[0].endswith(" | sensitivity=0.95 (p_covid >= 0.01991915237158537), fp32 onnx |")


@pytest.mark.parametrize(("info", "said"), [
    ({"runtime": TORCH_BF16}, "bf16 torch"),
    ({"runtime": ONNX_FP32}, "fp32 onnx"),
    ({"runtime": "concat on torch (auto): device=cuda precision=fp16 memory=channels_last", "backend": "torch"},
     "fp16 torch"),
    ({"runtime": "concat on onnx (an ONNX file): onnxruntime providers=CPUExecutionProvider threads=2",
      "backend": "onnx", "model": "/runs/r/best.int8.onnx"}, "int8 onnx"),
    ({"runtime": "torch: device=cpu precision=bf16", "precision": "fp32"}, "fp32 torch"),  # recorded wins
    ({}, "precision not recorded"),
])
def test_each_row_says_the_precision_and_backend_it_ran_in(info: dict, said: str) -> None:
    assert measured_with(info) == said
