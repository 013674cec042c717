"""The project's own promises: README commands equal CI's, the CLI answers, the shared contracts hold."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from covid_cxr import __version__
from covid_cxr.errors import CheckpointError, ConfigError
from covid_cxr.labels import (
    CLASSES,
    check_classes,
    covid_chestxray_class,
    normalize_label,
)
from covid_cxr.preprocess import Preprocessing, to_model_input
from covid_cxr.runs.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from tests.conftest import REPO


def _readme_commands() -> tuple[str, str]:
    text = (REPO / "README.md").read_text()
    setup = re.search(r"One command installs everything.*?```bash\n(.+?)\n```", text, re.S)
    test = re.search(r"One command runs the tests:\s*```bash\n(.+?)\n```", text, re.S)
    assert setup and test, "README lost its set-up or test command block"
    return setup.group(1).strip(), test.group(1).strip()


def test_ci_runs_exactly_the_readme_commands() -> None:
    setup, test = _readme_commands()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert setup in ci_lines
    assert test in ci_lines


def test_cli_version_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "covid_cxr", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"covid-cxr {__version__}"
    out = subprocess.run([sys.executable, "-m", "covid_cxr", "--help"], capture_output=True, text=True, check=True)
    assert "usage: covid-cxr" in out.stdout


def test_label_spellings() -> None:
    assert normalize_label("COVID-19") == "covid"
    assert normalize_label(" Pneumonia ") == "pneumonia"
    assert normalize_label("No Finding") == "normal"
    with pytest.raises(ValueError, match="unknown class label 'ARDS' in x.csv row 3"):
        normalize_label("ARDS", where="x.csv row 3")
    with pytest.raises(ValueError, match=r"unknown class label 'Pneumnia' \(did you mean 'pneumonia'\?\); valid labels"):
        normalize_label("Pneumnia")
    assert check_classes(["COVID-19", "normal", "pneumonia"]) == ("covid", "normal", "pneumonia")
    with pytest.raises(ValueError):
        check_classes(["covid", "normal"])


@pytest.mark.parametrize(
    ("finding", "expected"),
    [
        ("COVID-19", "covid"),
        ("COVID-19, ARDS", "covid"),
        ("Pneumonia/Viral/COVID-19", "covid"),
        ("SARS", "pneumonia"),
        ("Pneumonia/Viral/SARS", "pneumonia"),
        ("Pneumonia/Fungal/Pneumocystis", "pneumonia"),
        ("Streptococcus", "pneumonia"),
        ("Pneumonia/Bacterial/Streptococcus", "pneumonia"),
        ("No Finding", "normal"),
        ("Legionella", None),
        ("Pneumonia/Bacterial/Legionella", None),
        ("ARDS", None),
        ("todo", None),
        ("", None),
        (None, None),
    ],
)
def test_covid_chestxray_findings(finding: str | None, expected: str | None) -> None:
    assert covid_chestxray_class(finding) == expected


def test_preprocessing_scalings() -> None:
    batch = torch.tensor([[[0, 255], [51, 127]]], dtype=torch.uint8)
    unit = to_model_input(batch, Preprocessing(image_size=300, scaling="unit"))
    sym = to_model_input(batch, Preprocessing(image_size=300, scaling="symmetric"))
    assert unit.shape == (1, 3, 2, 2)
    assert torch.allclose(unit[0, :, 0, 1], torch.ones(3))
    assert torch.allclose(unit[0, 0], unit[0, 2])
    assert sym.min().item() == -1.0 and sym.max().item() == 1.0
    assert to_model_input(batch, Preprocessing(), channels_last=True).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match="scaling must be one of"):
        Preprocessing(scaling="imagenet")
    with pytest.raises(ConfigError, match="image_size must be an integer >= 71"):
        Preprocessing(image_size=32)


def test_checkpoint_round_trip_and_errors(tmp_path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    ckpt = Checkpoint("concat", CLASSES, Preprocessing(image_size=128, scaling="symmetric"), state, meta={"fold": 2})
    path = save_checkpoint(ckpt, tmp_path / "sub" / "model.pt")
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"], "a temporary file was left behind"
    back = load_checkpoint(path)
    assert back.network == "concat" and back.classes == CLASSES
    assert back.preprocessing == Preprocessing(image_size=128, scaling="symmetric")
    assert torch.equal(back.model_state["w"], state["w"])
    assert back.meta["fold"] == 2 and back.meta["covid_cxr_version"] == __version__

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a covid-cxr checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")  # a torch file, but not ours: import-keras would refuse it too
    with pytest.raises(CheckpointError, match="other.pt: a PyTorch file, but not a covid-cxr checkpoint") as caught:
        load_checkpoint(tmp_path / "other.pt")
    assert "import-keras other.pt" not in str(caught.value)


def test_runtime_choices() -> None:
    from covid_cxr.runtime import choose_runtime

    rt = choose_runtime("cpu", "fp32", channels_last=False)
    assert rt.device.type == "cpu" and rt.dtype == torch.float32
    assert "precision=fp32" in rt.describe()
    with pytest.raises(ConfigError, match="fp16 is for GPUs"):
        choose_runtime("cpu", "fp16")
    with pytest.raises(ConfigError, match="precision must be one of"):
        choose_runtime("cpu", "int4")
    assert choose_runtime("cpu", "auto").precision in ("fp32", "bf16")


@pytest.mark.parametrize(
    ("flags", "env", "native"),
    [
        ({"avx2", "fma"}, {}, False),  # Zen 2
        ({"avx2", "avx512f", "avx512_bf16"}, {}, True),  # Zen 4
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, {}, True),  # Sapphire Rapids
        ({"avx2", "avx512f", "amx_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True),
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),  # run as an AVX2 CPU
        ({"avx2", "avx512f", "avx512_bf16"}, {"DNNL_MAX_CPU_ISA": "avx512_core_vnni"}, False),
    ],
)
def test_bf16_is_native_only_where_the_cpu_and_the_isa_caps_allow_it(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], env: dict[str, str], native: bool
) -> None:
    """``auto`` picks bf16 only where it is computed in hardware: an ISA cap makes the CPU an older one."""
    from covid_cxr import runtime

    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    # oneDNN reads the real CPU, and on an AVX2-only one (the CPU running this suite, perhaps) it says no: stand it
    # in for the CPU of the flags; a oneDNN that says no is honoured whatever the flags.
    monkeypatch.setattr(runtime, "_onednn_supports_bf16", lambda: bool(flags & {"avx512_bf16", "amx_bf16"}))
    assert runtime.cpu_has_native_bf16() is native
    with monkeypatch.context() as m:
        m.setattr(runtime, "_onednn_supports_bf16", lambda: False)
        assert not runtime.cpu_has_native_bf16()
    assert runtime.choose_runtime("cpu", "auto").precision == ("bf16" if native else "fp32")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert not runtime.cpu_has_native_bf16()
    assert runtime.bf16_capped_by_env() == (f"{next(iter(env))}={next(iter(env.values())).upper()}" if env and not native
                                            else "ATEN_CPU_CAPABILITY=avx2")
