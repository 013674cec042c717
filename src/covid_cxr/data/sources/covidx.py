"""COVIDx (COVID-Net, Wang et al. 2020): its split files and a folder of its images.

COVID-Net publishes COVIDx as label files, ``train_COVIDx<V>.txt`` and ``test_COVIDx<V>.txt``
(versions 4 to 9: 4, 5, 6, 7A, 8A, 9A ...), one image a line: ``patientid filename label
[source]``, space-separated; the images themselves are gathered from the sources the files name
(covid-chestxray as ``cohen``, RSNA as ``rsna``, Actualmed, Figure 1, SIRM, RICORD, BIMCV,
Stony Brook ...) into ``train/`` and ``test/`` folders. This adapter turns both files into manifest
rows (image ids ``covidx/<file stem>``, the source field mapped to our source names so the audits
see covid-chestxray and RSNA as such) and :func:`covidx_plan` keeps their test set as given: one
fold whose test split is COVIDx's test file, whose validation split is carved from COVIDx's
training file by patient, and whose training images are dealt over the phases.

Quirks handled: the COVIDx4 test file has no source field (its 197 such lines are RSNA images
named ``<patientId>.png``, recognised by that form); COVIDx9A spells RSNA ``rnsa`` on 199 lines;
the COVIDx4 training file lists one image (``000001-27.jpg``) under two patients, kept once; a file
name written on Windows (``train\\a.png``) is looked for as its ``/`` spelling.
The binary files (COVIDx8B, 9B: ``positive``/``negative``) cannot be read as three classes and are
refused with a message saying so.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_cxr import fmt
from covid_cxr.data import splits
from covid_cxr.data.manifest import finalize, make_ids
from covid_cxr.data.sources._common import listed_file
from covid_cxr.data.splits import Fold, SplitPlan, SplitSettings
from covid_cxr.errors import ConfigError, DataError
from covid_cxr.stats import wilson_interval

PREFIX = "covidx"
SPLITS = ("train", "test")
FILE_PATTERN = re.compile(r"(train|test)_COVIDx(\w*)\.txt$", re.IGNORECASE)
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
LABELS = {"covid-19": "covid", "covid19": "covid", "covid": "covid", "pneumonia": "pneumonia", "normal": "normal"}
BINARY_LABELS = {"positive", "negative"}
SOURCES = {"cohen": "covid-chestxray", "rsna": "rsna", "rnsa": "rsna", "actmed": "actualmed", "fig1": "figure1"}
"""COVIDx source field -> our source name (the others, sirm, ricord, bimcv, stonybrook ..., are kept)."""
FIX = ("give COVID-Net's split files (train_COVIDx<V>.txt and test_COVIDx<V>.txt from "
       "https://github.com/lindawangg/COVID-Net, labels/) or the folder holding them")

COVID_NET_CITATION = (
    "Wang L, Lin ZQ, Wong A. COVID-Net: a tailored deep convolutional neural network design for detection of "
    "COVID-19 cases from chest X-ray images. Scientific Reports 10, 19549 (2020). doi:10.1038/s41598-020-76550-z"
)
PUBLISHED_WHERE = "github.com/lindawangg/COVID-Net, README 'Results' and docs/models.md"
PUBLISHED: tuple[dict[str, Any], ...] = (
    {"model": "COVIDNet-CXR4-A", "test_set": "4", "per_class": 100, "accuracy": 94.3,
     "sensitivity": {"normal": 94.0, "pneumonia": 94.0, "covid": 95.0}, "ppv": {"normal": 91.3, "pneumonia": 93.1, "covid": 99.0}},
    {"model": "COVIDNet-CXR4-B", "test_set": "4", "per_class": 100, "accuracy": 93.7,
     "sensitivity": {"normal": 96.0, "pneumonia": 92.0, "covid": 93.0}, "ppv": {"normal": 88.9, "pneumonia": 93.9, "covid": 98.9}},
    {"model": "COVIDNet-CXR4-C", "test_set": "4", "per_class": 100, "accuracy": 93.3,
     "sensitivity": {"normal": 95.0, "pneumonia": 89.0, "covid": 96.0}, "ppv": {"normal": 90.5, "pneumonia": 93.7, "covid": 96.0}},
)  # fmt: skip
"""COVID-Net's published figures (percent) on the COVIDx4 test set (100 images a class), from
:data:`PUBLISHED_WHERE`; cite :data:`COVID_NET_CITATION`."""


@dataclass(frozen=True)
class CovidxFiles:
    """The split files to read, and the COVIDx version their names give (``4``, ``9A``, or ``""``)."""

    files: dict[str, Path]  # "train"/"test" -> file
    version: str


def find_files(given: Sequence[str | Path]) -> CovidxFiles:
    """The train and/or test file among ``given`` paths (files, or folders holding them)."""
    found: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for item in map(Path, given):
        if item.is_dir():
            candidates = sorted(p for p in item.iterdir() if FILE_PATTERN.match(p.name))
            if not candidates:
                raise DataError(f"{item} holds no train_COVIDx*.txt or test_COVIDx*.txt; {FIX}")
        elif item.is_file():
            candidates = [item]
        else:
            raise DataError(f"{item} not found; {FIX}")
        for path in candidates:
            match = FILE_PATTERN.match(path.name)
            split = match.group(1).lower() if match else ("test" if "test" in path.name.lower() else "train")
            found[split].append(path)
    for split, paths in found.items():
        if len(paths) > 1:
            raise DataError(f"several COVIDx {split} files given ({', '.join(p.name for p in paths)}); "
                            "give one train and one test file of the same version")
    files = {s: p[0] for s, p in found.items() if p}
    versions = {m.group(2).upper() for p in files.values() if (m := FILE_PATTERN.match(p.name))}
    if len(versions) > 1:
        raise DataError(f"the COVIDx files are of different versions ({', '.join(sorted(versions))}); "
                        "train and test must come from the same release")
    return CovidxFiles(files, versions.pop() if versions else "")


def parse_split_file(path: Path, split: str) -> pd.DataFrame:
    """One split file as a table (patientid, filename, label, source, split); bad lines name their number."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (3, 4):
            raise DataError(f"{path} line {number}: expected 'patientid filename label [source]', got {line!r}")
        raw = fields[2].strip().lower()
        if raw in BINARY_LABELS:
            raise DataError(f"{path}: a binary COVIDx file (labels positive/negative, as COVIDx8B and 9B): a negative "
                            "may be normal or pneumonia, which three classes cannot tell. Use the three-class files "
                            "(COVIDx8A, 9A). Beware: the 8B/9B test sets take every COVID-19 image from one source "
                            "and every negative from another, so a model can score well by recognising the source")
        if raw not in LABELS:
            raise DataError(f"{path} line {number}: unknown label {fields[2]!r}; "
                            "expected COVID-19, pneumonia or normal")
        rows.append((fields[0], fields[1], LABELS[raw], fields[3].lower() if len(fields) == 4 else ""))
    if not rows:
        raise DataError(f"{path} holds no lines; {FIX}")
    frame = pd.DataFrame(rows, columns=["patientid", "filename", "label", "raw_source"])
    frame["split"] = split
    return frame


def _source(frame: pd.DataFrame) -> tuple[pd.Series, int]:
    """Our source names; a line without one is ``rsna`` when named ``<patientId>.png`` with an RSNA id."""
    source = frame["raw_source"].map(lambda s: SOURCES.get(s, s))
    rsna_like = frame["patientid"].str.match(UUID) & (frame["filename"] == frame["patientid"] + ".png")
    missing = source == ""
    source = source.where(~(missing & rsna_like), "rsna").where(~(missing & ~rsna_like), "covidx-unknown")
    return source, int(missing.sum())


def split_table(covidx: CovidxFiles) -> tuple[pd.DataFrame, list[str]]:
    """Every listed image once, with its image id, label, patient, source and COVIDx split."""
    frame = pd.concat([parse_split_file(p, s) for s, p in covidx.files.items()], ignore_index=True)
    name = f"COVIDx{covidx.version}" if covidx.version else "COVIDx"
    notes = [f"{name}: " + ", ".join(f"{s} {int((frame['split'] == s).sum())} lines ({p.name})"
                                     for s, p in covidx.files.items())]
    frame["source"], no_source = _source(frame)
    if no_source:
        notes.append(f"{name}: {no_source} lines have no source field; those named <patientId>.png with an RSNA "
                     "patient id are counted as rsna, any other as covidx-unknown")
    names = {s: set(frame.loc[frame["split"] == s, "filename"]) for s in SPLITS}
    in_both = sorted(names["train"] & names["test"])
    if in_both:
        raise DataError(f"{name}: {len(in_both)} images are listed in both the train and the test file "
                        f"(e.g. {', '.join(in_both[:3])}); use the two files of one release unchanged")
    dup = frame["filename"].duplicated()
    if dup.any():
        notes.append(f"{name}: {int(dup.sum())} images listed twice, kept once (first patient id): "
                     f"{', '.join(frame.loc[dup, 'filename'].head(5))}")
        frame = frame[~dup].reset_index(drop=True)
    frame["image_id"] = make_ids(PREFIX, frame["filename"])
    frame["patient_id"] = frame["patientid"].astype(str)
    return frame, notes


def _locate(frame: pd.DataFrame, images: Path) -> tuple[list[str], int]:
    """Each image's path: IMAGES/<split>/<file>, else IMAGES/<file>, else found anywhere below IMAGES by name.
    A name written on Windows (``train\\a.png``) is looked for as its ``/`` spelling (:func:`~._common.listed_file`)."""
    paths, missing = [], []
    for i, (split, name) in enumerate(zip(frame["split"], frame["filename"])):
        first = listed_file(images / split, name)[1]
        path = first if first.is_file() else listed_file(images, name)[1]
        if not path.is_file():
            missing.append(i)
            path = first
        paths.append(str(path))
    if missing:
        by_name: dict[str, Path] = {}
        for found in images.rglob("*"):
            by_name.setdefault(found.name, found)
        still = 0
        for i in missing:
            hit = by_name.get(listed_file(images, frame["filename"].iat[i])[0])
            if hit is not None and hit.is_file():
                paths[i] = str(hit.resolve())
            else:
                still += 1
        return paths, still
    return paths, 0


def read_covidx(given: Sequence[str | Path], images: Path | None) -> tuple[pd.DataFrame, list[str]]:
    """Manifest rows of the COVIDx split files ``given`` with their images under ``images``, and notes.

    Without ``images`` (``--labels-only``) the paths point beside the split files and are not checked.
    """
    covidx = find_files(given)
    frame, notes = split_table(covidx)
    if images is None:
        base = next(iter(covidx.files.values())).parent.resolve()
        frame["path"] = [str(listed_file(base / s, n)[1]) for s, n in zip(frame["split"], frame["filename"])]
    else:
        images = Path(images).resolve()
        if not images.is_dir():
            raise DataError(f"{images} not found: give the folder of the COVIDx images (with train/ and test/) "
                            "as --covidx-images; COVID-Net's create_COVIDx notebook builds it from the public sources")
        frame["path"], missing = _locate(frame, images)
        if missing:
            notes.append(f"{missing} images listed in the COVIDx files are not under {images}; prepare will list them "
                         "(--skip-bad leaves them out)")
    frame["view"] = ""
    notes += confounding_notes(frame)
    return finalize(frame, f"COVIDx{covidx.version} split files"), notes


def confounding_notes(frame: pd.DataFrame) -> list[str]:
    """Warn when the test set's COVID-19 images and its other images come from different sources."""
    test = frame[frame["split"] == "test"]
    covid = test[test["label"] == "covid"]
    other = test[test["label"] != "covid"]
    if covid.empty or other.empty:
        return []
    covid_sources = set(covid["source"])
    shared = other["source"].isin(covid_sources)
    what = (f"COVID-19 from {', '.join(sorted(covid_sources))}; the other classes from "
            f"{', '.join(sorted(set(other['source'])))}")
    if not shared.any():
        return [f"warning: the COVIDx test set takes every COVID-19 image from one group of sources and every other "
                f"image from another ({what}), as COVIDx8B, 9A and 9B do: a model that recognises the source scores "
                "well without seeing disease. Run 'covid-cxr audit' and evaluate on an external set as well"]
    share = 100.0 * float((~shared).mean())
    if share >= 90.0:
        return [f"warning: {share:.0f}% of the COVIDx test images of other classes come from sources without any "
                f"COVID-19 test image ({what}): source and class are nearly confounded; run 'covid-cxr audit'"]
    return []


def covidx_plan(given: Sequence[str | Path], manifest: pd.DataFrame, settings: SplitSettings) -> SplitPlan:
    """One fold: COVIDx's test file as the test split, validation carved by patient from its train file."""
    if settings.protocol != "strict":
        raise ConfigError("COVIDx has its own test set: the paper's s_test protocol does not apply; "
                          "drop --protocol paper")
    covidx = find_files(given)
    table, _ = split_table(covidx)
    split = dict(zip(table["image_id"], table["split"]))
    frame = manifest[manifest["image_id"].isin(split)]
    side = frame["image_id"].map(split)
    test = frame.loc[side == "test", "image_id"].tolist()
    train = frame[side == "train"]
    notes = [f"splits from COVIDx{covidx.version}: its test file is the test split, unchanged ({len(test)} images); "
             f"one fold (--folds {settings.folds} does not apply)"]
    if train.empty:
        val, phases = [], [[] for _ in range(settings.phases)]
        notes.append("no COVIDx training file: this folder is for evaluation only (its test split)")
    else:
        val, phases, note = _train_side(train, settings)
        notes.append(note)
    plan = SplitPlan(folds=[Fold(fold=1, phases=phases, val=val, test=test)], protocol="strict",
                     origin=f"covidx:{','.join(p.name for p in covidx.files.values())}", notes=notes,
                     settings={"folds": 1, "phases": settings.phases, "seed": settings.seed, "protocol": "strict",
                               "val_fraction": settings.val_fraction, "covidx_version": covidx.version})
    splits.check_disjoint(plan, manifest)
    return plan


def _train_side(train: pd.DataFrame, settings: SplitSettings) -> tuple[list[str], list[list[str]], str]:
    """Validation patients carved from COVIDx's training file; the rest dealt over the phases as the paper does:
    every COVID-19 and covid-chestxray patient in each phase, every other patient in exactly one."""
    share = max(2, round(1 / settings.val_fraction))
    in_val = _deal(train, share, settings.seed) == 0
    val_pat = set(train.loc[in_val, "patient_id"])
    val = train.loc[in_val, "image_id"].tolist()
    rest = train[~in_val]
    core = splits.core_mask(rest)
    core_ids = rest.loc[core, "image_id"].tolist()
    pool = rest[~core]
    phase_of = _deal(pool, settings.phases, settings.seed + 1)
    phases = [core_ids + pool.loc[phase_of == p, "image_id"].tolist() for p in range(settings.phases)]
    note = (f"validation: {len(val)} images of {len(val_pat)} patients from the COVIDx training file (1 in {share}, "
            f"by patient); the rest over {settings.phases} phases, every COVID-19 and covid-chestxray patient in "
            "each, the others dealt out once")
    return val, phases, note


def _deal(frame: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    """Each image's group 0..k-1, whole patients, stratified by class (``StratifiedGroupKFold``, as the folds
    are); fewer patients than groups get one group each."""
    patients = frame["patient_id"].nunique()
    if k == 1:
        return np.zeros(len(frame), dtype=int)
    if patients >= k:
        return splits.patient_folds(frame, k, seed)
    codes, _ = pd.factorize(frame["patient_id"])
    return np.random.default_rng(seed).permutation(k)[:patients][codes] if patients else np.zeros(0, dtype=int)


def check_settings(covidx: Sequence[str] | None, images: Path | None, *, others: bool, splits_from: Path | None,
                   labels_only: bool) -> None:
    """Refuse combinations ``prepare`` cannot honour with COVIDx, naming the fix."""
    if not covidx:
        if images is not None:
            raise ConfigError("--covidx-images needs --covidx SPLIT_FILES")
        return
    if others:
        raise ConfigError("--covidx cannot be combined with --covid-chestxray, --rsna or --folder: COVIDx already "
                          "holds covid-chestxray and RSNA images; prepare the other data into its own folder")
    if splits_from is not None:
        raise ConfigError("--covidx keeps COVIDx's own train/test split; drop --splits-from")
    if images is None and not labels_only:
        raise ConfigError("--covidx needs --covidx-images DIR, the folder of the COVIDx images (train/ and test/)")


def published_rows(metrics: dict[str, Any], version: str) -> list[list[str]]:
    """Our figures on a COVIDx test set beside COVID-Net's published ones on the same version's test set.

    Rows: model, COVID-19 sensitivity [95% CI], COVID-19 PPV [95% CI], accuracy; the published
    sensitivities' intervals follow from their 100 images a class. Empty when nothing was published
    for ``version``.
    """
    published = [p for p in PUBLISHED if p["test_set"] == str(version).upper()]
    if not published:
        return []
    rows = [["this model", _ci(metrics, "covid_recall"), _ci(metrics, "covid_precision"), _ci(metrics, "accuracy")]]
    for p in published:
        n = p["per_class"]
        low, high = wilson_interval(round(p["sensitivity"]["covid"] * n / 100), n)
        sensitivity = fmt.interval(p["sensitivity"]["covid"], 100 * low, 100 * high)
        rows.append([f"{p['model']} (published)", sensitivity, f"{p['ppv']['covid']:.1f}", f"{p['accuracy']:.1f}"])
    return rows


def _ci(metrics: dict[str, Any], key: str) -> str:
    return fmt.interval(metrics.get(key), metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high"), na="-")
