"""``covid-cxr predict``: files, folders and globs of PNG, JPEG and DICOM; bad files reported, not fatal.

No result is ever lost: every good file gets its row whatever else is in the folder (names that
are not UTF-8, multi-frame DICOMs, truncated files, folders named like images), each refused
input is named with its reason, and the rows are on disk batch by batch, so an interrupt keeps them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from covid_cxr.atomic import file_sha256
from covid_cxr.cli import main
from covid_cxr.data.images import load_image
from covid_cxr.inference.inputs import expand_inputs
from covid_cxr.inference.torch_model import TorchPredictor
from covid_cxr.labels import CLASSES
from covid_cxr.runs.checkpoint import load_checkpoint, save_checkpoint
from covid_cxr.synth import render_chest
from covid_cxr.synth.dicom import write_dicom
from tests.test_images import write_raw_dicom
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
    everything = pd.read_csv(out, keep_default_na=False)
    assert list(everything.columns) == ["path", "class", "p_covid", "p_pneumonia", "p_normal", "rule", "threshold",
                                        "model_sha256", "overlay", "error"]
    assert list(everything["path"]) == sorted(everything["path"])  # input order, the refusal where it fell
    table = everything[everything["error"] == ""]
    assert sorted(table["path"].map(lambda p: p[len(str(folder)) + 1 :])) == sorted(GOOD)
    refused = everything[everything["error"] != ""]
    assert list(refused["path"]) == [str(folder / "broken.png")] and "truncated" in refused["error"].iloc[0]
    # Every row names the model file; predictions the rule that decided them (argmax: no threshold) and overlay.
    assert set(everything["model_sha256"]) == {file_sha256(ckpt)}
    assert set(table["rule"]) == {"argmax"} and set(table["threshold"]) == {""}
    assert refused[["rule", "threshold", "overlay"]].iloc[0].tolist() == ["", "", ""]
    assert [Path(o).name for o in table["overlay"]] == [Path(p).stem + ".png" for p in table["path"]]
    assert all(Path(o).parent == cams and Path(o).is_file() for o in table["overlay"])
    assert f"failed: {folder / 'broken.png'}:" in err and "1 failed" in err
    assert "metadata.csv" not in err

    # The numbers are the predictor's on the decoded images: predict adds no preprocessing of its own.
    predictor = TorchPredictor(load_checkpoint(ckpt), device="cpu", precision="fp32")
    expected = predictor.predict_proba(np.stack([load_image(p, SIZE) for p in table["path"]]))
    table = table.astype({f"p_{c}": float for c in CLASSES})
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


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Good images among every kind of trouble a real folder holds; returns (folder, good names, refused names)."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    imgs = [render_chest(rng, 96, label).image for label in ("covid", "pneumonia", "normal", "normal")]
    cv2.imwrite(str(root / "a.png"), imgs[0])
    (Path(os.fsdecode(bytes(root) + b"/caf\xe9.png"))).write_bytes(cv2.imencode(".png", imgs[1])[1].tobytes())
    write_raw_dicom(root / "raw.dcm", imgs[2])  # no preamble, no file meta: read
    write_dicom(root / "z.dcm", imgs[3])
    write_raw_dicom(root / "cine.dcm", np.stack([imgs[0], imgs[1], imgs[2]]), frames=3)
    (root / "truncated.png").write_bytes(cv2.imencode(".png", imgs[0])[1].tobytes()[:300])
    (root / "x.png").mkdir()
    (root / "notes.txt").write_text("not an image, and not named like one\n")
    refused = {"cine.dcm": "multi-frame DICOM (3 frames)", "truncated.png": "truncated", "x.png": "a folder"}
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.png")  # opening it would wait forever: reported without being read
        refused["pipe.png"] = "a named pipe"
    return root, ["a.png", "caf\\xe9.png", "raw.dcm", "z.dcm"], refused


def test_no_result_is_lost(ckpt, mixed, tmp_path, capsys):
    root, good, refused = mixed
    out = tmp_path / "preds.csv"
    status = main(["predict", str(ckpt), str(root), "--out", str(out), "--batch-size", "2", "--device", "cpu",
                   "--precision", "fp32"])
    err = capsys.readouterr().err
    assert status == 1
    table = pd.read_csv(out, keep_default_na=False)
    names = table["path"].map(lambda p: p[len(str(root)) + 1 :])
    ok = table["error"] == ""
    assert sorted(names[ok]) == sorted(good)  # every good image predicted, the undecodable name among them
    assert all(c in CLASSES for c in table.loc[ok, "class"])
    reasons = dict(zip(names[~ok], table.loc[~ok, "error"]))
    assert reasons.keys() == refused.keys()
    for name, words in refused.items():
        assert words in reasons[name], reasons[name]
        assert f"failed: {root / name}: " in err
    assert f"{len(refused)} failed" in err and f"predicted {len(good)} images" in err

    # The same to the terminal, in a process of its own: stdout's UTF-8 encoder meets the escaped name.
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-m", "covid_cxr", "predict", str(ckpt), str(root), "--device", "cpu"],
                          capture_output=True, env=env, timeout=600)
    assert done.returncode == 1, done.stderr.decode(errors="replace")
    assert b"caf\\xe9.png" in done.stdout and b"multi-frame DICOM (3 frames)" in done.stdout


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_an_interrupted_run_keeps_its_rows(ckpt, mixed, tmp_path, monkeypatch, capsys, suffix):
    root, good, _ = mixed
    files = [tmp_path / f"img{i}.png" for i in range(9)]  # batches of 2: [cine.dcm, img0], [img1, img2], ...
    for f in files:
        f.write_bytes((root / "a.png").read_bytes())
    out = tmp_path / f"preds{suffix}"
    real = TorchPredictor.predict_proba
    calls = []

    def interrupted(self, images):
        calls.append(len(images))
        if len(calls) == 3:  # Ctrl-C during the third batch: the first two are already on disk
            if suffix == ".csv":
                assert len(pd.read_csv(out)) == 4
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(TorchPredictor, "predict_proba", interrupted)
    paths = [str(root / "cine.dcm")] + [str(f) for f in files]
    # --backend torch: auto runs ONNX Runtime on CPUs without native bf16 (AVX2-only ones), which the patch misses
    status = main(["predict", str(ckpt), *paths, "--out", str(out), "--batch-size", "2", "--device", "cpu",
                   "--backend", "torch"])
    assert status == 130
    assert "interrupted: predicted 3 images" in capsys.readouterr().err
    if suffix == ".csv":
        table = pd.read_csv(out, keep_default_na=False)
        assert list(table["path"]) == paths[:4] and list(table["error"] != "") == [True, False, False, False]
    else:
        doc = json.loads(out.read_text())  # a valid document, marked incomplete
        assert doc["complete"] is False and len(doc["predictions"]) == 3
        assert [f["path"] for f in doc["failed"]] == [str(root / "cine.dcm")]


def test_glob_matches_that_are_not_files_are_reported(mixed):
    root, _, _ = mixed
    got = expand_inputs([str(root / "*.png"), root / "a.png"])
    assert [p.name for p in got.files] == ["a.png", os.fsdecode(b"caf\xe9.png"), "truncated.png"]
    reasons = dict((Path(p).name, r) for p, r in got.failures)
    assert "a folder" in reasons["x.png"] and ("pipe.png" not in reasons or "named pipe" in reasons["pipe.png"])
    (root.parent / "dangling.png").symlink_to(root.parent / "absent.png")
    assert expand_inputs([root.parent / "dangling.png"]).failures == [(str(root.parent / "dangling.png"),
                                                                        "a broken symbolic link")]


def test_predict_resizes_as_the_checkpoint_records(ckpt, tmp_path):
    """An authors'-style checkpoint (bilinear) sees what cv2.resize makes of a large radiograph, not our area filter."""
    big = cv2.resize(render_chest(np.random.default_rng(5), 256, "covid").image, (1100, 1000))
    big = np.clip(big.astype(int) + np.tile([0, 60], (1000, 550)), 0, 255).astype(np.uint8)  # fine detail to alias
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), big)
    ours = load_checkpoint(ckpt)
    ours.preprocessing = replace(ours.preprocessing, resize="bilinear")
    ckpt = save_checkpoint(ours, tmp_path / "bilinear.pt")
    out = tmp_path / "p.csv"
    assert main(["predict", str(ckpt), str(path), "--out", str(out), "--device", "cpu", "--precision", "fp32"]) == 0
    got = pd.read_csv(out)[[f"p_{c}" for c in CLASSES]].to_numpy()[0]
    predictor = TorchPredictor(load_checkpoint(ckpt), device="cpu", precision="fp32")
    bilinear = predictor.predict_proba(cv2.resize(big, (SIZE, SIZE))[None])[0]
    area = predictor.predict_proba(load_image(path, SIZE, resize="area")[None])[0]
    np.testing.assert_allclose(got, bilinear, atol=1e-5)
    assert np.abs(bilinear - area).max() > 1e-3  # the method matters, so the test above can tell them apart


def test_the_pipeline_runs_without_the_command_line(tmp_path, capsys):
    """``predict``'s pipeline as a library call: a row per input in input order, the refusal where it fell, and
    each class decided by the model's operating point, not by argmax (the step the web service runs too)."""
    from covid_cxr.inference.inputs import Inputs
    from covid_cxr.inference.pipeline import Classifier, predict_inputs
    from covid_cxr.operating_point import OperatingPoint
    from covid_cxr.preprocess import Preprocessing

    class Fixed:  # p_covid 0.3 for every image: argmax says normal, a covid threshold of 0.25 says covid
        backend = "fixed"
        classes = CLASSES
        preprocessing = Preprocessing(SIZE, "unit")

        def predict_proba(self, images: np.ndarray) -> np.ndarray:
            assert images.shape[1:] == (SIZE, SIZE) and images.dtype == np.uint8
            return np.tile(np.float32([0.3, 0.2, 0.5]), (len(images), 1))

        def describe(self) -> str:
            return "fixed"

        def warm_up(self, batch_size: int) -> None:
            pass

    rng = np.random.default_rng(1)
    for name in ("a.png", "c.png"):
        cv2.imwrite(str(tmp_path / name), render_chest(rng, 64, "normal").image)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    files = [tmp_path / n for n in ("a.png", "b.png", "c.png")]
    out = tmp_path / "rows.csv"
    threshold = OperatingPoint("sensitivity", target=0.95, threshold=0.25)

    sink = predict_inputs(Classifier(Fixed(), threshold), Inputs(files=files), out, batch_size=2, workers=1)
    rows = pd.read_csv(out, keep_default_na=False)
    assert list(rows["path"]) == [str(f) for f in files]
    assert list(rows["class"]) == ["covid", "", "covid"] and rows["error"][1] != ""
    assert sink.predicted == 2 and len(sink.failed) == 1
    assert "predicted 2 images (covid 2, pneumonia 0, normal 0); 1 failed" in capsys.readouterr().err
    argmax = Classifier(Fixed())(np.zeros((1, SIZE, SIZE), np.uint8))
    assert CLASSES[int(argmax.decided[0])] == "normal"


def test_overlays_of_files_with_the_same_stem_never_overwrite_each_other(ckpt, tmp_path):
    # a/x.png and b/x.png would both be x.png; c/x-2.png's own stem is the name b/x.png gets next.
    chest = render_chest(np.random.default_rng(5), SIZE + 9, "covid").image
    files = [tmp_path / d / n for d, n in (("a", "x.png"), ("b", "x.png"), ("c", "x-2.png"))]
    for k, path in enumerate(files):
        path.parent.mkdir()
        assert cv2.imwrite(str(path), np.roll(chest, 7 * k, axis=1))
    cams = tmp_path / "cams"
    assert main(["predict", str(ckpt), *map(str, files), "--out", str(tmp_path / "p.csv"),
                 "--gradcam", str(cams), "--device", "cpu"]) == 0
    written = sorted(p.name for p in cams.iterdir())
    assert written == ["x-2-2.png", "x-2.png", "x.png"]
    assert len({(cams / name).read_bytes() for name in written}) == 3  # three different images, none overwritten
