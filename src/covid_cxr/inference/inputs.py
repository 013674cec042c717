"""Turn what a user typed (files, folders, globs) into the list of files to predict.

A file named on the command line is always taken: its content, not its name, decides whether it
is a PNG, a JPEG, a TIFF or a DICOM. Inside folders (walked recursively, links to folders followed
once) only files that look like images are taken (an image suffix in any case, no suffix, or the
all-digit suffix of a DICOM named by its UID: :func:`~covid_cxr.data.sources.folder.scan_folder`),
so a ``metadata.csv`` beside the images is not reported as a broken X-ray. A path that matches
nothing is not an exception: it comes back as a failure, like an unreadable file, so the rest still
runs. So does anything named like an image that is not a regular file (a folder called ``x.png``, a
pipe, a broken link, a link loop): it is reported, never opened (reading a pipe would wait forever),
never silently dropped. Hidden files, macOS AppleDouble files (``._x.png``) and DICOMDIR indexes are
passed over with a note: they are never images, and hospital exports and macOS archives are full of them.

The model may be named by its run folder, as ``evaluate``, ``calibrate`` and ``model-card`` take it:
:func:`model_file` turns ``runs/concat-fold1`` into its ``best.pt``.

File names are whatever bytes the OS holds; Python hands names that are not UTF-8 over with
surrogate escapes; :func:`~covid_cxr.data.names.display_path` is how such a name is printed or written.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from covid_cxr.data.names import display_path
from covid_cxr.data.sources.folder import (
    FOLDER_NAMED_LIKE_IMAGE,
    IMAGE_SUFFIXES,
    named_like_image,
    not_a_file,
    scan_folder,
    skipped_notes,
)
from covid_cxr.errors import CheckpointError
from covid_cxr.runs.folder import RunFolder

_GLOB_CHARS = frozenset("*?[")


def model_file(path: Path) -> Path:
    """The model file ``path`` names: itself, or for a run folder (one holding run.json) its best.pt. A folder
    that is no run folder, or a run without a best.pt yet, is refused with what to give instead."""
    if not path.is_dir():
        return path
    run = RunFolder(path)
    if not run.exists():
        raise CheckpointError(f"{display_path(path)}: a folder, not a run folder (no run.json); give a run folder, "
                              "a .pt checkpoint or an exported .onnx model")
    return run.best_or_hint()


@dataclass
class Inputs:
    """Files to read, in a stable order, the inputs that named nothing readable, and what folders held that
    is passed over on purpose (hidden and AppleDouble files, DICOMDIR indexes: notes, not failures)."""

    files: list[Path] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (what the user typed, reason)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path found, why it is not read)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path found, kind of SKIPPED_KINDS)
    folders: list[Path] = field(default_factory=list)  # the folders walked

    @property
    def failures(self) -> list[tuple[str, str]]:
        """Everything that will not be read, with the reason, names printable."""
        return [(display_path(p), reason) for p, reason in self.missing + self.refused]

    @property
    def notes(self) -> list[str]:
        """One line per kind of file passed over, names printable."""
        return skipped_notes([(display_path(p), kind) for p, kind in self.skipped])

    def nothing_found(self) -> bool:
        """True when the inputs name no file to read and nothing that failed: folders without one image file."""
        return not self.files and not self.missing and not self.refused

    def nothing_found_message(self, typed: Iterable[str | os.PathLike[str]]) -> str:
        """Where no image file was found, what was looked for, and what the folders held instead."""
        where = ", ".join(display_path(Path(p)) for p in typed)
        others = [f for folder in self.folders for f in _files_under(folder)]
        held = f"{len(others)} other file{'s' if len(others) != 1 else ''} passed over"
        if others:
            held += ": " + ", ".join(display_path(f) for f in others[:3]) + (", ..." if len(others) > 3 else "")
        return (f"no image files found in {where} (looked for {' '.join(sorted(IMAGE_SUFFIXES))} in any case, files "
                f"without a suffix and DICOMs named by their UID; {held}); give the folder that holds the X-rays")


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
        elif path.is_dir() and (typed or not named_like_image(path.name)):
            out.folders.append(path)
            scan = scan_folder(path)
            out.refused += scan.refused
            out.skipped += scan.skipped
            for f in scan.files:
                add(f)
        elif typed:
            out.missing.append((str(path), reason))
        else:
            out.refused.append((str(path), reason if not path.is_dir() else FOLDER_NAMED_LIKE_IMAGE))

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


def _files_under(folder: Path) -> list[Path]:
    """Every file under ``folder`` (links to folders not followed), in sorted order."""
    return sorted(Path(root) / name for root, _, names in os.walk(folder) for name in names)
