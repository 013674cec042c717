"""File names as text: any name the OS can hold, printed and written without an encoding error.

On POSIX a file name is bytes; Python hands names that are not UTF-8 over as ``str`` with
surrogate escapes, which open the file fine but make every UTF-8 encoder (the terminal, a CSV,
a hash) raise. Reports, rows and messages go through :func:`printable` (undecodable bytes become
``\\xNN``); keys that must tell two files apart go through :func:`name_bytes`.
"""

from __future__ import annotations

import os


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
