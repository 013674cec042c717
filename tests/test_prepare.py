"""``prepare`` end to end on synthetic data: the prepared folder's contract, the cache, and bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covid_cxr.cli import main
from covid_cxr.data.images import decode_image, resize_gray
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.data.splits import SplitSettings
from covid_cxr.data.prepared import PreparedData
from covid_cxr.errors import ConfigError, DataError
from covid_cxr.synth import make_synthetic, render_chest

SIZE = 72


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    make_synthetic(out, seed=2, n_covid=24, n_pneumonia=30, n_normal=24, size=128, workers=1)
    return out


def _settings(raw: Path, out: Path, **kw: object) -> PrepareSettings:
    split = SplitSettings(folds=3, phases=2, seed=int(kw.pop("seed", 0)), protocol=str(kw.pop("protocol", "strict")))
    base = dict(out=out, covid_chestxray=raw / "covid-chestxray-dataset", rsna=raw / "rsna", split=split,
                image_size=SIZE, workers=1)
    base.update(kw)
    return PrepareSettings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def prepared(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare_dataset(_settings(raw, out), progress=False)
    return out


def test_prepared_folder_contract(prepared: Path) -> None:
    data = PreparedData(prepared)
    assert (data.num_folds, data.num_phases, data.protocol, data.image_size) == (3, 2, "strict", SIZE)
    m = data.manifest
    assert list(m.columns) == ["image_id", "path", "label", "patient_id", "source", "view"]
    assert len(m) == 24 + 30 + 24 and set(m["label"]) == {"covid", "pneumonia", "normal"}
    assert set(m.loc[m["source"] == "rsna", "view"]) <= {"PA", "AP"}  # read from the DICOM headers
    for name in ("manifest.csv", "prepare.json", "splits/summary.json", "splits/fold3/phase2.csv",
                 "splits/fold1/val.csv", "splits/fold1/test.csv"):
        assert (prepared / name).is_file(), name
    fold = data.fold(2)
    assert fold.fold == 2 and len(fold.phases) == 2 and {"image_id", "label", "patient_id", "source"} <= set(fold.val)
    assert set(fold.paths) == {"phase1", "phase2", "val", "test"} and len(fold.split_hash) == 64
    assert fold.split_hash == data.fold(2).split_hash != data.fold(1).split_hash
    test_p, val_p = set(fold.test["patient_id"]), set(fold.val["patient_id"])
    train_p = set(pd.concat(fold.phases)["patient_id"])
    assert not test_p & (train_p | val_p)
    with pytest.raises(DataError, match="between 1 and 3"):
        data.fold(4)


def test_cache_holds_the_decoded_images(prepared: Path) -> None:
    data = PreparedData(prepared)
    cache = data.cache()
    assert cache.images.shape == (78, SIZE, SIZE) and cache.images.dtype == np.uint8
    assert isinstance(cache.images, np.memmap) and not cache.images.flags.writeable
    ids = data.fold(1).val["image_id"].tolist()[:5]
    rows = cache.rows(ids)
    assert rows.dtype == np.int64
    path = data.manifest.set_index("image_id").loc[ids[0], "path"]
    np.testing.assert_array_equal(cache.images[rows[0]], resize_gray(decode_image(path), SIZE))
    with pytest.raises(DataError, match="rsna/nobody"):
        cache.rows(["rsna/nobody"])
    with pytest.raises(DataError, match="--image-size 128"):
        data.cache(128)


def test_cache_reused_when_unchanged_and_rebuilt_when_not(raw: Path, prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    again = prepare_dataset(_settings(raw, out), progress=False)
    assert again.cache_reused and again.images_decoded == 0
    assert PreparedData(out).fold(1).split_hash == PreparedData(prepared).fold(1).split_hash
    one = PreparedData(out).manifest["path"].iloc[0]
    os.utime(one, ns=(1, 1))
    rebuilt = prepare_dataset(_settings(raw, out, seed=9), progress=False)
    assert not rebuilt.cache_reused and rebuilt.images_decoded == 78
    assert PreparedData(out).fold(1).split_hash != PreparedData(prepared).fold(1).split_hash  # another seed


def test_labels_only_and_paper_protocol(raw: Path, tmp_path: Path) -> None:
    report = prepare_dataset(_settings(raw, tmp_path / "lo", labels_only=True, protocol="paper"), progress=False)
    data = PreparedData(tmp_path / "lo")
    assert data.image_size is None and data.protocol == "paper" and not (tmp_path / "lo" / "cache").exists()
    assert any("selects on test data" in n for n in report.notes)
    with pytest.raises(DataError, match="--labels-only"):
        data.cache()


def _break(raw: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the raw data with an absent image, a truncated DICOM and a text file named .dcm."""
    bad = tmp_path / "bad"
    shutil.copytree(raw, bad)
    dicoms = sorted((bad / "rsna" / "stage_2_train_images").glob("*.dcm"))
    info = pd.read_csv(bad / "rsna" / "stage_2_detailed_class_info.csv")
    kept = set(info.loc[info["class"] != "No Lung Opacity / Not Normal", "patientId"])
    dicoms = [d for d in dicoms if d.stem in kept]
    dicoms[0].unlink()
    dicoms[1].write_bytes(dicoms[1].read_bytes()[:3000])
    dicoms[2].write_text("not an image at all\n" * 10)
    return bad, [d.name for d in dicoms[:3]]


def test_kfold_protocol(raw: Path, tmp_path: Path) -> None:
    """Plain stratified group k-fold: one training phase that train reads like any other, test sets that
    partition the patients, and a note that says the phase keeps the data's own class shares."""
    report = prepare_dataset(_settings(raw, tmp_path / "kf", labels_only=True, protocol="kfold"), progress=False)
    data = PreparedData(tmp_path / "kf")
    assert (data.protocol, data.num_folds, data.num_phases) == ("kfold", 3, 1)
    assert any("protocol 'kfold'" in n for n in report.notes)
    tested = []
    for k in (1, 2, 3):
        fold = data.fold(k)
        assert len(fold.phases) == 1 and set(fold.paths) == {"phase1", "val", "test"}
        sides = [set(fold.phases[0]["patient_id"]), set(fold.val["patient_id"]), set(fold.test["patient_id"])]
        assert not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2]
        assert len(fold.phases[0]) + len(fold.val) + len(fold.test) == len(data.manifest)
        tested += sorted(sides[2])
    assert sorted(tested) == sorted(data.manifest["patient_id"].unique())
    summary = json.loads((tmp_path / "kf" / "splits" / "summary.json").read_text())
    assert [i["rule"] for i in summary["phase_balance"]] == ["kfold"] * 3


def test_bad_images_fail_together_and_write_nothing(raw: Path, prepared: Path, tmp_path: Path) -> None:
    bad, names = _break(raw, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare_dataset(_settings(bad, out), progress=False)
    message = str(err.value)
    assert "3 images cannot be used; nothing was written" in message and "--skip-bad" in message
    for name, reason in zip(names, ("file not found", "truncated", "not an image")):
        assert any(name in line and reason in line for line in message.splitlines()), (name, message)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # An earlier prepared folder survives a failed run untouched.
    keep = tmp_path / "keep"
    shutil.copytree(prepared, keep)
    before = (keep / "prepare.json").read_bytes()
    with pytest.raises(DataError):
        prepare_dataset(_settings(bad, keep), progress=False)
    assert (keep / "prepare.json").read_bytes() == before
    report = prepare_dataset(_settings(bad, out, skip_bad=True), progress=False)
    assert len(report.skipped) == 3 and len(PreparedData(out).manifest) == 75
    assert len(json.loads((out / "prepare.json").read_text())["skipped"]) == 3


def test_bad_metadata_and_duplicates(raw: Path, tmp_path: Path) -> None:
    bad = tmp_path / "meta"
    shutil.copytree(raw, bad)
    meta = pd.read_csv(bad / "covid-chestxray-dataset" / "metadata.csv", dtype=str, keep_default_na=False)
    meta.drop(columns="finding").to_csv(bad / "covid-chestxray-dataset" / "metadata.csv", index=False)
    with pytest.raises(DataError, match=r"metadata.csv lacks the column\(s\) finding"):
        prepare_dataset(_settings(bad, tmp_path / "o1", labels_only=True), progress=False)
    meta.to_csv(bad / "covid-chestxray-dataset" / "metadata.csv", index=False)
    kept = meta[(meta["modality"] == "X-ray") & meta["finding"].str.startswith("COVID")]
    images = bad / "covid-chestxray-dataset" / "images"
    shutil.copyfile(images / kept["filename"].iloc[0], images / kept["filename"].iloc[1])  # same bytes, two names
    report = prepare_dataset(_settings(bad, tmp_path / "o2"), progress=False)
    assert any(len(group) == 2 for group in report.duplicates)
    assert any("byte-identical" in n for n in report.notes)
    with pytest.raises(ConfigError, match="at least one dataset"):
        PrepareSettings(out=tmp_path / "o3")


def test_cli_prepare_and_errors(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["prepare", "--covid-chestxray", str(raw / "covid-chestxray-dataset"), "--rsna", str(raw / "rsna"),
            "--folds", "3", "--phases", "2", "--labels-only", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out and "covid-chestxray" in out and "phases (fold 1-3)" in " ".join(out.split())
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "thesis.txt").write_text("mine")
    assert main([*args, "--out", str(tmp_path / "junk")]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err and (tmp_path / "junk" / "thesis.txt").exists()
    with pytest.raises(DataError, match="is not a prepared dataset: run 'covid-cxr prepare"):
        PreparedData(tmp_path / "junk")


def test_own_folder_with_patient_ids(tmp_path: Path) -> None:
    """A user's folder (CSV with patient ids, several images per patient) goes through the same pipeline."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(18):
        label = ("covid", "pneumonia", "normal")[p % 3]
        for i in range(1 + p % 3):
            name = f"img_{p}_{i}.png"
            Image.fromarray(render_chest(rng, 80, label).image).save(tmp_path / name)
            rows.append({"path": name, "label": label, "patient_id": f"pt{p}"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "data"
    prepare_dataset(PrepareSettings(out=out, folder=tmp_path, split=SplitSettings(folds=2, phases=2), image_size=SIZE, workers=1),
                    progress=False)
    data = PreparedData(out)
    assert set(data.manifest["source"]) == {"folder"} and len(data.cache()) == len(rows)
    for k in (1, 2):
        fold = data.fold(k)
        train = set(pd.concat(fold.phases)["patient_id"])
        assert not set(fold.test["patient_id"]) & (train | set(fold.val["patient_id"]))
