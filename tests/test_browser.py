"""The page, driven in headless Chromium: `covid-cxr serve` in a subprocess, an upload, the result read back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from covid_cxr.synth import render_chest
from tests.test_server import tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent: install the distribution's chromium "
                       "(apt-get install chromium; .ci/run does) to run the browser test"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """The real command line: ``covid-cxr serve CHECKPOINT --port P``, until its /health answers."""
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("browser") / "tiny.pt", "xception", size=71)
    port = free_port()
    log = tmp_path_factory.mktemp("browser-log") / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "covid_cxr", "serve", str(ckpt), "--port", str(port),
                                 "--device", "cpu"], stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"covid-cxr serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"covid-cxr serve did not answer within 180 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def test_upload_shows_bars_heatmap_and_disclaimer(server, browser, tmp_path, artifacts_dir):
    image = render_chest(np.random.default_rng(5), 256, "pneumonia", lesion_side="left").image
    path = tmp_path / "chest.png"
    cv2.imwrite(str(path), image)
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    page.goto(server + "/")
    disclaimer = page.locator("#disclaimer")
    assert disclaimer.is_visible() and "not a diagnostic device" in disclaimer.inner_text()

    page.set_input_files("#file-input", str(path))
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    page.wait_for_function("document.getElementById('heatmap').complete "
                           "&& document.getElementById('heatmap').naturalWidth > 0", timeout=30_000)

    shown = {el.get_attribute("data-class"): float(el.inner_text().rstrip("%"))
             for el in page.locator(".bar-value").all()}
    api = httpx.post(f"{server}/predict", files={"file": ("chest.png", path.read_bytes())}, timeout=120).json()
    assert set(shown) == set(api["probabilities"])
    for cls, p in api["probabilities"].items():
        assert abs(shown[cls] - 100 * p) <= 0.051  # the page rounds to 0.1 %
    assert page.locator("#predicted-class").get_attribute("data-class") == api["class"]
    assert page.evaluate("document.getElementById('heatmap').naturalWidth") == api["model"]["image_size"]
    assert page.locator("#preview").is_visible()
    assert api["model"]["version"] in page.locator("#model-info").inner_text()
    page.screenshot(path=str(artifacts_dir / "web-page-result.png"), full_page=True)

    # A file that is not an image: the page says what the server refused, and shows no stale result.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an x-ray")
    page.set_input_files("#file-input", str(bad))
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "422" in page.locator("#error").inner_text()
    assert page.locator("#result").is_hidden()
    page.close()
