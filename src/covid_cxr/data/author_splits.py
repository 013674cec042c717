"""The authors' own split files (github.com/mr7495/covid19), read back into our folds.

Layout: ``All.csv`` (``filename,class``: every image they used; RSNA images named
``<patientId>.png``) and ``foldK/trainP.csv`` (the images of phase P of fold K). Their phases are
reproduced exactly and their test set is All minus every phase of the fold. Validation:
``paper`` rebuilds their ``s_test`` from the test set (selection on test data, as they did);
``strict`` moves a patient-grouped validation set out of the test set instead (a third of
the fold's test core patients and the paper's 300 + 300 pool images), so the phases stay theirs
and nothing is selected on images that are scored.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from covid_cxr.data.sources._common import read_table
from covid_cxr.data.splits import (
    SELECTION_ON_TEST,
    VAL_QUOTA,
    Fold,
    SplitPlan,
    SplitSettings,
    check_disjoint,
    core_mask,
    patient_folds,
    share_quota,
    take_patients,
)
from covid_cxr.errors import ConfigError, DataError
from covid_cxr.labels import normalize_label

FIX = "give the folder of the authors' split files (All.csv and fold1/train1.csv ...)"
STRICT_VAL_SHARE = 3  # strict: one in this many of the fold's test core patients becomes validation


def _numbered(folder: Path, pattern: str) -> list[Path]:
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(pattern, p.name))]
    return [p for _, p in sorted(found)]


def _lookup(manifest: pd.DataFrame) -> dict[str, str]:
    """Authors' file name -> our image id: by file name, then by stem (``<patientId>.png`` -> the DICOM)."""
    names = manifest["path"].map(lambda p: Path(p).name)
    table: dict[str, str] = {}
    for name, image_id in zip(names, manifest["image_id"]):
        table.setdefault(name.rsplit(".", 1)[0], image_id)
    for name, image_id in zip(names, manifest["image_id"]):
        table[name] = image_id
    return table


def _map(files: pd.DataFrame, lookup: dict[str, str], labels: dict[str, str], where: Path) -> list[str]:
    ids, missing, wrong = [], [], []
    for i, (name, cls) in enumerate(zip(files["filename"].str.strip(), files["class"])):
        image_id = lookup.get(name) or lookup.get(name.rsplit(".", 1)[0])
        if image_id is None:
            missing.append(name)
            continue
        try:
            label = normalize_label(cls, where=f"{where} row {i + 2}")
        except ValueError as exc:
            raise DataError(str(exc)) from None
        if labels[image_id] != label:
            wrong.append(f"{name} ({cls} there, {labels[image_id]} here)")
        ids.append(image_id)
    if missing:
        raise DataError(f"{where}: {len(missing)} files are not among the prepared images (e.g. "
                        f"{', '.join(missing[:3])}); use the datasets the splits were made from "
                        "(covid-chestxray-dataset of April 2020 and the RSNA stage-2 training set)")
    if wrong:
        raise DataError(f"{where}: {len(wrong)} files have another class than in the datasets: {', '.join(wrong[:3])}")
    return ids


def read_author_splits(folder: Path, manifest: pd.DataFrame, settings: SplitSettings) -> SplitPlan:
    """Folds whose phases are exactly the authors' files, mapped to our image ids."""
    folder = Path(folder)
    if settings.protocol == "kfold":
        raise ConfigError("--splits-from reproduces the authors' phases; use --protocol strict or paper with it, "
                          "or leave --splits-from out for --protocol kfold")
    if not folder.is_dir():
        raise DataError(f"{folder} not found; {FIX}")
    lookup = _lookup(manifest)
    labels = dict(zip(manifest["image_id"], manifest["label"]))
    all_file = folder / "All.csv"
    all_ids = _map(read_table(all_file, ("filename", "class"), fix=FIX), lookup, labels, all_file)
    if len(set(all_ids)) != len(all_ids):
        raise DataError(f"{all_file}: some images are listed twice")
    fold_dirs = _numbered(folder, r"fold(\d+)")
    if not fold_dirs:
        raise DataError(f"{folder} holds no fold1/, fold2/ ... folders; {FIX}")
    used = manifest[manifest["image_id"].isin(set(all_ids))]
    notes = [f"splits read from {folder}: {len(fold_dirs)} folds"]
    left_out = len(manifest) - len(used)
    if left_out:
        notes.append(f"{left_out} prepared images are not in the authors' All.csv and are in no fold")
    if settings.protocol == "paper":
        notes.append(SELECTION_ON_TEST)
    else:
        notes.append("protocol 'strict' with the authors' splits: validation is moved out of their test set "
                     f"(1 in {STRICT_VAL_SHARE} test core patients + pool images), so test is smaller than theirs")
    is_core = core_mask(used)
    val_q = share_quota(used[~is_core], settings.val_fraction, VAL_QUOTA)
    folds = []
    for k, fold_dir in enumerate(fold_dirs, start=1):
        phase_files = _numbered(fold_dir, r"train(\d+)\.csv")
        if not phase_files:
            raise DataError(f"{fold_dir} holds no train1.csv, train2.csv ...; {FIX}")
        phases = [_map(read_table(f, ("filename", "class"), fix=FIX), lookup, labels, f) for f in phase_files]
        in_phases = {i for p in phases for i in p}
        test = [i for i in all_ids if i not in in_phases]
        rng = np.random.default_rng([settings.seed, k])
        test_frame = used[used["image_id"].isin(set(test))]
        core_test = test_frame[core_mask(used)[test_frame.index]]
        pool_test = test_frame.drop(core_test.index)
        if settings.protocol == "paper":
            val = core_test.loc[core_test["label"] == "covid", "image_id"].tolist()
        else:
            parts = min(STRICT_VAL_SHARE, core_test["patient_id"].nunique())
            share = patient_folds(core_test, parts, settings.seed + k) == 0 if parts > 1 else []
            val = core_test.loc[share, "image_id"].tolist()
        val += take_patients(pool_test, [val_q], rng)[0][0]
        if settings.protocol == "strict":
            moved = set(val)
            test = [i for i in test if i not in moved]
        folds.append(Fold(fold=k, phases=phases, val=val, test=test))
    plan = SplitPlan(folds=folds, protocol=settings.protocol, origin=str(folder.resolve()), notes=notes,
                     settings={"folds": len(folds), "phases": max(len(f.phases) for f in folds), "seed": settings.seed,
                               "protocol": settings.protocol, "splits_from": str(folder.resolve())})
    check_disjoint(plan, manifest)
    return plan
