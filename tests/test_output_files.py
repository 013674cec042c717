"""Evaluation and report outputs: written atomically, a refused report loses nothing, one file per plot."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import numpy as np
import pytest

from covid_cxr.atomic import current_umask
from covid_cxr.errors import DataError
from covid_cxr.evaluate import plots
from covid_cxr.evaluate.predictions import (
    read_predictions,
    validate_predictions,
    write_predictions,
)
from covid_cxr.evaluate.run import write_evaluation
from covid_cxr.report.report import write_report
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


def _evaluation(folder: Path, seed: int, **info: object) -> Path:
    """An evaluation folder as 'covid-cxr evaluate' writes it: predictions, metrics.json and the plots."""
    frame = _with_probs((4, 8, 8), seed=seed)
    write_predictions(frame, folder / "predictions.csv")
    write_evaluation(validate_predictions(frame, "t"), folder, {"network": "concat", "split": "test", **info}, n_boot=0)
    return folder


def _linked(out: Path) -> list[str]:
    return re.findall(r"\]\(report_files/([^)]+)\)", (out / "report.md").read_text())


def test_a_refused_report_leaves_the_previous_one_whole(tmp_path: Path) -> None:
    folds = [_evaluation(tmp_path / f"fold{k}", seed=k, fold=k) for k in (1, 2)]
    out = tmp_path / "report"
    write_report(folds, out, n_boot=0)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert sorted(_linked(out)) == sorted(p.name for p in (out / "report_files").iterdir())
    again = _evaluation(tmp_path / "again", seed=3, fold=2)
    with pytest.raises(DataError, match="fold 2"):
        write_report([*folds, again], out, n_boot=0)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # A new report over one fold: every image it links is there, the other fold's images are gone.
    write_report(folds[:1], out, n_boot=0)
    files = sorted(p.name for p in (out / "report_files").iterdir())
    assert files == sorted(_linked(out)) and not any("fold2" in name for name in files)
    assert _mode(out / "report.html") == _mode(out / "report.md") == 0o666 & ~current_umask()


def test_external_evaluations_of_each_fold_keep_their_own_plots_and_headings(tmp_path: Path) -> None:
    internal = [_evaluation(tmp_path / f"fold{k}", seed=k, fold=k) for k in (1, 2)]
    external = [_evaluation(tmp_path / f"fold{k}-external-hospital-b", seed=10 + k, fold=k, kind="external",
                            name="hospital-b", split="external:hospital-b") for k in (1, 2)]
    out = tmp_path / "report"
    write_report([*internal, *external], out, n_boot=0)
    md = (out / "report.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("### ") and "hospital-b" in line]
    assert [h.split(" (N = ")[0] for h in headings] == ["### concat fold 1 on hospital-b",
                                                         "### concat fold 2 on hospital-b"]
    for k, folder in zip((1, 2), external):
        linked = [name for name in _linked(out) if name.startswith(f"external-concat-fold{k}-hospital-b-")]
        assert sorted(linked) == [f"external-concat-fold{k}-hospital-b-confusion_matrix.png",
                                  f"external-concat-fold{k}-hospital-b-roc.png"]
        for name in linked:  # each fold's section shows that fold's own plot
            plot = name.removeprefix(f"external-concat-fold{k}-hospital-b-")
            assert (out / "report_files" / name).read_bytes() == (folder / plot).read_bytes()
    with pytest.raises(DataError, match="two external evaluations of concat fold 1 on hospital-b"):
        write_report([*internal, external[0], _evaluation(tmp_path / "copy", seed=20, fold=1, kind="external",
                                                          name="hospital-b")], tmp_path / "other", n_boot=0)
