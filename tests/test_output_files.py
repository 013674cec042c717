"""Evaluation and report outputs: written atomically, a refused report loses nothing, one file per plot."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np

from covid_cxr.atomic import current_umask
from covid_cxr.evaluate import plots
from covid_cxr.evaluate.predictions import read_predictions, validate_predictions, write_predictions
from tests.test_report import _with_probs


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_predictions_are_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "eval-test" / "predictions.csv"
    old, new = _with_probs((3, 4, 5), seed=1), _with_probs((6, 7, 8), seed=2)
    write_predictions(old, path)
    before = path.read_bytes()
    with open(path, "rb") as reader:  # a reader (the report, a server) that opened the file before the rewrite
        write_predictions(new, path)
        assert reader.read() == before  # sees the whole old table, not a truncated or mixed one
    assert len(read_predictions(path).frame) == len(new)
    assert _mode(path) == 0o666 & ~current_umask()
    assert sorted(p.name for p in path.parent.iterdir()) == ["predictions.csv"]


def test_figures_are_replaced_whole(tmp_path: Path) -> None:
    preds = validate_predictions(_with_probs((5, 20, 25), seed=3), "t")
    first = plots.save_figure(plots.roc_figure(preds.true_idx, preds.probs), tmp_path / "roc.png")[0]
    before = first.read_bytes()
    with open(first, "rb") as reader:
        paths = plots.save_figure(plots.confusion_figure(np.eye(3, dtype=int) * 5), tmp_path / "roc.png",
                                  tmp_path / "roc.pdf")
        assert reader.read() == before
    assert paths[0].read_bytes() != before and paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"  # the format still follows the target's suffix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roc.pdf", "roc.png"]
