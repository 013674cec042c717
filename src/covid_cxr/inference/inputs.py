"""Turn what a user typed (files, folders, globs) into the list of files to predict.

A file named on the command line is always taken: its content, not its name, decides whether it
is a PNG, a JPEG or a DICOM. Inside folders (walked recursively) only files that look like images
are taken (:data:`IMAGE_SUFFIXES`, or no suffix at all, as many PACS exports name DICOMs), so a
``metadata.csv`` beside the images is not reported as a broken X-ray. A path that matches nothing
is not an exception: it comes back as a failure, like an unreadable file, so the rest still runs.
So does anything named like an image that is not a regular file (a folder called ``x.png``, a
pipe, a broken link): it is reported, never opened (reading a pipe would wait forever), never
silently dropped.

File names are whatever bytes the OS holds; Python hands names that are not UTF-8 over with
surrogate escapes; :func:`~covid_cxr.data.names.display_path` is how such a name is printed or written.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from covid_cxr.data.names import display_path

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic"})
_GLOB_CHARS = frozenset("*?[")


@dataclass
class Inputs:
    """Files to read, in a stable order, and the inputs that named nothing readable."""

    files: list[Path] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (what the user typed, reason)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path found, why it is not read)

    @property
    def failures(self) -> list[tuple[str, str]]:
        """Everything that will not be read, with the reason, names printable."""
        return [(display_path(p), reason) for p, reason in self.missing + self.refused]


def _named_like_image(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _is_candidate(path: Path) -> bool:
    return not path.name.startswith(".") and (path.suffix.lower() in IMAGE_SUFFIXES or path.suffix == "")


def not_a_file(path: Path) -> str | None:
    """Why ``path`` is not a regular file we may read (None when it is one)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else "no such file or folder"
    except OSError as exc:
        return f"cannot be examined ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not an image file"
    kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return f"{kind}, not an image file"


def _walk(folder: Path, refused: list[tuple[str, str]]) -> list[Path]:
    """Image candidates under ``folder``; folders named like images and other non-files go to ``refused``."""
    found = []
    for root, dirs, names in os.walk(folder):
        for d in sorted(dirs):
            if _named_like_image(Path(d)):
                refused.append((str(Path(root) / d), "a folder named like an image file; its contents are not read"))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _named_like_image(Path(d)))
        for n in sorted(names):
            path = Path(root) / n
            if not _is_candidate(path):
                continue
            reason = not_a_file(path)
            if reason is None:
                found.append(path)
            else:
                refused.append((str(path), reason))
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

    def take(path: Path, typed: bool) -> None:
        reason = not_a_file(path)
        if reason is None:
            add(path)
        elif path.is_dir() and (typed or not _named_like_image(path)):
            for f in _walk(path, out.refused):
                add(f)
        elif typed:
            out.missing.append((str(path), reason))
        else:
            out.refused.append((str(path), reason if not path.is_dir() else
                                "a folder named like an image file; its contents are not read"))

    for raw in paths:
        text = os.fspath(raw)
        path = Path(text)
        if path.exists() or path.is_symlink() or not any(c in text for c in _GLOB_CHARS):
            take(path, typed=True)
            continue
        matches = sorted(glob.glob(text, recursive=True))
        if not matches:
            out.missing.append((text, "the pattern matches no file"))
        for m in matches:
            take(Path(m), typed=False)
    return out
