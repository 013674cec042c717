"""Every image a model sees is resized by that model's own method: the audits, ``export --int8``, ``evaluate --external``.

A tiny synthetic set (covid-chestxray PNG/JPEG files and RSNA DICOMs, all larger than the 72 px
input, so that ``area`` and ``bilinear`` give different images) is prepared by ``area``, and a
random network that records ``bilinear`` (as an imported authors' model does) is put in a run
folder. Each path must feed it exactly ``load_image(file, 72, resize="bilinear")`` of the files,
never the prepared ``area`` images, and say so in what it writes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from covid_cxr.audit.ablation import audit_ablation
from covid_cxr.audit.cam_stats import audit_cam
from covid_cxr.audit.cross_source import (
    audit_cross_source,
    external_data,
    unseen_images,
)
from covid_cxr.audit.data import (
    load_test_images_and_lungs,
    resolve_target,
    split_images,
)
from covid_cxr.audit.lungs import estimate_lung_fields, mask_stem
from covid_cxr.audit.source import audit_source
from covid_cxr.data.images import decode_image, load_image
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.splits import SplitSettings
from covid_cxr.deploy.export import Int8Settings, int8_inputs
from covid_cxr.deploy.onnx import export_onnx
from covid_cxr.evaluate.external import (
    evaluate_external,
    external_images,
    read_external,
)
from covid_cxr.inference.backends import load_model
from covid_cxr.inference.onnx_model import OnnxPredictor
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.labels import CLASSES
from covid_cxr.runs.checkpoint import load_checkpoint
from covid_cxr.synth import make_synthetic, render_chest
from covid_cxr.synth.dicom import write_dicom
from tests.test_server import tiny_checkpoint

SIZE = 72
CPU = InferenceSettings(batch_size=8, device="cpu", precision="fp32", backend="torch")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resize")
    # RSNA DICOMs of 256 px, covid-chestxray files of 90-230 px: every one is shrunk to 72 px.
    synth = make_synthetic(root / "raw", seed=7, n_covid=10, n_pneumonia=12, n_normal=10, size=256, workers=1)
    prepare_dataset(PrepareSettings(out=root / "data", covid_chestxray=synth.covid_chestxray, rsna=synth.rsna,
                                    image_size=SIZE, split=SplitSettings(folds=2, phases=1, seed=0), workers=1),
                    progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def run(data: Path) -> Path:
    """A run folder on fold 1 of ``data`` whose best.pt resizes by ``bilinear``."""
    folder = data.parent / "run"
    folder.mkdir()
    tiny_checkpoint(folder / "best.pt", "resnet50v2", size=SIZE, resize="bilinear")
    split_hash = PreparedData(data).fold(1).split_hash
    (folder / "run.json").write_text(json.dumps({"network": "resnet50v2", "fold": 1, "data": str(data),
                                                 "split_hash": split_hash, "image_size": SIZE}))
    return folder


@pytest.fixture(scope="module")
def hospital(data: Path) -> Path:
    """Another hospital's COVID-19 X-rays, one sub-folder per class: PNGs of other aspects and a DICOM."""
    covid = data.parent / "hospital-b" / "covid"
    covid.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(5):
        image = render_chest(rng, 240, "covid").image
        cv2.imwrite(str(covid / f"h{i}.png"), cv2.resize(image, (160 + 15 * i, 240), interpolation=cv2.INTER_AREA))
    write_dicom(covid / "h5.dcm", render_chest(rng, 200, "covid").image, storage="16bit")
    return covid.parent


def _paths(data: Path, image_ids) -> list[str]:
    manifest = PreparedData(data).manifest.set_index("image_id")
    return [str(manifest.loc[i, "path"]) for i in image_ids]


def _resized(paths, method: str) -> np.ndarray:
    return np.stack([load_image(p, SIZE, resize=method) for p in paths])


def _assert_fed_bilinear(fed: np.ndarray, paths) -> None:
    """``fed`` is the files resized the model's way (``bilinear``), in that order, and not the ``area`` images."""
    np.testing.assert_array_equal(np.asarray(fed), _resized(paths, "bilinear"))
    assert not np.array_equal(np.asarray(fed), _resized(paths, "area"))


def _as_set(images: np.ndarray) -> list[bytes]:
    return sorted(np.ascontiguousarray(image).tobytes() for image in images)


def test_the_audits_split_images_are_resized_the_checkpoints_way(data: Path, run: Path) -> None:
    target = resolve_target(run, None, None)
    assert target.checkpoint.preprocessing.resize == "bilinear"
    test = split_images(PreparedData(data), target)
    _assert_fed_bilinear(test.images, _paths(data, test.frame["image_id"]))
    assert PreparedData(data).cache(SIZE).resize == "area"  # the prepared cache stays as 'prepare' wrote it


def test_user_masks_and_the_estimate_line_up_with_the_bilinear_images(data: Path, run: Path, tmp_path: Path) -> None:
    """A mask drawn on the original frame lands where the same drawing, resized the model's way, lands."""
    frame = PreparedData(data).fold(1).test
    masks = tmp_path / "masks"
    masks.mkdir()
    rng = np.random.default_rng(0)
    for image_id, path in zip(frame["image_id"], _paths(data, frame["image_id"])):
        h, w = decode_image(path).shape  # the X-ray's own size and aspect, as a user's mask has them
        mask = np.zeros((h, w), np.uint8)
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        mask[y0 : y0 + h // 3, x0 : x0 + w // 3] = 255
        assert cv2.imwrite(str(masks / f"{mask_stem(image_id)}.png"), mask)
    _, test, lungs = load_test_images_and_lungs(run, None, None, masks)
    _assert_fed_bilinear(test.images, _paths(data, test.frame["image_id"]))
    assert lungs.method == "user-masks" and lungs.masks.shape == test.images.shape
    band = np.ones((5, 5), np.uint8)
    for image_id, got in zip(test.frame["image_id"], lungs.masks):
        want = load_image(masks / f"{mask_stem(image_id)}.png", SIZE, resize="bilinear") >= 128
        edge = cv2.dilate(want.astype(np.uint8), band) > cv2.erode(want.astype(np.uint8), band)
        assert (want & ~edge).any() and (~want & ~edge).any()  # inside and outside, away from the edge
        assert not (got != want)[~edge].any(), image_id  # nearest-neighbour masks differ only at the edge
    _, _, estimate = load_test_images_and_lungs(run, None, None, None)  # the estimate: made on the fed images
    np.testing.assert_array_equal(estimate.masks, estimate_lung_fields(test.images).masks)


@pytest.mark.slow  # the network over a dozen images: about 5 s on 2 cores
def test_cross_source_feeds_its_unseen_images_resized_the_checkpoints_way(data: Path, run: Path,
                                                                           hospital: Path) -> None:
    checkpoint = run / "best.pt"
    folder = external_data(f"hospital-b={hospital}", SIZE, "bilinear", checkpoint)  # decoded here
    assert len(folder.manifest) == 6
    _assert_fed_bilinear(folder.images(folder.manifest["image_id"]), folder.manifest["path"])
    prepared = PreparedData(data)
    ids = prepared.fold(1).test["image_id"]
    for unseen in (external_data(data, SIZE, "bilinear", checkpoint),  # a folder 'prepare' wrote, by area
                   unseen_images(None, prepared, SIZE, "bilinear", checkpoint)):  # the model's own data
        _assert_fed_bilinear(unseen.images(ids), _paths(data, ids))
    result, _ = audit_cross_source(run, CPU, source_data=f"hospital-b={hospital}")
    assert result["inputs"]["resize"] == "bilinear" and result["metrics"]["unseen_source"]["n"] == 6


@pytest.mark.slow  # three audits run the network: about 20 s on 2 cores
def test_the_model_audits_record_the_method_they_fed(data: Path, run: Path) -> None:
    ablation, path = audit_ablation(run, CPU)
    assert ablation["inputs"]["resize"] == "bilinear"
    assert json.loads(path.read_text())["inputs"]["resize"] == "bilinear"
    probe, _ = audit_source(data, CPU, checkpoint=run)  # the linear probe on the checkpoint's features
    assert probe["metrics"]["mode"] == "linear-probe" and probe["inputs"]["resize"] == "bilinear"
    cam, _ = audit_cam(run, InferenceSettings(batch_size=8, device="cpu"))
    assert cam["inputs"]["resize"] == "bilinear"


def test_int8_calibration_and_check_images_are_resized_the_checkpoints_way(data: Path, run: Path,
                                                                            tmp_path: Path) -> None:
    checkpoint = run / "best.pt"
    ckpt = load_checkpoint(checkpoint)
    every = Int8Settings(calibration_count=1000, check_count=1000)  # all of phase 1 and all of validation
    from_run = int8_inputs(checkpoint, ckpt.preprocessing, ckpt.classes, every)
    fold = PreparedData(data).fold(1)
    assert from_run.resize == "bilinear"
    for fed, ids in ((from_run.calibration, fold.phases[0]["image_id"]), (from_run.check_images, fold.val["image_id"])):
        paths = _paths(data, ids)
        assert _as_set(fed) == _as_set(_resized(paths, "bilinear"))
        assert _as_set(fed) != _as_set(_resized(paths, "area"))
    # --calibration X-ray files (DICOM and PNG/JPEG), with the run (its check) and without one.
    files = _paths(data, fold.test["image_id"])
    assert len(files) >= 8
    loose = tmp_path / "loose.pt"
    shutil.copy(checkpoint, loose)
    given = replace(every, calibration=tuple(files))
    for path in (checkpoint, loose):
        images = int8_inputs(path, ckpt.preprocessing, ckpt.classes, given)
        assert images.resize == "bilinear"
        assert _as_set(images.calibration) == _as_set(_resized(files, "bilinear"))
        assert _as_set(images.calibration) != _as_set(_resized(files, "area"))
    assert images.check_labels is None and _as_set(images.check_images) == _as_set(images.calibration)


@pytest.mark.slow  # an ONNX export and two evaluations: about 15 s on 2 cores
def test_evaluate_external_feeds_images_resized_the_models_way(data: Path, run: Path, hospital: Path,
                                                                tmp_path: Path) -> None:
    checkpoint = run / "best.pt"
    pre = load_checkpoint(checkpoint).preprocessing
    frame, prepared = read_external(hospital)
    images, rows, kept, failed = external_images(frame, prepared, pre, 1, checkpoint)
    assert prepared is None and not failed
    _assert_fed_bilinear(images[rows], kept["path"])
    frame, prepared = read_external(data)  # a prepared folder at the model's size, its cache by area
    images, rows, kept, _ = external_images(frame, prepared, pre, 1, checkpoint)
    _assert_fed_bilinear(images[rows], _paths(data, kept["image_id"]))

    paths = read_external(hospital)[0]["path"]
    result = evaluate_external(run, hospital, CPU, n_boot=20, progress=False)
    saved = json.loads((result.out_dir / "metrics.json").read_text())
    assert result.info["resize"] == saved["evaluation"]["resize"] == "bilinear"
    direct = load_model(checkpoint, CPU).predictor  # the same runtime, so the same kernels, as evaluate's
    probs = result.predictions[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs, direct.predict_proba(_resized(paths, "bilinear")), atol=1e-6)
    # An exported model carries its method in its metadata, and is fed by it.
    onnx_path = export_onnx(load_checkpoint(checkpoint), tmp_path / "model.onnx", dynamic_batch=True)
    onnx_model = OnnxPredictor(onnx_path)
    assert onnx_model.preprocessing.resize == "bilinear"
    result = evaluate_external(onnx_path, hospital, InferenceSettings(batch_size=8), n_boot=20, progress=False)
    assert result.info["resize"] == "bilinear" and result.info["backend"] == onnx_model.backend
    probs = result.predictions[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs, onnx_model.predict_proba(_resized(paths, "bilinear")), atol=1e-6)
