"""Turn what a user typed (files, folders, globs) into the list of files to predict.

A file named on the command line is always taken: its content, not its name, decides whether it
is a PNG, a JPEG or a DICOM. Inside folders (walked recursively) only files that look like images
are taken (:data:`IMAGE_SUFFIXES`, or no suffix at all, as many PACS exports name DICOMs), so a
``metadata.csv`` beside the images is not reported as a broken X-ray. A path that matches nothing
is not an exception: it comes back as a failure, like an unreadable file, so the rest still runs.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic"})
_GLOB_CHARS = frozenset("*?[")


@dataclass
class Inputs:
    """Files to read, in a stable order, and the inputs that named nothing readable."""

    files: list[Path] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (what the user typed, reason)


def _is_candidate(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    suffix = path.suffix.lower()
    return suffix in IMAGE_SUFFIXES or suffix == ""


def _walk(folder: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / n for n in sorted(names) if _is_candidate(Path(n)))
    return found


def expand_inputs(paths: Iterable[str | os.PathLike[str]]) -> Inputs:
    """Expand files, folders (recursively) and globs; keep the first occurrence of each file."""
    out = Inputs()
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            out.files.append(path)

    for raw in paths:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            for f in _walk(path):
                add(f)
        elif path.is_file():
            add(path)
        elif any(c in text for c in _GLOB_CHARS):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                out.missing.append((text, "the pattern matches no file"))
            for m in matches:
                p = Path(m)
                if p.is_dir():
                    for f in _walk(p):
                        add(f)
                elif p.is_file():
                    add(p)
        else:
            out.missing.append((text, "no such file or folder"))
    return out
