"""What a QA pass of ``predict`` and ``serve`` found, each kept fixed by a test.

``predict --gradcam`` never writes over an input or a file it did not write, writes each overlay atomically, and
an overlay that cannot be written is its image's note, not the run's end; --out and --gradcam are checked before
the model loads; a run folder names its best.pt; a closed pipe or a full disk is not called an interrupt.
``serve`` refuses bad options by their flag, answers one image per request, shows its API description without
reaching the network, and takes a client that hangs up mid-upload in its stride.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import ClassVar

import cv2
import httpx
import numpy as np
import pandas as pd
import pytest

from covid_cxr.cli import build_parser, main
from covid_cxr.deploy.server import create_app
from covid_cxr.gradcam import CamResult, is_overlay
from covid_cxr.inference.backends import load_model
from covid_cxr.inference.inputs import Inputs
from covid_cxr.inference.pipeline import (
    Classifier,
    Overlays,
    overlay_stem,
    predict_inputs,
)
from covid_cxr.inference.protocol import predict_in_batches
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.inference.sink import PredictionSink
from covid_cxr.labels import CLASSES
from covid_cxr.preprocess import Preprocessing
from covid_cxr.synth import render_chest
from covid_cxr.synth.dicom import write_dicom
from tests.test_server import png_bytes, serve, tiny_checkpoint

SIZE = 71
CPU = ["--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("qa") / "tiny.pt", "xception", size=SIZE)


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    return render_chest(np.random.default_rng(11), 96, "covid").image


def _xrays(folder: Path, chest: np.ndarray, *names: str) -> dict[str, bytes]:
    """PNG X-rays under ``names`` (each a different picture); their bytes, to tell later whether one was touched."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        (folder / name).write_bytes(png_bytes(np.roll(chest, 5 * k, axis=1)))
    return {name: (folder / name).read_bytes() for name in names}


def _overlays(csv: Path) -> list[str]:
    return list(pd.read_csv(csv, keep_default_na=False)["overlay"])


def _leftovers(folder: Path) -> list[str]:
    """Temporary files an atomic write would leave behind had it been cut short."""
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# --- Overlays: never over an input, nor over a file this program did not write --------------------------------------

def test_gradcam_into_the_input_folder_never_touches_an_input(ckpt, chest, tmp_path, monkeypatch, capsys):
    scans = tmp_path / "scans"
    originals = _xrays(scans, chest, "a.png", "b.png")
    out = tmp_path / "p.csv"
    assert main(["predict", str(ckpt), str(scans), "--gradcam", str(scans), "--out", str(out), *CPU]) == 0
    assert {n: (scans / n).read_bytes() for n in originals} == originals  # the X-rays are as they were
    assert _overlays(out) == [str(scans / "a-2.png"), str(scans / "b-2.png")]
    assert all(is_overlay(scans / n) for n in ("a-2.png", "b-2.png")) and not is_overlay(scans / "a.png")

    # Again from inside the folder, as `.`: now the first run's overlays are inputs too, and none is written over.
    monkeypatch.chdir(scans)
    inputs = {p.name: p.read_bytes() for p in scans.iterdir()}
    assert main(["predict", str(ckpt), ".", "--gradcam", ".", "--out", str(out), *CPU]) == 0
    assert {n: (scans / n).read_bytes() for n in inputs} == inputs
    written = _overlays(out)
    assert len(set(written)) == 4 and not set(map(os.path.basename, written)) & set(inputs)
    assert "interrupted" not in capsys.readouterr().err and _leftovers(scans) == []


def test_a_rerun_replaces_its_own_overlays_and_nothing_else(ckpt, chest, tmp_path):
    scans, cams = tmp_path / "scans", tmp_path / "cams"
    _xrays(scans, chest, "a.png", "b.png")
    mine = _xrays(cams, np.ascontiguousarray(chest[::-1]), "a.png")  # a picture of the user's own, named like a's overlay
    (cams / "b.png").mkdir()  # and a folder named like b's
    out = tmp_path / "p.csv"
    for _ in range(2):
        assert main(["predict", str(ckpt), str(scans), "--gradcam", str(cams), "--out", str(out), *CPU]) == 0
        assert _overlays(out) == [str(cams / "a-2.png"), str(cams / "b-2.png")]
        assert sorted(p.name for p in cams.iterdir()) == ["a-2.png", "a.png", "b-2.png", "b.png"]
    assert (cams / "a.png").read_bytes() == mine["a.png"] and (cams / "b.png").is_dir()
    assert is_overlay(cams / "a-2.png") and cv2.imread(str(cams / "a-2.png")).shape == (SIZE, SIZE, 3)


def test_overlays_of_dicoms_named_by_uid_keep_the_whole_uid(ckpt, chest, tmp_path):
    scans, cams = tmp_path / "scans", tmp_path / "cams"
    scans.mkdir()
    uids = ["1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.102"]
    for uid in uids:
        write_dicom(scans / uid, chest)
    out = tmp_path / "p.csv"
    assert main(["predict", str(ckpt), str(scans), "--gradcam", str(cams), "--out", str(out), *CPU]) == 0
    assert _overlays(out) == [str(cams / f"{uid}.png") for uid in uids]


def test_an_overlay_name_keeps_the_file_name_less_an_image_suffix():
    assert overlay_stem("a.png") == "a" and overlay_stem("B.DCM") == "B" and overlay_stem("c.dicom") == "c"
    assert overlay_stem("1.2.840.10008.5.101") == "1.2.840.10008.5.101"  # a UID's last component is no suffix
    assert overlay_stem("report.v2") == "report.v2" and overlay_stem("scan") == "scan"
    assert overlay_stem(".png") == ".png"  # a hidden file named .png has no suffix to strip


class TwoBackbones:
    """What :class:`Overlays` asks of a Grad-CAM, for a network with two backbones, without a network."""

    layers: ClassVar[dict[str, None]] = {"xception": None, "resnet50v2": None}

    def with_method(self, method: str) -> TwoBackbones:
        return self

    def __call__(self, images: np.ndarray, targets: list) -> list[CamResult]:
        ramp = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
        maps = {"xception": ramp, "resnet50v2": ramp[::-1], "combined": ramp.T}
        return [CamResult(0, np.float32([1, 0, 0]), maps) for _ in images]


def test_a_name_too_long_for_the_file_system_is_shortened_with_a_hash(tmp_path):
    cams = tmp_path / "cams"
    overlays = Overlays(TwoBackbones(), cams)  # type: ignore[arg-type]
    # 245 ASCII characters, and 125 two-byte ones (250 bytes): inputs fit in 255 bytes, their maps' names would not.
    paths = [tmp_path / ("a" * 241 + ".png"), tmp_path / ("a" * 241 + ".dcm"), tmp_path / ("é" * 125 + ".png")]
    images = np.zeros((3, SIZE, SIZE), np.uint8)
    written = overlays.write(images, paths, np.zeros(3, int))
    names = [f.name for w in written for f in w.files if f is not None]
    assert all(w.error == "" for w in written) and len(names) == len(set(names)) == 9
    assert all(len(os.fsencode(n)) <= 255 and n.endswith(".png") and "~" in n for n in names)
    assert names[0].startswith("a" * 200) and names[-1].startswith("é" * 100)  # cut by characters, never inside one
    assert sorted(p.name for p in cams.iterdir()) == sorted(names)


def test_an_overlay_that_cannot_be_written_is_its_images_note(tmp_path, monkeypatch):
    from covid_cxr.inference import pipeline

    def disk_full_for_b(path: Path, image: np.ndarray, cam: np.ndarray) -> Path:
        if path.name.startswith("b."):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, image, cam)

    real = pipeline.save_overlay
    monkeypatch.setattr(pipeline, "save_overlay", disk_full_for_b)
    overlays = Overlays(TwoBackbones(), tmp_path / "cams")  # type: ignore[arg-type]
    a, b = overlays.write(np.zeros((2, SIZE, SIZE), np.uint8), [tmp_path / "a.png", tmp_path / "b.png"], np.zeros(2))
    assert a.error == "" and all(f is not None and f.is_file() for f in a.files)
    assert b.files == (None, None, None) and "No space left on device" in b.error and "b.png" in b.error


def test_a_run_whose_overlays_fail_keeps_every_prediction(ckpt, chest, tmp_path, monkeypatch, capsys):
    from covid_cxr.inference import pipeline

    scans, cams = tmp_path / "scans", tmp_path / "cams"
    _xrays(scans, chest, "a.png", "b.png", "c.png")
    real = pipeline.save_overlay

    def denied_for_b(path: Path, image: np.ndarray, cam: np.ndarray) -> Path:
        if path.name == "b.png":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, image, cam)

    monkeypatch.setattr(pipeline, "save_overlay", denied_for_b)
    out = tmp_path / "p.csv"
    status = main(["predict", str(ckpt), str(scans), "--gradcam", str(cams), "--out", str(out), *CPU])
    err = capsys.readouterr().err
    assert status == 1  # not everything asked for was done
    rows = pd.read_csv(out, keep_default_na=False)
    assert list(rows["path"]) == [str(scans / n) for n in ("a.png", "b.png", "c.png")]
    assert all(c in CLASSES for c in rows["class"])  # b's prediction stands
    assert list(rows["overlay"]) == [str(cams / "a.png"), "", str(cams / "c.png")]
    assert rows["error"][0] == rows["error"][2] == "" and "Permission denied" in rows["error"][1]
    assert f"{scans / 'b.png'}: overlay not written" in err and "1 without their overlay" in err
    assert "interrupted" not in err and "Traceback" not in err


def test_a_long_input_name_gets_a_shortened_overlay(ckpt, chest, tmp_path):
    long = "x" * 253  # no suffix: its overlay, long + ".png", is over 255 bytes
    _xrays(tmp_path / "scans", chest, long)
    out = tmp_path / "p.csv"
    assert main(["predict", str(ckpt), str(tmp_path / "scans" / long), "--gradcam", str(tmp_path / "cams"),
                 "--out", str(out), *CPU]) == 0
    (overlay,) = _overlays(out)
    assert Path(overlay).is_file() and len(Path(overlay).name) <= 255 and Path(overlay).name.startswith("x" * 200)


# --- --out and --gradcam are checked before the model is loaded -----------------------------------------------------

@pytest.fixture()
def places(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "full.csv").symlink_to("/dev/full")
    return {"afile": tmp_path / "afile", "dir": tmp_path / "dir.csv", "full": tmp_path / "full.csv"}


@pytest.mark.parametrize(("option", "where", "words"), [
    ("--gradcam", "afile", "afile: a file, not a folder"),
    ("--gradcam", "afile/cams", "afile is a file, not a folder"),
    ("--gradcam", "/sys/covid-cxr-cams", "cannot write in /sys"),
    ("--out", "dir", "dir.csv: a folder; name a file in it"),
    ("--out", "afile/p.csv", "afile is a file, not a folder"),
    ("--out", "/sys/covid-cxr/p.csv", "cannot write in /sys"),
    ("--out", "full", "full.csv: a device, not a file"),
])
def test_outputs_that_cannot_be_written_are_refused_before_the_model_loads(ckpt, chest, tmp_path, places, monkeypatch,
                                                                            capsys, option, where, words):
    if where.startswith("/sys") and not Path("/sys").is_dir():
        pytest.skip("no /sys here to stand for a folder nobody may write into")
    monkeypatch.setattr("covid_cxr.inference.backends.load_model", _never)
    _xrays(tmp_path / "scans", chest, "a.png")
    target = str(places[where]) if where in places else where if where.startswith("/") else str(tmp_path / where)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["predict", str(ckpt), str(tmp_path / "scans"), option, target, *CPU]) == 2
    err = capsys.readouterr().err
    assert f"covid-cxr predict: error: {option}" in err and words in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing made, nothing written


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model was loaded before the outputs were checked")


# --- a run folder is its best.pt --------------------------------------------------------------------------------------

def test_predict_and_serve_take_a_run_folder_as_its_best_checkpoint(ckpt, chest, tmp_path, capsys, monkeypatch):
    run = tmp_path / "runs" / "xception-fold1"
    run.mkdir(parents=True)
    (run / "run.json").write_text('{"network": "xception", "fold": 1, "status": "finished"}\n')
    _xrays(tmp_path, chest, "a.png")
    out = tmp_path / "p.csv"
    (run / "last.pt").write_bytes(b"")
    assert main(["predict", str(run), str(tmp_path / "a.png"), "--out", str(out), *CPU]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'best.pt'}: no such file" in err and f"give {run / 'last.pt'} by path" in err

    shutil.copy(ckpt, run / "best.pt")
    assert main(["predict", str(run), str(tmp_path / "a.png"), "--out", str(out), *CPU]) == 0
    assert set(pd.read_csv(out)["model_sha256"]) == {hashlib.sha256(ckpt.read_bytes()).hexdigest()}

    (tmp_path / "models").mkdir()
    for verb in ("predict", "serve"):
        monkeypatch.setattr("covid_cxr.inference.backends.load_model", _never)
        args = [str(tmp_path / "a.png")] if verb == "predict" else []
        assert main([verb, str(tmp_path / "models"), *args, "--device", "cpu"]) == 2
        assert "models: a folder, not a run folder (no run.json)" in capsys.readouterr().err


# --- how a run that did not finish ends -------------------------------------------------------------------------------

class Fixed:
    """A model with fixed answers; ``fail_on`` makes that call (1-based) raise instead."""

    backend = "fixed"
    classes = CLASSES
    preprocessing = Preprocessing(SIZE, "unit")

    def __init__(self, fail_on: int = 0) -> None:
        self.calls, self.fail_on = 0, fail_on

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("the accelerator went away")
        return np.tile(np.float32([0.2, 0.3, 0.5]), (len(images), 1))


def _files(folder: Path, chest: np.ndarray, n: int) -> Inputs:
    names = [f"img{k}.png" for k in range(n)]
    _xrays(folder, chest, *names)
    return Inputs(files=[folder / name for name in names])


def test_a_run_stopped_by_an_error_says_so_not_interrupted(chest, tmp_path, capsys):
    out = tmp_path / "p.csv"
    with pytest.raises(RuntimeError, match="accelerator"):
        predict_inputs(Classifier(Fixed(fail_on=2)), _files(tmp_path, chest, 3), out, batch_size=2, workers=1)
    err = capsys.readouterr().err
    assert "stopped by an error: predicted 2 images" in err and "interrupted" not in err
    assert len(pd.read_csv(out)) == 2  # the first batch is kept


def test_a_closed_stdout_pipe_ends_the_run_quietly(chest, tmp_path, monkeypatch, capsys):
    class ClosedPipe:
        """stdout whose reader (``| head -1``) has gone after the header."""

        lines = 0

        def write(self, text: str) -> int:
            self.lines += text.count("\n")
            if self.lines > 1:
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    with pytest.raises(BrokenPipeError):  # raised unchanged, for the command line to end quietly
        predict_inputs(Classifier(Fixed()), _files(tmp_path, chest, 3), None, batch_size=2, workers=1)
    assert capsys.readouterr().err == ""  # no summary, and above all no "interrupted"


def test_a_full_disk_ends_the_run_naming_the_file(chest, tmp_path, monkeypatch, capsys):
    from covid_cxr.inference import pipeline

    class FillsUp:
        """A file whose disk fills after the header and the first batch: what comes after never reaches it."""

        def __init__(self, fh) -> None:
            self.fh, self.flushes = fh, 0

        def write(self, text: str) -> int:
            return self.fh.write(text) if self.flushes == 0 else len(text)

        def flush(self) -> None:
            self.flushes += 1
            if self.flushes > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.fh.flush()

        def close(self) -> None:
            self.fh.close()

    class FullDisk(PredictionSink):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._fh = FillsUp(self._fh)
            self._csv = csv.writer(self._fh)

    monkeypatch.setattr(pipeline, "PredictionSink", FullDisk)
    out = tmp_path / "p.csv"
    with pytest.raises(OSError, match=r"cannot write .*p\.csv \(No space left on device\)") as raised:
        predict_inputs(Classifier(Fixed()), _files(tmp_path / "scans", chest, 5), out, batch_size=2, workers=1)
    assert raised.value.errno == errno.ENOSPC  # an OSError still: the command line ends with its message
    err = capsys.readouterr().err
    assert "stopped by an error: predicted" in err and "wrote" not in err and "interrupted" not in err
    assert len(pd.read_csv(out)) == 2


# --- serve: its options ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("option", "value", "words"), [
    ("--port", "80000", "must be a port in 0-65535"),
    ("--port", "-1", "must be a port in 0-65535"),
    ("--port", "http", "must be a whole number"),
    ("--max-upload-mb", "inf", "must be a finite number of MiB"),
    ("--max-upload-mb", "nan", "must be a finite number of MiB"),
    ("--max-upload-mb", "0", "at least one byte"),
    ("--max-upload-mb", "-5", "at least one byte"),
    ("--max-upload-mb", "1e-9", "at least one byte"),
    ("--max-upload-mb", "1e308", "must be a finite number of MiB"),
    ("--max-upload-mb", "lots", "must be a number of MiB"),
    ("--max-pixels", "0", "must be a whole number >= 1"),
    ("--max-batch", "0", "must be a whole number >= 1"),
])
def test_serve_refuses_a_bad_option_by_its_flag(capsys, option, value, words):
    with pytest.raises(SystemExit) as ended:
        main(["serve", "model.onnx", f"{option}={value}"])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be" in err and words in err and "Traceback" not in err


def test_serve_takes_the_edges_of_each_range():
    args = build_parser("serve").parse_args(["serve", "m.onnx", "--port", "65535", "--max-upload-mb", "0.5",
                                             "--max-pixels", "1", "--max-batch", "1"])
    assert (args.port, args.max_upload_mb, args.max_pixels, args.max_batch) == (65535, 0.5, 1, 1)
    assert build_parser("serve").parse_args(["serve", "m.onnx", "--port", "0"]).port == 0


def test_serve_refuses_a_port_in_use_and_a_foreign_host_before_the_model_loads(tmp_path, capsys):
    """A port in use cost the model's export and warm-up, then gave uvicorn's ERROR line and exit status 3; the
    socket is now bound first, and each refusal is one line naming the flag and the fix."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        missing = tmp_path / "no-such-model.onnx"  # never opened: the refusal comes first
        assert main(["serve", str(missing), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"--port {port}: 127.0.0.1:{port} is in use" in err and "choose another --port" in err
        assert "no-such-model" not in err and "Traceback" not in err
    assert main(["serve", str(missing), "--host", "203.0.113.7", "--port", "0"]) == 2  # TEST-NET-3: no one's
    err = capsys.readouterr().err
    assert "--host 203.0.113.7: not an address of this machine" in err and "Traceback" not in err
    assert main(["serve", str(missing), "--port", "0"]) == 2  # a free port: then the model is the fault
    assert "no-such-model.onnx" in capsys.readouterr().err


# --- serve: one image per request, documentation offline, a client that hangs up -------------------------------------

@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt, InferenceSettings(device="cpu", precision="fp32"))


@pytest.fixture(scope="module")
def base_url(model):
    with serve(create_app(model.predictor, network=model.network, sha256=model.sha256)) as url:
        yield url


def test_two_images_in_one_request_are_refused_and_an_empty_one_is_named(base_url, chest):
    data = png_bytes(chest)
    for files in ([("file", ("a.png", data)), ("file", ("b.png", b"not an image"))],
                  [("file", ("b.png", b"not an image")), ("file", ("a.png", data))]):
        r = httpx.post(f"{base_url}/predict", files=files)
        assert r.status_code == 422 and "one image per request" in r.json()["detail"], r.text
    empty = httpx.post(f"{base_url}/predict", files={"file": ("zero.png", b"")})
    assert empty.status_code == 422 and "'file' is empty (0 bytes)" in empty.json()["detail"]
    assert httpx.post(f"{base_url}/predict", files={"file": ("a.png", data)}).status_code == 200
    spec = httpx.get(f"{base_url}/openapi.json").json()["paths"]["/predict"]["post"]
    assert "One chest X-ray per request" in spec["description"] and "second 'file'" in spec["responses"]["422"][
        "description"]


def test_the_api_description_needs_no_network(base_url):
    docs = httpx.get(f"{base_url}/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "http://" not in docs.text and "https://" not in docs.text and "cdn" not in docs.text.lower()
    assert 'href="/openapi.json"' in docs.text and "POST /predict" in docs.text and "<code>file</code>" in docs.text
    assert httpx.get(f"{base_url}/redoc").status_code == 404  # ReDoc loads from a CDN: off
    assert httpx.get(f"{base_url}/openapi.json").json()["paths"]["/predict"]


def test_a_client_that_hangs_up_mid_upload_is_no_error(model, chest, caplog):
    errors = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not reach the root logger
    caplog.set_level(logging.INFO, logger="covid_cxr.deploy.server")
    data = png_bytes(chest)
    body = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--XyZ--\r\n")
    try:
        with serve(create_app(model.predictor, network=model.network)) as url:
            errors.addHandler(caplog.handler)  # here: starting uvicorn set its loggers' handlers afresh
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port)) as client:  # a browser tab closed mid-upload
                client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                               b"boundary=XyZ\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                               + body[: len(body) // 2])
                time.sleep(0.3)
            deadline = time.monotonic() + 20
            while "hung up" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            assert httpx.get(f"{url}/health").status_code == 200  # and the server serves on
    finally:
        errors.removeHandler(caplog.handler)
    assert "a client hung up before its upload was complete" in caplog.text
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "Traceback" not in caplog.text and "ClientDisconnect" not in caplog.text


# --- a model whose weights are not finite ---------------------------------------------------------------------------

def test_nan_weights_are_refused_not_decided_as_covid(tmp_path, capsys):
    """A model with NaN weights gave NaN probabilities, which argmax decides as index 0: predict called every image
    COVID-19 and said "0 failed". Such a checkpoint is refused at load; such outputs (an ONNX file) at the batch."""
    from covid_cxr.errors import CheckpointError
    from covid_cxr.runs.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint(tmp_path / "sound.pt", size=SIZE))
    name = next(k for k, v in ckpt.model_state.items() if v.is_floating_point() and v.ndim == 4)
    ckpt.model_state[name] = ckpt.model_state[name].clone()
    ckpt.model_state[name].view(-1)[0] = float("nan")
    save_checkpoint(ckpt, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=f"NaN or inf values, in {name}"):
        load_checkpoint(tmp_path / "nan.pt").build_model()
    chest = tmp_path / "x.png"
    cv2.imwrite(str(chest), render_chest(np.random.default_rng(0), SIZE, "normal").image)
    assert main(["predict", str(tmp_path / "nan.pt"), str(chest), "--out", str(tmp_path / "p.csv"),
                 "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert "NaN or inf values" in err and "Traceback" not in err and not (tmp_path / "p.csv").exists()

    class NanModel(Fixed):
        def predict_proba(self, images: np.ndarray) -> np.ndarray:
            probs = np.full((len(images), len(CLASSES)), 1 / 3, np.float32)
            probs[-1] = np.nan
            return probs

    with pytest.raises(CheckpointError, match="NaN or infinite probabilities for 1 of 2 images"):
        Classifier(NanModel())(np.zeros((2, SIZE, SIZE), np.uint8))
    # evaluate, the audits and calibrate read probabilities through predict_in_batches: the same refusal
    with pytest.raises(CheckpointError, match="NaN or infinite probabilities for 1 of 2 images"):
        predict_in_batches(NanModel(), np.zeros((2, SIZE, SIZE), np.uint8), batch_size=2)
