"""build_cache's default worker count works where os.sched_getaffinity does not exist (macOS, Windows)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covid_cxr.data.cache import build_cache


def test_default_workers_without_sched_getaffinity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for k in range(3):  # real PNG files, decoded by the real decoder
        paths.append(tmp_path / f"img{k}.png")
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(paths[-1])
    manifest = pd.DataFrame({"image_id": [p.stem for p in paths], "path": [str(p) for p in paths]})
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # as on macOS and Windows
    build = build_cache(manifest, 32, tmp_path / "cache", workers=0, progress=False)
    assert build.image_ids == ["img0", "img1", "img2"] and not build.failures
