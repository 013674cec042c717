"""How the ``covid-cxr`` program ends: as ``main`` says, and, in a process that joined a torchrun process group,
through ``distributed.end_rank`` (no interpreter finalization, where the group's leftover threads can abort the
process: see ``covid_cxr.train.distributed``). Each case runs in a fresh interpreter, since ``end_rank`` ends it."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

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


# without PYTHONUNBUFFERED (set where the suite may run), so that the child's stdout is a block-buffered pipe
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def _run(joined: bool, argv: list[str], patch: str = "") -> subprocess.CompletedProcess[str]:
    code = SCRIPT.format(joined=joined, argv=argv, patch=patch)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)


def test_the_program_and_python_m_go_through_entry() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "covid-cxr"]
    assert script.value == "covid_cxr.cli:entry"
    code = "import runpy; from covid_cxr.train import distributed; distributed._joined = True; " \
           "import atexit; atexit.register(print, 'atexit ran'); runpy.run_module('covid_cxr', run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", code, "exprot"], capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 2 and "unknown command 'exprot'" in done.stderr and "atexit ran" not in done.stdout


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


@pytest.mark.parametrize(("exit_with", "status", "said"), [("None", 0, ""), ("'no data here'", 1, "no data here"),
                                                          ("3", 3, ""), ("KeyboardInterrupt", 130, "")])
def test_a_rank_ends_as_python_would_on_sys_exit_and_interrupt(exit_with: str, status: int, said: str) -> None:
    """``sys.exit(None)`` is 0, ``sys.exit(text)`` says the text and is 1, an interrupt is 130, as without a group."""
    raise_it = "raise KeyboardInterrupt" if exit_with == "KeyboardInterrupt" else f"sys.exit({exit_with})"
    patch = f"def fake(argv=None):\n    {raise_it}\ncli.main = fake"
    done = _run(True, ["train"], patch=patch)
    assert done.returncode == status and said in done.stderr and "atexit ran" not in done.stdout


def test_a_bug_in_a_rank_prints_its_traceback_and_fails() -> None:
    done = _run(True, ["train"], patch="cli.main = lambda argv=None: 1 / 0")
    assert done.returncode == 1
    assert "ZeroDivisionError" in done.stderr and "Traceback" in done.stderr
    assert "atexit ran" not in done.stdout


def test_a_bug_outside_a_group_keeps_pythons_own_ending() -> None:
    done = _run(False, ["train"], patch="cli.main = lambda argv=None: 1 / 0")
    assert done.returncode == 1 and "ZeroDivisionError" in done.stderr and "atexit ran" in done.stdout


def test_a_rank_whose_peer_went_away_says_so_in_one_line() -> None:
    """When rank 0 died, rank 1 printed gloo's RuntimeError traceback ("Connection closed by peer ... GLHF!"),
    which buried rank 0's own message; it now says in one line why it stops, and fails."""
    gloo = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:31117. This is "
            "typically caused by a remote worker crashing.")
    patch = f"def fake(argv=None):\n    raise RuntimeError({gloo!r})\ncli.main = fake"
    done = _run(True, ["train"], patch=patch)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "another process of this torchrun launch ended, so this one stops too (Connection closed by peer)" in \
        done.stderr
