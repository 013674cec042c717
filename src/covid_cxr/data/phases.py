"""How many images of each class a training phase holds: the paper's balance on any pool size.

The paper's phase (SPEC section 2) is 149 COVID-19 + 234 pneumonia (34 covid-chestxray + 200 RSNA)
+ 250 normal images: every training core image, plus 250 normal and 200 pneumonia pool images that
no other phase uses. The balance (23.5 : 37.0 : 39.5 %) is what the phases are for; the absolute
quotas only fit the paper's pool. So a fold's phases take, in this order of preference:

1. ``paper-quotas``: the paper's 250 + 200 pool images, when the training-side pool can give every
   phase its own and the phase's shares then stay within :data:`TOLERANCE` of the paper's (the
   paper's data: nothing changes);
2. ``paper-proportions``: every training core image and the pool images per class that the training
   COVID-19 count calls for (a pool too small to give each phase its own is used in turn, its images
   in several phases, as the core's are);
3. ``class-limited``: where a class has too few training images even for that, all of them in every
   phase, and of the other classes as many as keep the paper's proportions, in turn (every core
   image still in at least one phase), instead of every COVID-19 image beside a few of the others.

Pool images that no phase takes are test images, as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from covid_cxr.errors import DataError
from covid_cxr.labels import CLASSES, DISPLAY_NAMES

PAPER_PHASE = {"covid": 149, "pneumonia": 234, "normal": 250}
"""Images per class in one of the authors' phases."""
PHASE_QUOTA = {"normal": 250, "pneumonia": 200}
"""Pool images per class in each of the authors' phases."""
TOLERANCE = 0.03
"""Largest difference (share of a phase) from the paper's class shares that the paper's quotas may give."""


@dataclass(frozen=True)
class PhaseQuota:
    """Images of each class one phase takes from the training core and from the training-side pool (each set
    taken in turn over the phases), what was there to take, and which class limited the phases."""

    rule: str  # paper-quotas | paper-proportions | class-limited
    core: dict[str, int]
    pool: dict[str, int]
    core_available: dict[str, int]
    pool_available: dict[str, int]
    limited_by: str | None = None

    def total(self) -> dict[str, int]:
        """Images of each class in one phase."""
        return {c: self.core.get(c, 0) + self.pool.get(c, 0) for c in CLASSES}


def paper_shares(classes: list[str]) -> dict[str, float]:
    """The paper's phase shares over the classes present (renormalised when one is absent)."""
    total = sum(PAPER_PHASE[c] for c in classes)
    return {c: PAPER_PHASE[c] / total for c in classes}


def shares(counts: dict[str, int]) -> dict[str, float]:
    """Each class's share of the images."""
    total = sum(counts.values())
    return {c: (n / total if total else 0.0) for c, n in counts.items()}


def deviation(counts: dict[str, int]) -> float:
    """Largest difference between these class shares and the paper's, over the classes present."""
    present = [c for c in CLASSES if counts.get(c, 0) > 0]
    got, want = shares({c: counts[c] for c in present}), paper_shares(present)
    return max(abs(got[c] - want[c]) for c in present)


def plan_phase(core: dict[str, int], pool: dict[str, int], phases: int) -> PhaseQuota:
    """The quotas of one fold's phases from its training-side core and pool counts (see the module docstring)."""
    present = [c for c in CLASSES if core.get(c, 0) + pool.get(c, 0) > 0]
    core = {c: core.get(c, 0) for c in present}
    pool = {c: pool.get(c, 0) for c in present}
    if core.get("covid", 0) == 0:
        raise DataError("no COVID-19 image is left for training in a fold; add COVID-19 patients or lower --folds")
    paper = {c: PHASE_QUOTA.get(c, 0) for c in present}
    if all(phases * paper[c] <= pool[c] for c in present):
        quota = PhaseQuota("paper-quotas", core, paper, core, pool)
        if deviation(quota.total()) <= TOLERANCE:
            return quota
    ideal = {c: core["covid"] * PAPER_PHASE[c] / PAPER_PHASE["covid"] for c in present}
    ratio = {c: (core[c] + pool[c]) / ideal[c] for c in present}
    limit = min(present, key=lambda c: ratio[c])
    scale = min(1.0, ratio[limit])
    target = {c: max(1, min(core[c] + pool[c], round(scale * ideal[c]))) for c in present}
    core_take = {c: max(min(core[c], target[c]), math.ceil(core[c] / phases)) for c in present}
    pool_take = {c: max(0, target[c] - core_take[c]) for c in present}
    if scale < 1.0:
        return PhaseQuota("class-limited", core_take, pool_take, core, pool, limit)
    return PhaseQuota("paper-proportions", core_take, pool_take, core, pool)


def spread(ids: list[str], take: int, phases: int, rng: np.random.Generator) -> list[list[str]]:
    """``phases`` parts of about ``take`` ids over one seeded shuffle that together hold every id: all ids in
    each part when ``take`` covers them, windows in turn (wrapping round) when the ids are too few for a part
    of their own each, else consecutive slices."""
    if take >= len(ids):
        return [list(ids) for _ in range(phases)]
    order = [ids[i] for i in rng.permutation(len(ids))]
    if phases * take >= len(order):
        return [[order[(p * take + i) % len(order)] for i in range(take)] for p in range(phases)]
    return [part.tolist() for part in np.array_split(np.array(order, dtype=object), phases)]


def _span(values: list[float], fmt: str = "{:.0f}") -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


def _mix(info: list[dict[str, Any]], key: str) -> str:
    classes = [c for c in CLASSES if any(i[key].get(c, 0) for i in info)]
    return " + ".join(f"{_span([i[key].get(c, 0) for i in info])} {DISPLAY_NAMES[c]}" for c in classes)


def describe(info: list[dict[str, Any]]) -> list[str]:
    """One note per rule used: what the phases hold and why, with ranges over the folds that used it."""
    notes = []
    for rule in ("paper-quotas", "paper-proportions", "class-limited"):
        group = [i for i in info if i["rule"] == rule]
        if not group:
            continue
        classes = [c for c in CLASSES if c in group[0]["shares"]]
        got = " : ".join(_span([100 * i["shares"][c] for i in group], "{:.1f}") for c in classes)
        want = " : ".join(f"{100 * s:.1f}" for s in paper_shares(classes).values())
        uses = ", ".join(f"{DISPLAY_NAMES[c]} {_span([i['uses'][c] for i in group], '{:.1f}')}" for c in classes)
        head = (f"phases (fold {_span([i['fold'] for i in group])}): {_mix(group, 'per_phase')} images each, class "
                f"shares {got} % (the paper's {want} %); a training image is in this many of the "
                f"{group[0]['phases']} phases on average: {uses}")
        if rule == "paper-quotas":
            why = (f"the paper's quotas, {PHASE_QUOTA['normal']} normal + {PHASE_QUOTA['pneumonia']} pneumonia pool "
                   f"images a phase beside every training core image: the pools hold enough and the shares stay "
                   f"within {100 * TOLERANCE:.0f} points of the paper's")
        elif rule == "paper-proportions":
            why = (f"the paper's proportions for {_span([i['core_available']['covid'] for i in group])} training "
                   f"COVID-19 images: {_mix(group, 'pool_quota')} pool images a phase beside every training core "
                   f"image (the paper's {PHASE_QUOTA['normal']} + {PHASE_QUOTA['pneumonia']} would not fit the "
                   f"pools or would move the shares more than {100 * TOLERANCE:.0f} points)")
        else:
            limits = " / ".join(sorted({DISPLAY_NAMES[i["limited_by"]] for i in group}))
            why = (f"{limits} images limit them: too few on the training side to balance every COVID-19 image in "
                   f"every phase, so they are all in every phase and the other classes are taken in turn, as many "
                   f"as keep the paper's proportions (every training image in at least one phase)")
        off = max(i["paper_deviation"] for i in group)
        if off > TOLERANCE:
            why += (f"; the shares are up to {100 * off:.0f} points off the paper's because every training image "
                    "must be in some phase: more phases (--phases) bring them closer")
        notes.append(f"{head}. Why: {why}")
    return notes
