"""What a review of ``predict``, ``serve`` and the image decoder found, each finding held by a test that failed
before its fix: corrupt DICOM headers, what decided a class (on the page, in the answers and in predict's rows),
fp32 for a model with a threshold rule, a second lifespan of the web app, overlay names, the pixel limit, a
folder without images, and the int8 record.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from covid_cxr import runtime
from covid_cxr.atomic import file_sha256
from covid_cxr.choices import COMPILE_MIN_IMAGES
from covid_cxr.cli import main
from covid_cxr.data.images import MAX_PIXELS, decode_radiograph, load_image
from covid_cxr.deploy import server
from covid_cxr.deploy.limits import ServerLimits
from covid_cxr.deploy.server import InferenceQueue, create_app
from covid_cxr.errors import ConfigError, ImageDecodeError
from covid_cxr.inference import backends
from covid_cxr.inference.backends import choose_backend, load_model, resolve_compile
from covid_cxr.inference.onnx_model import OnnxPredictor
from covid_cxr.inference.pipeline import Classifier
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.inference.torch_model import TorchPredictor
from covid_cxr.operating_point import OperatingPoint
from covid_cxr.runs.checkpoint import load_checkpoint, save_checkpoint
from covid_cxr.synth import render_chest
from covid_cxr.synth.dicom import STORAGES, write_dicom
from tests.test_server import png_bomb, png_bytes, tiny_checkpoint

SIZE = 71
ODD_DICOMS = sorted((Path(__file__).parent / "data").glob("odd-dcm-*.bin"))  # mutated DICOMs the review kept
RULE = {"rule": "sensitivity", "target": 0.95, "positive_class": "covid", "threshold": 0.2,
        "validation": {"sensitivity": 0.95, "specificity": 0.6, "n_positive": 20, "n_negative": 80}}
RULE_LINE = ("decided by sensitivity=0.95: COVID-19 when p(COVID-19) >= 0.2, otherwise the more probable of the "
             "other classes")
FP32 = InferenceSettings(device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("review") / "tiny.pt", "xception", size=SIZE)


@pytest.fixture(scope="module")
def rule_ckpt(ckpt: Path) -> Path:
    """The same network deciding by a stored threshold rule (COVID-19 when p_covid >= 0.2)."""
    checkpoint = load_checkpoint(ckpt)
    checkpoint.operating_point = dict(RULE)
    return save_checkpoint(checkpoint, ckpt.with_name("rule.pt"))


@pytest.fixture(scope="module")
def xrays(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic radiographs as PNG files."""
    folder = tmp_path_factory.mktemp("xrays")
    rng = np.random.default_rng(4)
    for k, label in enumerate(["covid", "pneumonia", "normal"] * 2):
        assert cv2.imwrite(str(folder / f"{label}{k}.png"), render_chest(rng, 96, label).image)
    return folder


def _within(seconds: float, call: Callable[[], Any]) -> Any:
    """``call()``'s result, failing the test (not hanging the suite) when it gives none within ``seconds``."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except Exception as exc:  # handed to the test thread below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"no answer within {seconds} s: the call hangs")
    if "error" in result:
        raise result["error"]
    return result["value"]


# ----------------------------------------------------------------------------------- 1. corrupt DICOM headers


def test_the_saved_corrupt_dicoms_are_refused_naming_the_file_and_the_fix() -> None:
    assert len(ODD_DICOMS) == 2  # pydicom raised BytesLengthException and NotImplementedError on these
    for path in ODD_DICOMS:
        with pytest.raises(ImageDecodeError) as refused:
            decode_radiograph(path)
        assert str(path) in str(refused.value)
        assert "DICOM header" in refused.value.reason and "re-export the image" in refused.value.reason
        assert "pydicom.config" not in refused.value.reason  # pydicom's advice to programmers is left out


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns of each invalid value it meets
def test_mutated_dicoms_decode_or_are_refused_never_crash(tmp_path: Path) -> None:
    """Seeded byte mutations of real DICOMs (every storage the synthesiser writes), most in the header: each
    either decodes to an image or is an ImageDecodeError, whatever element pydicom trips on."""
    rng = np.random.default_rng(0)
    image = (rng.random((48, 48)) * 255).astype(np.uint8)
    escaped: list[str] = []
    decoded = refused = 0
    for storage in STORAGES:
        write_dicom(tmp_path / f"{storage}.dcm", image, storage=storage)
        original = (tmp_path / f"{storage}.dcm").read_bytes()
        for _ in range(100):
            data = bytearray(original)
            span = min(len(data), 700) if rng.random() < 0.8 else len(data)  # the header, mostly
            for _ in range(int(rng.integers(1, 9))):
                data[int(rng.integers(0, span))] = int(rng.integers(0, 256))
            try:
                img, _ = decode_radiograph(bytes(data), name="fuzzed.dcm")
            except ImageDecodeError as exc:
                assert exc.path == "fuzzed.dcm" and exc.reason
                refused += 1
            except Exception as exc:  # what the test is about: anything else escaping the decoder
                escaped.append(f"{storage}: {type(exc).__name__}: {exc}"[:160])
            else:
                assert img.dtype == np.uint8 and img.ndim == 2
                decoded += 1
    assert escaped == []
    assert decoded and refused  # both outcomes occur: the mutations neither all miss nor all break the file


def test_serve_answers_a_corrupt_dicom_with_422_and_the_reason(ckpt: Path, xrays: Path) -> None:
    model = load_model(ckpt, FP32)
    with TestClient(create_app(model.predictor, network=model.network), raise_server_exceptions=False) as client:
        for path in ODD_DICOMS:
            r = client.post("/predict", files={"file": ("x.dcm", path.read_bytes())})
            assert r.status_code == 422, r.text
            assert "DICOM header" in r.json()["detail"] and "re-export" in r.json()["detail"]
        good = client.post("/predict", files={"file": ("x.png", (xrays / "covid0.png").read_bytes())})
        assert good.status_code == 200


def test_serve_answers_any_decoder_failure_with_422_and_logs_its_traceback(
    ckpt: Path, xrays: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A decoder bug nobody foresaw (stood in: no real file raises one now) is the upload's 422, not a 500."""
    class DecoderBug(Exception):
        pass

    def broken(data: bytes, **kwargs: Any) -> None:
        raise DecoderBug("a branch nobody tested")

    model = load_model(ckpt, FP32)
    app = create_app(model.predictor, network=model.network)
    monkeypatch.setattr(server, "decode_radiograph", broken)
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        r = client.post("/predict", files={"file": ("x.png", (xrays / "covid0.png").read_bytes())})
    assert r.status_code == 422
    assert "DecoderBug: a branch nobody tested" in r.json()["detail"] and "send the original file" in r.json()["detail"]
    assert "Traceback" in caplog.text and "DecoderBug" in caplog.text


def test_predict_refuses_the_corrupt_dicom_and_keeps_the_good_file(ckpt: Path, xrays: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.dcm"
    shutil.copyfile(ODD_DICOMS[0], bad)
    out = tmp_path / "p.csv"
    assert main(["predict", str(ckpt), str(bad), str(xrays / "covid0.png"), "--out", str(out), "--device", "cpu",
                 "--precision", "fp32"]) == 1
    rows = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert "DICOM header" in rows.loc[str(bad), "error"] and rows.loc[str(bad), "class"] == ""
    assert rows.loc[str(xrays / "covid0.png"), "error"] == "" and rows.loc[str(xrays / "covid0.png"), "class"]
    assert f"failed: {bad}: unreadable DICOM header" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 2. what decided the class


def test_serve_says_what_decided_the_class(rule_ckpt: Path) -> None:
    model = load_model(rule_ckpt, FP32)
    rng = np.random.default_rng(0)
    with TestClient(create_app(model.predictor, network=model.network, sha256=model.sha256)) as client:
        health = client.get("/health").json()
        answers = [client.post("/predict", files={"file": ("x.png", png_bytes(
            (rng.random((100, 100)) * 255).astype(np.uint8)))}).json() for _ in range(6)]
    expected = {"rule": "sensitivity=0.95", "threshold": 0.2, "positive_class": "covid", "text": RULE_LINE}
    assert health["decision"] == expected
    classes = model.predictor.classes
    contradicted = 0
    for body in answers:
        assert body["decision"] == expected
        probs = np.array([[body["probabilities"][c] for c in classes]])
        assert body["class"] == classes[int(OperatingPoint.from_dict(RULE).decide(probs, classes)[0])]
        contradicted += body["class"] != classes[int(probs.argmax())]
    assert contradicted  # the case the rule line is for: a class that is not the longest bar


def test_predict_rows_name_the_rule_its_threshold_and_the_model(rule_ckpt: Path, xrays: Path, tmp_path: Path) -> None:
    csv, json_out = tmp_path / "p.csv", tmp_path / "p.json"
    for out in (csv, json_out):
        assert main(["predict", str(rule_ckpt), str(xrays), "--out", str(out), "--device", "cpu"]) == 0
    table = pd.read_csv(csv)
    assert list(table.columns) == ["path", "class", "p_covid", "p_pneumonia", "p_normal", "rule", "threshold",
                                   "model_sha256", "error"]
    assert set(table["rule"]) == {"sensitivity=0.95"} and set(table["threshold"]) == {0.2}
    assert set(table["model_sha256"]) == {file_sha256(rule_ckpt)}
    covid = table["p_covid"] >= 0.2
    assert (table.loc[covid, "class"] == "covid").all() and (table.loc[~covid, "class"] != "covid").all()
    rows = pd.read_json(json_out, typ="series")["predictions"]
    assert [(r["rule"], r["threshold"], r["model_sha256"]) for r in rows] == [
        ("sensitivity=0.95", 0.2, file_sha256(rule_ckpt))] * len(table)


# ------------------------------------------------------------------- 3. fp32 for a model with a threshold rule


@pytest.fixture
def cpu_kind(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """Stand in the CPU class as tests/test_project.py does (its flags, ATen's capability, oneDNN's word on bf16):
    ``cpu_kind(True)`` computes bf16 natively (Sapphire Rapids, Zen 4), ``cpu_kind(False)`` is AVX2-only."""
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)

    def set_kind(native_bf16: bool) -> None:
        flags = {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"} if native_bf16 else {"avx2", "fma"}
        monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512" if native_bf16 else "AVX2")
        monkeypatch.setattr(runtime, "_onednn_supports_bf16", lambda: native_bf16)
        assert runtime.cpu_has_native_bf16() is native_bf16

    return set_kind


def test_auto_runs_a_model_with_a_threshold_rule_in_fp32_on_every_cpu(cpu_kind: Callable[[bool], None]) -> None:
    cpu_kind(True)
    assert choose_backend(device="cpu").backend == "torch"  # argmax: bf16 autocast, as before
    choice = choose_backend(device="cpu", rule="sensitivity=0.95")
    assert (choice.backend, choice.precision) == ("onnx", "fp32")
    assert "fp32, not bf16: the model decides by sensitivity=0.95" in choice.reason
    asked = choose_backend("torch", device="cpu", rule="sensitivity=0.95")  # the backend asked for, in fp32
    assert (asked.backend, asked.precision) == ("torch", "fp32")
    kept = choose_backend(device="cpu", precision="bf16", rule="sensitivity=0.95")  # asked for: kept
    assert (kept.backend, kept.precision) == ("torch", "bf16")
    cpu_kind(False)
    choice = choose_backend(device="cpu", rule="sensitivity=0.95")
    assert (choice.backend, choice.precision) == ("onnx", "fp32") and "not bf16" not in choice.reason


def test_auto_compiles_no_model_it_runs_on_onnx_runtime(rule_ckpt: Path, ckpt: Path,
                                                         cpu_kind: Callable[[bool], None]) -> None:
    cpu_kind(True)
    on_cpu = InferenceSettings(device="cpu")
    assert resolve_compile("auto", COMPILE_MIN_IMAGES, on_cpu, model=ckpt, follow_rule=True)
    assert not resolve_compile("auto", COMPILE_MIN_IMAGES, on_cpu, model=rule_ckpt, follow_rule=True)


def test_predict_decides_a_threshold_rule_on_fp32_probabilities_on_a_bf16_cpu(
    rule_ckpt: Path, xrays: Path, tmp_path: Path, cpu_kind: Callable[[bool], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cpu_kind(True)
    out = tmp_path / "p.csv"
    assert main(["predict", str(rule_ckpt), str(xrays), "--out", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    model_line = next(line for line in err.splitlines() if line.startswith("model: "))
    assert "on onnx" in model_line and "fp32, not bf16: the model decides by sensitivity=0.95" in model_line
    assert "warning" not in err
    table = pd.read_csv(out)
    exact = TorchPredictor(load_checkpoint(rule_ckpt), device="cpu", precision="fp32")
    expected = exact.predict_proba(np.stack([load_image(p, SIZE) for p in table["path"]]))
    np.testing.assert_allclose(table[["p_covid", "p_pneumonia", "p_normal"]].to_numpy(), expected, atol=1e-4)


def test_an_explicit_bf16_is_kept_with_a_warning_naming_the_risk(rule_ckpt: Path, ckpt: Path, xrays: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bf16 = InferenceSettings(device="cpu", precision="bf16")
    loaded = load_model(rule_ckpt, bf16, follow_rule=True)
    assert isinstance(loaded.predictor, TorchPredictor) and loaded.predictor.runtime.precision == "bf16"
    (warning,) = loaded.warnings()
    assert "sensitivity=0.95" in warning and "validated on fp32" in warning and "Drop --precision bf16" in warning
    assert load_model(ckpt, bf16, follow_rule=True).warnings() == []  # argmax: nothing to warn about
    assert load_model(rule_ckpt, FP32, follow_rule=True).warnings() == []
    assert main(["predict", str(rule_ckpt), str(xrays / "covid0.png"), "--device", "cpu", "--precision", "bf16"]) == 0
    assert "warning: the model decides by sensitivity=0.95" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- 4. a second lifespan


def test_the_app_answers_through_a_second_lifespan(ckpt: Path, xrays: Path) -> None:
    model = load_model(ckpt, FP32)
    app = create_app(model.predictor, network=model.network)
    data = (xrays / "normal2.png").read_bytes()
    for _ in range(2):  # two event loops, as two test clients or an embedding app restarting it make
        with TestClient(app) as client:
            answer = _within(120, lambda: client.post("/predict", files={"file": ("x.png", data)}))
            assert answer.status_code == 200, answer.text


class _Fatal(BaseException):
    """Stands in for a failure the worker does not survive (``except Exception`` lets it through)."""


def test_a_dead_worker_fails_the_requests_instead_of_hanging_them(ckpt: Path, xrays: Path) -> None:
    model = load_model(ckpt, FP32)

    class Dying:
        backend = "torch"
        classes = model.predictor.classes
        preprocessing = model.predictor.preprocessing

        def predict_proba(self, images: np.ndarray) -> np.ndarray:
            raise _Fatal("the worker's thread is gone")

    image = load_image(xrays / "normal2.png", SIZE)

    async def scenario() -> list[str]:
        queue = InferenceQueue(Classifier(Dying()), None, max_batch=4)
        await queue.start()
        failures = []
        for _ in range(2):  # the request that killed it, then one that finds it dead
            with pytest.raises(RuntimeError) as failed:
                await asyncio.wait_for(queue.submit(image, False), timeout=60)
            failures.append(str(failed.value))
        await queue.stop()
        return failures

    failures = asyncio.run(scenario())
    assert all("the inference worker ended" in f and "_Fatal" in f for f in failures)
    app = create_app(Dying(), network="xception")
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(2):
            r = _within(120, lambda: client.post("/predict", files={"file": ("x.png", png_bytes(image))}))
            assert r.status_code == 500 and r.json() == {"detail": "internal error while processing the request"}


# ---------------------------------------------------------------------------------------- 5. overlay names


def test_concat_overlays_never_overwrite_each_other(tmp_path: Path) -> None:
    """x.png's xception map is x.xception.png, the very name of the other input's overlay."""
    ckpt = tiny_checkpoint(tmp_path / "concat.pt", "concat", size=SIZE)
    files = [tmp_path / "x.png", tmp_path / "x.xception.png"]
    for k, path in enumerate(files):
        assert cv2.imwrite(str(path), render_chest(np.random.default_rng(k), 90, "covid").image)
    for order, cams in ((files, tmp_path / "cams"), (files[::-1], tmp_path / "cams-reversed")):
        out = cams.with_suffix(".csv")
        assert main(["predict", str(ckpt), *map(str, order), "--out", str(out), "--gradcam", str(cams),
                     "--device", "cpu", "--precision", "fp32"]) == 0
        table = pd.read_csv(out)
        named = table[["overlay", "overlay_xception", "overlay_resnet50v2"]].to_numpy().ravel().tolist()
        assert len(set(named)) == 6 and sorted(Path(p).name for p in named) == sorted(p.name for p in cams.iterdir())
        assert len({Path(p).read_bytes() for p in named}) == 6  # six different maps, none overwritten
        first = table.iloc[0]
        assert Path(first["overlay"]).name == Path(first["path"]).stem + ".png"  # the first keeps its own name


# ------------------------------------------------------------------------------------------ 6. pixel limit


def test_the_servers_pixel_limit_is_checked_from_the_header(ckpt: Path, xrays: Path) -> None:
    model = load_model(ckpt, FP32)
    app = create_app(model.predictor, network=model.network, limits=ServerLimits(max_pixels=150 * 150))
    with TestClient(app) as client:
        # A header claiming 200x200 over almost no data: refused from the header, never decoded (it would be
        # "truncated", a 422, if it were).
        r = client.post("/predict", files={"file": ("big.png", png_bomb(200, 200))})
        assert r.status_code == 413 and "exceeds the limit of 22500 pixels" in r.json()["detail"]
        assert client.post("/predict", files={"file": ("x.png", (xrays / "covid0.png").read_bytes())}).status_code == 200


def test_a_pixel_limit_above_the_decoders_is_refused_at_start_up(ckpt: Path, capsys: pytest.CaptureFixture[str]
                                                                ) -> None:
    model = load_model(ckpt, FP32)
    with pytest.raises(ConfigError, match=f"above the largest image the decoder reads \\({MAX_PIXELS} pixels"):
        create_app(model.predictor, network=model.network, limits=ServerLimits(max_pixels=MAX_PIXELS + 1))
    assert main(["serve", str(ckpt), "--max-pixels", str(60_000_000)]) == 2
    assert f"give {MAX_PIXELS} or less" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 7. no images


def test_predict_on_a_folder_without_images_says_so_and_writes_nothing(ckpt: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    scans = tmp_path / "scans"
    (scans / "sub").mkdir(parents=True)
    (scans / "notes.txt").write_text("x")
    (scans / "sub" / "report.pdf").write_bytes(b"%PDF-1.4")
    out = tmp_path / "p.csv"
    assert main(["predict", str(ckpt), str(scans), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"no image files found in {scans}" in err and ".png" in err and ".dcm" in err
    assert "2 other files passed over" in err and str(scans / "notes.txt") in err
    assert "nothing was predicted or written" in err and not out.exists()


# -------------------------------------------------------------------------------------------- 8. int8 record


@pytest.mark.slow
def test_the_int8_record_names_its_rule_and_serve_shows_an_int8_model(rule_ckpt: Path, xrays: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime.quantization")
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(9)
    for k, label in enumerate(["covid", "pneumonia", "normal"] * 3):
        assert cv2.imwrite(str(calibration / f"{label}{k}.png"), render_chest(rng, 96, label).image)
    model = tmp_path / "m.onnx"
    assert main(["export", str(rule_ckpt), "--out", str(model), "--int8", "--calibration", str(calibration)]) == 0
    capsys.readouterr()
    int8 = model.with_name("m.int8.onnx")
    assert main(["predict", str(int8), str(xrays / "covid0.png"), "--device", "cpu"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("int8: "))
    assert "agreement with fp32" in line and "decided by sensitivity=0.95 (p_covid >= 0.2)" in line
    # Each agreement is a count over the 9 check images with its Wilson interval, by the rule and by argmax.
    assert len(re.findall(r"\d+\.\d% \(95% CI \d+\.\d-\d+\.\d%\), \d/9\b", line)) == 2, line
    assert "/9 by argmax)" in line
    with TestClient(create_app(OnnxPredictor(int8), network="xception")) as client:
        described = client.get("/health").json()["model"]
    assert described["precision"] == "int8" and described["int8"]["decision_rule"] == "sensitivity=0.95 (p_covid >= 0.2)"
    assert 0 <= described["int8"]["agreement_pct"] <= 100 and described["int8"]["check_images"] == 9
    agreed = round(described["int8"]["agreement_pct"] * 9 / 100)
    agreement = described["int8"]["agreement"]
    assert agreement.startswith(f"{100 * agreed / 9:.1f}% (95% CI ") and agreement.endswith(f"%), {agreed}/9")
    with TestClient(create_app(OnnxPredictor(model), network="xception")) as client:
        described = client.get("/health").json()["model"]
    assert described["precision"] == "fp32" and "int8" not in described
