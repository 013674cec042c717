"""Write ``src/covid_cxr/models/keras_backbones.json``: Keras' own backbones, layer by layer.

Not a benchmark: it sits beside them because, like them, it needs Keras, which the package never
imports (a test-only dependency). ``covid-cxr import-keras`` compares a file's backbones with this
reference (:mod:`covid_cxr.models.keras_architecture`); tests/test_keras_import.py regenerates it
with the installed Keras and checks that it equals the shipped file. Any Keras backend will do (the
configs do not depend on it); torch is the default here, as in the tests.

    python -m benchmarks.keras_reference [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from covid_cxr.atomic import write_text
from covid_cxr.models.keras_architecture import APPLICATIONS, OUTPUT_LAYERS, REFERENCE_FILE, describe_backbone
from covid_cxr.models.keras_reader import model_graph

ABOUT = (
    "Xception and ResNet50V2 as keras.applications builds them (include_top=False): per layer its class, the "
    "settings that change its outputs and the layers it reads ('Class#k': a layer Keras names itself). "
    "Written by python -m benchmarks.keras_reference; read by covid_cxr.models.keras_architecture."
)


def build_reference() -> dict[str, Any]:
    """The reference, from the installed Keras."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras  # deferred: a test-only dependency, and it must see the backend chosen above

    backbones = {}
    for backbone, application in APPLICATIONS.items():
        model = getattr(keras.applications, application)(include_top=False, weights=None)
        graph = model_graph(json.loads(model.to_json()))  # the config as a .keras file holds it
        backbones[backbone] = describe_backbone(graph, OUTPUT_LAYERS[backbone], application)
    return {"about": ABOUT, "backbones": backbones}


def reference_text(data: dict[str, Any]) -> str:
    """The reference as JSON with one layer a line, so a change reads as a short diff."""
    lines = ["{", f' "about": {json.dumps(data["about"])},', ' "backbones": {']
    for index, (name, entry) in enumerate(data["backbones"].items()):
        lines += [f"  {json.dumps(name)}: {{",
                  f'   "application": {json.dumps(entry["application"])},',
                  f'   "output": {json.dumps(entry["output"])},',
                  '   "layers": [']  # fmt: skip
        lines += [f"    {json.dumps(layer)}," for layer in entry["layers"]]
        lines[-1] = lines[-1].rstrip(",")
        lines += ["   ]", "  }" + ("," if index < len(data["backbones"]) - 1 else "")]
    return "\n".join([*lines, " }", "}"]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REFERENCE_FILE, help="file to write (default: the package's)")
    args = parser.parse_args(argv)
    write_text(args.out, reference_text(build_reference()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
