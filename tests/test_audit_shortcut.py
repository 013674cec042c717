"""The audits on synthetic data with and without a deliberate source shortcut.

Two synthetic datasets differ only in ``shortcut='marker'`` (a bright square in a top corner of
every covid-chestxray image, outside the lungs). On the marked one the source probe must find the
source near-perfectly within the pneumonia class, a model trained on it must keep its score with
the lungs hidden, the cross-source recall must drop on unmarked COVID-19 images, and the report
section must flag all of it. The clean model, trained the same way with the same seed on the same
images but for the marker, is the comparison: each property is asserted as a contrast with it, with
a margin, because what a tiny model does with hidden lungs or an unseen source moves between CPUs.

The class models are small CNNs trained here for a few seconds (the probe's architecture with
three outputs, seeded): the registry's Xception/ResNet50V2 take minutes per epoch on two CPU
cores. They are real trained models used through the same ``Predictor`` surface the audits use
for checkpoints; the checkpoint path of each audit is exercised separately (CLI tests at the end).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from covid_cxr.atomic import file_sha256
from covid_cxr.audit import results as R
from covid_cxr.audit.ablation import run_ablation
from covid_cxr.audit.cross_source import run_cross_source
from covid_cxr.audit.data import rows_of
from covid_cxr.audit.lungs import estimate_lung_fields
from covid_cxr.audit.source import audit_source, cnn_probe_proba, train_cnn_probe
from covid_cxr.cli import main
from covid_cxr.data.prepared import PreparedData
from covid_cxr.labels import CLASSES
from covid_cxr.models import build_model
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs import results as results_io
from covid_cxr.runs.checkpoint import Checkpoint, save_checkpoint
from covid_cxr.runs.resolve import training_pool
from covid_cxr.synth import make_synthetic, render_chest

SIZE = 72
pytestmark = pytest.mark.slow  # two synthetic datasets, four small trainings: about 2 CPU-minutes


class SmallCnnPredictor:
    """A small CNN classifier trained on the fold's training pool, with the Predictor surface."""

    backend = "torch"

    def __init__(self, images: np.ndarray, labels: list[str], seed: int = 0) -> None:
        self.classes = CLASSES
        self.preprocessing = Preprocessing(SIZE)
        targets = np.array([CLASSES.index(v) for v in labels])
        self.model = train_cnn_probe(images, targets, len(CLASSES), epochs=30, seed=seed)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return cnn_probe_proba(self.model, images)


def _prepare(root: Path, shortcut: str | None) -> Path:
    from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
    from covid_cxr.data.splits import SplitSettings

    raw = make_synthetic(root / "raw", seed=3, n_covid=80, n_pneumonia=200, n_normal=200, size=96,
                         shortcut=shortcut, cxr_pneumonia_fraction=0.3, workers=1)
    out = root / "data"
    prepare_dataset(PrepareSettings(out=out, covid_chestxray=raw.covid_chestxray, rsna=raw.rsna,
                                    split=SplitSettings(folds=3, phases=8, seed=0), image_size=SIZE, workers=0),
                    progress=False)
    return out


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Run the source, ablation and cross-source audits on both datasets once."""
    from covid_cxr.data.prepared import PreparedData

    torch.manual_seed(0)
    found: dict[str, dict] = {}
    for name, shortcut in (("clean", None), ("marked", "marker")):
        root = tmp_path_factory.mktemp(name)
        data = _prepare(root, shortcut)
        # The statistics probe alone: the CNN probe's cross-fitting costs about 80 CPU-seconds a set here
        # (its path is tested in test_audit.py); measured, both find the marker with AUC 1.000.
        source, _ = audit_source(data, fold=1, probes=("stats",), seed=0, out_dir=root / "audit")
        prepared = PreparedData(data)
        cache = prepared.cache()
        pool = training_pool(prepared, 1)
        test = prepared.fold(1).test.reset_index(drop=True)
        test_images = rows_of(cache, test["image_id"])
        predictor = SmallCnnPredictor(rows_of(cache, pool["image_id"]), list(pool["label"]))
        ablation = run_ablation(predictor, test_images, list(test["label"]), estimate_lung_fields(test_images))
        # COVID-19 images "from another collection": rendered alike, never marked.
        rng = np.random.default_rng(11)
        other = np.stack([render_chest(rng, SIZE, "covid").image for _ in range(30)])
        covid = test["label"] == "covid"
        cross = run_cross_source(predictor, test_images[covid.to_numpy()], list(test["source"][covid]), other,
                                 source="other-hospital", cls="covid")
        results_io.write_result(ablation, root / "audit")
        results_io.write_result(cross, root / "audit")
        found[name] = {"source": source, "ablation": ablation, "cross_source": cross, "root": root, "data": data}
    return found


def _codes(result: dict) -> list[str]:
    return [f["code"] for f in result["flags"]]


def test_source_probe_finds_the_marker_and_only_the_marker(audited: dict) -> None:
    clean = audited["clean"]["source"]["metrics"]["within_class"]["pneumonia"]
    marked = audited["marked"]["source"]["metrics"]["within_class"]["pneumonia"]
    print(f"within-pneumonia source AUC: clean {clean['auc']['value']:.3f}, marked {marked['auc']['value']:.3f}")
    assert marked["auc"]["value"] >= 0.95
    assert clean["auc"]["value"] < 0.9
    # COVID-19 only from covid-chestxray and normal only from RSNA: said first on both sets.
    assert _codes(audited["marked"]["source"]) == ["class-from-one-source", "source-predictable"]
    assert _codes(audited["clean"]["source"]) == ["class-from-one-source"]
    confounded = audited["clean"]["source"]["metrics"]["confounded_classes"]
    assert confounded == {"covid": "covid-chestxray", "normal": "rsna"}


def test_ablation_score_survives_lung_removal_only_with_the_shortcut(audited: dict) -> None:
    for name in ("clean", "marked"):
        c = audited[name]["ablation"]["metrics"]["conditions"]
        print(name, {k: round(v["balanced_accuracy"], 3) for k, v in c.items()},
              {k: round(v["recall"]["covid"]["value"], 2) for k, v in c.items()})
    marked = audited["marked"]["ablation"]["metrics"]["conditions"]
    clean = audited["clean"]["ablation"]["metrics"]["conditions"]

    def recall(conditions: dict, name: str) -> float:
        return conditions[name]["recall"]["covid"]["value"]

    def outside_minus_inside(conditions: dict) -> float:
        """COVID-19 recall from outside the lungs (lungs hidden) minus from the lungs alone."""
        return recall(conditions, "lungs_hidden") - recall(conditions, "only_lungs")

    # Each model against itself and the two against each other, on the same test images (the datasets differ
    # only by the marker), rather than against absolute numbers: what a small model does with hidden lungs
    # moves by 0.15 between CPUs (clean COVID-19 recall with the lungs hidden: 0.37 on a Sapphire Rapids,
    # 0.52 on a Zen 2); these contrasts measured 0.6-1.0 where the margins ask 0.2-0.4.
    assert clean["as_is"]["balanced_accuracy"] > 0.6  # the clean model did learn the disease (chance 1/3)...
    assert recall(clean, "lungs_hidden") <= recall(clean, "as_is") - 0.2  # ...and loses COVID-19 without the lungs
    assert outside_minus_inside(marked) >= 0.3  # the shortcut model finds COVID-19 outside the lungs, not in them
    assert outside_minus_inside(marked) >= outside_minus_inside(clean) + 0.4
    assert "ablation-covid-survives" in _codes(audited["marked"]["ablation"])
    # Not asserted: that the clean model raises no flag. That rests on its balanced accuracy with the lungs hidden
    # staying under chance + 0.15 (0.40 against 0.48 here) and its hidden-lung COVID-19 recall under 0.5 (0.37
    # here, 0.52 on a Zen 2): thresholds on what a tiny model does with a grey lung field. The contrasts above
    # are what the ablation must show on every CPU; the report test checks any flag it raises is reported.


def test_cross_source_recall_drops_only_with_the_shortcut(audited: dict) -> None:
    marked = audited["marked"]["cross_source"]["metrics"]
    print("cross-source covid recall:", {k: (audited[k]["cross_source"]["metrics"]["in_source"]["recall"]["value"],
                                          audited[k]["cross_source"]["metrics"]["unseen_source"]["recall"]["value"])
                                      for k in ("clean", "marked")})
    clean = audited["clean"]["cross_source"]["metrics"]
    assert marked["unseen_source"]["recall"]["value"] < marked["in_source"]["recall"]["value"] - 0.3
    assert _codes(audited["marked"]["cross_source"]) == ["cross-source-recall-drop"]
    # The clean model drops too on the "other hospital" (rendered straight at 72 px, not resized from a
    # collection's sizes: a real difference between sources), by far less: 0.26 against 0.96 here. Whether
    # that 0.26 is flagged rests on two 95% intervals of ~30 images each overlapping (by 0.06 here), which
    # moves between CPUs; the contrast is what the audit must show on every one.
    assert marked["difference"] >= clean["difference"] + 0.4


def test_report_section_flags_the_shortcut(audited: dict) -> None:
    marked = R.render_section(results_io.load_results(audited["marked"]["root"]), "html")
    clean = R.render_section(results_io.load_results(audited["clean"]["root"]), "markdown")
    assert "Warning:" in marked and "The source is predictable from the image" in marked
    assert "COVID-19 is still recognised with the lungs hidden" in marked
    assert "Class and source are confounded" in clean  # the data's confound, whatever the model learned
    raised = [f for k in ("source", "ablation", "cross_source") for f in audited["clean"][k]["flags"]]
    assert "The source is predictable from the image" not in clean  # the clean data's source probe stays near chance
    if raised:  # the clean model's borderline flags (see above) are reported, each with its message
        assert "Warning:" in clean and all(f["message"] in clean for f in raised)
    else:
        assert "Warning:" not in clean and "No audit raised a flag" in clean
        assert "not evidence of its absence" in clean


def test_cli_audits_of_a_checkpoint(audited: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = audited["clean"]["data"]
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(Checkpoint("resnet50v2", CLASSES, Preprocessing(SIZE), build_model("resnet50v2", 3, SIZE).state_dict()),
                    ckpt)
    assert main(["audit", "ablation", str(ckpt), "--data", str(data), "--fold", "1", "--device", "cpu",
                 "--precision", "fp32"]) == 0
    written = json.loads((tmp_path / "model-audit" / "ablation.json").read_text())
    assert set(written["metrics"]["conditions"]) == {"as_is", "lungs_hidden", "only_lungs"}
    assert written["metrics"]["conditions"]["as_is"]["n"] == written["metrics"]["conditions"]["only_lungs"]["n"] > 0
    assert "coarse" in written["metrics"]["mask_description"]
    assert written["inputs"]["model_sha256"] == file_sha256(ckpt)  # which weights: best.pt may be replaced later
    assert written["metrics"]["operating_point"]["rule"] == "argmax"
    out = capsys.readouterr().out
    assert "lung fields hidden" in out and "wrote" in out
    # A checkpoint at another input size than the prepared cache: one clear error.
    big = tmp_path / "big.pt"
    save_checkpoint(Checkpoint("resnet50v2", CLASSES, Preprocessing(96), {}), big)
    assert main(["audit", "ablation", str(big), "--data", str(data), "--fold", "1"]) == 2
    assert "96x96" in capsys.readouterr().err
    # Masks missing for the test images: listed.
    (tmp_path / "masks").mkdir()
    assert main(["audit", "cam", str(ckpt), "--data", str(data), "--fold", "1", "--masks", str(tmp_path / "masks")]) == 2
    assert "lung masks missing for" in capsys.readouterr().err
    # The linear source probe on the checkpoint's frozen features.
    assert main(["audit", "source", str(data), "--fold", "1", "--checkpoint", str(ckpt), "--device", "cpu",
                 "--precision", "fp32"]) == 0
    probe = json.loads((tmp_path / "model-audit" / "source.json").read_text())
    assert probe["metrics"]["mode"] == "linear-probe" and "pneumonia" in probe["metrics"]["within_class"]
    capsys.readouterr()
    # Cross-source: a source unknown to the data, and a source with no image of the class, are refused.
    assert main(["audit", "cross-source", str(ckpt), "--data", str(data), "--fold", "1", "--source", "nowhere"]) == 2
    assert "its sources are covid-chestxray, rsna" in capsys.readouterr().err
    assert main(["audit", "cross-source", str(ckpt), "--data", str(data), "--fold", "1", "--source", "rsna"]) == 2
    assert "no covid images from source 'rsna'" in capsys.readouterr().err
    # ...and a source prepared on its own ("another hospital") is evaluated beside the in-source recall.
    ext = _prepare_folder_source(tmp_path / "hospital-b")
    assert main(["audit", "cross-source", str(ckpt), "--data", str(data), "--fold", "1", "--source", "folder",
                 "--source-data", str(ext), "--device", "cpu", "--precision", "fp32"]) == 0
    cross = json.loads((tmp_path / "model-audit" / "cross_source.json").read_text())["metrics"]
    assert cross["unseen_source"]["n"] == 12 and cross["in_source"]["sources"] == ["covid-chestxray"]
    assert cross["in_source"]["n"] == int((_test_frame(data)["label"] == "covid").sum())


def _prepare_folder_source(root: Path, covid_copies: Sequence[Path] = ()) -> Path:
    """A collection of 12 images per class, prepared; plus ``covid_copies`` (files copied in as COVID-19)."""
    from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
    from covid_cxr.data.splits import SplitSettings

    rng = np.random.default_rng(5)
    for cls in CLASSES:
        (root / "images" / cls).mkdir(parents=True)
        for i in range(12):
            cv2.imwrite(str(root / "images" / cls / f"{i}.png"), render_chest(rng, 96, cls).image)
    for i, path in enumerate(covid_copies):
        shutil.copyfile(path, root / "images" / "covid" / f"copy{i}{path.suffix}")
    prepare_dataset(PrepareSettings(out=root / "data", folder=root / "images", split=SplitSettings(folds=2, phases=1),
                                    image_size=SIZE),
                    progress=False)
    return root / "data"


def _test_frame(data: Path):
    from covid_cxr.data.prepared import PreparedData

    return PreparedData(data).fold(1).test


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(Checkpoint("resnet50v2", CLASSES, Preprocessing(SIZE), build_model("resnet50v2", 3, SIZE).state_dict()),
                    path)
    return path


def test_cross_source_leaves_out_the_models_own_training_images(
    audited: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A folder named hospital-b holding copies of the fold's training images is not an unseen source."""
    data = audited["clean"]["data"]
    ckpt = _checkpoint(tmp_path / "model.pt")
    prepared = PreparedData(data)
    pool = training_pool(prepared, 1)
    paths = prepared.manifest.set_index("image_id")["path"]
    copies = [Path(paths[i]) for i in pool["image_id"][pool["label"] == "covid"][:7]]
    hospital = tmp_path / "hb"
    (hospital / "covid").mkdir(parents=True)
    for i, path in enumerate(copies):
        shutil.copyfile(path, hospital / "covid" / f"copy{i}{path.suffix}")
    args = ["audit", "cross-source", str(ckpt), "--data", str(data), "--fold", "1", "--device", "cpu",
            "--precision", "fp32", "--source-data", f"hospital-b={hospital}"]
    assert main(args) == 2  # nothing of hospital-b is unseen: refused, not scored as an "unseen source"
    err = capsys.readouterr().err
    assert "every one of the 7 covid images of 'hospital-b' is byte-identical" in err and "model's own" in err
    rng = np.random.default_rng(21)
    for i in range(3):  # three images the model never saw
        cv2.imwrite(str(hospital / "covid" / f"new{i}.png"), render_chest(rng, 96, "covid").image)
    assert main(args) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "model-audit" / "cross_source.json").read_text())
    assert written["inputs"]["model_sha256"] == file_sha256(ckpt)
    assert written["metrics"]["unseen_source"]["n"] == 3 and written["metrics"]["unseen_source"]["left_out_own"] == 7
    note = next(n for n in written["notes"] if n.startswith("left out 7 of 10 COVID-19 images of hospital-b"))
    assert "hospital-b/covid_copy0" in note and "and 2 more" in note  # five named, the rest counted
    assert "note: left out 7 of 10" in out and "unseen source hospital-b | 3" in out
    section = R.render_section({"cross_source": written}, "markdown")
    assert "7 COVID-19 images of hospital-b were left out" in section
    # The same check for a folder that 'prepare' wrote: its cache's sha256 column against the pool's.
    ext = _prepare_folder_source(tmp_path / "prepared-b", covid_copies=copies[:4])
    assert main(["audit", "cross-source", str(ckpt), "--data", str(data), "--fold", "1", "--source", "folder",
                 "--source-data", str(ext), "--device", "cpu", "--precision", "fp32"]) == 0
    cross = json.loads((tmp_path / "model-audit" / "cross_source.json").read_text())["metrics"]
    assert cross["unseen_source"]["n"] == 12 and cross["unseen_source"]["left_out_own"] == 4


def test_source_audit_refuses_fold_0(audited: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """Fold 0 is no fold (they count from 1): said, not silently taken as fold 1."""
    assert main(["audit", "source", str(audited["clean"]["data"]), "--fold", "0", "--probes", "stats"]) == 2
    assert "fold 0 is out of range" in capsys.readouterr().err
