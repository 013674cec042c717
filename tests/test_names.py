"""Any file name the OS can hold, through prepare --skip-bad and evaluate: read as it is, written escaped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from covid_cxr.cli import main
from covid_cxr.data.names import display_path, printable
from covid_cxr.data.prepared import PreparedData
from covid_cxr.synth import render_chest
from tests.test_server import tiny_checkpoint

SIZE = 72


def _name(root: Path, raw: bytes) -> Path:
    """A path whose last part is the bytes ``raw`` (not necessarily UTF-8)."""
    return Path(os.fsdecode(os.fsencode(root) + b"/" + raw))


def test_names_print_with_escapes_and_utf8_names_unchanged(tmp_path: Path) -> None:
    assert display_path(_name(tmp_path, b"caf\xe9.png")) == f"{tmp_path}/caf\\xe9.png"
    assert display_path(tmp_path / "café.png") == f"{tmp_path}/café.png"
    assert printable("lone \ud800 surrogate") == "lone \\ud800 surrogate"
    printable(os.fsdecode(b"\xff\xfe")).encode("utf-8")  # never raises


def test_prepare_skip_bad_and_evaluate_take_any_file_name(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "xrays"
    for label in ("covid", "pneumonia", "normal"):
        (root / label).mkdir(parents=True)
        for i in range(12):
            cv2.imwrite(str(root / label / f"{i}.png"), render_chest(rng, 96, label).image)
    good = _name(root / "normal", b"caf\xe9.png")
    good.write_bytes((root / "normal" / "0.png").read_bytes())
    _name(root / "normal", b"bad\xff.png").write_bytes(b"not an image at all")
    data = tmp_path / "data"
    assert main(["prepare", "--folder", str(root), "--out", str(data), "--skip-bad", "--image-size", str(SIZE),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "bad\\xff.png" in out.replace("\n", "")  # named, escaped, with its reason
    prepared = PreparedData(data)
    paths = prepared.manifest["path"].tolist()
    assert str(good) in paths and all(Path(p).is_file() for p in paths)  # the name round-trips to the file
    assert len(prepared.cache(SIZE)) == 37
    info = json.loads((data / "prepare.json").read_text())
    assert [Path(s["path"]).name for s in info["skipped"]] == ["bad\\xff.png"]

    ckpt = tiny_checkpoint(tmp_path / "m.pt", "resnet50v2", size=SIZE)
    assert main(["evaluate", str(ckpt), "--data", str(data), "--fold", "1", "--device", "cpu", "--no-progress",
                 "--bootstrap", "10", "--out", str(tmp_path / "eval")]) == 0
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert len(preds) == len(prepared.fold(1).test)
