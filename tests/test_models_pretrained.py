"""Fetching the ImageNet weights: cache location, digest checks, offline errors. Never touches the
network: "downloads" come from file:// URLs of files made here."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from covid_cxr.errors import CheckpointError
from covid_cxr.labels import CLASSES
from covid_cxr.models import build_model
from covid_cxr.models.pretrained import default_cache_dir, fetch_weights, load_imagenet_weights
from covid_cxr.networks import IMAGENET_FILES, WeightsFile
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.checkpoint import Checkpoint, save_checkpoint


def _entry(tmp_path: Path, payload: bytes, *, sha256: str | None = None) -> WeightsFile:
    source = tmp_path / "server" / "weights.h5"
    source.parent.mkdir()
    source.write_bytes(payload)
    digest = sha256 or hashlib.sha256(payload).hexdigest()
    return WeightsFile("xception", "weights.h5", source.as_uri(), sha256=digest)


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COVID_CXR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "covid-cxr"
    monkeypatch.setenv("COVID_CXR_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("COVID_CXR_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "covid-cxr"


def test_download_is_verified_and_cached(tmp_path: Path) -> None:
    entry = _entry(tmp_path, b"weights bytes")
    cache = tmp_path / "cache"
    path = fetch_weights(entry, cache_dir=cache)
    assert path == cache / "weights.h5" and path.read_bytes() == b"weights bytes"
    # Second call: from the cache, even with downloads off and the source gone.
    Path(entry.url.removeprefix("file://")).unlink()
    assert fetch_weights(entry, cache_dir=cache, allow_download=False) == path


def test_wrong_sha256_is_refused_and_nothing_is_cached(tmp_path: Path) -> None:
    entry = _entry(tmp_path, b"tampered", sha256=hashlib.sha256(b"the real file").hexdigest())
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="SHA256 is .* expected"):
        fetch_weights(entry, cache_dir=cache)
    assert not any(cache.iterdir())  # no partial or bad file left behind
    # A corrupt file already in the cache is refused too, with the URL to fetch it again.
    (cache / "weights.h5").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="download it again from file://"):
        fetch_weights(entry, cache_dir=cache)


def test_offline_without_a_file_says_what_to_download_and_where(tmp_path: Path) -> None:
    model = build_model("xception", image_size=71)
    entry = IMAGENET_FILES["xception"]
    with pytest.raises(CheckpointError) as err:
        load_imagenet_weights(model, allow_download=False, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert entry.url in message
    assert str(tmp_path / "cache" / entry.filename) in message
    assert "--weights-file" in message


def test_our_own_model_files_as_weights_say_what_training_takes(tmp_path: Path) -> None:
    # Not import-keras' words ("no import needed: predict, evaluate, export and serve take it"): this is training.
    ours = save_checkpoint(Checkpoint("xception", CLASSES, Preprocessing(image_size=71), {}), tmp_path / "best.pt")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX ModelProto's first fields
    model = build_model("xception", image_size=71)
    for path, what in ((ours, "a covid-cxr checkpoint"), (onnx, "an ONNX model")):
        with pytest.raises(CheckpointError) as err:
            load_imagenet_weights(model, weights_file=path)
        message = str(err.value)
        assert message.startswith(f"{path}: {what}, not ImageNet weights: --weights-file takes the Keras ImageNet")
        assert IMAGENET_FILES["xception"].filename in message and "train --resume RUN" in message
        assert "no import needed" not in message


def test_official_entries_point_at_the_keras_files() -> None:
    for backbone, entry in IMAGENET_FILES.items():
        assert entry.backbone == backbone
        assert entry.url.startswith("https://storage.googleapis.com/tensorflow/keras-applications/")
        assert entry.url.endswith("/" + entry.filename) and entry.filename.endswith("_notop.h5")
        assert entry.sha256 or entry.md5
