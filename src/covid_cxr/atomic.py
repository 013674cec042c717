"""The one atomic file writer, and the one JSON reader.

Every file the package writes for keeps (run.json, metrics.json, audit results, model cards,
checkpoints, exported models, downloaded weights) goes through :func:`replace_atomically` (a writer
given a file object) or :func:`atomic_path` (a writer that wants a file name: ``onnx.save``, ONNX
Runtime's quantizer): a temporary file in the target's folder, flushed and fsynced, then renamed
over the target, and the folder fsynced, so a crash at any moment leaves either the old file or the
new one, never half of either.

The written file gets the permissions a plain ``open()`` would give it (``0o666`` less the umask), or
keeps those of the file it replaces: ``mkstemp`` creates its file ``0o600`` and a rename keeps that,
which would leave an exported model unreadable to the service user that runs it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO

from covid_cxr.errors import DataError

PathLike = str | os.PathLike[str]

_UMASK_LOCK = threading.Lock()


def current_umask(status: Path = Path("/proc/self/status")) -> int:
    """The process's umask, read when a file is written (a program may change it after import).

    Linux reports it in ``/proc/self/status`` (since 4.7): a read with no side effect. Elsewhere the
    only way to read it is to set it and set it back; that happens under a lock, so two writers here
    never see each other's temporary value, and the temporary value is ``0o077`` so a file another
    thread creates in that instant is at worst too private, never too open.
    """
    try:
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _give_mode(tmp: PathLike, target: Path) -> None:
    """Give ``tmp`` the mode of the ``target`` it will replace, or that of a new file from ``open()``."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    os.chmod(tmp, mode)


_RANDOM_CHARACTERS = 8  # what tempfile.mkstemp puts between its prefix and suffix (CPython's name sequence)


def _temporary(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """An open temporary file beside ``path``, named ``.NAME.<random>SUFFIX``: hidden, and told apart by its name."""
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)


def temporary_name_room(suffix: str = ".tmp") -> int:
    """How many bytes the temporary file's name adds to the name of the file it becomes: a name that must be
    written atomically has to leave that much of the file system's limit free."""
    return len("..") + _RANDOM_CHARACTERS + len(suffix)


def replace_atomically(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temporary binary file beside ``path``, make it durable, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            _give_mode(tmp, path)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextmanager
def atomic_path(path: PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file name beside ``path`` to write to; when the block ends without an error the file is
    made durable and renamed to ``path``, otherwise it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = _temporary(path, suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _give_mode(tmp, path)  # after the writer: one that recreates the file would have dropped an earlier mode
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; not every platform lets a folder be opened, which is then skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return replace_atomically(path, lambda fh: fh.write(data))


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode(encoding))


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON: NaN and infinities become null (JSON has neither), numpy scalars Python numbers.

    Anything else JSON cannot hold (a path, a date) is written as its text.
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        value = value.item()  # a numpy or torch scalar, without importing either
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def write_json(path: PathLike, data: Any, *, indent: int = 2) -> Path:
    """Write ``data`` as JSON (made finite and serialisable by :func:`jsonable`) to ``path`` atomically."""
    return write_text(path, json.dumps(jsonable(data), indent=indent) + "\n")


def read_json(path: PathLike, *, fix: str = "write it again") -> Any:
    """The JSON in ``path``; a missing, unreadable or malformed file raises :class:`DataError` naming ``fix``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file; {fix}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); {fix}") from exc


def read_json_object(path: PathLike, *, what: str = "a JSON object", fix: str = "write it again") -> dict[str, Any]:
    """:func:`read_json` for files that hold one object (run.json, metrics.json, audit results)."""
    data = read_json(path, fix=fix)
    if not isinstance(data, dict):
        raise DataError(f"{path}: not {what} (expected a JSON object); {fix}")
    return data


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file, read in chunks: identifies exactly which weights a result or a card belongs to."""
    with open(path, "rb") as fh:
        return stream_sha256(fh)


def stream_sha256(fh: BinaryIO) -> str:
    """Hex sha256 of what is left to read in the open binary file ``fh``, read in chunks."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def signals_held(*signums: int, redeliver: bool) -> Iterator[list[int]]:
    """Hold signals (SIGINT, SIGTERM) back over a step that must not stop half-way; the list yielded records
    those that came. ``redeliver``: raise them again once the step is done, so that they act as they would have
    (a Ctrl-C's KeyboardInterrupt, a SIGTERM's exit), only after it; else the caller says what they did.

    A Ctrl-C inside ``torch.save`` of a 276 MB checkpoint ended training with a RuntimeError traceback from the zip
    writer ("unexpected pos"), exit status 1, where the run promises "interrupted" and 130. Only the main thread
    can set a handler; elsewhere (and where Python does not own a signal's handler) nothing is held.
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {signum: signal.getsignal(signum) for signum in signums}
    held = [signum for signum, handler in previous.items() if handler is not None]
    for signum in held:
        signal.signal(signum, lambda number, frame: caught.append(number))
    try:
        yield caught
    finally:
        for signum in held:
            signal.signal(signum, previous[signum])
        if redeliver:
            for signum in dict.fromkeys(caught):  # once each, in the order they came
                signal.raise_signal(signum)
