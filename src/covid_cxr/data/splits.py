"""Patient-grouped folds, the paper's training phases, and validation sets.

The paper's design (SPEC section 2): the scarce images (every COVID-19 image, and everything
from covid-chestxray) form the *core*; each fold tests on a fifth of the core patients, and
every training phase repeats all the other core images. The abundant images (RSNA, a user's
folder) form the *pool*: every phase adds its own 250 normal and 200 pneumonia images that no
other phase uses, and whatever no phase or validation set takes is test. Pools smaller than the
RSNA set get the quotas scaled down in proportion (the run's notes say so).

Unlike the authors, the core is a true partition: seeded, grouped by patient, stratified by
class, so no patient is ever in two folds' test sets. Validation (``strict``, the default)
comes from the training side, patient-disjoint from test; ``paper`` rebuilds the authors'
``s_test`` (all test COVID-19 + 300 normal + 300 pneumonia test images), which selects the
checkpoint on test data and is labelled so. :func:`check_disjoint` refuses any fold in which a
patient sits on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from covid_cxr.errors import ConfigError, DataError
from covid_cxr.labels import CLASSES

PROTOCOLS = ("strict", "paper")
CORE_SOURCES = ("covid-chestxray",)
PHASE_QUOTA = {"normal": 250, "pneumonia": 200}
"""Pool images per class in each phase (the authors' numbers)."""
VAL_QUOTA = {"normal": 300, "pneumonia": 300}
"""Pool images per class in the validation set (the authors' ``s_test``)."""
PAPER_POOL = {"normal": 8851, "pneumonia": 6012}
"""RSNA pool sizes the quotas were set for; smaller pools scale the quotas by n / these."""
SELECTION_ON_TEST = (
    "protocol 'paper': the validation set is drawn from the test set (the authors' s_test), so choosing "
    "a checkpoint on it selects on test data and test figures are optimistic"
)


@dataclass(frozen=True)
class SplitSettings:
    """How folds are made: counts, seed, validation protocol and share."""

    folds: int = 5
    phases: int = 8
    seed: int = 0
    protocol: str = "strict"
    val_fraction: float = 0.1  # strict: share of the training-side core patients held out for validation

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {self.protocol!r}")
        if not 2 <= self.folds <= 20:
            raise ConfigError(f"folds must be between 2 and 20; got {self.folds}")
        if not 1 <= self.phases <= 50:
            raise ConfigError(f"phases must be between 1 and 50; got {self.phases}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be in (0, 0.5); got {self.val_fraction}")


@dataclass
class Fold:
    """One fold as lists of image ids."""

    fold: int
    phases: list[list[str]]
    val: list[str]
    test: list[str]

    @property
    def train(self) -> set[str]:
        return {i for p in self.phases for i in p}


@dataclass
class SplitPlan:
    """All folds, with what a user should know about how they were made."""

    folds: list[Fold]
    protocol: str
    origin: str  # 'generated' or the authors' split folder
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def _patient_class(labels: pd.Series) -> str:
    """A patient's stratum: its rarest class (COVID-19 before pneumonia before normal)."""
    present = set(labels)
    return next(c for c in CLASSES if c in present)


def patient_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: stratum and image count."""
    grouped = frame.groupby("patient_id", sort=True)["label"]
    return pd.DataFrame({"stratum": grouped.agg(_patient_class), "n": grouped.size()})


def assign_groups(patients: pd.DataFrame, k: int, rng: np.random.Generator) -> pd.Series:
    """Patient -> group 0..k-1: stratified by class, balanced by image count, seeded."""
    order = patients.assign(r=rng.permutation(len(patients))).sort_values(["n", "r"], ascending=[False, True])
    group = pd.Series(-1, index=patients.index, dtype=int)
    for stratum in CLASSES:
        loads = np.zeros(k, dtype=int)
        for pid, n in order.loc[order["stratum"] == stratum, "n"].items():
            g = int(np.argmin(loads + 1e-3 * np.arange(k)))
            group[pid] = g
            loads[g] += int(n)
    return group


def take_patients(frame: pd.DataFrame, quotas: list[int], rng: np.random.Generator) -> tuple[list[list[str]], list[str]]:
    """Shuffle ``frame``'s patients once (seeded) and cut consecutive runs of whole patients holding at
    least ``quotas[j]`` images each; return the runs' image ids and the ids left over."""
    parts: list[list[str]] = [[] for _ in quotas]
    if frame.empty:
        return parts, []
    codes, uniques = pd.factorize(frame["patient_id"], sort=False)  # frame order is deterministic
    order = rng.permutation(len(uniques))
    cumulative = np.cumsum(np.bincount(codes, minlength=len(uniques))[order])
    part_of = np.full(len(uniques), len(quotas))
    pos = 0
    for j, quota in enumerate(quotas):
        if quota <= 0 or pos >= len(order):
            continue
        before = cumulative[pos - 1] if pos else 0
        end = min(len(order), int(np.searchsorted(cumulative, before + quota)) + 1)
        part_of[order[pos:end]] = j
        pos = end
    image_part = part_of[codes]
    ids = frame["image_id"].to_numpy()
    return [ids[image_part == j].tolist() for j in range(len(quotas))], ids[image_part == len(quotas)].tolist()


def draw_patients(frame: pd.DataFrame, quota: int, rng: np.random.Generator) -> list[str]:
    """Whole patients of ``frame`` in a seeded order until ``quota`` images are taken."""
    return take_patients(frame, [quota], rng)[0][0]


def pool_quotas(pool: pd.DataFrame, phases: int) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """Per-class images each phase and the validation set take from the pool, scaled to its size."""
    phase_q, val_q, notes = {}, {}, []
    for cls, base in PHASE_QUOTA.items():
        n = int((pool["label"] == cls).sum())
        if n == 0:
            continue
        scale = min(1.0, n / PAPER_POOL[cls])
        phase_q[cls] = math.floor(base * scale)
        val_q[cls] = max(1, round(VAL_QUOTA[cls] * scale))
        if phase_q[cls] == 0:
            if n < phases + 2 * val_q[cls]:
                raise DataError(f"only {n} {cls} images in the RSNA/folder pool: too few for {phases} phases "
                                "plus validation and test; add images or lower --phases")
            phase_q[cls] = 1
        if scale < 1.0:
            notes.append(f"{cls}: pool of {n} images is smaller than the paper's {PAPER_POOL[cls]}, so each phase "
                         f"takes {phase_q[cls]} (paper: {base}) and validation {val_q[cls]} (paper: {VAL_QUOTA[cls]})")
    return phase_q, val_q, notes


def core_mask(manifest: pd.DataFrame) -> pd.Series:
    """Images of patients with any COVID-19 image or any covid-chestxray image: repeated in every phase."""
    scarce = (manifest["label"] == "covid") | manifest["source"].isin(CORE_SOURCES)
    core_patients = set(manifest.loc[scarce, "patient_id"])
    return manifest["patient_id"].isin(core_patients)


def make_folds(manifest: pd.DataFrame, settings: SplitSettings) -> SplitPlan:
    """Seeded, patient-grouped folds with phases, validation and test (see the module docstring)."""
    is_core = core_mask(manifest)
    core, pool = manifest[is_core], manifest[~is_core]
    patients = patient_table(core)
    n_covid_patients = int((patients["stratum"] == "covid").sum())
    if n_covid_patients < settings.folds:
        raise DataError(f"{n_covid_patients} COVID-19 patients cannot fill {settings.folds} folds; "
                        "add data or lower --folds")
    rng = np.random.default_rng(settings.seed)
    group = assign_groups(patients, settings.folds, rng)
    phase_q, val_q, notes = pool_quotas(pool, settings.phases)
    if settings.protocol == "paper":
        notes.append(SELECTION_ON_TEST)
    folds = []
    for k in range(settings.folds):
        frng = np.random.default_rng([settings.seed, k + 1])
        test_pat = set(group.index[group == k])
        train_pat = patients.loc[group != k]
        val_pat: set[str] = set()
        if settings.protocol == "strict":
            inner = assign_groups(train_pat, max(2, round(1 / settings.val_fraction)), frng)
            val_pat = set(inner.index[inner == 0])
        core_test = core.loc[core["patient_id"].isin(test_pat), "image_id"].tolist()
        core_val = core.loc[core["patient_id"].isin(val_pat), "image_id"].tolist()
        core_train = core.loc[~core["patient_id"].isin(test_pat | val_pat), "image_id"].tolist()
        phases: list[list[str]] = [list(core_train) for _ in range(settings.phases)]
        pool_val: list[str] = []
        pool_test: list[str] = []
        for cls in CLASSES:
            val_n = val_q.get(cls, 0) if settings.protocol == "strict" else 0
            quotas = [val_n] + [phase_q.get(cls, 0)] * settings.phases
            runs, rest = take_patients(pool[pool["label"] == cls], quotas, frng)
            pool_val += runs[0]
            for p in range(settings.phases):
                phases[p] += runs[p + 1]
            pool_test += rest
        test = core_test + pool_test
        if settings.protocol == "strict":
            val = core_val + pool_val
        else:  # the authors' s_test: all test COVID-19 + some test normal and pneumonia, drawn from test
            test_frame = manifest[manifest["image_id"].isin(pool_test)]
            val = manifest.loc[manifest["image_id"].isin(test) & (manifest["label"] == "covid"), "image_id"].tolist()
            for cls in ("normal", "pneumonia"):
                val += draw_patients(test_frame[test_frame["label"] == cls], val_q.get(cls, 0), frng)
        folds.append(Fold(fold=k + 1, phases=phases, val=val, test=test))
    plan = SplitPlan(folds=folds, protocol=settings.protocol, origin="generated", notes=notes,
                     settings={"folds": settings.folds, "phases": settings.phases, "seed": settings.seed,
                               "protocol": settings.protocol, "val_fraction": settings.val_fraction})
    check_disjoint(plan, manifest)
    return plan


def check_disjoint(plan: SplitPlan, manifest: pd.DataFrame) -> None:
    """Refuse folds where a patient is in test and in training or validation, or ids are unknown.

    Under ``paper`` the validation set is part of test by design; it must still share no patient
    with training.
    """
    patient = dict(zip(manifest["image_id"], manifest["patient_id"]))
    problems = []
    for fold in plan.folds:
        ids = fold.train | set(fold.val) | set(fold.test)
        unknown = sorted(ids - set(patient))
        if unknown:
            problems.append(f"fold {fold.fold}: {len(unknown)} image ids not in the manifest (e.g. {unknown[0]})")
            continue
        train_p = {patient[i] for i in fold.train}
        val_p = {patient[i] for i in fold.val}
        test_p = {patient[i] for i in fold.test}
        pairs = [("test", test_p, "training", train_p), ("validation", val_p, "training", train_p)]
        if plan.protocol == "strict":
            pairs.append(("test", test_p, "validation", val_p))
        for a, pa, b, pb in pairs:
            both = sorted(pa & pb)
            if both:
                problems.append(f"fold {fold.fold}: {len(both)} patients in both {a} and {b} (e.g. {', '.join(both[:5])})")
        if set(fold.train) & set(fold.test):
            problems.append(f"fold {fold.fold}: images in both training and test")
    if problems:
        raise DataError("refusing to write splits that leak patients between test and training/validation: "
                        + "; ".join(problems))
