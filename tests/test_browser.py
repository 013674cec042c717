"""The page, driven in headless Chromium: `covid-cxr serve` in a subprocess, an upload, the result read back."""

from __future__ import annotations

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
import pandas as pd
import pytest
import yaml

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


def _fake_run(run_dir: Path) -> None:
    """A run folder around the checkpoint: run.json and split files, so the served card has a training table."""
    (run_dir / "splits").mkdir(parents=True)
    (run_dir / "run.json").write_text('{"network": "xception", "fold": 1, "status": "finished", "protocol": "strict"}')
    rows = {"phase1": [("covid-chestxray", "covid", 7), ("rsna", "normal", 5)], "val": [("rsna", "pneumonia", 3)],
            "test": [("rsna", "normal", 4)]}
    for name, groups in rows.items():
        frame = pd.DataFrame([{"image_id": f"{name}-{label}-{k}", "label": label, "patient_id": f"{name}{k}",
                               "source": source} for source, label, n in groups for k in range(n)])
        frame.to_csv(run_dir / "splits" / f"{name}.csv", index=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """The real command line: ``covid-cxr serve CHECKPOINT --port P``, until its /health answers."""
    run_dir = tmp_path_factory.mktemp("browser") / "run"
    _fake_run(run_dir)
    ckpt = tiny_checkpoint(run_dir / "best.pt", "xception", size=71)
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


def test_page_shows_the_model_card(server, browser, artifacts_dir):
    markdown = httpx.get(f"{server}/model-card", timeout=30)
    assert markdown.status_code == 200 and markdown.headers["content-type"].startswith("text/markdown")
    header = yaml.safe_load(markdown.text.split("---\n")[1])
    assert {"license", "tags", "datasets", "metrics", "base_model"} <= set(header)
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    page.goto(server + "/")
    page.wait_for_selector("#model-card-section:not([hidden])", timeout=30_000)
    headings = [h.inner_text() for h in page.locator("#model-card h2").all()]
    for section in ("Intended use", "Training data", "Evaluation", "Operating point", "Limitations", "How to cite"):
        assert any(h.startswith(section) for h in headings), headings
    assert "Not a diagnostic device" in page.locator("#model-card").inner_text()
    # the training table, rendered as a table: covid-chestxray's 7 COVID-19 training images in its row
    row = page.locator("#model-card table tr", has_text="covid-chestxray").first.inner_text()
    assert row.split() == ["training", "covid-chestxray", "7", "0", "0", "7"]
    assert page.locator("#model-card table").first.is_visible()
    page.screenshot(path=str(artifacts_dir / "web-page-model-card.png"), full_page=True)
    page.close()
