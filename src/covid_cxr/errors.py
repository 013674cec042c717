"""Errors a user can act on.

Every error a user can cause raises one of these (or plain ``ValueError`` /
``FileNotFoundError``) with a message that names the file and the fix. The command line
prints the message alone, without a traceback, and exits with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CovidCxrError(Exception):
    """Base class of the errors this package raises for bad input or bad settings."""


class DataError(CovidCxrError, ValueError):
    """A dataset, manifest, split or cache is missing, malformed or inconsistent."""


class ImageDecodeError(DataError):
    """An image file cannot be decoded (corrupt, truncated, not an image, too large)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(CovidCxrError, ValueError):
    """A setting has an unknown name or a value out of its valid range."""


class CheckpointError(CovidCxrError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit what it is used for."""


def did_you_mean(value: object, valid: Iterable[str]) -> str:
    """`` (did you mean 'concat'?)`` for the closest valid name, as Ultralytics answers a typo; else ``""``."""
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
