"""``covid-cxr export --int8``: calibrated from the checkpoint's run or from user X-rays, checked, usable.

A tiny synthetic dataset is prepared at 71 px and a random Xception checkpoint is put in a run
folder (``run.json`` naming the data and fold), as a training run leaves it.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from covid_cxr.cli import main  # noqa: E402
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset  # noqa: E402
from covid_cxr.data.prepared import PreparedData  # noqa: E402
from covid_cxr.data.splits import SplitSettings  # noqa: E402
from covid_cxr.deploy.calibration import check_int8, stratified_sample  # noqa: E402
from covid_cxr.deploy.export import Int8Settings, export_checkpoint  # noqa: E402
from covid_cxr.deploy.quantize import META_KEY  # noqa: E402
from covid_cxr.inference.int8 import cpu_features, describe_cpu, lacks_vnni  # noqa: E402
from covid_cxr.errors import ConfigError  # noqa: E402
from covid_cxr.inference.onnx_model import OnnxPredictor  # noqa: E402
from covid_cxr.operating_point import ONNX_KEY, OperatingPoint  # noqa: E402
from covid_cxr.stats import wilson_interval  # noqa: E402
from covid_cxr.synth import make_synthetic  # noqa: E402
from tests.test_server import tiny_checkpoint  # noqa: E402

SIZE = 71


def _cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("int8data")
    synth = make_synthetic(root / "synthetic", seed=0, n_covid=16, n_pneumonia=20, n_normal=16, size=64, workers=1)
    prepare_dataset(PrepareSettings(out=root / "data", covid_chestxray=synth.covid_chestxray, rsna=synth.rsna,
                                    image_size=SIZE, split=SplitSettings(folds=2, phases=1, seed=0)), progress=False)  # fmt: skip
    return root / "data"


@pytest.fixture(scope="module")
def pngs(data: Path) -> Path:
    """Ten test-split X-rays of the prepared data written as PNG files, as a user would have them."""
    prepared = PreparedData(data)
    test = prepared.fold(1).test
    cache = prepared.cache(SIZE)
    folder = data.parent / "pngs"
    folder.mkdir()
    for k, row in enumerate(cache.rows(test["image_id"][:10])):
        assert cv2.imwrite(str(folder / f"xray{k}.png"), np.asarray(cache.images[row]))
    return folder


@pytest.fixture(scope="module")
def exported_run(data: Path) -> tuple[Path, str]:
    """A run folder whose best.pt was exported with ``--int8`` and nothing else: calibration from the run."""
    run = data.parent / "run"
    run.mkdir()
    tiny_checkpoint(run / "best.pt", "xception", size=SIZE)
    split_hash = PreparedData(data).fold(1).split_hash
    (run / "run.json").write_text(json.dumps({"network": "xception", "fold": 1, "data": str(data),
                                              "split_hash": split_hash, "image_size": SIZE}))
    rc, err = _cli("export", str(run / "best.pt"), "--int8")
    assert rc == 0, err
    return run, err


def _quantization(path: Path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}  # the raw file, as other tools see it
    return json.loads(props[META_KEY])


def test_int8_from_the_run_is_int8_and_carries_its_check(data: Path, exported_run: tuple[Path, str]) -> None:
    run, err = exported_run
    fp32_path, int8_path = run / "best.onnx", run / "best.int8.onnx"
    fp32, int8 = OnnxPredictor(fp32_path), OnnxPredictor(int8_path)
    assert fp32.fixed_batch is None  # --int8 exports the fp32 model with a dynamic batch too
    assert int8.classes == fp32.classes and int8.preprocessing == fp32.preprocessing

    graph = onnx.load(str(int8_path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QLinearConv") >= 10 and "Conv" not in ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) >= ops.count("QLinearConv")
    assert int8_path.stat().st_size < fp32_path.stat().st_size / 2
    assert not list(run.glob(".*"))  # no temporary file left behind

    # The stored figures are what running both models on the run's validation split gives.
    prepared = PreparedData(data)
    val = prepared.fold(1).val
    cache = prepared.cache(SIZE)
    images = np.asarray(cache.images[cache.rows(val["image_id"])])
    truth = np.asarray([fp32.classes.index(c) for c in val["label"]])
    p32, p8 = fp32.predict_proba(images).argmax(1), int8.predict_proba(images).argmax(1)
    info = _quantization(int8_path)
    check = info["check"]
    n = len(val)
    assert check["images"] == n and check["labelled"] is True
    assert check["fp32_accuracy_pct"] == pytest.approx(100 * (p32 == truth).mean(), abs=1e-3)
    assert check["int8_accuracy_pct"] == pytest.approx(100 * (p8 == truth).mean(), abs=1e-3)
    assert check["agreement_pct"] == pytest.approx(100 * (p32 == p8).mean(), abs=1e-3)
    assert check["accuracy_difference_pp"] == pytest.approx(check["int8_accuracy_pct"] - check["fp32_accuracy_pct"],
                                                            abs=1e-2)
    low, high = wilson_interval(int((p8 == truth).sum()), n)
    assert check["int8_accuracy_ci95_pct"] == pytest.approx([100 * low, 100 * high], abs=1e-3)
    assert "validation images of fold 1" in check["source"]
    # Calibrated on the fold's phase-1 training images (all of them: fewer than the default 64).
    assert info["calibration_images"] == len(prepared.fold(1).phases[0]) and info["format"] == "qoperator"
    assert "phase-1 training images of fold 1" in info["calibration_source"]
    # ...resized, like the check images, by the checkpoint's own method, which the record names.
    assert info["resize"] == "area" and "resized by 'area'" in err
    assert f"int8 check on {n} validation images" in err and "wrote " + str(int8_path) in err
    # Full 8-bit weights, run in their uint8 form where the CPU has no VNNI; the record names the CPU the check ran on.
    assert info["weight_range"] == [-127, 127] and info["uint8_form_without_vnni"] is True
    assert info["saturation_free"] is False and info["max_int16_pair_sum"] == 2 * 255 * 127
    assert info["checked_on"] == cpu_features() and "full 8-bit range; run as uint8" in err


def test_predict_runs_the_int8_model(exported_run: tuple[Path, str], pngs: Path, tmp_path: Path) -> None:
    run, _ = exported_run
    rc, err = _cli("predict", str(run / "best.int8.onnx"), str(pngs), "--out", str(tmp_path / "p.csv"))
    assert rc == 0, err
    assert "int8: qoperator, uint8 activations, int8 per-channel, full 8-bit range" in err and "warning" not in err
    assert describe_cpu(cpu_features()) in err  # the CPU the check ran on: this one
    # Where this CPU has no VNNI the weights run in their uint8 form, and predict says so.
    assert ("int8 weights run here in their uint8 form" in err) == lacks_vnni()
    table = pd.read_csv(tmp_path / "p.csv")
    assert len(table) == 10 and set(table["class"]) <= {"covid", "pneumonia", "normal"}
    assert np.allclose(table[["p_covid", "p_pneumonia", "p_normal"]].sum(axis=1), 1, atol=1e-4)


def test_serve_prints_the_int8_record(exported_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: served.append(sockets))
    run, _ = exported_run
    rc, err = _cli("serve", str(run / "best.int8.onnx"), "--port", "0")
    assert rc == 0 and served, err
    assert "int8: qoperator, uint8 activations, int8 per-channel, full 8-bit range" in err and "agreement with fp32" in err


def test_calibration_folder_without_a_run(data: Path, pngs: Path, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "loose.pt", "xception", size=SIZE, seed=1)  # no run.json beside it
    folder = tmp_path / "xrays"
    folder.mkdir()
    for png in pngs.iterdir():
        (folder / png.name).write_bytes(png.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    rc, err = _cli("export", str(ckpt), "--out", str(tmp_path / "out" / "m.onnx"), "--int8", "--calibration",
                   str(folder), "--int8-format", "qdq")
    assert rc == 0, err
    assert "skipped: " in err and "broken.png" in err
    assert "accuracy not checked: no labelled images were given" in err
    info = _quantization(tmp_path / "out" / "m.int8.onnx")
    assert info["calibration_images"] == 10 and info["format"] == "qdq"
    assert info["check"]["images"] == 10 and info["check"]["labelled"] is False
    assert 0 <= info["check"]["agreement_pct"] <= 100 and "int8_accuracy_pct" not in info["check"]


def test_the_library_call_returns_what_it_wrote(pngs: Path, tmp_path: Path) -> None:
    """export_checkpoint is what the command line and the demo call: typed settings in, the files and check out."""
    ckpt = tiny_checkpoint(tmp_path / "loose.pt", "xception", size=SIZE, seed=2)
    lines: list[str] = []
    result = export_checkpoint(ckpt, int8=Int8Settings(calibration=(str(pngs),)), say=lines.append)
    assert result.onnx == tmp_path / "loose.onnx" and result.int8 == tmp_path / "loose.int8.onnx"
    assert result.int8.is_file() and result.card.is_file() and result.check is not None
    assert _quantization(result.int8)["check"] == result.check.as_dict()
    assert any(line.startswith(f"wrote {result.int8}") for line in lines)
    with pytest.raises(ConfigError, match=r"got 'qdqq' \(did you mean 'qdq'\?\)"):
        Int8Settings(quant_format="qdqq")
    with pytest.raises(ConfigError, match="must be >= 1"):
        Int8Settings(check_count=0)


def test_refusals_name_the_fix(data: Path, pngs: Path, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "loose.pt", "xception", size=SIZE)
    rc, err = _cli("export", str(ckpt), "--int8")
    assert rc == 2 and "no run.json beside it" in err and "Pass --calibration with a folder of X-rays" in err
    missing = tmp_path / "no-such-folder"
    rc, err = _cli("export", str(ckpt), "--int8", "--calibration", str(missing))
    assert rc == 2 and str(missing) in err and "no such file or folder" in err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"nope")
    rc, err = _cli("export", str(ckpt), "--int8", "--calibration", str(junk))
    assert rc == 2 and "none of the 1 files decoded" in err
    rc, err = _cli("export", str(ckpt), "--int8", "--calibration", *sorted(map(str, pngs.iterdir()))[:5])
    assert rc == 2 and "at least 8 calibration images" in err
    rc, err = _cli("export", str(ckpt), "--calibration", str(pngs))
    assert rc == 2 and "only apply with --int8" in err
    rc, err = _cli("export", str(tmp_path / "absent.pt"), "--int8")
    assert rc == 2 and "absent.pt" in err
    assert not list(tmp_path.glob("*.onnx"))  # every refusal came before the export


def test_stratified_sample_gives_a_rare_class_its_share() -> None:
    frame = pd.DataFrame({"image_id": [str(i) for i in range(73)],
                          "label": ["normal"] * 50 + ["covid"] * 3 + ["pneumonia"] * 20})
    picked = stratified_sample(frame, 12)
    counts = picked["label"].value_counts().to_dict()
    assert counts["covid"] == 3 and sorted([counts["normal"], counts["pneumonia"]]) == [4, 5]
    assert picked["image_id"].is_unique and picked.equals(stratified_sample(frame, 12))
    assert len(stratified_sample(frame, 500)) == 73


class _FixedPredictor:
    """A model of known probabilities carrying an operating point in its metadata, as an exported file does."""

    classes = ("covid", "pneumonia", "normal")

    def __init__(self, p_covid: float, op: OperatingPoint) -> None:
        self.p_covid = p_covid
        self.metadata = {ONNX_KEY: json.dumps(op.to_dict())}

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        rest = (1.0 - self.p_covid) / 2
        return np.tile([self.p_covid, rest - 0.05, rest + 0.05], (len(images), 1))


def test_the_int8_check_decides_by_the_models_operating_point() -> None:
    # fp32 puts p_covid at 0.30 and int8 at 0.26: the same argmax (normal), but on either side of a 0.28
    # threshold, so predict and serve would decide differently; the check must count that as disagreement.
    op = OperatingPoint(rule="sensitivity", target=0.95, threshold=0.28)
    images = np.zeros((10, 8, 8), np.uint8)
    labels = np.array(["covid"] * 10)
    check = check_int8(_FixedPredictor(0.30, op), _FixedPredictor(0.26, op), images, labels, "test images")
    assert check.agreed.k == 0 and check.argmax_agreed is not None and check.argmax_agreed.k == 10
    assert check.fp32 is not None and check.fp32.k == 10 and check.int8 is not None and check.int8.k == 0
    record = check.as_dict()
    assert record["agreement_pct"] == 0 and record["argmax_agreement_pct"] == 100
    assert record["decision_rule"].startswith("sensitivity=0.95")
    assert "0.0% (0/10) decided by sensitivity=0.95" in check.summary()
    assert check.problems()  # under 99% agreement and 100 points lost: the export warns


def test_the_int8_check_by_argmax_keeps_one_agreement() -> None:
    check = check_int8(_FixedPredictor(0.30, OperatingPoint()), _FixedPredictor(0.26, OperatingPoint()),
                       np.zeros((4, 8, 8), np.uint8), None, "calibration images")
    assert check.agreed.k == 4 and check.argmax_agreed is None
    assert check.as_dict()["decision_rule"] == "argmax" and "argmax_agreement_pct" not in check.as_dict()


def test_export_never_overwrites_its_checkpoint_nor_leaves_a_stale_int8(pngs: Path, tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "best.pt", "xception", size=SIZE, seed=3)
    before = ckpt.read_bytes()
    for out in (ckpt, tmp_path / "model.pt", tmp_path / "model"):
        with pytest.raises(ConfigError, match="ending in .onnx"):
            export_checkpoint(ckpt, tmp_path / out.name)
    assert ckpt.read_bytes() == before and not list(tmp_path.glob("*.onnx"))
    (tmp_path / "taken.onnx").mkdir()
    (tmp_path / "a-file").write_text("")
    for out, said in ((tmp_path / "taken.onnx", "a folder; name the .onnx file in it"),
                      (tmp_path / "a-file" / "model.onnx", "a-file is a file, not a folder")):
        with pytest.raises(ConfigError, match=said):  # said before the export's work, not after it
            export_checkpoint(ckpt, out)

    out = tmp_path / "model.onnx"
    first = export_checkpoint(ckpt, out, int8=Int8Settings(calibration=(str(pngs),)))
    assert first.int8 is not None and first.int8.is_file()
    again = export_checkpoint(ckpt, out)  # the same weights again, fp32 only: their int8 file stays ...
    assert first.int8.is_file()
    assert f"File `{first.int8.name}`: sha256" in again.card.read_text()  # ... and the card still lists it
    other = tiny_checkpoint(tmp_path / "other.pt", "xception", size=SIZE, seed=4)
    lines: list[str] = []
    export_checkpoint(other, out, say=lines.append)  # other weights under the same name: the old int8 goes
    assert not first.int8.exists() and any(line.startswith(f"removed {first.int8}") for line in lines)
