"""Class names and the maps from raw dataset findings to classes: the one source of truth.

Our canonical order is the paper's table order (COVID-19, pneumonia, normal). The
authors' Keras models were trained with ``flow_from_dataframe``, which sorts class names,
so their output units are ``COVID-19, normal, pneumonia``: :data:`KERAS_AUTHORS_ORDER`.
"""

from __future__ import annotations

from collections.abc import Iterable

from covid_cxr.errors import did_you_mean

CLASSES: tuple[str, ...] = ("covid", "pneumonia", "normal")
"""Canonical class keys, in the paper's table order. Used in files, JSON keys and columns."""

DISPLAY_NAMES: dict[str, str] = {"covid": "COVID-19", "pneumonia": "Pneumonia", "normal": "Normal"}

KERAS_AUTHORS_ORDER: tuple[str, ...] = ("covid", "normal", "pneumonia")
"""Output-unit order of the authors' published Keras models (sorted 'COVID-19' < 'normal' < 'pneumonia')."""

# Spellings met in the datasets, the authors' split files and user CSVs, lower-cased.
_ALIASES: dict[str, str] = {
    "covid": "covid",
    "covid-19": "covid",
    "covid19": "covid",
    "pneumonia": "pneumonia",
    "normal": "normal",
    "no finding": "normal",
}

# covid-chestxray-dataset findings (flat spelling of 2020, and the last component of the
# later hierarchical spelling such as "Pneumonia/Viral/COVID-19").
COVID_CHESTXRAY_FINDINGS: dict[str, str] = {
    "COVID-19": "covid",
    "COVID-19, ARDS": "covid",
    "SARS": "pneumonia",
    "Pneumocystis": "pneumonia",
    "Streptococcus": "pneumonia",
    "No Finding": "normal",
    "Normal": "normal",
}

# RSNA Pneumonia Detection Challenge ``class`` values (stage_2_detailed_class_info.csv). "No Lung Opacity /
# Not Normal" is neither pneumonia nor normal (other findings) and is left out: None.
RSNA_CLASSES: dict[str, str | None] = {
    "Normal": "normal",
    "Lung Opacity": "pneumonia",
    "No Lung Opacity / Not Normal": None,
}


def normalize_label(raw: object, *, where: str = "") -> str:
    """Return the canonical class key for a label spelling, or raise ``ValueError``.

    ``where`` names the file (and row) the label came from, for the error message.
    """
    key = _ALIASES.get(str(raw).strip().lower())
    if key is None:
        place = f" in {where}" if where else ""
        raise ValueError(
            f"unknown class label {raw!r}{place}{did_you_mean(str(raw).strip().lower(), _ALIASES)}; valid labels are "
            f"{', '.join(CLASSES)} (also accepted: COVID-19, No Finding)"
        )
    return key


def covid_chestxray_class(finding: object) -> str | None:
    """Map a covid-chestxray ``finding`` (flat or hierarchical) to a class, or ``None``.

    ``None`` means the row is of no class we use (e.g. ``Legionella``, ``todo``) and is left out.
    The hierarchical spelling is matched on its last component.
    """
    if finding is None:
        return None
    text = str(finding).strip()
    if not text or text.lower() == "nan":
        return None
    if text in COVID_CHESTXRAY_FINDINGS:
        return COVID_CHESTXRAY_FINDINGS[text]
    leaf = text.split("/")[-1].strip()
    if leaf in COVID_CHESTXRAY_FINDINGS:
        return COVID_CHESTXRAY_FINDINGS[leaf]
    return None


def check_classes(classes: Iterable[str]) -> tuple[str, ...]:
    """Validate a class list (a permutation of :data:`CLASSES`) and return it as a tuple."""
    out = tuple(normalize_label(c) for c in classes)
    if sorted(out) != sorted(CLASSES):
        raise ValueError(f"classes must be a permutation of {', '.join(CLASSES)}; got {', '.join(out)}")
    return out
