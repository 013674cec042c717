"""How the ``covid-cxr`` program ends: as ``main`` says, and, in a process that joined a torchrun process group,
through ``distributed.end_rank`` (no interpreter finalization, where the group's leftover threads can abort the
process: see ``covid_cxr.train.distributed``). Each case runs in a fresh interpreter, since ``end_rank`` ends it."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import atexit, sys
from covid_cxr.train import distributed
distributed._joined = {joined}
atexit.register(lambda: print("atexit ran", flush=True))
import covid_cxr.cli as cli
{patch}
print("written before the end")  # stdout is a pipe here, so block-buffered: only a flush gets this out of os._exit
cli.entry({argv!r})
"""


def _run(joined: bool, argv: list[str], patch: str = "") -> subprocess.CompletedProcess[str]:
    code = SCRIPT.format(joined=joined, argv=argv, patch=patch)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("joined", [False, True])
def test_the_status_and_the_output_are_mains_whether_or_not_a_group_was_joined(joined: bool) -> None:
    done = _run(joined, ["exprot"])
    assert done.returncode == 2
    assert "written before the end" in done.stdout
    assert "unknown command 'exprot'" in done.stderr
    assert ("atexit ran" in done.stdout) is not joined  # a rank skips the finalization (and with it atexit)


def test_a_rank_ends_with_argparses_status() -> None:
    done = _run(True, ["--version"])
    assert done.returncode == 0 and "covid-cxr" in done.stdout and "atexit ran" not in done.stdout


def test_a_bug_in_a_rank_prints_its_traceback_and_fails() -> None:
    done = _run(True, ["train"], patch="cli.main = lambda argv=None: 1 / 0")
    assert done.returncode == 1
    assert "ZeroDivisionError" in done.stderr and "Traceback" in done.stderr
    assert "atexit ran" not in done.stdout


def test_a_bug_outside_a_group_keeps_pythons_own_ending() -> None:
    done = _run(False, ["train"], patch="cli.main = lambda argv=None: 1 / 0")
    assert done.returncode == 1 and "ZeroDivisionError" in done.stderr and "atexit ran" in done.stdout
