"""The web service, run for real (uvicorn on a loopback port) and used over HTTP with httpx."""

from __future__ import annotations

import base64
import contextlib
import logging
import socket
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from covid_cxr.data.images import load_image
from covid_cxr.deploy.limits import ServerLimits
from covid_cxr.deploy.server import create_app
from covid_cxr.inference.backends import load_model
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.labels import CLASSES
from covid_cxr.models import build_model
from covid_cxr.preprocess import Preprocessing, to_model_input
from covid_cxr.runs.checkpoint import Checkpoint, save_checkpoint
from covid_cxr.synth.dicom import write_dicom

SIZE = 71
SECRET = "SECRET^PATIENT"


def tiny_checkpoint(path: Path, network: str = "xception", *, size: int = SIZE, classes=CLASSES,
                    scaling: str = "symmetric", seed: int = 0, resize: str = "area") -> Path:
    """A random network whose outputs are not all 1/3: BatchNorm statistics taken from one batch, a wider head."""
    torch.manual_seed(seed)
    model = build_model(network, image_size=size)
    pre = Preprocessing(size, scaling, resize=resize)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running stats become the batch's own
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(to_model_input(torch.randint(0, 256, (4, size, size), dtype=torch.uint8), pre))
    torch.nn.init.normal_(model.classifier.weight, std=0.02)
    save_checkpoint(Checkpoint(network, tuple(classes), pre, model.state_dict()), path)
    return path


def png_bytes(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge image, with almost no data: a decompression bomb's signature."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on a free loopback port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("server") / "tiny.pt")
    return load_model(path, InferenceSettings(device="cpu", precision="fp32"))


@pytest.fixture(scope="module")
def base_url(model) -> Iterator[str]:
    app = create_app(model.predictor, network=model.network, sha256=model.sha256, gradcam=model.gradcam())
    with serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def xray() -> np.ndarray:
    from covid_cxr.synth import render_chest

    return render_chest(np.random.default_rng(3), 160, "pneumonia").image


def test_health_names_the_model(base_url, model):
    r = httpx.get(f"{base_url}/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["heatmaps"] is True
    assert body["model"]["network"] == "xception"
    assert body["model"]["sha256"] == model.sha256 and len(model.sha256) == 64
    assert body["model"]["image_size"] == SIZE
    assert "not a diagnostic device" in body["disclaimer"]


def test_predict_png_matches_the_predictor(base_url, model, xray):
    data = png_bytes(xray)
    r = httpx.post(f"{base_url}/predict", files={"file": ("x.png", data, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = model.predictor.predict_proba(load_image(data, SIZE)[None])[0]
    got = np.array([body["probabilities"][c] for c in model.predictor.classes])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert body["class"] == CLASSES[int(np.argmax(expected))]
    assert body["model"]["version"].startswith("xception@")
    assert body["image"] == {"width": 160, "height": 160}
    assert "heatmap" not in body


def test_predict_dicom_with_heatmap(base_url, tmp_path, xray):
    path = tmp_path / "x.dcm"
    write_dicom(path, xray, storage="16bit", patient_id=SECRET)
    r = httpx.post(f"{base_url}/predict?heatmap=true",
                   files={"file": ("x.dcm", path.read_bytes(), "application/dicom")})
    assert r.status_code == 200, r.text
    heat = r.json()["heatmap"]
    img = cv2.imdecode(np.frombuffer(base64.b64decode(heat["png_base64"]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (SIZE, SIZE, 3)
    assert heat["class"] == r.json()["class"]  # the map explains the predicted class
    # The form-field spelling works too, and the name of the file plays no part.
    r2 = httpx.post(f"{base_url}/predict", data={"heatmap": "true"},
                    files={"file": ("looks-like.png", path.read_bytes(), "image/png")})
    assert r2.status_code == 200 and "heatmap" in r2.json()


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"files": {"file": ("x.png", b"\x89PNG\r\n\x1a\n broken", "image/png")}}, 422),
        ({"files": {"file": ("x.png", b"just some text, named like an image", "image/png")}}, 422),
        ({"files": {"file": ("x.png", b"", "image/png")}}, 422),
        ({"files": {"other": ("x.png", b"abc", "image/png")}}, 422),
        ({"json": {"file": "abc"}}, 415),
        ({"files": {"file": ("bomb.png", png_bomb(60000, 60000), "image/png")}}, 413),
        ({"files": {"file": ("x.png", b"abc", "image/png")}, "data": {"heatmap": "maybe"}}, 422),
        ({"content": b"--xyz\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 422),
        ({"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400),
    ],
)
def test_bad_requests_get_4xx_json(base_url, kwargs, status):
    r = httpx.post(f"{base_url}/predict", **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert isinstance(r.json()["detail"], str) and "Traceback" not in r.text


def test_unknown_routes_and_methods_are_json(base_url):
    for r in (httpx.get(f"{base_url}/nope"), httpx.get(f"{base_url}/predict")):
        assert r.status_code in (404, 405) and r.headers["content-type"].startswith("application/json")


def test_limits_on_bytes_and_pixels(model, xray):
    limits = ServerLimits(max_upload_bytes=20_000, max_pixels=100 * 100)
    app = create_app(model.predictor, network=model.network, sha256=model.sha256, limits=limits)
    small = png_bytes(cv2.resize(xray, (64, 64)))
    noisy = png_bytes(np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8))
    assert len(small) < 20_000 < len(noisy)
    with serve(app) as url:
        assert httpx.post(f"{url}/predict", files={"file": ("a.png", small)}).status_code == 200
        too_many = httpx.post(f"{url}/predict", files={"file": ("a.png", png_bytes(cv2.resize(xray, (120, 120))))})
        assert too_many.status_code == 413 and "pixels" in too_many.json()["detail"]
        too_big = httpx.post(f"{url}/predict", files={"file": ("a.png", noisy)})
        assert too_big.status_code == 413 and "MiB" in too_big.json()["detail"]
        # Without Content-Length (chunked), the limit holds on the bytes actually received.
        body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n" + noisy + b"\r\n--b--\r\n"
        chunked = httpx.post(f"{url}/predict", content=iter([body[i:i + 8192] for i in range(0, len(body), 8192)]),
                             headers={"content-type": "multipart/form-data; boundary=b"})
        assert chunked.status_code == 413
        no_heatmaps = httpx.post(f"{url}/predict?heatmap=true", files={"file": ("a.png", small)})
        assert no_heatmaps.status_code == 422 and "heatmap" in no_heatmaps.json()["detail"]


def test_concurrent_uploads_are_batched_without_mixing_answers(base_url, model):
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (90 + i, 80 + i), dtype=np.uint8) for i in range(12)]
    expected = model.predictor.predict_proba(np.stack([load_image(png_bytes(im), SIZE) for im in images]))

    def post(img: np.ndarray) -> dict:
        r = httpx.post(f"{base_url}/predict", files={"file": ("x.png", png_bytes(img))}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, images))
    for body, exp in zip(answers, expected):
        np.testing.assert_allclose([body["probabilities"][c] for c in model.predictor.classes], exp, atol=1e-5)


def test_uploads_never_touch_disk_nor_logs(base_url, monkeypatch, caplog, capfd, xray, tmp_path):
    created: list[str] = []
    for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp", "mkdtemp"):
        original = getattr(tempfile, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            created.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tempfile, name, spy)
    big = cv2.resize(xray, (1400, 1400)) ^ np.random.default_rng(0).integers(0, 8, (1400, 1400), dtype=np.uint8)
    path = tmp_path / "big.dcm"
    write_dicom(path, big, storage="16bit", patient_id=SECRET)
    data = path.read_bytes()
    assert len(data) > 2 * 2**20  # above Starlette's 1 MiB spooling threshold
    with caplog.at_level(logging.DEBUG):
        r = httpx.post(f"{base_url}/predict", files={"file": ("PATIENT-NAME.dcm", data)}, timeout=120)
    assert r.status_code == 200, r.text
    assert created == []
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "SECRET" not in logged and "PATIENT-NAME" not in logged


def test_openapi_and_page(base_url, model):
    spec = httpx.get(f"{base_url}/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"] and body["properties"]["file"]["format"] == "binary"
    assert "/health" in spec["paths"]
    assert httpx.get(f"{base_url}/docs").status_code == 200
    page = httpx.get(f"{base_url}/")
    assert page.status_code == 200 and "not a diagnostic device" in page.text
    assert httpx.get(f"{base_url}/static/app.js").status_code == 200
    # What the description declares is what the server does (schemathesis found these three apart).
    assert "400" in spec["paths"]["/predict"]["post"]["responses"]  # a malformed multipart body
    assert httpx.post(f"{base_url}/predict", content=b"--x\r\nbroken",
                      headers={"content-type": "multipart/form-data; boundary=y"}).status_code == 400
    declared = spec["paths"]["/model-card"]["get"]["responses"]
    assert list(declared["200"]["content"]) == ["text/markdown"] and "404" in declared
    assert httpx.get(f"{base_url}/model-card").status_code == 404  # this server has none
    with TestClient(create_app(model.predictor, network=model.network, model_card="# Model card\n")) as client:
        card = client.get("/model-card")
    assert card.text == "# Model card\n" and card.headers["content-type"] == "text/markdown; charset=utf-8"
    put = httpx.put(f"{base_url}/predict")
    assert put.status_code == 405 and put.headers["allow"] == "POST"


def test_a_failing_model_gives_a_bare_500(model, xray):
    class Broken:
        backend = "torch"
        classes = model.predictor.classes
        preprocessing = model.predictor.preprocessing

        def predict_proba(self, images):
            raise RuntimeError("secret internal state")

    with serve(create_app(Broken(), network="xception")) as url:
        r = httpx.post(f"{url}/predict", files={"file": ("x.png", png_bytes(xray))})
        assert r.status_code == 500
        assert r.json() == {"detail": "internal error while processing the request"}
        # The worker survives the failure and keeps answering.
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.post(f"{url}/predict", files={"file": ("x.png", png_bytes(xray))}).status_code == 500


def _multipart(filename: bytes, data: bytes) -> tuple[bytes, dict[str, str]]:
    """A body whose part header carries ``filename`` as raw bytes (a client sending a name that is not UTF-8)."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + filename + b"\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--b--\r\n")
    return body, {"content-type": "multipart/form-data; boundary=b"}


def test_unusual_uploads_get_an_answer_or_a_clear_4xx(base_url, model, xray, tmp_path):
    from tests.test_images import write_raw_dicom

    raw = tmp_path / "raw"
    write_raw_dicom(raw, xray)  # no preamble, no file meta, as older PACS exports write it
    r = httpx.post(f"{base_url}/predict", files={"file": ("raw", raw.read_bytes())})
    assert r.status_code == 200, r.text
    expected = model.predictor.predict_proba(load_image(png_bytes(xray), SIZE)[None])[0]
    np.testing.assert_allclose([r.json()["probabilities"][c] for c in model.predictor.classes], expected, atol=1e-5)
    body, headers = _multipart(b"r\xe9sum\xff.png", png_bytes(xray))  # the file name plays no part
    assert httpx.post(f"{base_url}/predict", content=body, headers=headers).status_code == 200

    cine = tmp_path / "cine.dcm"
    write_raw_dicom(cine, np.stack([xray, xray]), frames=2)
    not_images = {
        "cine.dcm": (cine.read_bytes(), "multi-frame DICOM (2 frames)"),
        "report.pdf": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", "not an image"),
        "scan.zip": (b"PK\x03\x04" + bytes(200), "not an image"),
        "truncated.png": (png_bytes(xray)[:400], "truncated"),
    }
    for name, (data, words) in not_images.items():
        r = httpx.post(f"{base_url}/predict", files={"file": (name, data)})
        assert r.status_code == 422 and words in r.json()["detail"], (name, r.text)
        assert name not in r.text  # the upload's name is never echoed


def test_the_server_resizes_as_the_checkpoint_records(model, xray):
    import copy

    big = np.clip(cv2.resize(xray, (900, 800)).astype(int) + np.tile([0, 70], (800, 450)), 0, 255).astype(np.uint8)
    predictor = copy.copy(model.predictor)
    predictor.preprocessing = Preprocessing(SIZE, model.predictor.preprocessing.scaling, resize="bilinear")
    with serve(create_app(predictor, network="xception")) as url:
        r = httpx.post(f"{url}/predict", files={"file": ("big.png", png_bytes(big))})
    assert r.status_code == 200 and r.json()["model"]["resize"] == "bilinear"
    bilinear = predictor.predict_proba(cv2.resize(big, (SIZE, SIZE))[None])[0]
    area = predictor.predict_proba(load_image(png_bytes(big), SIZE)[None])[0]
    np.testing.assert_allclose([r.json()["probabilities"][c] for c in predictor.classes], bilinear, atol=1e-5)
    assert np.abs(bilinear - area).max() > 1e-3
