"""``covid-cxr predict``: files, folders and globs of PNG, JPEG and DICOM; bad files reported, not fatal."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from covid_cxr.checkpoint import load_checkpoint
from covid_cxr.cli import main
from covid_cxr.data.images import load_image
from covid_cxr.deploy.files import expand_inputs
from covid_cxr.inference import TorchPredictor
from covid_cxr.labels import CLASSES
from covid_cxr.synth import render_chest
from covid_cxr.synth.dicom import write_dicom
from tests.test_server import tiny_checkpoint

SIZE = 71


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("predict") / "tiny.pt", "xception", size=SIZE)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """PNG, JPEG (colour), four kinds of DICOM in a subfolder, one corrupt PNG and a CSV that is not an image."""
    root = tmp_path_factory.mktemp("xrays")
    rng = np.random.default_rng(0)
    imgs = [render_chest(rng, 128, label).image for label in ("covid", "pneumonia", "normal", "normal", "covid", "normal")]
    cv2.imwrite(str(root / "a.png"), imgs[0])
    cv2.imwrite(str(root / "b.jpg"), cv2.cvtColor(imgs[1], cv2.COLOR_GRAY2BGR))
    (root / "dicoms").mkdir()
    for img, storage in zip(imgs[2:], ("jpeg", "16bit", "mono1", "nopreamble")):
        write_dicom(root / "dicoms" / f"{storage}.dcm", img, storage=storage)
    (root / "broken.png").write_bytes(cv2.imencode(".png", imgs[0])[1].tobytes()[:200])  # truncated
    (root / "metadata.csv").write_text("not,an,image\n")
    return root


GOOD = ["a.png", "b.jpg", "dicoms/16bit.dcm", "dicoms/jpeg.dcm", "dicoms/mono1.dcm", "dicoms/nopreamble.dcm"]


def test_expand_inputs(folder, tmp_path):
    got = expand_inputs([folder, folder / "a.png", str(folder / "*.jpg"), folder / "metadata.csv",
                         tmp_path / "absent.png", str(tmp_path / "*.dcm")])
    rel = [p.relative_to(folder).as_posix() for p in got.files]
    # Folder files come sorted, each once; the CSV only because it was named; nothing else is lost.
    assert rel == ["a.png", "b.jpg", "broken.png", "dicoms/16bit.dcm", "dicoms/jpeg.dcm", "dicoms/mono1.dcm",
                   "dicoms/nopreamble.dcm", "metadata.csv"]
    assert [m[0] for m in got.missing] == [str(tmp_path / "absent.png"), str(tmp_path / "*.dcm")]


def test_predict_folder_reports_the_bad_file_and_fails(ckpt, folder, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    cams = tmp_path / "cams"
    status = main(["predict", str(ckpt), str(folder), "--out", str(out), "--batch-size", "4",
                   "--device", "cpu", "--precision", "fp32", "--backend", "torch", "--gradcam", str(cams)])
    err = capsys.readouterr().err
    assert status == 1
    table = pd.read_csv(out)
    assert list(table.columns) == ["path", "class", "p_covid", "p_pneumonia", "p_normal"]
    assert sorted(table["path"].map(lambda p: p[len(str(folder)) + 1 :])) == sorted(GOOD)
    assert f"failed: {folder / 'broken.png'}:" in err and "1 failed" in err
    assert "metadata.csv" not in err

    # The numbers are the predictor's on the decoded images: predict adds no preprocessing of its own.
    predictor = TorchPredictor(load_checkpoint(ckpt), device="cpu", precision="fp32")
    expected = predictor.predict_proba(np.stack([load_image(p, SIZE) for p in table["path"]]))
    np.testing.assert_allclose(table[["p_covid", "p_pneumonia", "p_normal"]].to_numpy(), expected, atol=1e-5)
    assert list(table["class"]) == [CLASSES[i] for i in expected.argmax(1)]

    overlays = sorted(p.name for p in cams.iterdir())
    assert overlays == sorted(["a.png", "b.png", "16bit.png", "jpeg.png", "mono1.png", "nopreamble.png"])
    img = cv2.imread(str(cams / "a.png"))
    assert img.shape == (SIZE, SIZE, 3)


def test_predict_json_and_exit_status(ckpt, folder, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["predict", str(ckpt), str(folder / "a.png"), str(folder / "dicoms" / "*.dcm"),
                 "--out", str(out), "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["predictions"]) == 5 and doc["failed"] == []
    assert sum(doc["summary"].values()) == 5
    for row in doc["predictions"]:
        assert abs(sum(row[f"p_{c}"] for c in CLASSES) - 1) < 1e-4
    assert main(["predict", str(ckpt), str(folder / "nothing-*.png"), "--device", "cpu"]) == 1
    assert "the pattern matches no file" in capsys.readouterr().err
    assert main(["predict", str(ckpt), str(folder / "a.png"), "--gradcam", str(tmp_path / "g"),
                 "--gradcam-class", "flu"]) == 2
    assert "unknown class label 'flu'" in capsys.readouterr().err


def test_real_rsna_dicom(ckpt, fixtures_dir, capsys):
    dicoms = sorted((fixtures_dir / "rsna").glob("*.dcm"))
    assert dicoms, "the fixtures hold one real RSNA DICOM"
    assert main(["predict", str(ckpt), str(dicoms[0]), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert dicoms[0].name in out and any(c in out for c in CLASSES)
