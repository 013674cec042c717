"""The atomic writer: files come out with the mode a plain open() gives, or keep the mode of the file they replace."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from covid_cxr.atomic import atomic_path, current_umask, write_bytes, write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_umask_is_read_without_changing_it(umask: int, tmp_path: Path) -> None:
    assert current_umask() == umask
    # Where /proc/self/status is missing (macOS, Windows), it is read by setting it and setting it back.
    assert current_umask(tmp_path / "no-such-status") == umask
    assert os.umask(umask) == umask  # still what the test set


def test_new_files_get_the_mode_open_would_give(umask: int, tmp_path: Path) -> None:
    plain = tmp_path / "plain.bin"
    with open(plain, "wb") as fh:
        fh.write(b"x")
    assert _mode(plain) == 0o666 & ~umask
    written = write_bytes(tmp_path / "model.onnx", b"onnx")
    assert _mode(written) == _mode(plain)
    with atomic_path(tmp_path / "quantized.onnx") as tmp:
        tmp.write_bytes(b"q")
    assert _mode(tmp_path / "quantized.onnx") == _mode(plain)
    assert write_text(tmp_path / "MODEL_CARD.md", "card").read_text() == "card"
    assert _mode(tmp_path / "MODEL_CARD.md") == _mode(plain)


def test_a_replaced_file_keeps_its_mode(umask: int, tmp_path: Path) -> None:
    target = tmp_path / "best.pt"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o640
    os.chmod(target, 0o604)

    def recreate(tmp: Path) -> None:  # a writer that deletes and recreates its file, as some libraries do
        tmp.unlink()
        tmp.write_bytes(b"newer")

    with atomic_path(target) as tmp:
        recreate(tmp)
    assert target.read_bytes() == b"newer" and _mode(target) == 0o604
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]  # no temporary file left behind


def test_the_temporary_names_room_is_what_the_writer_adds(tmp_path) -> None:
    """An overlay's name is shortened to leave this room under the file system's limit: it must be the real one."""
    from covid_cxr.atomic import atomic_path, temporary_name_room

    target = tmp_path / "scan.xception.png"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"x")
        assert len(tmp.name) - len(target.name) == temporary_name_room()
