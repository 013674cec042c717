"""The page, driven in headless Chromium: `covid-cxr serve` in a subprocess, an upload, the result read back."""

from __future__ import annotations

import contextlib
import re
import signal
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

from covid_cxr.cli import main
from covid_cxr.runs.checkpoint import load_checkpoint, save_checkpoint
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


@contextlib.contextmanager
def serving(model: Path, log: Path) -> Iterator[str]:
    """The real command line: ``covid-cxr serve MODEL --port 0``, until its /health answers; its output in ``log``.

    Port 0 lets the server bind a free port itself and name it ("serving on URL"): a port picked here and bound
    later by the server could be taken in between (the suite runs in several processes at once).
    """
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "covid_cxr", "serve", str(model), "--port", "0",
                                 "--device", "cpu"], stdout=fh, stderr=subprocess.STDOUT)
    url = None
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"covid-cxr serve exited with {proc.returncode}:\n{log.read_text()}")
            bound = re.search(r"serving on (http://127\.0\.0\.1:\d+)/", log.read_text(errors="replace"))
            url = bound.group(1) if bound else None
            try:
                if url and httpx.get(f"{url}/health", timeout=2).status_code == 200:
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
def server(tmp_path_factory) -> Iterator[str]:
    """A checkpoint in a run folder, served by the command line."""
    run_dir = tmp_path_factory.mktemp("browser") / "run"
    _fake_run(run_dir)
    ckpt = tiny_checkpoint(run_dir / "best.pt", "xception", size=71)
    with serving(ckpt, tmp_path_factory.mktemp("browser-log") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def int8_rule_server(tmp_path_factory) -> Iterator[str]:
    """The int8 export of a checkpoint that decides by a threshold rule (COVID-19 when p_covid >= 0.3), served."""
    pytest.importorskip("onnxruntime.quantization")
    root = tmp_path_factory.mktemp("browser-int8")
    checkpoint = load_checkpoint(tiny_checkpoint(root / "tiny.pt", "xception", size=71))
    checkpoint.operating_point = {"rule": "specificity", "target": 0.9, "positive_class": "covid", "threshold": 0.3,
                                  "validation": {}}
    save_checkpoint(checkpoint, root / "rule.pt")
    rng = np.random.default_rng(2)
    (root / "calibration").mkdir()
    for k, label in enumerate(["covid", "pneumonia", "normal"] * 3):
        cv2.imwrite(str(root / "calibration" / f"{label}{k}.png"), render_chest(rng, 96, label).image)
    assert main(["export", str(root / "rule.pt"), "--out", str(root / "m.onnx"), "--int8", "--calibration",
                 str(root / "calibration")]) == 0
    with serving(root / "m.int8.onnx", root / "serve.log") as url:
        yield url


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


def test_the_page_shows_the_rule_that_decided_and_an_int8_model(int8_rule_server, browser, tmp_path, artifacts_dir):
    """With a threshold rule the class need not be the longest bar: the page says what decided it, marks the
    threshold on the COVID-19 bar, and says that an int8 model answers."""
    server = int8_rule_server
    path = tmp_path / "chest.png"
    cv2.imwrite(str(path), render_chest(np.random.default_rng(6), 256, "covid").image)
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('served-model').textContent.length > 0", timeout=30_000)
    served = page.locator("#served-model").inner_text()
    assert "int8" in served and "agreement with fp32 on 9 images: " in served and "decided by specificity=0.9" in served
    assert "/9, decided by" in served and "(95% CI " in served  # the count and its interval, not a bare 88.889%
    assert page.locator("#served-model").get_attribute("data-precision") == "int8"

    page.set_input_files("#file-input", str(path))
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    rule = page.locator("#decision-rule")
    assert rule.is_visible()
    assert rule.inner_text() == ("decided by specificity=0.9: COVID-19 when p(COVID-19) >= 0.3, otherwise the more "
                                 "probable of the other classes")
    mark = page.locator(".bar-track .bar-threshold")
    assert mark.count() == 1 and float(mark.get_attribute("data-threshold")) == 0.3
    assert page.locator(".bar-fill.covid + .bar-threshold").count() == 1  # on the COVID-19 bar
    track, line = page.locator(".bar-track").first.bounding_box(), mark.bounding_box()
    assert abs((line["x"] + 1 - track["x"]) / track["width"] - 0.3) < 0.02  # where 30% lies on the bar
    api = httpx.post(f"{server}/predict", files={"file": ("chest.png", path.read_bytes())}, timeout=120).json()
    assert page.locator("#predicted-class").get_attribute("data-class") == api["class"]
    assert "int8" in page.locator("#model-info").inner_text()
    page.screenshot(path=str(artifacts_dir / "web-page-rule-int8.png"), full_page=True)
    page.close()
