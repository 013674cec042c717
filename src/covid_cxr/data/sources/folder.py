"""A user's own images: one sub-folder per class, or a CSV listing them.

Folder layout: ``DIR/<class>/...`` where the class folder is ``covid``/``COVID-19``,
``pneumonia`` or ``normal`` (any depth below, walked by :func:`scan_folder`, which ``predict``
shares: hidden and AppleDouble files, ``__MACOSX`` and DICOMDIR are skipped with a note, links to
folders followed once, and a folder named like an image becomes a row that decoding refuses by
name). A link that leads out of a class folder to the tree's top or into another class folder is not
followed (a note says so): its images keep the class of their own folder; so is a link to a file in another
class folder, or to a file read already. Files of other suffixes are counted in a note. Without patient ids
every image is its own patient. CSV layout: ``DIR/labels.csv`` (or the path of the table itself, whatever its
suffix: ``.tsv`` and ``.txt`` exports too) with ``path`` (relative to the CSV) or ``filename``, ``label``, and
optionally ``patient_id``, ``view`` (or ``View Position``) and ``source``, in any case and with spaces, ``_`` or
``-`` anywhere, as spreadsheets save it (:func:`~._common.read_table`; the columns not used are named in the
note); a file is known by its real path, so a row repeated (by any spelling of the path, or through a link) is
read once, the same file listed with another label is refused, and rows with an empty ``patient_id`` are
counted in a note (each is its own patient). A path written on
Windows (``images\\covid\\a.png``, ``.\\a.png``) finds the file, and gets the image id, that its
``/`` spelling does (:func:`~._common.listed_file`); Windows absolute paths (``C:\\...``) cannot be
found, and the note and each image's error say to list paths relative to the CSV.

Every folder is a named source (``--folder nih=DIR``): the name the user gives wins; without one,
a CSV's per-row ``source`` column names each image's collection (spellings that differ only in case or
spacing are one source, named as first written, with a note; a patient id found under two sources is
two patients, with a note); otherwise the source is ``folder``.
Image ids are ``<source, made safe and lower-case>/<relative path, made safe>`` (``folder/...`` when
unnamed, as before names existed).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from covid_cxr.data.manifest import check_source_name, finalize, make_ids, source_prefix
from covid_cxr.data.names import display_path
from covid_cxr.data.sources._common import (
    listed_file,
    read_table,
    windows_absolute_note,
)
from covid_cxr.errors import DataError
from covid_cxr.labels import normalize_label

SOURCE = "folder"
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".dcm", ".dicom", ".dic", ".ima",
                                            ".bmp", ".tif", ".tiff", ".gif", ".webp", ".jp2", ".j2k", ".jpf",
                                            ".jpx"})
"""Suffixes (any case) of the files a folder walk takes; so do names without one, and the SOP-instance-UID names
PACS exports give DICOMs (``1.2.840.113619.2.55.3.1234``: an all-digit suffix). Every one is a format the
decoder reads by its content (GIF, WebP and JPEG 2000 through Pillow, whose wheels carry the codecs)."""
FIX = "give a folder with one sub-folder per class (covid, pneumonia, normal) or a labels.csv"
CSV_FIX = ("its columns are path (or filename), label, and optionally patient_id, view and source, in any case and "
           "with spaces, _ or - anywhere (Patient ID is patient_id)")
CSV_COLUMNS = ("path", "filename", "label", "patient_id", "view", "source")
"""The columns a labels CSV may have, matched in any case and with spaces, ``_`` or ``-`` anywhere."""
CSV_ALIASES = {"View Position": "view"}  # NIH's and DICOM's name (ViewPosition) for the view
WORKBOOK_SUFFIXES = frozenset({".xlsx", ".xlsm", ".xls", ".ods", ".numbers"})
TABLE_SUFFIXES = (".csv", ".tsv", ".txt")
"""Suffixes (any case) of a file in a folder that may be its labels table under another name than labels.csv."""
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"GIF8", b"\x00\x00\x00\x0cjP")

# What a folder walk passes over on purpose, each with a note: never images, and common in hospital exports and
# in archives made on macOS. Keys are the kinds a note counts; values, how the note names them.
SKIPPED_KINDS: dict[str, str] = {
    "appledouble": "macOS AppleDouble files (._name: the resource data of a file, not an image)",
    "hidden": "hidden files (names starting with '.', such as .DS_Store)",
    "hidden-folder": "hidden folders (names starting with '.'), not searched",
    "macosx": "__MACOSX folders (macOS archive metadata), not searched",
    "dicomdir": "DICOMDIR files (the index of a DICOM media set; its images are read from their own files)",
    "seen": "links to a folder already read (a loop or a second way in), not searched again",
    "other-class": ("links to the folder of the tree or to another class folder, not followed (the images there keep "
                    "their own folder's class)"),
    "file-other-class": "links to an image in another class folder, not read (the image keeps its own folder's class)",
    "file-seen": "links to an image read already (the same file by another name), not read again",
}
FOLDER_NAMED_LIKE_IMAGE = "a folder named like an image file; its contents are not read"


@dataclass
class FolderScan:
    """What a walk of a folder found: image candidates, inputs that cannot be read, and what it passed over."""

    files: list[Path] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path, why): named like an image, not a file
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, kind of SKIPPED_KINDS)
    other: list[Path] = field(default_factory=list)  # files whose suffix is not an image's: not read


def named_like_image(name: str) -> bool:
    """A name with an image suffix that is not hidden: what a folder of that name is refused for."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def is_candidate(name: str) -> bool:
    """A file a walk takes: an image suffix, no suffix, or an all-digit one (a DICOM named by its UID)."""
    suffix = Path(name).suffix
    return suffix.lower() in IMAGE_SUFFIXES or suffix == "" or suffix[1:].isdigit()


def skipped_kind(name: str, *, folder: bool) -> str | None:
    """The kind of :data:`SKIPPED_KINDS` a walk passes ``name`` over as, or None to look at it."""
    if name.startswith("._") and not folder:
        return "appledouble"
    if name.startswith("."):
        return "hidden-folder" if folder else "hidden"
    if folder and name == "__MACOSX":
        return "macosx"
    if not folder and name.upper() == "DICOMDIR":
        return "dicomdir"
    return None


def skipped_notes(skipped: list[tuple[str, str]], *, examples: int = 3) -> list[str]:
    """One note per kind of :data:`SKIPPED_KINDS`: how many were passed over, and the first few."""
    by_kind: dict[str, list[str]] = {}
    for path, kind in skipped:
        by_kind.setdefault(kind, []).append(path)
    notes = []
    for kind, paths in by_kind.items():
        more = f" and {len(paths) - examples} more" if len(paths) > examples else ""
        notes.append(f"skipped {len(paths)} {SKIPPED_KINDS[kind]}: {', '.join(paths[:examples])}{more}")
    return notes


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


def _holds(outer: str, inner: str) -> bool:
    """True when the folder ``outer`` is ``inner`` or holds it (both real paths)."""
    return os.path.commonpath([outer, inner]) == outer


def scan_folder(folder: Path, *, seen: set[str] | None = None, elsewhere: tuple[str, ...] = ()) -> FolderScan:
    """Image candidates under ``folder``, recursively and in sorted order, following links to folders once each.

    A folder named like an image and anything named like one that is not a regular file (a pipe, a broken
    link, a link loop) is refused with the reason, never opened; hidden files, AppleDouble files, DICOMDIR
    indexes, ``__MACOSX`` folders and links back to a folder already read or holding ``folder`` (a loop) are
    skipped with a note. ``seen`` (real paths) is shared by walks that must not read a folder twice between them;
    a link into one of ``elsewhere`` (real paths of folders read as something else), or to a folder holding one,
    is skipped too.
    """
    scan = FolderScan()
    top = os.path.realpath(folder)
    seen = set() if seen is None else seen
    seen.add(top)
    for root, dirs, names in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirs):
            path = Path(root) / d
            kind = skipped_kind(d, folder=True)
            real = os.path.realpath(path)
            if kind is None and any(_holds(real, o) or _holds(o, real) for o in elsewhere):
                kind = "other-class"
            elif kind is None and (real in seen or _holds(real, top)):
                kind = "seen"
            if kind is not None:
                scan.skipped.append((str(path), kind))
            elif named_like_image(d):
                scan.refused.append((str(path), FOLDER_NAMED_LIKE_IMAGE))
            else:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        for n in sorted(names):
            path = Path(root) / n
            kind = skipped_kind(n, folder=False)
            if kind is not None:
                scan.skipped.append((str(path), kind))
            elif is_candidate(n):
                reason = not_a_file(path)
                if reason is None:
                    scan.files.append(path)
                else:
                    scan.refused.append((str(path), reason))
            else:
                scan.other.append(path)
    return scan


def other_files_note(where: Path, files: list[Path], *, examples: int = 3) -> list[str]:
    """A note counting the files a walk passed over for their suffix, by suffix, naming the first few."""
    if not files:
        return []
    by_suffix: dict[str, int] = {}
    for f in files:
        by_suffix[f.suffix.lower()] = by_suffix.get(f.suffix.lower(), 0) + 1
    counts = ", ".join(f"{n} {suffix}" for suffix, n in sorted(by_suffix.items(), key=lambda kv: (-kv[1], kv[0])))
    shown = ", ".join(display_path(f.relative_to(where)) for f in files[:examples])
    more = f" and {len(files) - examples} more" if len(files) > examples else ""
    note = (f"{where}: {len(files)} files in class folders are not read, for their suffix ({counts}): {shown}{more}; "
            f"read are {' '.join(sorted(IMAGE_SUFFIXES))} in any case, files without a suffix and DICOMs named by "
            "their UID: convert an X-ray in another format to PNG to include it")
    return [note]


def parse_folder_spec(text: str | os.PathLike[str]) -> tuple[str | None, Path]:
    """``NAME=DIR`` -> (NAME, DIR); a bare ``DIR`` (or an existing path that holds ``=``) -> (None, DIR)."""
    raw = os.fspath(text)
    name, sep, rest = raw.partition("=")
    if not sep or not name.strip() or not rest or Path(raw).exists():
        return None, Path(raw)
    if "/" in name or os.sep in name:  # a path holding '=', unless what follows the '=' is there
        if Path(rest).exists():
            plain = name.strip().replace("/", "-")
            raise DataError(f"--folder {raw}: a source name cannot contain '/' ({name.strip()!r}), and {raw} is no "
                            f"file or folder; name it without one, e.g. --folder {plain}={rest}")
        return None, Path(raw)
    return check_source_name(name, where=f"--folder {raw}"), Path(rest)


def folder_specs(folder: str | os.PathLike[str] | tuple[str | os.PathLike[str], ...] | list | None) -> tuple[str, ...]:
    """One or several ``[NAME=]DIR`` as a tuple of strings (what ``prepare`` records)."""
    if folder is None:
        return ()
    items = [folder] if isinstance(folder, (str, os.PathLike)) else list(folder)
    return tuple(os.fspath(f) for f in items)


def _source_key(name: str) -> str:
    """What spellings of one source name share: its words in any case (``NIH  ChestX-ray14``, ``nih chestx-ray14``)."""
    return " ".join(name.split()).casefold()


def _sources(frame: pd.DataFrame, csv: Path, name: str | None) -> tuple[pd.Series, list[str]]:
    """Each row's source name: ``name`` when given, else the CSV's ``source`` column, else ``folder``.

    Spellings of one name that differ in case or spacing only are one source, named as first written: they
    would otherwise be two sources sharing an image-id prefix, and one patient would be two.
    """
    given = frame["source"].str.strip() if "source" in frame else None
    if name is not None:
        notes = [f"{csv}: its source column is ignored; every image is named {name!r} as given"] \
            if given is not None and (given != "").any() else []
        return pd.Series(name, index=frame.index), notes
    if given is None:
        return pd.Series(SOURCE, index=frame.index), []
    spellings: dict[str, list[str]] = {}  # a name's words in any case -> its spellings, in file order
    for v in given[given != ""]:
        known = spellings.setdefault(_source_key(v), [])
        if v not in known:
            known.append(v)
    checked = {k: check_source_name(w[0], where=f"{csv} source column") for k, w in spellings.items()}
    names = given.map(lambda v: checked[_source_key(v)] if v else SOURCE)
    counts = ", ".join(f"{k} ({v})" for k, v in names.value_counts().sort_index().items())
    notes = [f"{csv}: sources from its source column: {counts}"]
    merged = ["; ".join(f"{o!r} read as {w[0]!r}" for o in w[1:]) for w in spellings.values() if len(w) > 1]
    if merged:
        notes.append(f"{csv}: source names that differ only in case or spacing are one source ({'; '.join(merged)}); "
                     "write each source's name one way in the source column to silence this note")
    return names, notes


def _patients_across_sources(frame: pd.DataFrame, sources: pd.Series, csv: Path) -> list[str]:
    """A note counting the patient ids one CSV files under two sources or more: they are kept as different patients
    (a patient is its source and its id), though in one hospital's export they are most likely the same people."""
    if "patient_id" not in frame:
        return []
    pairs = pd.DataFrame({"patient": frame["patient_id"].str.strip().to_numpy(), "source": sources.to_numpy()})
    pairs = pairs[pairs["patient"] != ""].drop_duplicates()
    counts = pairs["patient"].value_counts(sort=False)
    shared = counts.index[counts > 1]
    if not len(shared):
        return []
    first = shared[0]
    under = ", ".join(sorted(pairs.loc[pairs["patient"] == first, "source"]))
    return [f"{csv}: {len(shared)} patient ids appear under more than one source (e.g. {first!r} under {under}); a "
            "patient is its source and its id, so they are kept as different patients, and one person's images may "
            f"land on both sides of a fold; if they are the same people, give the CSV one source name (--folder "
            f"NAME={csv}), which overrides its source column"]


def _found(frame: pd.DataFrame, name_col: str, base: Path) -> tuple[pd.Series, pd.Series]:
    """Each row's file name as found (``/`` separators, normalised, looked for as the CSV's own bytes too where it
    is not UTF-8: :func:`~._common.listed_file`) and its path, a leading ``..`` folded away (``meta/../img/x.png``
    is ``img/x.png``): ``base`` is a real path, so its parent is the one ``..`` names."""
    encoding = frame.attrs.get("encoding", "utf-8")
    listed = [listed_file(base, n, encoding) for n in frame[name_col]]
    return (pd.Series([rel for rel, _ in listed], index=frame.index, dtype=str),
            pd.Series([os.path.normpath(path) for _, path in listed], index=frame.index, dtype=str))


def _labels(frame: pd.DataFrame, csv: Path) -> pd.Series:
    """Each row's class key, whatever its spelling, case or surrounding spaces; an unknown one names its row."""
    labels = {}
    for i, raw in zip(frame.index, frame["label"]):
        try:
            labels[i] = normalize_label(raw, where=f"{csv} row {i + 2}")
        except ValueError as exc:
            raise DataError(str(exc)) from None
    return pd.Series(labels, dtype=str)


def _drop_repeats(frame: pd.DataFrame, name_col: str, rel: pd.Series, paths: pd.Series,
                  csv: Path) -> tuple[pd.DataFrame, list[str]]:
    """A row that repeats an earlier one (same file, same fields) is read once, with a note; the same file
    listed with a different label, patient or view is refused, naming its rows. A file is known by its real path,
    so ``a.png``, ``./a.png``, ``.\\a.png``, its absolute path and a link to it are one file."""
    real = paths.map(os.path.realpath)
    same = frame.apply(lambda col: col.str.strip()).assign(**{name_col: real})
    repeated = same.duplicated(keep="first")
    shown = ", ".join(str(i + 2) for i in frame.index[repeated][:5]) + (" ..." if repeated.sum() > 5 else "")
    notes = []
    if repeated.any():
        first_name = rel[~repeated].groupby(real[~repeated]).first()
        renamed = int((rel[repeated] != real[repeated].map(first_name)).sum())
        other = f" ({renamed} of them by another path or a link)" if renamed else ""
        notes.append(f"{csv}: rows {shown} repeat an earlier row{other} and are read once")
    key = same.loc[~repeated, name_col]
    clash = key[key.duplicated(keep=False)]
    if len(clash):
        rows = clash.index[clash == clash.iloc[0]]
        spellings = list(dict.fromkeys(rel[rows]))
        also = f" (as {', '.join(spellings[1:])}: the same file)" if len(spellings) > 1 else ""
        raise DataError(f"{csv}: {spellings[0]} is listed in rows {', '.join(str(i + 2) for i in rows)}{also} with "
                        "different labels or other fields; keep one row per image")
    return frame[~repeated], notes


def _patient_ids(frame: pd.DataFrame, image_ids: pd.Series, csv: Path) -> tuple[list[str], list[str]]:
    """Each row's patient id, its image id where none is given; a note counting the rows of a ``patient_id``
    column left empty, which become patients of one image each."""
    if "patient_id" not in frame:
        return image_ids.tolist(), []
    given = frame["patient_id"].str.strip().to_numpy()
    empty = [n for n, p in enumerate(given) if not p]
    notes = []
    if empty:
        rows = ", ".join(str(frame.index[n] + 2) for n in empty[:5]) + (" ..." if len(empty) > 5 else "")
        notes.append(f"{csv}: {len(empty)} rows have an empty patient_id (rows {rows}); each is taken as a patient "
                     "of its own, so images of one patient may land on both sides of a fold: fill in their "
                     "patient ids")
    return [p or i for p, i in zip(given, image_ids)], notes


def _from_csv(csv: Path, name: str | None) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Rows of a labels table, the notes on it, and the columns of it not used (as written)."""
    frame = read_table(csv, ("label",), optional=CSV_COLUMNS, aliases=CSV_ALIASES, fix=CSV_FIX)
    unused = list(frame.attrs.get("unused", []))
    name_col = "path" if "path" in frame else "filename"
    if name_col not in frame:
        raise DataError(f"{csv} lacks the column path (or filename) (it has {', '.join(frame.columns[:12])}); "
                        f"{CSV_FIX}")
    if name_col == "path" and "filename" in frame:
        unused.append("filename")
    if frame.empty:
        raise DataError(f"{csv} lists no images (it has a header only); add one row per image: {name_col},label")
    rel, paths = _found(frame, name_col, csv.parent.resolve())
    frame, repeat_notes = _drop_repeats(frame.assign(label=_labels(frame, csv)), name_col, rel, paths, csv)
    rel, paths = rel[frame.index], paths[frame.index]
    sources, notes = _sources(frame, csv, name)
    if name is None:
        notes += _patients_across_sources(frame, sources, csv)
    out = pd.DataFrame({"path": paths.to_numpy(), "label": frame["label"].to_numpy(), "source": sources.to_numpy()})
    safe_rel = rel.str.replace("/", "_", regex=False).reset_index(drop=True)
    out["image_id"] = ""
    for source in sorted(set(out["source"])):  # ids unique within each source's prefix
        rows = (out["source"] == source).to_numpy()
        out.loc[rows, "image_id"] = make_ids(source_prefix(source), safe_rel[rows]).values
    out["patient_id"], patient_notes = _patient_ids(frame, out["image_id"], csv)
    out["view"] = frame["view"].to_numpy() if "view" in frame else ""
    notes += patient_notes
    return out, repeat_notes + notes + windows_absolute_note(csv, frame[name_col], map(Path, paths)), unused


def _tables_hint(root: Path) -> str:
    """A clause naming the files in ``root`` that may be its labels table under another name (``Labels.CSV``,
    ``labels.tsv``), with how to read one; empty when there is none."""
    tables = sorted(p.name for p in root.iterdir()
                    if p.suffix.lower() in TABLE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not tables:
        return ""
    return (f"; it holds {', '.join(tables[:3])}{' ...' if len(tables) > 3 else ''}: only a file named exactly "
            f"labels.csv is looked for; to read a labels table of another name, give its path, e.g. --folder "
            f"{root / tables[0]}")


def _class_folders(root: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]], list[str]]:
    """(class folder, label) pairs under ``root``, what was skipped there, and its image files left loose."""
    folders, skipped, loose = [], [], []
    for sub in sorted(root.iterdir()):
        if not sub.is_dir():
            if named_like_image(sub.name):
                loose.append(sub.name)
            continue
        kind = skipped_kind(sub.name, folder=True)
        if kind is not None:
            skipped.append((str(sub), kind))
            continue
        try:
            folders.append((sub, normalize_label(sub.name, where=f"folder name {sub}")))
        except ValueError as exc:
            raise DataError(f"{exc}; rename the folder or move it out of {root}{_tables_hint(root)}") from None
    return folders, skipped, loose


def _linked_twice(found: list[tuple[Path, str, str]], real: list[str]) -> tuple[list[tuple[Path, str]],
                                                                               list[tuple[str, str]]]:
    """``found`` (file, label, the real path of its class folder) less the links to a file that is read already or
    lies in another class folder (so no image is read twice, or under a second class), and those links as skipped.
    A file itself is kept over a link to it, whichever the walk met first."""
    links = [os.path.islink(f) for f, _, _ in found]
    if not any(links):
        return [(f, label) for f, label, _ in found], []
    taken = {os.path.realpath(f) for (f, _, _), link in zip(found, links) if not link}
    kept, skipped = [], []
    for (f, label, here), link in zip(found, links):
        if link:
            target = os.path.realpath(f)
            if any(_holds(r, target) for r in real if r != here):
                skipped.append((str(f), "file-other-class"))
                continue
            if target in taken:
                skipped.append((str(f), "file-seen"))
                continue
            taken.add(target)
        kept.append((f, label))
    return kept, skipped


def _from_tree(root: Path, prefix: str) -> tuple[pd.DataFrame, list[str]]:
    """Rows of a class-folder tree. Entries named like images that are not files (a folder ``x.png``, a broken
    link) are rows too, so that decoding refuses them by name, as every bad image is.

    One walk's worth of folders for the whole tree: no folder is read twice, and a link in one class folder to
    the tree's top or into another class folder is not followed, nor a link to a file there or to a file read
    already, so no image is read twice or under a second class."""
    folders, skipped, loose = _class_folders(root)
    real = [os.path.realpath(sub) for sub, _ in folders]
    seen: set[str] = set()
    found, other = [], []
    for (sub, label), here in zip(folders, real):
        if here in seen:  # a class folder that is a link to one already read
            skipped.append((str(sub), "seen"))
            continue
        scan = scan_folder(sub, seen=seen, elsewhere=tuple(r for r in real if r != here))
        skipped += scan.skipped
        other += scan.other
        found += [(f, label, here) for f in [*scan.files, *(Path(p) for p, _ in scan.refused)]]
    kept, links = _linked_twice(found, real)
    skipped += links
    rows = [{"path": str(f), "label": label, "rel": f.relative_to(root).as_posix()} for f, label in kept]
    if not rows:
        raise DataError(f"{root} holds no images in class sub-folders; {FIX}{_tables_hint(root)}")
    out = pd.DataFrame(rows).sort_values("rel", kind="stable").reset_index(drop=True)
    out["image_id"] = make_ids(prefix, out["rel"].str.replace("/", "_", regex=False))
    out["patient_id"] = out["image_id"]
    out["view"] = ""
    more = f" and {len(loose) - 3} more" if len(loose) > 3 else ""
    notes = [f"{root}: image files in no class sub-folder are left out: {', '.join(loose[:3])}{more}"] if loose else []
    return out, notes + skipped_notes(skipped) + other_files_note(root, other)


def _labels_csv(root: Path) -> Path:
    """The labels table a folder source is read from where it exists: ``root/labels.csv`` for a folder, else ``root``
    itself, whatever its suffix (a hospital's tab-separated export is often ``.tsv`` or ``.txt``)."""
    return root / "labels.csv" if root.is_dir() else root


def _looks_like_image(path: Path) -> bool:
    """A file given where a folder or labels table belongs that is an image: by its suffix, or by its first bytes
    (PNG, JPEG, TIFF, GIF, JPEG 2000, or DICOM's ``DICM`` at byte 128, as a file named by its UID has)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False  # reading it as a table says why it cannot be read
    return head.startswith(_IMAGE_MAGIC) or head[128:132] == b"DICM"


def _check_table(path: Path) -> None:
    """Refuse a file given as a labels table that is an image, or a spreadsheet workbook, saying what to give."""
    if _looks_like_image(path):
        raise DataError(f"{path} is an image, not a folder or a labels table: give the folder that holds it (one "
                        "sub-folder per class), or a labels.csv that lists it")
    if path.suffix.lower() in WORKBOOK_SUFFIXES:
        raise DataError(f"{path} is a spreadsheet workbook, not a labels table: save it as CSV (in Excel: Save As, "
                        f"'CSV UTF-8') and give that file; {CSV_FIX}")


def class_tree(root: Path) -> Path | None:
    """``root`` when :func:`read_folder` reads it as a tree of class sub-folders (every folder in it is read), None
    when it is read from a labels table (only the files listed are) or is not there."""
    root = Path(root)
    return root if not _labels_csv(root).is_file() and root.is_dir() else None


def read_folder(root: Path, name: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Manifest rows of a user's folder (class sub-folders or a labels table), as source ``name`` if given."""
    root = Path(root)
    if name is not None:
        name = check_source_name(name, where=f"--folder {name}={root}")
    csv = _labels_csv(root)
    notes: list[str] = []
    unused: list[str] = []
    if csv.is_file():
        _check_table(csv)
        frame, notes, unused = _from_csv(csv, name)
    elif class_tree(root) is not None:
        frame, notes = _from_tree(root.resolve(), source_prefix(name or SOURCE))
        frame["source"] = name or SOURCE
    else:
        raise DataError(f"{root} not found; {FIX}")
    names = sorted(set(frame["source"]))
    note = f"{root}: {len(frame)} images" + (f" as source {names[0]!r}" if len(names) == 1 else "")
    if (frame["patient_id"] == frame["image_id"]).all():
        note += " (no patient ids given: every image is its own patient)"
    if unused:
        note += f"; columns not used: {', '.join(unused)}"
    return finalize(frame, str(root)), [note, *notes]
