"""Patient-grouped folds, the training phases, and validation sets.

Every patient gets one fold from scikit-learn's ``StratifiedGroupKFold`` (grouped by patient,
stratified by core/pool, source and class, balanced by images, seeded): the fold's test set holds
all of that patient's images whatever their labels, and a patient's images are only ever taken
whole, so no patient is on two sides of a fold.

Protocols (``--protocol``):

- ``strict`` (default) and ``paper``, the paper's design (SPEC section 2): the scarce images (every
  COVID-19 patient, and everything from covid-chestxray) form the *core*, repeated in every phase;
  the abundant images (RSNA, a user's folder) form the *pool*, each pool image in one phase only.
  The per-phase quotas keep the paper's class balance on any pool size (:mod:`.phases`); pool images
  no phase or validation set takes are test too (as in the paper). ``strict`` carves validation
  from the training side; ``paper`` rebuilds the authors' ``s_test`` (all test COVID-19 + pool
  test images), which selects the checkpoint on test data and is labelled so.
- ``kfold``: plain stratified group k-fold, for a user's own data: validation is a share of the
  training side's patients and every other training image is in one phase, in the data's own
  proportions.

A patient is its source and its id (``nih:13``): ids are only unique within a source (NIH's patient 13
is not covid-chestxray's). Patients whose files are byte-identical (a study exported twice, under two
ids) are merged into one group before the folds are made, so the same image is never on two sides.

:func:`check_disjoint` refuses any fold in which a patient, or an image's bytes, sits on two sides, and
:func:`check_filled` any fold with an empty phase, validation or test split.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from covid_cxr.config import PROTOCOLS
from covid_cxr.data.phases import PhaseQuota, deviation, describe, plan_phase, shares, spread
from covid_cxr.errors import ConfigError, DataError
from covid_cxr.labels import CLASSES, DISPLAY_NAMES

CORE_SOURCES = ("covid-chestxray",)
GROUP = "group"
"""Column :func:`make_folds` adds to its working manifest: what must stay on one side of every fold (a
patient, or patients sharing a byte-identical image); frames without it group by :func:`patient_key`."""
UNITS_PER_KIND = 500
"""Most units :func:`patient_folds` splits patients with images of the same strata into (bundles beyond)."""
VAL_QUOTA = {"normal": 300, "pneumonia": 300}
"""Most pool images per class in a validation set (the authors' ``s_test``)."""
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
    val_fraction: float = 0.1  # share of the training side's images held out for validation (pool: at most 300 a class)

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
    phase_info: list[dict[str, Any]] = field(default_factory=list)  # per fold: what the phases hold and why


def counts(frame: pd.DataFrame) -> dict[str, int]:
    """Images per class."""
    got = frame["label"].value_counts()
    return {c: int(got.get(c, 0)) for c in CLASSES}


def patient_key(frame: pd.DataFrame) -> pd.Series:
    """Each image's patient as ``source:patient_id``: patient ids are only unique within their source."""
    return frame["source"].astype(str) + ":" + frame["patient_id"].astype(str)


def groups_of(frame: pd.DataFrame) -> pd.Series:
    """What must stay together: the :data:`GROUP` column where :func:`make_folds` set it, else the patient."""
    return frame[GROUP] if GROUP in frame.columns else patient_key(frame)


def merge_identical(manifest: pd.DataFrame, digests: dict[str, str]) -> pd.Series:
    """Each image's group: its patient key, with patients that share an image sha256 merged (connected
    components: patient A shares a file with B and B with C -> one group), named by its first key."""
    keys = patient_key(manifest)
    codes, uniques = pd.factorize(keys, sort=True)
    digest = np.array([digests.get(i, "") for i in manifest["image_id"]], dtype=object)
    has = digest != ""
    first = pd.Series(codes[has]).groupby(pd.factorize(digest[has])[0]).transform("first").to_numpy()
    graph = coo_matrix((np.ones(len(first)), (codes[has], first)), shape=(len(uniques), len(uniques)))
    _, component = connected_components(graph, directed=False)
    name = pd.Series(uniques).groupby(component).transform("first").to_numpy()  # sorted: the smallest key
    return pd.Series(name[codes], index=manifest.index)


def _merge_note(manifest: pd.DataFrame) -> list[str]:
    """How many patients :func:`merge_identical` merged, and why."""
    per_group = patient_key(manifest).groupby(manifest[GROUP]).nunique()
    merged = per_group[per_group > 1]
    if merged.empty:
        return []
    note = (f"{int(merged.sum())} patients merged into {len(merged)} groups because they share byte-identical images "
            f"(the same study filed under several patient ids, e.g. {merged.index[0]}); each group is kept on one "
            "side of every fold")
    return [note]


def core_mask(manifest: pd.DataFrame) -> pd.Series:
    """Images of patients (groups) with any COVID-19 image or any covid-chestxray image: repeated in every phase."""
    scarce = (manifest["label"] == "covid") | manifest["source"].isin(CORE_SOURCES)
    groups = groups_of(manifest)
    return groups.isin(set(groups[scarce]))


def _bundles(patients: np.ndarray, strata: np.ndarray, seed: int) -> np.ndarray:
    """Each image's unit for ``StratifiedGroupKFold``: its patient or, where more than
    :data:`UNITS_PER_KIND` patients have images of the very same strata (RSNA's one-image patients), a
    seeded bundle of a few of them. The splitter's cost grows with its groups (15000: seconds); a bundle
    is whole patients of one kind, so grouping holds and folds stay balanced to within a bundle."""
    codes, uniques = pd.factorize(patients)
    stratum, kinds = pd.factorize(strata)
    per_patient = np.zeros((len(uniques), len(kinds)), dtype=np.int64)
    np.add.at(per_patient, (codes, stratum), 1)
    kind = pd.factorize(pd.util.hash_pandas_object(pd.DataFrame(per_patient), index=False))[0]
    order = np.lexsort((np.random.default_rng(seed).permutation(len(uniques)), kind))
    size = np.bincount(kind)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    position = np.empty(len(uniques), dtype=np.int64)
    position[order] = np.arange(len(uniques)) - start[kind[order]]
    per_bundle = np.maximum(1, -(-size // UNITS_PER_KIND))
    unit = kind * (int(size.max()) + 1) + position // per_bundle[kind]
    return unit[codes]


def patient_folds(frame: pd.DataFrame, k: int, seed: int, strata: pd.Series | None = None) -> np.ndarray:
    """Each image's fold 0..k-1: ``StratifiedGroupKFold`` over patients, stratified by ``strata``
    (default: the label), so a patient's images share a fold and the classes spread evenly by images."""
    y = (frame["label"] if strata is None else strata).to_numpy().astype(str)
    groups = _bundles(groups_of(frame).to_numpy(), y, seed)
    fold = np.full(len(frame), -1)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a stratum with fewer members than folds is fine: it spreads over fewer
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        for j, (_, test) in enumerate(splitter.split(np.zeros(len(frame)), y, groups)):
            fold[test] = j
    return fold


def take_patients(frame: pd.DataFrame, quotas: list[dict[str, int]], rng: np.random.Generator, *,
                  keep_one: Collection[str] = ()) -> tuple[list[list[str]], list[str]]:
    """Whole patients of ``frame`` in one seeded order, into parts holding about ``quotas[j][c]`` images of
    each class ``c``; return the parts' image ids and the ids left over.

    Patients are taken by their rarest class first (COVID-19, pneumonia, normal), so a patient with a
    pneumonia and a normal image fills the pneumonia quota and counts towards the normal one. A
    patient who would overshoot a quota by more than it is short is left for a later part, except that a part
    which asks for a class and would get none of it takes the smallest patient of that class, while another one
    is left over: where every patient has many images (daily films in intensive care), a validation split would
    otherwise hold none of the class, and the best checkpoint and a decision threshold be chosen without it.
    ``keep_one`` names the classes whose last patient stays with the rest (a validation split must not take the
    training side's only COVID-19 patient; where the rest has the class from elsewhere, the paper's pool, it may).
    """
    parts: list[list[str]] = [[] for _ in quotas]
    if frame.empty:
        return parts, []
    codes, uniques = pd.factorize(groups_of(frame), sort=False)  # frame order is deterministic
    label = pd.Categorical(frame["label"], categories=CLASSES).codes
    per_patient = np.zeros((len(uniques), len(CLASSES)), dtype=np.int64)
    np.add.at(per_patient, (codes, label), 1)
    stratum = np.argmax(per_patient > 0, axis=1)  # the first class in CLASSES order a patient has
    order = rng.permutation(len(uniques))
    part_of = np.full(len(uniques), len(quotas))
    have = np.zeros((len(quotas), len(CLASSES)), dtype=np.int64)
    for s, cls in enumerate(CLASSES):
        queue = order[stratum[order] == s].tolist()
        sizes = per_patient[:, s].tolist()
        spare = 1 if cls in keep_one else 0  # patients of the class that must stay for the rest
        for j, quota in enumerate(quotas):
            need, kept = quota.get(cls, 0) - int(have[j, s]), []
            for n, patient in enumerate(queue):
                if need <= 0:
                    kept += queue[n:]
                    break
                left = len(queue) - n + len(kept)  # this patient and the others not yet in a part
                if sizes[patient] - need < need and left > spare:  # fits, or gets closer to the quota than without it
                    part_of[patient] = j
                    have[j] += per_patient[patient]
                    need -= sizes[patient]
                else:
                    kept.append(patient)
            if quota.get(cls, 0) > 0 and have[j, s] == 0 and len(kept) > max(spare, 1):
                smallest = min(kept, key=lambda patient: sizes[patient])  # the first in seeded order among equals
                part_of[smallest] = j
                have[j] += per_patient[smallest]
                kept.remove(smallest)
            queue = kept
    image_part = part_of[codes]
    ids = frame["image_id"].to_numpy()
    return [ids[image_part == j].tolist() for j in range(len(quotas))], ids[image_part == len(quotas)].tolist()


def share_quota(frame: pd.DataFrame, share: float, most: dict[str, int] | None = None) -> dict[str, int]:
    """``share`` of each class's images (at least 1 where there are any, at most ``most[c]``)."""
    quota = {c: max(1, round(share * n)) for c, n in counts(frame).items() if n}
    return {c: min(n, (most or {}).get(c, n)) for c, n in quota.items()}


def _check_enough(manifest: pd.DataFrame, settings: SplitSettings) -> None:
    """Every class the folds must test (COVID-19; every class present under ``kfold``) needs a patient a fold."""
    present = [c for c in CLASSES if (manifest["label"] == c).any()]
    if len(present) == 1:
        raise DataError(f"all {len(manifest)} images are {DISPLAY_NAMES[present[0]]}: a single class cannot train a "
                        "classifier; add images of the other classes")
    classes = present if settings.protocol == "kfold" else ["covid"]
    for cls in classes:
        n = groups_of(manifest)[manifest["label"] == cls].nunique()
        if n < settings.folds:
            fixes = ["add data"] + (["lower --folds"] if n >= 2 and settings.folds > 2 else [])
            if n == 0 and settings.protocol != "kfold":  # the paper's protocols test COVID-19 in every fold
                fixes.append("for data without COVID-19 images give --protocol kfold, which tests the classes it has")
            raise DataError(f"{n} {DISPLAY_NAMES[cls]} patients cannot fill {settings.folds} folds; "
                            f"{', or '.join(fixes)}")


def make_folds(manifest: pd.DataFrame, settings: SplitSettings, digests: dict[str, str] | None = None) -> SplitPlan:
    """Seeded, patient-grouped folds with phases, validation and test (see the module docstring).

    ``digests`` (image id -> sha256 of its file, from the cache build) merges patients that share a file.
    """
    manifest = manifest.reset_index(drop=True)
    manifest = manifest.assign(**{GROUP: merge_identical(manifest, digests or {})})
    _check_enough(manifest, settings)
    is_core = core_mask(manifest)
    strata = np.where(is_core, "core", "pool") + "|" + manifest["source"] + "|" + manifest["label"]
    fold_of = patient_folds(manifest, settings.folds, settings.seed, pd.Series(strata))
    pool_val = share_quota(manifest[~is_core], settings.val_fraction, VAL_QUOTA)
    folds, info = [], []
    for k in range(settings.folds):
        rng = np.random.default_rng([settings.seed, k + 1])
        if settings.protocol == "kfold":
            fold, fold_info = _kfold_fold(manifest, fold_of == k, settings, rng)
        else:
            fold, fold_info = _paper_fold(manifest, fold_of == k, is_core.to_numpy(), pool_val, settings, rng)
        fold.fold = fold_info["fold"] = k + 1
        folds.append(fold)
        info.append(fold_info)
    notes = _merge_note(manifest) + _notes(settings, info) + _validation_gaps(manifest, folds)
    phases = 1 if settings.protocol == "kfold" else settings.phases
    plan = SplitPlan(folds=folds, protocol=settings.protocol, origin="generated", notes=notes, phase_info=info,
                     settings={"folds": settings.folds, "phases": phases, "seed": settings.seed,
                               "protocol": settings.protocol, "val_fraction": settings.val_fraction})
    check_disjoint(plan, manifest, digests)
    return plan


def _phase_info(quota: PhaseQuota | None, phases: list[list[str]], labels: pd.Series) -> dict[str, Any]:
    """What a fold's phases hold, for the notes and ``summary.json``."""
    per_class = [labels[p].value_counts() for p in phases]
    total = {c: int(sum(n.get(c, 0) for n in per_class)) for c in CLASSES}
    present = {c: round(total[c] / len(phases)) for c in CLASSES if total[c]}
    distinct = labels[list({i for p in phases for i in p})].value_counts()
    info: dict[str, Any] = {"rule": quota.rule if quota else "kfold", "phases": len(phases), "per_phase": present,
                            "shares": shares(present), "paper_deviation": round(deviation(present), 4),
                            "uses": {c: round(total[c] / int(distinct[c]), 2) for c in present}}
    if quota:
        info.update(core_per_phase=quota.core, pool_quota=quota.pool, core_available=quota.core_available,
                    pool_available=quota.pool_available, limited_by=quota.limited_by)
    return info


def _paper_fold(manifest: pd.DataFrame, is_test: np.ndarray, is_core: np.ndarray, pool_val: dict[str, int],
                settings: SplitSettings, rng: np.random.Generator) -> tuple[Fold, dict[str, Any]]:
    """One fold of the paper's design: core test by patient, phases of core + pool, the rest test."""
    core_train, pool_train = manifest[is_core & ~is_test], manifest[~is_core & ~is_test]
    val: list[str] = []
    if settings.protocol == "strict":
        # Training keeps a patient of every class it has, from the core or the pool: a class only one of them holds
        # keeps its last patient there (covid-chestxray's one normal patient may go to validation beside RSNA's).
        only_core = {c for c, n in counts(pool_train).items() if not n}
        (core_val,), _ = take_patients(core_train, [share_quota(core_train, settings.val_fraction)], rng,
                                       keep_one=only_core)
        left = counts(core_train[~core_train["image_id"].isin(core_val)])
        (val_pool,), _ = take_patients(pool_train, [pool_val], rng, keep_one={c for c, n in left.items() if not n})
        val = core_val + val_pool
        core_train = core_train[~core_train["image_id"].isin(val)]
        pool_train = pool_train[~pool_train["image_id"].isin(val)]
    quota = plan_phase(counts(core_train), counts(pool_train), settings.phases)
    pool_counts = counts(pool_train)
    wanted = {c: min(pool_counts[c], settings.phases * n) for c, n in quota.pool.items()}
    (pool_used,), pool_left = take_patients(pool_train, [wanted], rng)  # whole patients; the rest are test
    used = pool_train[pool_train["image_id"].isin(set(pool_used))]
    phases: list[list[str]] = [[] for _ in range(settings.phases)]
    for cls in CLASSES:
        for frame, take in ((core_train, quota.core.get(cls, 0)), (used, quota.pool.get(cls, 0))):
            ids = frame.loc[frame["label"] == cls, "image_id"].tolist()
            for p, part in enumerate(spread(ids, take, settings.phases, rng)):
                phases[p] += part
    pool_test = manifest.loc[~is_core & is_test, "image_id"].tolist() + pool_left
    test = manifest.loc[is_core & is_test, "image_id"].tolist() + pool_test
    if settings.protocol == "paper":  # the authors' s_test: all test COVID-19 + pool test images
        test_frame = manifest[manifest["image_id"].isin(set(test))]
        val = test_frame.loc[test_frame["label"] == "covid", "image_id"].tolist()
        val += take_patients(test_frame[test_frame["image_id"].isin(set(pool_test))], [pool_val], rng)[0][0]
    labels = manifest.set_index("image_id")["label"]
    return Fold(fold=0, phases=phases, val=val, test=test), _phase_info(quota, phases, labels)


def _kfold_fold(manifest: pd.DataFrame, is_test: np.ndarray, settings: SplitSettings,
                rng: np.random.Generator) -> tuple[Fold, dict[str, Any]]:
    """Plain stratified group k-fold: validation a share of the training side's patients, the rest one phase."""
    train = manifest[~is_test]
    (val,), rest = take_patients(train, [share_quota(train, settings.val_fraction)], rng, keep_one=CLASSES)
    if not rest:
        raise DataError(f"a fold has no image left to train on once its test and validation patients are taken "
                        f"({len(manifest)} images of {manifest[GROUP].nunique()} patients in {settings.folds} "
                        "folds); add data or lower --folds")
    labels = manifest.set_index("image_id")["label"]
    fold = Fold(fold=0, phases=[rest], val=val, test=manifest.loc[is_test, "image_id"].tolist())
    return fold, _phase_info(None, fold.phases, labels)


def _notes(settings: SplitSettings, info: list[dict[str, Any]]) -> list[str]:
    """What the user should know about how the folds were made."""
    notes = []
    if settings.protocol == "paper":
        notes.append(SELECTION_ON_TEST)
    if settings.protocol == "kfold":
        mix = " : ".join(f"{100 * float(np.mean([i['shares'].get(c, 0) for i in info])):.1f}" for c in CLASSES)
        notes.append(f"protocol 'kfold': stratified group {settings.folds}-fold; validation "
                     f"{settings.val_fraction:.0%} of each fold's training patients; every other training image in "
                     "one phase (--phases does not apply), in the data's own class shares (COVID-19 : pneumonia : "
                     f"normal about {mix} %), not the paper's balance")
    else:
        notes += describe(info)
    return notes


def _validation_gaps(manifest: pd.DataFrame, folds: list[Fold]) -> list[str]:
    """A note for each class that a fold trains on but does not validate."""
    labels = manifest.set_index("image_id")["label"]
    folds_of: dict[str, list[int]] = {}
    for fold in folds:
        missing = set(labels[list(fold.train)]) - set(labels[fold.val])
        for cls in (c for c in CLASSES if c in missing):
            folds_of.setdefault(cls, []).append(fold.fold)
    classes_of: dict[tuple[int, ...], list[str]] = {}  # one note for the classes that the same folds lack
    for cls, ks in folds_of.items():
        classes_of.setdefault(tuple(ks), []).append(DISPLAY_NAMES[cls])
    return [f"warning: fold{'s' if len(ks) > 1 else ''} {', '.join(map(str, ks))}: validation holds no "
            f"{' or '.join(names)} "
            "image, though training does (too few such patients to spare one): the best checkpoint is chosen "
            f"without {'that class' if len(names) == 1 else 'those classes'}, and calibrate cannot choose a "
            "threshold for it; add patients, or lower --folds" for ks, names in classes_of.items()]


def check_disjoint(plan: SplitPlan, manifest: pd.DataFrame, digests: dict[str, str] | None = None) -> None:
    """Refuse folds where a patient (``source:patient_id``) or, given ``digests``, an image's bytes are in test
    and in training or validation, or ids are unknown.

    Under ``paper`` the validation set is part of test by design; it must still share no patient
    with training.
    """
    patient = dict(zip(manifest["image_id"], patient_key(manifest)))
    problems = identical_across(plan, manifest, digests or {})
    for fold in plan.folds:
        ids = fold.train | set(fold.val) | set(fold.test)
        unknown = sorted(ids - set(patient))
        if unknown:
            problems.append(f"fold {fold.fold}: {len(unknown)} image ids not in the manifest (e.g. {unknown[0]})")
            continue
        problems += [f"fold {fold.fold}: {p}" for p in _crossings(fold, plan.protocol, patient, "patients")]
        if set(fold.train) & set(fold.test):
            problems.append(f"fold {fold.fold}: images in both training and test")
    if problems:
        raise DataError("refusing to write splits that leak patients between test and training/validation: "
                        + "; ".join(problems))


def check_filled(plan: SplitPlan, manifest: pd.DataFrame) -> None:
    """Refuse folds with an empty training phase, validation or test split: ``train`` cannot use such a fold, and
    preparing the same data the same way again cannot fill it. The message says how little data there is."""
    empty = []
    for fold in plan.folds:
        parts = [f"phase {p}" for p, ids in enumerate(fold.phases, start=1) if not ids] if fold.phases else ["training"]
        parts += [name for name, ids in (("validation", fold.val), ("test", fold.test)) if not ids]
        if parts:
            empty.append(f"fold {fold.fold}: {', '.join(parts)}")
    if not empty:
        return
    per_class = counts(manifest)
    classes = ", ".join(f"{n} {DISPLAY_NAMES[c]}" for c, n in per_class.items() if n)
    one = "; a single class cannot train a classifier" if sum(n > 0 for n in per_class.values()) == 1 else ""
    k = len(plan.folds)
    if plan.origin == "generated":
        fix = "add images of more patients" + (f" or lower --folds (now {k})" if k > 2 else "")
    else:
        fix = f"check the given splits ({plan.origin}): every fold needs images in each of them"
    raise DataError(f"refusing to write folds with an empty split ({'; '.join(empty[:5])}"
                    f"{' ...' if len(empty) > 5 else ''}): {len(manifest)} images of "
                    f"{patient_key(manifest).nunique()} patients ({classes}) are too few for {k} folds whose test, "
                    f"validation and training sides each take whole patients{one}; {fix}")


def identical_across(plan: SplitPlan, manifest: pd.DataFrame, digests: dict[str, str]) -> list[str]:
    """Where ``plan`` puts byte-identical files (``digests``: image id -> sha256) on two sides of a fold; for
    :func:`check_disjoint`, and for splits made elsewhere (the authors', COVIDx's), which are kept as given."""
    known = set(manifest["image_id"])
    digest = {i: d for i, d in digests.items() if d and i in known}
    return [f"fold {fold.fold}: {p}" for fold in plan.folds
            for p in _crossings(fold, plan.protocol, digest, "byte-identical files")]


def _crossings(fold: Fold, protocol: str, key: dict[str, str], what: str) -> list[str]:
    """The pairs of sides of ``fold`` that share a ``key`` (patient or file digest), each with examples."""
    side = {name: [i for i in ids if i in key] for name, ids in
            (("training", fold.train), ("validation", fold.val), ("test", fold.test))}
    keys = {name: {key[i] for i in ids} for name, ids in side.items()}
    pairs = [("test", "training"), ("validation", "training")]
    if protocol != "paper":  # under paper validation is drawn from test by design
        pairs.append(("test", "validation"))
    found = []
    for a, b in pairs:
        both = sorted(keys[a] & keys[b])
        if not both:
            continue
        if what == "patients":
            shown = ", ".join(both[:5])
        else:  # the images of the first shared file: the ids a user can look up
            shown = " = ".join(sorted(i for i in side[a] + side[b] if key[i] == both[0])[:3])
        found.append(f"{len(both)} {what} in both {a} and {b} (e.g. {shown})")
    return found
