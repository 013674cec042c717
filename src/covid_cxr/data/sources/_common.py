"""Helpers the source adapters share: reading a CSV with the columns it must have, and finding the files it lists.

CSVs come from other hospitals' spreadsheets as they were saved: UTF-8 with or without a byte-order
mark, UTF-16 ("Unicode text"), or the Windows code page Excel writes (cp1252, a superset of Latin-1
for letters such as é); separated by commas, or by semicolons or tabs where the comma is the decimal
mark; with CRLF line ends and blank lines, and with a separator closing every row (one empty field more
than the header, as some spreadsheets export), and with Excel's ``sep=;`` hint as the first line. All of these are
read; every column a reader knows (required or optional) matches whatever its case, spaces, ``_`` and ``-``
(``Patient ID``, ``PatientID`` and ``patient-id`` are ``patient_id``). File names written on Windows
(``images\\covid\\a.png``) are found as the same names with ``/``, and a name in a CSV that is not UTF-8 is
also looked for as the CSV's own bytes, which is how Linux holds a name that is not UTF-8 (:func:`listed_file`).
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from covid_cxr.data.names import windows_absolute
from covid_cxr.errors import DataError

SEPARATORS = ",;\t"


def _decode(raw: bytes, path: Path, fix: str) -> tuple[str, str]:
    """The text of a CSV file and its encoding: UTF-16 by its byte-order mark, else UTF-8 (a mark dropped), else
    cp1252."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encodings: tuple[str, ...] = ("utf-16",)
    else:
        encodings = ("utf-8-sig", "cp1252")
    for encoding in encodings:
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise DataError(f"{path} is neither UTF-8 nor Windows (cp1252) text; save it as 'CSV UTF-8'; {fix}")


_SEP_HINT = re.compile(r'"?sep=([^\r\n"\w])"?[ ]*(\r?\n|$)', re.IGNORECASE)
"""Excel's first line ``sep=;`` naming the separator (Excel hides it; pandas would read it as the header)."""


def _separator_hint(text: str) -> tuple[str | None, str]:
    """The separator a leading ``sep=X`` line names (None without one) and the text with that line left blank, so
    that line numbers stay the file's and row numbers the spreadsheet's (which does not show the hint)."""
    hint = _SEP_HINT.match(text)
    if hint is None:
        return None, text
    return hint.group(1), hint.group(2) + text[hint.end():]


def column_key(name: str) -> str:
    """What matching column names compares: the name in any case without spaces, ``_`` or ``-``."""
    return re.sub(r"[\s_-]+", "", name).casefold()


def _header(text: str, separator: str) -> list[str] | None:
    """The header's names as written (pandas renames a repeated one ``x.1``); None where csv cannot split it."""
    try:
        row = next((r for r in csv.reader(io.StringIO(text), delimiter=separator) if r), None)
    except csv.Error:
        return None
    return None if row is None else [name.strip() for name in row]


def _separator(text: str) -> str:
    """The separator of the header line, by :class:`csv.Sniffer` among comma, semicolon and tab; else a comma."""
    header = text.lstrip("\r\n").partition("\n")[0]
    try:
        return csv.Sniffer().sniff(header, delimiters=SEPARATORS).delimiter
    except csv.Error:
        return ","


def _check_row_lengths(text: str, separator: str, path: Path, fix: str) -> None:
    """Refuse a row with more fields than the header unless the extra ones are empty (a spreadsheet's separator at
    the end of every row), which pandas would otherwise drop, or read as an index column and shift every field."""
    reader = csv.reader(io.StringIO(text), delimiter=separator)
    width = 0
    try:
        for row in reader:
            if not width:
                width = len(row)  # the header: the first line that is not blank
            elif len(row) > width and any(field.strip() for field in row[width:]):
                raise DataError(f"{path} line {reader.line_num} has {len(row)} fields where the header has {width} "
                                f"(the first one more: {row[width]!r}); put a field that holds {separator!r} in "
                                f"double quotes, or name the extra column in the header; {fix}")
    except csv.Error:
        return  # text the csv module cannot split (old Mac line ends): pandas reads it, or says why not


def read_table(path: Path, required: tuple[str, ...], *, optional: tuple[str, ...] = (), fix: str,
               aliases: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Read a CSV as text, rows indexed 0, 1, ... in file order (a row's number, the header being row 1, is its
    index + 2); a missing file or column raises :class:`DataError` naming it and ``fix``.

    Every column of ``required`` and ``optional`` (or named by a key of ``aliases``, whose value is the column it
    stands for) present in any case, with spaces, ``_`` or ``-`` anywhere (:func:`column_key`), is renamed to the
    spelling given here, so readers look columns up by that spelling alone; two columns that would both be one
    of them are refused, naming both. ``frame.attrs["unused"]`` lists the other columns as written, and
    ``frame.attrs["encoding"]`` the encoding the text was read in (for :func:`listed_file`).
    """
    if not path.is_file():
        raise DataError(f"{path} not found; {fix}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc}); {fix}") from None
    text, encoding = _decode(raw, path, fix)
    hinted, text = _separator_hint(text)
    if not text.strip():
        raise DataError(f"{path} is empty; it needs a header row and one row per entry; {fix}")
    separator = hinted or _separator(text)
    _check_row_lengths(text, separator, path, fix)
    try:
        with warnings.catch_warnings():  # rows one empty field longer than the header: checked above
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            frame = pd.read_csv(io.StringIO(text), sep=separator, dtype=str, keep_default_na=False, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path} is not a readable CSV file ({exc}); {fix}") from None
    frame = _match_columns(frame, _header(text, separator), required, optional, aliases or {}, path, fix)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path} lacks the column(s) {', '.join(missing)} (it has {', '.join(frame.columns[:12])}); {fix}"
        )
    frame = frame.reset_index(drop=True)
    frame.attrs["encoding"] = encoding
    return frame


def _match_columns(frame: pd.DataFrame, header: list[str] | None, required: tuple[str, ...],
                   optional: tuple[str, ...], aliases: Mapping[str, str], path: Path, fix: str) -> pd.DataFrame:
    """:func:`read_table`'s renaming: each known column to its own spelling, a clash refused, the rest listed."""
    written = [str(c).strip() for c in frame.columns]
    if header is not None and len(header) == len(written):
        written = [h or w for h, w in zip(header, written)]  # a name repeated as written, not as pandas's x.1
    known = {column_key(c): c for c in (*required, *optional)}
    known.update({column_key(a): c for a, c in aliases.items()})
    claims: dict[str, list[int]] = {}
    for n, name in enumerate(written):
        if column_key(name) in known:
            claims.setdefault(known[column_key(name)], []).append(n)
    for column, spots in claims.items():
        if len(spots) > 1:
            both = " and ".join(repr(written[n]) for n in spots)
            raise DataError(f"{path} has the columns {both}, which both read as {column!r}; delete or rename all "
                            f"but one; {fix}")
    names = [str(c).strip() for c in frame.columns]
    for column, (n,) in claims.items():
        names[n] = column
    unused = [written[n] for n in range(len(names)) if column_key(written[n]) not in known
              and not (names[n].startswith("Unnamed: ") and not frame.iloc[:, n].str.strip().any())]
    frame.columns = names
    frame.attrs["unused"] = unused
    return frame


def listed_file(base: Path, name: str, encoding: str = "utf-8") -> tuple[str, Path]:
    """A file name a list gives relative to ``base``: (the name with ``/`` separators, normalised; its path).

    A name written on Windows (``images\\covid\\a.png``, ``.\\a.png``) reads as the same name with ``/``,
    so it finds the same file and gives the same image id; a file of the literal name is kept when it exists
    (a Linux name may hold ``\\``). ``./a.png`` and ``a.png`` are one file. A Windows absolute name
    (``C:\\x``, ``\\\\server\\x``) names no file here: its path stays the literal name under ``base``,
    which reading refuses with the fix, rather than ``\\x`` turning into a path at this file system's root.

    A list read in another ``encoding`` than UTF-8 (cp1252) may hold a Linux name that is not UTF-8 (the bytes
    ``ff fe`` read as ``ÿþ``): when no file has the name as read, the file named by the list's own bytes is taken
    if it exists.
    """
    rel, path = _listed(base, name)
    if encoding.startswith("utf") or os.path.lexists(path):
        return rel, path
    try:
        as_bytes = os.fsdecode(name.encode(encoding))  # the bytes the list holds, as the OS names them
    except UnicodeEncodeError:
        return rel, path
    found = _listed(base, as_bytes)
    return found if os.path.lexists(found[1]) else (rel, path)


def _listed(base: Path, name: str) -> tuple[str, Path]:
    """:func:`listed_file` for one spelling of the name."""
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
