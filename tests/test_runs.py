"""The run folder's owner: the atomic writer, RunInfo, RunFolder, and resolution of a target."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from covid_cxr.atomic import (
    atomic_path,
    file_sha256,
    read_json,
    read_json_object,
    write_json,
    write_text,
)
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.splits import SplitSettings
from covid_cxr.errors import DataError
from covid_cxr.labels import CLASSES
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.checkpoint import Checkpoint, save_checkpoint
from covid_cxr.runs.evaluations import evaluations, external_evaluations
from covid_cxr.runs.folder import RunFolder, RunInfo
from covid_cxr.runs.resolve import resolve_target, trained_splits
from covid_cxr.runs.results import audit_dir_for
from covid_cxr.synth import make_synthetic


def test_write_json_is_finite_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = write_json(tmp_path / "sub" / "m.json", {"nan": math.nan, "inf": math.inf, "n": np.int64(3),
                                                    "x": np.float32(0.5), "p": tmp_path, "t": (1, 2)})
    assert json.loads(path.read_text()) == {"nan": None, "inf": None, "n": 3, "x": 0.5, "p": str(tmp_path),
                                            "t": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]
    write_text(path, "replaced")
    assert path.read_text() == "replaced" and len(file_sha256(path)) == 64


def test_atomic_path_renames_on_success_and_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    """A writer that wants a file name (onnx.save, the quantizer) gets all-or-nothing too."""
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of a new mod")
        raise RuntimeError("the writer died")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    with atomic_path(target, suffix=".partial.onnx") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".partial.onnx") and tmp != target
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing shows at the final name until the block ends
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]


def test_read_json_names_the_file_and_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON .*; do this"):
        read_json(bad, fix="do this")
    with pytest.raises(DataError, match=r"missing\.json: no such file"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(DataError, match="expected a JSON object"):
        read_json_object(tmp_path / "list.json")


def test_run_info_round_trips_and_keeps_unknown_keys(tmp_path: Path) -> None:
    data = {"network": "xception", "fold": 2, "status": "running", "from_the_future": {"a": 1}}
    info = RunInfo.from_json(data)
    assert info.network == "xception" and info.fold == 2 and info.best_epoch is None
    assert info.to_json() == data
    folder = RunFolder(tmp_path / "run")
    assert not folder.exists()
    folder.write_info(info.replace(status="finished", best_epoch=3))
    again = folder.info()
    assert again.status == "finished" and again.best_epoch == 3 and again.extra == {"from_the_future": {"a": 1}}
    assert RunFolder.containing(folder.best) is not None and RunFolder.containing(tmp_path) is None
    assert folder.eval_dir("val").name == "eval-val" and folder.card.name == "MODEL_CARD.md"
    assert audit_dir_for(folder.root) == folder.audit and audit_dir_for(folder.best) == folder.audit
    assert audit_dir_for(tmp_path / "loose.pt") == tmp_path / "loose-audit"


def test_a_damaged_run_json_is_named(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("[]")
    with pytest.raises(DataError, match=r"run\.json: not a run description"):
        RunFolder(tmp_path).info()
    assert evaluations(tmp_path, None) == []  # a card says what is absent instead of failing


def _checkpoint(path: Path, **meta: object) -> Path:
    """A checkpoint file with ``meta`` (no weights: resolution reads only what it recorded)."""
    save_checkpoint(Checkpoint("xception", CLASSES, Preprocessing(image_size=71), {}, meta=meta), path)
    return path


def test_resolve_target_says_what_is_missing(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.write_info(RunInfo(network="xception", fold=1, data=str(tmp_path / "data"), status="running"))
    with pytest.raises(DataError, match="split must be one of"):
        resolve_target(folder.root, None, None, "train", None)
    with pytest.raises(ValueError, match="has not saved a best checkpoint yet .*'running'"):
        resolve_target(folder.root, None, None, "test", None)
    _checkpoint(folder.best)
    t = resolve_target(folder.root, None, None, "val", None)
    assert (t.checkpoint, t.fold, t.data, t.out_dir) == (folder.best, 1, tmp_path / "data", folder.eval_dir("val"))
    loose = _checkpoint(tmp_path / "loose.pt")  # recorded no fold or data (as an imported model)
    with pytest.raises(DataError, match="--data"):
        resolve_target(loose, None, 1, "test", None)
    with pytest.raises(DataError, match="--fold"):
        resolve_target(loose, tmp_path, None, "test", None)
    assert resolve_target(loose, tmp_path, 2, "test", None).out_dir == tmp_path / "loose-eval-test"


def test_external_evaluations_lists_only_complete_ones(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    assert external_evaluations(tmp_path) == []  # not a run folder
    folder.write_info(RunInfo(status="finished"))
    for name, done in (("b", True), ("a", True), ("c", False)):
        folder.external_dir(name).mkdir()
        if done:
            (folder.external_dir(name) / "predictions.csv").write_text("x\n")
    assert [p.name for p in external_evaluations(tmp_path)] == ["external-a", "external-b"]


@pytest.fixture(scope="module")
def two_preparations(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same synthetic datasets prepared (labels only) with two seeds: two sets of fold-1 splits."""
    root = tmp_path_factory.mktemp("resolve")
    synth = make_synthetic(root / "synthetic", seed=0, n_covid=10, n_pneumonia=14, n_normal=12, size=64, workers=1)
    out = []
    for seed in (0, 1):
        data = root / f"data{seed}"
        prepare_dataset(PrepareSettings(out=data, covid_chestxray=synth.covid_chestxray, rsna=synth.rsna,
                                        labels_only=True, split=SplitSettings(folds=2, phases=2, seed=seed)),
                        progress=False)  # fmt: skip
        out.append(data)
    return out[0], out[1]


def test_a_loose_checkpoint_is_checked_against_the_splits_it_recorded(two_preparations: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    old, new = (PreparedData(d) for d in two_preparations)
    old_hash, new_hash = old.fold(1).split_hash, new.fold(1).split_hash
    assert old_hash != new_hash
    loose = _checkpoint(tmp_path / "shared" / "model.pt", fold=1, data=str(old.root), split_hash=old_hash)
    t = resolve_target(loose, None, None, "test", None)
    assert (t.data, t.fold, t.run.split_hash) == (old.root, 1, old_hash)
    assert trained_splits(old, 1, t.run, loose).split_hash == old_hash
    t = resolve_target(loose, new.root, None, "test", None)
    with pytest.raises(DataError, match=rf"trained on fold 1 splits {old_hash[:12]} .* splits {new_hash[:12]}"):
        trained_splits(new, t.fold, t.run, loose)
    with pytest.raises(DataError, match=r"trained on fold 1, so fold 2's test .* --fold 1"):
        resolve_target(loose, None, 2, "test", None)


def test_a_run_is_refused_on_another_fold_or_when_its_checkpoint_trained_on_other_splits(
        two_preparations: tuple[Path, Path], tmp_path: Path) -> None:  # fmt: skip
    old, new = (PreparedData(d) for d in two_preparations)
    old_hash, new_hash = old.fold(1).split_hash, new.fold(1).split_hash
    folder = RunFolder(tmp_path / "run")
    folder.write_info(RunInfo(network="xception", fold=1, data=str(old.root), split_hash=old_hash, status="finished"))
    _checkpoint(folder.best, fold=1, data=str(old.root), split_hash=old_hash)
    assert resolve_target(folder.root, None, 1, "test", None).fold == 1
    with pytest.raises(DataError, match=r"trained on fold 1, so fold 2's test"):
        resolve_target(folder.root, None, 2, "test", None)
    with pytest.raises(DataError, match=rf"the run was trained on fold 1 splits {old_hash[:12]} .* for fold 2"):
        trained_splits(old, 2, folder.info(), folder.root)
    # best.pt of a run resumed on re-prepared data (before resume refused that): run.json took the new hash
    _checkpoint(folder.best, fold=1, data=str(old.root), split_hash=old_hash)
    folder.write_info(folder.info().replace(split_hash=new_hash))
    with pytest.raises(DataError, match=rf"trained on splits {old_hash[:12]} but its run.json says {new_hash[:12]}"):
        resolve_target(folder.root, None, None, "test", None)


@pytest.mark.parametrize(("name", "content", "said"), [
    ("model.pt", b"", r"empty file \(0 bytes\)"),
    ("authors.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 64, r"a Keras HDF5 model, not a covid-cxr checkpoint; convert it first "
                                                     r"with 'covid-cxr import-keras"),
    ("model.onnx", b"\x08\x08\x12\x07pytorch" + b"\0" * 64, r"an ONNX model, not a covid-cxr checkpoint; give the "
                                                             r"checkpoint \(\.pt, e\.g\. RUN/best\.pt\)"),
    ("notes.pt", b"epoch 3: best so far\n", r"not a covid-cxr checkpoint \(those are zip archives"),
])
def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path: Path, name: str, content: bytes,
                                                              said: str) -> None:
    """export, calibrate, evaluate and model-card passed torch's own words on (``EOFError``, ``KeyError: 101``, an
    unpickling error suggesting ``weights_only=False``); predict and serve already said what the file was."""
    from covid_cxr.cli import main
    from covid_cxr.errors import CheckpointError
    from covid_cxr.runs.checkpoint import load_checkpoint

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"^{path}: {said}"):
        load_checkpoint(path)
    assert main(["model-card", str(path), "--out", str(tmp_path / "card.md")]) == 2
    assert not (tmp_path / "card.md").exists()


class _SignalWhilePickled:
    """Sends ``signum`` to this process when torch.save pickles it, half-way through the checkpoint's bytes."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        os.kill(os.getpid(), self.signum)
        return (int, ())


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_during_a_checkpoint_write_acts_once_the_file_is_in_place(tmp_path: Path, signame: str) -> None:
    """A Ctrl-C or SIGTERM inside torch.save ended training with the zip writer's RuntimeError ("unexpected pos"),
    exit status 1, instead of "interrupted" (130) or 143. The signal now waits for the write and acts after it."""
    import signal

    import torch

    from covid_cxr.runs.checkpoint import atomic_torch_save

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # as training's SIGTERM handler does

    signum = getattr(signal, signame)
    handler = signal.default_int_handler if signame == "SIGINT" else stop  # a pytest-xdist worker ignores SIGINT
    expected = KeyboardInterrupt if signame == "SIGINT" else SystemExit
    before = signal.signal(signum, handler)
    path = tmp_path / "last.pt"
    try:
        with pytest.raises(expected):
            atomic_torch_save({"a": torch.ones(2**20), "b": _SignalWhilePickled(signum), "c": torch.arange(5)}, path)
        assert signal.getsignal(signum) is handler  # put back
    finally:
        signal.signal(signum, before)
    saved = torch.load(path, weights_only=False)  # whole: written and renamed before the signal acted
    assert saved["a"].shape == (2**20,) and saved["c"].tolist() == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left
