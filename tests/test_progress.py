"""The one progress bar: on stderr, never on stdout; silent when disabled."""

from __future__ import annotations

import pytest

from covid_cxr.progress import progress_bar


def test_the_bar_counts_on_stderr_and_keeps_stdout_clean(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar("[bold]evaluate[/] test", 10, rate_unit="img") as advance:
        for _ in range(5):
            advance(2)
    out, err = capsys.readouterr()
    assert out == "" and "evaluate test" in err and "10/10" in err and "img/s" in err


def test_a_disabled_or_transient_bar_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar("decoding", 3, enabled=False) as advance:
        advance(3)
    with progress_bar("decoding", 3, transient=True) as advance:
        advance(3)
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == ""
