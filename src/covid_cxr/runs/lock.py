"""Who is writing a run folder: the lock ``train`` holds for as long as it trains it.

The main process of ``covid-cxr train`` holds ``RUN/.train.lock`` from the moment it chooses (or
resumes) the folder until it returns. The operating system releases the lock when the process
ends, ``kill -9`` included, so a lock file left behind never blocks anything: only a live process
holds the lock. With it:

- a second ``train`` (``--resume RUN`` while RUN still trains, or two new runs given the same
  ``--name``) is refused instead of both writing best.pt, last.pt and log.csv;
- ``calibrate`` rewrites best.pt in place, so it is refused while RUN trains (a later best epoch
  would replace the calibrated file, or calibrate would put back the older weights it read over
  the newer best.pt); it holds the lock while it works, so no training starts under it;
- commands that only read a run (``evaluate``, ``audit``, int8 calibration) say that best.pt may
  still change: their results name the file they read (its sha256), so none is wrong, only stale.

The lock is :mod:`filelock`'s (``flock`` on POSIX, ``msvcrt.locking`` on Windows), the lock torch
and Hugging Face use for their caches.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from covid_cxr.errors import DataError

LOCK_NAME = ".train.lock"
_NO_LOCK_ERRNOS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP})
_held: dict[Path, int] = {}  # run folders this process holds the lock of, with how many holds (nested holds)


class RunBusyError(DataError):
    """Another process is training the run folder."""


def lock_path(root: str | Path) -> Path:
    """The lock file of the run folder ``root``."""
    return Path(root) / LOCK_NAME


def _key(root: str | Path) -> Path:
    return Path(root).resolve()


@contextlib.contextmanager
def hold_run(root: str | Path, purpose: str, fix: str) -> Iterator[None]:
    """Hold ``root``'s lock for the ``with`` block; refuse with :class:`RunBusyError` when a live process holds it.

    ``purpose`` says what the caller is about to do and ``fix`` what the user can do instead, for
    the message. A process that holds the lock already holds it again without refusing itself
    (a second ``flock`` of the file in one process would). Where the file system cannot lock (some
    network mounts), a warning says so and the block runs unguarded.
    """
    key = _key(root)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    lock: FileLock | None = _file_lock(lock_path(root))
    try:
        lock.acquire()  # type: ignore[union-attr]
    except Timeout:
        raise RunBusyError(
            f"{root} is being trained by another process (it holds {lock_path(root)}); {purpose} now would clash "
            f"with it: {fix}"
        ) from None
    except OSError as exc:
        if not _no_locks(exc):
            raise DataError(f"{lock_path(root)}: cannot create the run folder's lock ({exc}); make {root} "
                            "writable, or work on a copy of the run in a folder you can write") from exc
        print(f"warning: {lock_path(root)}: this file system cannot lock files ({exc}); going on without the "
              f"lock, so another process working on {root} at the same time would not be noticed", file=sys.stderr)
        lock = None
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        if lock is not None:
            lock.release()


def being_trained(root: str | Path) -> bool:
    """True when another live process holds ``root``'s lock (a ``train`` of it is running).

    Never creates a lock file (a run folder may be read-only): no file means no training ever
    held one. A lock file this process may not open (a read-only run), or a file system that
    cannot lock, counts as not held.
    """
    path = lock_path(root)
    if _key(root) in _held or not path.is_file():
        return False
    lock = _file_lock(path)
    try:
        lock.acquire()
    except Timeout:
        return True
    except PermissionError:
        return False  # a lock file we may not open: we cannot tell, and the answer only decides a note
    except OSError as exc:
        if _no_locks(exc):
            return False  # no process can hold a lock here, a training included
        raise
    lock.release()
    return False


def _file_lock(path: Path) -> FileLock:
    """The run folder's lock, never waiting (a training holds it for hours). Where ``flock`` is missing,
    filelock would fall back to a lock that is the file's existence, which a killed training leaves held
    for ever; without the fallback the missing ``flock`` is an ENOSYS, which :func:`_no_locks` knows."""
    return FileLock(path, timeout=0, fallback_to_soft=False)


def _no_locks(exc: OSError) -> bool:
    """Whether ``exc`` says the file system cannot lock files (some network mounts): ENOLCK, ENOSYS or EOPNOTSUPP."""
    return exc.errno in _NO_LOCK_ERRNOS


def note_if_training(root: str | Path, what: str) -> None:
    """Print a note on stderr when ``root`` is being trained: ``what`` (e.g. "this evaluation") may go stale."""
    if being_trained(root):
        print(f"note: {root} is still being trained: its best.pt may be replaced by a better epoch after {what}, "
              "which names the file it read (sha256); run it again when training ends", file=sys.stderr)
