"""Synthetic data: known geometry per image, both public layouts with their quirks, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from covid_cxr.data.images import decode_image
from covid_cxr.data.sources import read_covid_chestxray, read_rsna
from covid_cxr.synth import make_synthetic, render_chest
from covid_cxr.synth.layouts import CXR_COLUMNS

SMALL = dict(n_covid=12, n_pneumonia=16, n_normal=10, size=96, workers=1)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    make_synthetic(out, seed=5, shortcut="marker", **SMALL)
    return out


def test_render_geometry() -> None:
    rng = np.random.default_rng(0)
    for label in ("normal", "pneumonia", "covid"):
        c = render_chest(rng, 128, label)
        assert c.image.shape == c.lung_mask.shape == c.lesion_mask.shape == (128, 128)
        assert c.image.dtype == np.uint8 and c.lung_mask.dtype == bool
        assert 0.1 < c.lung_mask.mean() < 0.5
        assert not (c.lesion_mask & ~c.lung_mask).any()  # evidence only inside the lungs
        assert c.lesion_mask.any() == (label != "normal")
    left = render_chest(rng, 128, "pneumonia", lesion_side="left")
    assert left.lesion_mask[:, :64].sum() > 0 and left.lesion_mask[:, 64:].sum() == 0
    both = render_chest(rng, 256, "covid")
    assert both.lesion_side == "both" and both.lesion_mask[:, :128].any() and both.lesion_mask[:, 128:].any()
    # The evidence is brighter than the same lungs elsewhere.
    assert left.image[left.lesion_mask].mean() > left.image[left.lung_mask & ~left.lesion_mask].mean() + 10


def test_render_is_deterministic_and_checks_arguments() -> None:
    a = render_chest(np.random.default_rng(7), 300, "covid").image
    b = render_chest(np.random.default_rng(7), 300, "covid").image
    np.testing.assert_array_equal(a, b)
    for kwargs in ({"label": "flu"}, {"label": "normal", "lesion_side": "left"}, {"label": "covid", "lesion_side": "up"}):
        with pytest.raises(ValueError):
            render_chest(np.random.default_rng(0), 64, **kwargs)


def test_layouts_have_the_real_quirks(synth_dir: Path) -> None:
    meta = pd.read_csv(synth_dir / "covid-chestxray-dataset" / "metadata.csv", dtype=str, keep_default_na=False)
    assert list(meta.columns) == CXR_COLUMNS
    assert {"L", "Axial"} <= set(meta["view"]) and "CT" in set(meta["modality"])
    assert meta["patientid"].value_counts().max() > 1  # several images for some patients
    suffixes = {Path(f).suffix for f in meta["filename"]}
    assert {".png", ".jpg"} <= suffixes
    frame, _ = read_covid_chestxray(synth_dir / "covid-chestxray-dataset")
    assert (frame["label"] == "covid").sum() == 12 and (frame["label"] == "pneumonia").sum() >= 6
    shapes = {decode_image(p).shape for p in frame["path"]}
    assert len(shapes) > 3  # varied sizes and aspect ratios
    labels = pd.read_csv(synth_dir / "rsna" / "stage_2_train_labels.csv")
    info = pd.read_csv(synth_dir / "rsna" / "stage_2_detailed_class_info.csv")
    assert len(labels) == len(info) and labels["patientId"].duplicated().any()  # multi-box patients
    assert "No Lung Opacity / Not Normal" in set(info["class"])
    rsna, _ = read_rsna(synth_dir / "rsna")
    assert (rsna["label"] == "normal").sum() == 10 and len(rsna) == 10 + 16 - (frame["label"] == "pneumonia").sum()
    ds = pydicom.dcmread(rsna["path"].iloc[0])
    assert (ds.Rows, ds.Columns, ds.BitsStored, ds.PhotometricInterpretation) == (96, 96, 8, "MONOCHROME2")


def test_shortcut_marker_only_on_covid_chestxray(synth_dir: Path) -> None:
    frame, _ = read_covid_chestxray(synth_dir / "covid-chestxray-dataset")
    rsna, _ = read_rsna(synth_dir / "rsna")

    def corner_peak(path: str) -> int:
        img = decode_image(path)
        h, w = img.shape
        return int(max(img[: h // 6, : w // 6].max(), img[: h // 6, -w // 6 :].max()))

    assert min(corner_peak(p) for p in frame["path"]) >= 230
    assert max(corner_peak(p) for p in rsna["path"]) < 200


def test_deterministic_and_hierarchical(tmp_path: Path, synth_dir: Path) -> None:
    make_synthetic(tmp_path / "again", seed=5, shortcut="marker", **SMALL)
    for rel in ("covid-chestxray-dataset/metadata.csv", "rsna/stage_2_train_labels.csv"):
        assert (tmp_path / "again" / rel).read_bytes() == (synth_dir / rel).read_bytes()
    first = sorted((synth_dir / "rsna" / "stage_2_train_images").iterdir())[0]
    assert (tmp_path / "again" / "rsna" / "stage_2_train_images" / first.name).read_bytes() == first.read_bytes()
    summary = make_synthetic(tmp_path / "hier", seed=5, hierarchical=True, **SMALL)
    meta = pd.read_csv(summary.covid_chestxray / "metadata.csv")
    assert meta["finding"].str.startswith("Pneumonia/").any()
    flat, _ = read_covid_chestxray(synth_dir / "covid-chestxray-dataset")
    hier, _ = read_covid_chestxray(summary.covid_chestxray)
    assert flat["label"].value_counts().to_dict() == hier["label"].value_counts().to_dict()
    assert summary.counts["covid-chestxray"]["covid"] == 12 and summary.total == 38


def test_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least"):
        make_synthetic(tmp_path, n_covid=2, n_pneumonia=20, n_normal=20)
    with pytest.raises(ValueError, match="shortcut"):
        make_synthetic(tmp_path, shortcut="watermark", **SMALL)


def test_a_second_set_over_the_first_is_refused(tmp_path: Path, synth_dir: Path) -> None:
    """A second synth into the same --out left the first set's images beside the second's labels (77 DICOMs for
    20 label rows) without a word; it is refused, naming the folder, and the first set is left as it was."""
    import shutil

    shutil.copytree(synth_dir, tmp_path / "set")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "set").rglob("*"))
    with pytest.raises(FileExistsError, match=r"covid-chestxray-dataset already holds files .*give a new --out"):
        make_synthetic(tmp_path / "set", seed=9, **SMALL)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "set").rglob("*")) == before
