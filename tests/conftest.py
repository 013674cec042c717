"""Shared test set-up: the path to the real dataset fixtures.

The fixtures (real metadata and label files, the authors' split files, the paper's tables,
one real RSNA DICOM) lie in ``../shared/fixtures`` beside the checkout; ``.ci/run`` passes the
path in ``COVID_CXR_FIXTURES``. Where neither exists, tests that need them are skipped with
a reason that says how to provide them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keras (a test-only dependency, for parity tests) must run on the torch backend: no TensorFlow.
# Set before any test module imports keras, whatever the collection order.
os.environ.setdefault("KERAS_BACKEND", "torch")

REPO = Path(__file__).resolve().parents[1]


def _fixtures_dir() -> Path | None:
    env = os.environ.get("COVID_CXR_FIXTURES")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "fixtures")
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    return None


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """ONNX exports that ``--backend auto`` caches go to a folder of this session, never the user's cache."""
    os.environ.setdefault("COVID_CXR_CACHE", str(tmp_path_factory.mktemp("covid-cxr-cache")))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    path = _fixtures_dir()
    if path is None:
        pytest.skip(
            "real dataset fixtures not found: set COVID_CXR_FIXTURES to the folder holding "
            "covid_chestxray/, rsna/, mr7495_splits/ and paper_tables/ (../shared/fixtures in the project checkout)"
        )
    return path


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave files a person may want to look at (screenshots, plots)."""
    path = Path(os.environ.get("COVID_CXR_TEST_ARTIFACTS", REPO / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path
