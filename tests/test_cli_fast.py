"""The command line answers ``--help`` without loading the library: no verb module for the verb list, and
no torch for a verb's own parser. Checked in fresh interpreters, by what got imported (not by the clock,
which depends on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from covid_cxr.cli import VERBS, main

# Verbs whose parser may import torch: none. A verb added here must say why; a listed verb that becomes light
# fails the test, so the set can only shrink.
KNOWN_HEAVY: set[str] = set()

SHARED = {"evaluate": {"covid_cxr.cli.metrics"}, "cv": {"covid_cxr.cli.train"}}  # verbs that reuse another's options
HEAVY = ("torch", "numpy", "pandas", "onnxruntime", "fastapi", "matplotlib", "sklearn", "cv2")


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_lists_every_verb_without_importing_any() -> None:
    out = _python(
        "import contextlib, io, json, sys\n"
        "from covid_cxr.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "verbs = sorted(m for m in sys.modules if m.startswith('covid_cxr.cli.'))\n"
        "heavy = sorted(m for m in %r if m in sys.modules)\n"
        "print(json.dumps({'help': buf.getvalue(), 'verbs': verbs, 'heavy': heavy}))" % (HEAVY,)
    )
    seen = json.loads(out)
    assert seen["verbs"] == [] and seen["heavy"] == []
    listed = [line.split()[0] for line in seen["help"].splitlines() if line[:5].startswith("    ") and line[4:5].strip()]
    assert listed == list(VERBS)


@pytest.mark.parametrize("verb", list(VERBS))
def test_each_verb_help_answers_and_loads_only_its_module(verb: str) -> None:
    done = subprocess.run([sys.executable, "-m", "covid_cxr", verb, "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"usage: covid-cxr {verb}" in done.stdout
    out = _python(
        "import json, sys\n"
        "from covid_cxr.cli import build_parser\n"
        f"build_parser({verb!r})\n"
        "verbs = sorted(m for m in sys.modules if m.startswith('covid_cxr.cli.'))\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'verbs': verbs}))"
    )
    seen = json.loads(out)
    own = f"covid_cxr.cli.{verb.replace('-', '_')}"
    assert own in seen["verbs"] and set(seen["verbs"]) - {own} <= SHARED.get(verb, set())
    if verb in KNOWN_HEAVY:
        assert seen["torch"], f"{verb}'s parser no longer loads torch: take it out of KNOWN_HEAVY"
    else:
        assert not seen["torch"], f"building the {verb} parser imported torch; import the library inside run()"


def test_an_unknown_verb_is_answered_with_the_nearest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["exprot", "model.pt"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'exprot' (did you mean 'export'?)" in err and "predict" in err


def _predictions(path: Path) -> Path:
    rows = ["label,pred"] + [f"{c},{c}" for c in ("covid", "pneumonia", "normal") for _ in range(4)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_an_output_the_system_refuses_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An OSError writing an output (here --json naming a folder) was a traceback; now it is one line and status 2."""
    (tmp_path / "m.json").mkdir()
    assert main(["metrics", str(_predictions(tmp_path / "p.csv")), "--json", str(tmp_path / "m.json"),
                 "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("covid-cxr metrics: error: [Errno 21] Is a directory") and "m.json" in err
    assert "Traceback" not in err



def test_ctrl_c_while_the_verb_loads_is_an_interrupt_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Ctrl-C in the first second lands in the import of the verb's module, which ran outside main's handler."""

    def interrupted(name: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("covid_cxr.cli.importlib.import_module", interrupted)
    assert main(["predict", "model.onnx", "x.png"]) == 130
    assert capsys.readouterr().err == "covid-cxr predict: interrupted\n"


@pytest.mark.parametrize("verb", ["synth", "prepare", "train", "demo", "metrics", "audit"])
def test_a_negative_seed_is_refused_naming_the_option(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    """NumPy's "expected non-negative integer" reached the user without the option's name."""
    argv = {"audit": ["audit", "source", "data", "--seed", "-1"], "metrics": ["metrics", "p.csv", "--seed", "-1"]}
    with pytest.raises(SystemExit) as ended:
        main(argv.get(verb, [verb, "--seed", "-1"]))
    assert ended.value.code == 2
    assert "argument --seed: a seed is an integer >= 0; got '-1'" in capsys.readouterr().err
