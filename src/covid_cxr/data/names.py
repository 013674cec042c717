"""File names as text: any name the OS can hold, printed and written without an encoding error.

On POSIX a file name is bytes; Python hands names that are not UTF-8 over as ``str`` with
surrogate escapes, which open the file fine but make every UTF-8 encoder (the terminal, a CSV,
a hash) raise. Reports, rows and messages go through :func:`printable` (undecodable bytes become
``\\xNN``); keys that must tell two files apart go through :func:`name_bytes`.

Lists written on Windows (a labels CSV, a split file) name files with ``\\``; a relative one reads as
the same name with ``/``, but a Windows absolute one (:func:`windows_absolute`: ``C:\\data\\a.png``,
``\\\\server\\share\\a.png``) names no file on another system, which :func:`holds_windows_absolute`
lets a "file not found" say.
"""

from __future__ import annotations

import os
import re

_WINDOWS_ANCHOR = r"(?:[A-Za-z]:[\\/]|\\)"  # a drive and its root (C:\ or C:/), or a leading backslash (\\server, \x)


def name_bytes(text: str) -> bytes:
    """The bytes a name stands for (the OS's own bytes for a surrogate-escaped name)."""
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte produced
        return text.encode("utf-8", errors="backslashreplace")


def printable(text: str) -> str:
    """Text safe to print or write as UTF-8: bytes that are not UTF-8 become ``\\xNN`` escapes."""
    return name_bytes(text).decode("utf-8", errors="backslashreplace")


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` as printable text; a valid UTF-8 name comes back unchanged."""
    return printable(os.fspath(path))


def windows_absolute(name: str) -> bool:
    """True for a name written as a Windows absolute path: a drive (``C:\\x``, ``C:/x``) or a leading backslash
    (``\\\\server\\share\\x``, ``\\x``). No such name points at a file on Linux or macOS."""
    return re.match(_WINDOWS_ANCHOR, name.strip()) is not None


def holds_windows_absolute(path: str | os.PathLike[str]) -> bool:
    """True when some component of ``path`` starts as a Windows absolute path does (a list's ``C:\\x`` joined to the
    folder of the list): what a missing file's message explains."""
    return re.search(r"(?:^|/)" + _WINDOWS_ANCHOR, os.fspath(path)) is not None
