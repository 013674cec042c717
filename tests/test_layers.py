"""The package's dependencies point down: a module imports only its own package or a lower layer.

The layers, top to bottom (README, "Layout"): the command line; the demo pipeline; the report; deployment;
audits; evaluation; training; inference; the run folder; models, data, synthetic data and CAMs (siblings that
never import each other); runtime, preprocessing, the operating point and statistics; the settings; the
foundations (formatting, the atomic writer, the progress bar, option values, network entries, what a model file
is); labels; errors. The test reads every module's imports (top-level and deferred alike) with ``ast``, so it needs
no heavy import and holds on every machine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "covid_cxr"

# Top to bottom. Each entry is the set of top-level names (packages or modules of covid_cxr) in one layer.
LAYERS: tuple[frozenset[str], ...] = tuple(frozenset(names) for names in (
    {"__main__", "cli"},
    {"pipeline"},
    {"report"},
    {"deploy"},
    {"audit"},
    {"evaluate"},
    {"train"},
    {"inference"},
    {"runs"},
    {"models", "data", "synth", "gradcam"},
    {"runtime", "perf", "preprocess", "operating_point", "stats"},
    {"config"},
    {"fmt", "atomic", "progress", "choices", "networks", "cpus", "model_files"},
    {"labels"},
    {"errors", "__init__"},
))
# Layers whose members are independent siblings: a member may not import another member of its layer.
SIBLINGS = {frozenset({"models", "data", "synth", "gradcam"})}
# Within the foundations and settings rows, these imports are the allowed exceptions (lower-level helpers).
ALLOWED_SAME_ROW = {("__main__", "cli"), ("runtime", "perf"), ("config", "runtime"), ("config", "preprocess"), ("gradcam", "models"),
                    ("operating_point", "stats")}


def _layer(name: str) -> int:
    for index, members in enumerate(LAYERS):
        if name in members:
            return index
    raise AssertionError(f"covid_cxr.{name} is in no layer of tests/test_layers.py: add it where it belongs")


def _module_or_root(name: str) -> str:
    """``from covid_cxr import X``: X is a module or package of ours, or a name defined in ``__init__``."""
    return name if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file() else "__init__"


def _top_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, covid_cxr top-level name) for every import of the package in ``path``."""
    return _imports_in(path.read_text(), path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])


def _imports_in(source: str, package: tuple[str, ...]) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
                if len(target) == 1:  # "from . import x" at the package root
                    target += [alias.name for alias in node.names][:1]
            else:
                target = (node.module or "").split(".")
                if target == ["covid_cxr"]:
                    target += [_module_or_root(alias.name) for alias in node.names][:1]
            if target[0] == "covid_cxr" and len(target) > 1:
                found.append((node.lineno, target[1]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "covid_cxr" and len(parts) > 1:
                    found.append((node.lineno, parts[1]))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer() -> None:
    for path in MODULES:
        _layer(_top_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    me = _top_name(path)
    mine = _layer(me)
    upward = []
    for line, name in _imports(path):
        if name == me:
            continue
        theirs = _layer(name)
        same_row_ok = (me, name) in ALLOWED_SAME_ROW
        if theirs < mine or (theirs == mine and not same_row_ok):
            upward.append(f"line {line}: covid_cxr.{name} (layer {theirs}) from layer {mine}")
    assert not upward, f"{path.relative_to(PACKAGE)} imports upward or sideways:\n" + "\n".join(upward)


def test_the_check_sees_every_spelling_of_an_import() -> None:
    """Absolute, relative, deferred and plain imports are all found, or the test above would pass on anything."""
    source = (
        "import covid_cxr.cli\n"
        "from covid_cxr import evaluate\n"
        "from covid_cxr import __version__\n"
        "from covid_cxr.audit.results import x\n"
        "from ..deploy import y\n"
        "from . import images\n"
        "def f():\n"
        "    from covid_cxr.report.report import z\n"
    )
    found = _imports_in(source, ("covid_cxr", "data"))
    assert found == [(1, "cli"), (2, "evaluate"), (3, "__init__"), (4, "audit"), (5, "deploy"), (6, "data"),
                     (8, "report")]
