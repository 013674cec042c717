"""Shared test set-up: the path to the real dataset fixtures.

The fixtures (real metadata and label files, the authors' split files, the paper's tables,
one real RSNA DICOM) lie in ``../shared/fixtures`` beside the checkout; ``.ci/run`` passes the
path in ``COVID_CXR_FIXTURES``. Where neither exists, tests that need them are skipped with
a reason that says how to provide them.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from covid_cxr.cpus import physical_cores  # light (no torch): imported before torch is

# Keras (a test-only dependency, for parity tests) must run on the torch backend: no TensorFlow.
# Set before any test module imports keras, whatever the collection order.
os.environ.setdefault("KERAS_BACKEND", "torch")

REPO = Path(__file__).resolve().parents[1]

# The suite runs in parallel (pyproject's addopts: pytest-xdist, one worker per test file at a time): 9 min
# against 15 in one process on 2 cores with PyTorch capped to AVX2 (benchmarks/RESULTS.md). A worker gets
# its share of the cores, so that workers do not run full-size thread pools on the same cores (OpenMP
# threads spin while they wait for each other). Set here, before any test module imports torch; a user's own
# COVID_CXR_THREADS / OMP_NUM_THREADS win.
GIB_PER_WORKER = 5  # the largest worker (the small demo) peaked at 4.2 GB resident
MAX_WORKERS = 8  # beyond this the small demo, one test on one worker, is the run's length anyway


def _worker_share() -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if workers > 1:
        share = str(max(1, physical_cores() // workers))
        os.environ.setdefault("COVID_CXR_THREADS", share)
        os.environ.setdefault("OMP_NUM_THREADS", share)


_worker_share()


def _memory_gib() -> float:
    """Physical memory, capped by the cgroup's limit (a container's memory.max)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        total = min(total, int(limit))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit ("max"), or no such file
    return total / 2**30


def pytest_report_header(config: pytest.Config) -> str:
    """The CPU the suite runs on (its kind decides the bf16, fp32 and int8 paths the tests take)."""
    from covid_cxr.inference.int8 import cpu_features, describe_cpu

    return f"cpu: {describe_cpu(cpu_features())}"


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per physical core this process may use, as many as memory holds, at most 8."""
    return max(1, min(physical_cores(), int(_memory_gib() // GIB_PER_WORKER), MAX_WORKERS))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files marked ``first`` are handed out first: started last, the small demo alone set the run's length."""
    items.sort(key=lambda item: item.get_closest_marker("first") is None)  # stable: the rest keep their order


def _fixtures_dir() -> Path | None:
    env = os.environ.get("COVID_CXR_FIXTURES")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "fixtures")
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    return None


USER_CACHE = os.environ.get("COVID_CXR_CACHE")  # a cache the user set for the run is theirs to keep

# Names of the tests that failed, by test file: their tmp_path folders are kept for a look (pyproject's
# tmp_path_retention_policy = "failed"), the rest of the file's folders go when the file is done.
_FAILED: dict[str, set[str]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    if outcome.get_result().failed:
        _FAILED.setdefault(str(item.path), set()).add(_tmp_path_name(item.name))


def _tmp_path_name(test_name: str) -> str:
    """The start of the folder name pytest gives a test's ``tmp_path`` (``_pytest.tmpdir._mk_tmp``)."""
    return re.sub(r"[\W]", "_", test_name)[:30]


@pytest.fixture(scope="module", autouse=True)
def _module_scratch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each test file's folders are removed when its last test ends, and its ONNX exports go to its own cache.

    pytest removes a passed test's ``tmp_path`` at once, but folders a module-scoped fixture makes (prepared
    data, trained runs: full-size checkpoints of 180 MB each) would stay until the session ends, and the cache
    that ``--backend auto`` fills would grow by every checkpoint any test exported. Together they peaked at
    9.6 GB on two workers, and CI ran out of disk (benchmarks/RESULTS.md, "The suite's disk use").
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    if USER_CACHE is None:
        os.environ["COVID_CXR_CACHE"] = str(tmp_path_factory.mktemp("covid-cxr-cache"))
    yield
    if USER_CACHE is None:
        os.environ.pop("COVID_CXR_CACHE", None)
    failed = _FAILED.get(str(request.path), set())
    for path in set(base.iterdir()) - before:
        if not any(path.name.startswith(name) for name in failed):
            shutil.rmtree(path, ignore_errors=True)


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
