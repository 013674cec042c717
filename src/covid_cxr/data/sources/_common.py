"""Helpers the source adapters share: reading a CSV with the columns it must have, and finding the files it lists.

CSVs come from other hospitals' spreadsheets as they were saved: UTF-8 with or without a byte-order
mark, UTF-16 ("Unicode text"), or the Windows code page Excel writes (cp1252, a superset of Latin-1
for letters such as é); separated by commas, or by semicolons or tabs where the comma is the decimal
mark; with CRLF line ends and blank lines. All of these are read; column names match whatever their
case and surrounding spaces. File names written on Windows (``images\\covid\\a.png``) are found as
the same names with ``/`` (:func:`listed_file`).
"""

from __future__ import annotations

import codecs
import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from covid_cxr.data.names import windows_absolute
from covid_cxr.errors import DataError

SEPARATORS = ",;\t"


def _decode(raw: bytes, path: Path, fix: str) -> str:
    """The text of a CSV file: UTF-16 by its byte-order mark, else UTF-8 (a mark dropped), else cp1252."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encodings: tuple[str, ...] = ("utf-16",)
    else:
        encodings = ("utf-8-sig", "cp1252")
    for encoding in encodings:
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise DataError(f"{path} is neither UTF-8 nor Windows (cp1252) text; save it as 'CSV UTF-8'; {fix}")


def _separator(text: str) -> str:
    """The separator of the header line, by :class:`csv.Sniffer` among comma, semicolon and tab; else a comma."""
    header = text.lstrip("\r\n").partition("\n")[0]
    try:
        return csv.Sniffer().sniff(header, delimiters=SEPARATORS).delimiter
    except csv.Error:
        return ","


def read_table(path: Path, required: tuple[str, ...], *, fix: str) -> pd.DataFrame:
    """Read a CSV as text; a missing file or column raises :class:`DataError` naming it and ``fix``."""
    if not path.is_file():
        raise DataError(f"{path} not found; {fix}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc}); {fix}") from None
    text = _decode(raw, path, fix)
    if not text.strip():
        raise DataError(f"{path} is empty; it needs a header row and one row per entry; {fix}")
    try:
        frame = pd.read_csv(io.StringIO(text), sep=_separator(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path} is not a readable CSV file ({exc}); {fix}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    by_lower = {c.lower(): c for c in frame.columns}
    frame = frame.rename(columns={by_lower[c.lower()]: c for c in required
                                  if c not in frame.columns and c.lower() in by_lower})
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path} lacks the column(s) {', '.join(missing)} (it has {', '.join(frame.columns[:12])}); {fix}"
        )
    return frame


def listed_file(base: Path, name: str) -> tuple[str, Path]:
    """A file name a list gives relative to ``base``: (the name with ``/`` separators, normalised; its path).

    A name written on Windows (``images\\covid\\a.png``, ``.\\a.png``) reads as the same name with ``/``,
    so it finds the same file and gives the same image id; a file of the literal name is kept when it exists
    (a Linux name may hold ``\\``). ``./a.png`` and ``a.png`` are one file. A Windows absolute name
    (``C:\\x``, ``\\\\server\\x``) names no file here: its path stays the literal name under ``base``,
    which reading refuses with the fix, rather than ``\\x`` turning into a path at this file system's root.
    """
    name = name.strip()
    if "\\" not in name or os.path.lexists(base / name):
        rel = os.path.normpath(name)
        return rel, base / rel
    rel = os.path.normpath(name.replace("\\", "/"))
    return rel, base / (name if windows_absolute(name) else rel)


def windows_absolute_note(where: Path, names: Iterable[str], paths: Iterable[Path]) -> list[str]:
    """A note naming ``where`` when it lists files by Windows absolute paths that do not exist here."""
    found = [n.strip() for n, p in zip(names, paths) if windows_absolute(n) and not os.path.lexists(p)]
    if not found:
        return []
    note = (f"{where}: {len(found)} files are listed by Windows absolute paths (e.g. {found[0]}), which name no file "
            f"on this system; list them by their paths relative to {where.name} instead")
    return [note]
