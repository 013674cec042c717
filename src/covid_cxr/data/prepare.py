"""``prepare``: raw datasets -> manifest, patient folds with phases, image cache, in one folder.

Everything is written into a temporary sibling folder (``.OUT.tmp-PID``) and renamed into place at the end,
so a failure (a bad image, a leaking split, Ctrl-C) leaves no partial output and an earlier prepared
folder intact. A cache whose inputs are unchanged is carried over instead of decoded again.

The swap at the end (the earlier folder set aside as ``.OUT.old-PID``, the new one renamed to OUT, the
earlier one deleted) holds Ctrl-C back until it is done: a Ctrl-C in it lets it finish, and ``prepare``
then ends normally, with a note that OUT was installed, for it was. What a process killed outright
(``kill -9``, a power cut) leaves behind is cleared by the next ``prepare`` into the same OUT: work
folders of processes that no longer run are deleted, with a note (an earlier prepared folder set aside
and never replaced is put back as OUT); those of a process still running are left alone.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from covid_cxr import __version__
from covid_cxr.atomic import read_json, signals_held, write_json
from covid_cxr.data.author_splits import read_author_splits
from covid_cxr.data.cache import (
    META_FILE,
    CacheBuild,
    build_cache,
    cache_dirname,
    cache_key,
    cache_matches,
    read_cache_build,
    write_cache_index,
)
from covid_cxr.data.manifest import COLUMNS, combine, read_manifest, table1
from covid_cxr.data.names import display_path
from covid_cxr.data.prepared import FORMAT, SPLIT_COLUMNS, hash_files, split_files
from covid_cxr.data.sources import (
    covidx,
    folder_specs,
    parse_folder_spec,
    read_covid_chestxray,
    read_folder,
    read_rsna,
)
from covid_cxr.data.sources.folder import class_tree
from covid_cxr.data.splits import (
    SplitPlan,
    SplitSettings,
    check_filled,
    identical_across,
    make_folds,
)
from covid_cxr.errors import ConfigError, DataError
from covid_cxr.labels import CLASSES
from covid_cxr.networks import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, PAPER_IMAGE_SIZE


@dataclass(frozen=True)
class PrepareSettings:
    """Everything ``prepare`` needs; written to ``DATA/prepare.json``."""

    out: Path
    covid_chestxray: Path | None = None
    rsna: Path | None = None
    folder: Path | str | tuple[str, ...] | None = None  # one or more "[NAME=]DIR": named folder sources
    covidx: tuple[str, ...] | None = None  # COVIDx split files (or their folder); images under covidx_images
    covidx_images: Path | None = None
    split: SplitSettings = field(default_factory=SplitSettings)  # folds, phases, seed, validation protocol
    splits_from: Path | None = None
    labels_only: bool = False
    image_size: int = PAPER_IMAGE_SIZE
    skip_bad: bool = False
    workers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", folder_specs(self.folder) or None)
        if not (self.covid_chestxray or self.rsna or self.folder or self.covidx):
            raise ConfigError("give at least one dataset: --covid-chestxray DIR, --rsna DIR, --folder DIR "
                              "or --covidx FILES")
        others = bool(self.covid_chestxray or self.rsna or self.folder)
        covidx.check_settings(self.covidx, self.covidx_images, others=others, splits_from=self.splits_from,
                              labels_only=self.labels_only)
        if not self.labels_only and not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"image size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels; got "
                              f"{self.image_size}")
        if not isinstance(self.split, SplitSettings):
            raise ConfigError(f"split must be SplitSettings; got {type(self.split).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """What ``prepare.json`` records (paths as text, the split settings nested)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class PrepareReport:
    """What was written, for the command line to print."""

    out: Path
    table1: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    decode_seconds: float = 0.0
    images_decoded: int = 0
    cache_reused: bool = False
    fold_summary: list[dict[str, Any]] = field(default_factory=list)


def read_sources(settings: PrepareSettings) -> tuple[pd.DataFrame, list[str]]:
    """The combined manifest of every given dataset, and each adapter's notes."""
    parts, notes = [], []
    for root, reader in ((settings.covid_chestxray, read_covid_chestxray), (settings.rsna, read_rsna)):
        if root is not None:
            frame, part_notes = reader(Path(root))
            parts.append(frame)
            notes += part_notes
    for spec in settings.folder or ():
        name, root = parse_folder_spec(spec)
        frame, part_notes = read_folder(root, name)
        parts.append(frame)
        notes += part_notes
    if settings.covidx:
        frame, part_notes = covidx.read_covidx(settings.covidx, settings.covidx_images)
        parts.append(frame)
        notes += part_notes
    _check_names_apart(parts)
    return combine(parts), notes


def _check_names_apart(parts: list[pd.DataFrame]) -> None:
    """Refuse two datasets whose source names differ only in case or spacing (``NIH``, ``nih``): they would share
    an image-id prefix; the audits compare sources, so they must read as two names."""
    first: dict[str, tuple[str, int]] = {}
    for i, part in enumerate(parts):
        for name in sorted(set(part["source"])):
            key = " ".join(name.split()).casefold()
            other, j = first.setdefault(key, (name, i))
            if j != i and other != name:  # the same name twice: combine() says so
                raise DataError(f"two of the given datasets are named {other!r} and {name!r} (datasets {j + 1} and "
                                f"{i + 1}), which differ only in case or spacing; give each a name of its own: "
                                "--folder nih=DIR --folder hospital-b=DIR")


def _duplicates(sha: dict[str, str], manifest: pd.DataFrame) -> list[list[str]]:
    by_digest: dict[str, list[str]] = {}
    for image_id in manifest["image_id"]:
        if sha.get(image_id):
            by_digest.setdefault(sha[image_id], []).append(image_id)
    return sorted(ids for ids in by_digest.values() if len(ids) > 1)


def _identical_note(plan: SplitPlan, manifest: pd.DataFrame, digests: dict[str, str]) -> list[str]:
    """Byte-identical files that given splits (not made here, so kept as they are) put on two sides."""
    across = identical_across(plan, manifest, digests)
    if not across:
        return []
    more = "; ..." if len(across) > 3 else ""
    note = (f"the given splits put byte-identical files on two sides of a fold ({'; '.join(across[:3])}{more}); "
            "they are kept as given, so test figures may be optimistic")
    return [note]


def _conflicting_copies(duplicates: list[list[str]], manifest: pd.DataFrame) -> list[str]:
    """A warning naming the groups of byte-identical files that carry different labels: one of them is wrong. They
    stay one group (:func:`~covid_cxr.data.splits.merge_identical`), so they never sit on two sides of a fold."""
    label = dict(zip(manifest["image_id"], manifest["label"]))
    path = dict(zip(manifest["image_id"], manifest["path"]))
    mixed = [g for g in duplicates if len({label[i] for i in g}) > 1]
    if not mixed:
        return []
    shown = "; ".join(" = ".join(f"{display_path(path[i])} ({label[i]})" for i in g[:3]) for g in mixed[:3])
    more = f"; and {len(mixed) - 3} more groups (prepare.json lists them)" if len(mixed) > 3 else ""
    note = (f"warning: {len(mixed)} groups of byte-identical files have different labels: {shown}{more}; one image "
            "cannot be two classes, so one of the labels is wrong: delete the wrong copy or correct its label. Until "
            "then each group stays on one side of every fold")
    return [note]


def _fail_on_bad(failures: list[dict[str, str]]) -> None:
    lines = [f"  {f['path']}: {f['reason']}" for f in failures[:50]]
    more = f"\n  ... and {len(failures) - 50} more" if len(failures) > 50 else ""
    raise DataError(f"{len(failures)} images cannot be used; nothing was written. Fix or remove them, or pass "
                    "--skip-bad to leave them out:\n" + "\n".join(lines) + more)


def _fold_counts(frame: pd.DataFrame) -> dict[str, Any]:
    counts = frame["label"].value_counts()
    return {"images": len(frame), "patients": int(frame["patient_id"].nunique()),
            **{c: int(counts.get(c, 0)) for c in CLASSES}}


def write_splits(plan: SplitPlan, manifest: pd.DataFrame, splits_dir: Path) -> list[dict[str, Any]]:
    """Write every fold's phase, val and test files and ``summary.json``; return the per-fold summary."""
    table = manifest.set_index("image_id", drop=False).loc[:, list(SPLIT_COLUMNS)]
    num_phases = max(len(f.phases) for f in plan.folds)
    folds = []
    for fold in plan.folds:
        fold_dir = splits_dir / f"fold{fold.fold}"
        fold_dir.mkdir(parents=True)
        parts = {f"phase{p}": ids for p, ids in enumerate(fold.phases, start=1)}
        parts.update(val=fold.val, test=fold.test)
        info: dict[str, Any] = {"fold": fold.fold}
        for name, ids in parts.items():
            frame = table.loc[sorted(ids)]
            frame.to_csv(fold_dir / f"{name}.csv", index=False)
            info[name] = _fold_counts(frame)
        info["train_distinct"] = _fold_counts(table.loc[sorted(fold.train)])
        info["split_hash"] = hash_files(split_files(fold_dir, num_phases))
        folds.append(info)
    summary = {"protocol": plan.protocol, "origin": plan.origin, "selection_on_test": plan.protocol == "paper",
               "num_folds": len(plan.folds), "num_phases": num_phases, "settings": plan.settings,
               "notes": plan.notes, "phase_balance": plan.phase_info, "folds": folds}
    write_json(splits_dir / "summary.json", summary, indent=1)
    return folds


PREPARED_ENTRIES = ("prepare.json", "manifest.csv", "splits", "cache", "audit")
"""What a prepared folder holds: what ``prepare`` writes, the caches ``evaluate`` adds, the data audits' results."""


def _carry_over(old: Path, new: Path, manifest: pd.DataFrame) -> list[str]:
    """Bring what ``old`` (the earlier prepared folder) holds beyond prepare's own output into ``new``: every cache
    still valid for ``manifest`` and ``audit/``; refuse anything else, which replacing ``old`` would delete."""
    unknown = sorted(p.name for p in old.iterdir() if p.name not in PREPARED_ENTRIES)
    if unknown:
        raise DataError(f"{old} holds {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}, which 'covid-cxr "
                        "prepare' did not write and would delete when it replaces the folder; move them out of it "
                        "(or give another --out) and run again")
    _reuse_caches(old, new, manifest)
    if not (old / "audit").is_dir():
        return []
    shutil.copytree(old / "audit", new / "audit", copy_function=_link_or_copy)
    if _same_images(old / "manifest.csv", manifest):
        return []
    note = (f"{old / 'audit'} was kept, but its results are of the earlier images: run the data audits again "
            f"('covid-cxr audit source {old}')")
    return [note]


def _same_images(earlier: Path, manifest: pd.DataFrame) -> bool:
    """True when the manifest file ``earlier`` lists the same images with the same labels as ``manifest``."""
    try:
        before = read_manifest(earlier)
    except DataError:
        return False
    return set(zip(before["image_id"], before["label"])) == set(zip(manifest["image_id"], manifest["label"]))


def _reuse_caches(old: Path, new: Path, manifest: pd.DataFrame) -> None:
    """Hard-link (or copy) every cache of ``old`` still valid for ``manifest`` into ``new``: whatever its size and
    resize method (read from its meta.json), so the caches ``evaluate`` built beside prepare's survive."""
    for folder in sorted(p for p in (old / "cache").glob("size*") if p.is_dir()):
        try:
            meta = read_json(folder / META_FILE)
            size, resize = int(meta["image_size"]), str(meta.get("resize", "area"))
        except (DataError, KeyError, TypeError, ValueError):
            continue  # an incomplete or damaged cache: built again when needed
        if cache_matches(folder, cache_key(manifest, size, resize)):
            shutil.copytree(folder, new / "cache" / cache_dirname(size, resize), copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _check_out(out: Path, settings: PrepareSettings) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; give a folder for --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "prepare.json").is_file():
        raise DataError(f"{out} exists, is not empty and is not a prepared dataset; give a new or empty folder for --out")
    for spec in settings.folder or ():
        tree = class_tree(parse_folder_spec(spec)[1])
        if tree is not None and out.is_relative_to(tree.resolve()):
            inside = out.relative_to(tree.resolve()).parts
            beside = tree.resolve().parent / f"{tree.name}-prepared"
            raise DataError(f"--out {out} is in the folder {tree}, whose sub-folders are read as classes: the next "
                            f"'covid-cxr prepare' would read {inside[0] if inside else 'its output'} as a class "
                            f"folder; give an --out outside it, e.g. {beside}")


_WORK_FOLDER = r"\.{name}\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)"
"""How :func:`prepare_dataset` names its work folders beside OUT: ``.OUT.tmp-PID`` (being written) and
``.OUT.old-PID`` (the earlier OUT, set aside during the swap)."""


def _running(pid: int) -> bool:
    """Whether process ``pid`` is running (True when that cannot be told: its folders are then left alone)."""
    if pid == os.getpid():
        return False  # an earlier process of our number left it; ours makes its folders after this
    if os.name == "nt":
        return True  # os.kill(pid, 0) would stop the process there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it runs as another user
    return True


def _clear_leftovers(out: Path) -> list[str]:
    """Delete the work folders an earlier ``prepare`` into ``out`` left behind when it was killed (its process no
    longer runs); an earlier prepared folder it set aside while ``out`` is missing is put back instead."""
    pattern = re.compile(_WORK_FOLDER.format(name=re.escape(out.name)))
    notes = []
    for path in sorted(out.parent.iterdir()):  # sorted: .OUT.old-PID, put back, before its .OUT.tmp-PID
        found = pattern.fullmatch(path.name)
        if found is None or not path.is_dir() or _running(int(found["pid"])):
            continue
        why = f"left by an earlier 'covid-cxr prepare' (process {found['pid']}) that was stopped"
        try:
            if found["kind"] == "old" and not out.exists() and (path / "prepare.json").is_file():
                path.rename(out)
                notes.append(f"put the prepared folder {path.name}, {why} while replacing it, back as {out}")
            else:
                shutil.rmtree(path)
                notes.append(f"deleted {path}, {why}")
        except OSError as exc:
            notes.append(f"{path} was {why}, and cannot be deleted ({exc.strerror or exc}); delete it yourself")
    return notes


def _swap_in(tmp: Path, out: Path) -> bool:
    """Put the finished ``tmp`` in place of ``out`` (the earlier one deleted); True when a Ctrl-C came meanwhile,
    held back so that ``out`` is never missing, nor an earlier one left beside it."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    with signals_held(signal.SIGINT, redeliver=False) as caught:  # prepare_dataset says the folder is complete
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)  # put the earlier prepared folder back
            raise
        shutil.rmtree(old, ignore_errors=True)
    return bool(caught)


def prepare_dataset(settings: PrepareSettings, *, progress: bool = True) -> PrepareReport:
    """Run the whole preparation; raise :class:`DataError` (and write nothing) on any bad input."""
    out = Path(settings.out).resolve()
    leftovers = _clear_leftovers(out) if out.parent.is_dir() else []
    _check_out(out, settings)
    manifest, notes = read_sources(settings)
    if manifest.empty:
        raise DataError("the given datasets hold no image of the classes covid, pneumonia, normal")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        report = _prepare_into(tmp, out, settings, manifest, leftovers + notes, progress)
        if _swap_in(tmp, out):
            report.notes.append(f"Ctrl-C came while {out} was being put in place; that was finished first, so {out} "
                                "is complete and ready to train on")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.out = out
    return report


def _prepare_into(tmp: Path, out: Path, settings: PrepareSettings, manifest: pd.DataFrame, notes: list[str],
                  progress: bool) -> PrepareReport:
    report = PrepareReport(out=out, table1=table1(manifest), notes=notes)
    digests: dict[str, str] = {}  # image id -> sha256 of its file, from the cache build
    if out.is_dir():
        report.notes += _carry_over(out, tmp, manifest)
    if not settings.labels_only:
        key = cache_key(manifest, settings.image_size)
        folder = tmp / "cache" / cache_dirname(settings.image_size)
        build: CacheBuild
        if cache_matches(folder, key):
            build = read_cache_build(folder)
        else:
            build = build_cache(manifest, settings.image_size, folder, workers=settings.workers, progress=progress)
            write_cache_index(build, settings.image_size, key)
        report.cache_reused, report.decode_seconds = build.reused, build.seconds
        report.images_decoded = 0 if build.reused else len(manifest)
        if build.failures and not settings.skip_bad:
            _fail_on_bad(build.failures)
        report.skipped = build.failures
        digests = build.sha256
        bad = {f["image_id"] for f in build.failures}
        manifest = manifest[~manifest["image_id"].isin(bad)].copy()
        report.duplicates = _duplicates(digests, manifest)  # of the images kept: two empty files are no copies
        report.notes += _conflicting_copies(report.duplicates, manifest)
        views = manifest["image_id"].map(build.views).fillna("")
        manifest["view"] = manifest["view"].where(manifest["view"] != "", views)
        if bad:
            notes.append(f"--skip-bad: left out {len(bad)} images that cannot be decoded (listed in prepare.json)")
        if report.duplicates:
            notes.append(f"{len(report.duplicates)} groups of byte-identical files under different names "
                         f"(e.g. {', '.join(report.duplicates[0][:3])}); listed in prepare.json; generated folds keep "
                         "each group's patients on one side")
        report.table1 = table1(manifest)
    split_settings = settings.split
    plan = (read_author_splits(Path(settings.splits_from), manifest, split_settings) if settings.splits_from
            else covidx.covidx_plan(settings.covidx, manifest, split_settings) if settings.covidx
            else make_folds(manifest, split_settings, digests))
    check_filled(plan, manifest)
    if plan.origin != "generated":
        report.notes += _identical_note(plan, manifest, digests)
    # File names are written as the OS holds them (bytes that are not UTF-8 too), so the paths reopen.
    manifest.loc[:, list(COLUMNS)].to_csv(tmp / "manifest.csv", index=False, errors="surrogateescape")
    report.fold_summary = write_splits(plan, manifest, tmp / "splits")
    report.notes += plan.notes
    info = {
        "format": FORMAT, "version": 1, "covid_cxr": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings.to_dict(), "protocol": plan.protocol, "selection_on_test": plan.protocol == "paper",
        "num_folds": len(plan.folds), "num_phases": max(len(f.phases) for f in plan.folds),
        "image_size": None if settings.labels_only else settings.image_size,
        "table1": {src: row.to_dict() for src, row in report.table1.iterrows()},
        "notes": report.notes, "skipped": report.skipped, "duplicates": report.duplicates,
        "decode_seconds": round(report.decode_seconds, 2), "cache_reused": report.cache_reused,
    }
    write_json(tmp / "prepare.json", info, indent=1)
    return report
