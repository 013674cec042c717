"""Synthetic datasets written in the two public layouts, quirks included.

``covid-chestxray-dataset/``: ``metadata.csv`` with the real columns and ``images/``; several
images for some patients; rows that a reader must leave out (lateral ``L`` and ``Axial`` views,
CT, findings of no class); JPEG and PNG, grayscale and RGB, varied sizes and aspect ratios.

``rsna/``: ``stage_2_train_labels.csv`` (one row per box, so pneumonia patients with several
boxes have several rows), ``stage_2_detailed_class_info.csv`` (with ``No Lung Opacity / Not
Normal`` patients to leave out) and ``stage_2_train_images/<patientId>.dcm``: JPEG-baseline
8-bit MONOCHROME2 DICOMs as in the challenge, plus some 16-bit (rescale + window), some
MONOCHROME1 and some preamble-less files.

Everything follows from the seed: the layout is drawn first in the parent process, then images
are rendered and written in parallel, each from its own child seed.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from covid_cxr.atomic import write_json
from covid_cxr.config import SHORTCUTS
from covid_cxr.cpus import usable_cpus
from covid_cxr.synth.dicom import write_dicom
from covid_cxr.synth.render import render_chest

CXR_COLUMNS = [
    "patientid", "offset", "sex", "age", "finding", "survival", "intubated", "went_icu",
    "needed_supplemental_O2", "extubated", "temperature", "pO2_saturation", "leukocyte_count",
    "neutrophil_count", "lymphocyte_count", "view", "modality", "date", "location", "folder",
    "filename", "doi", "url", "license", "clinical_notes", "other_notes",
]
KEPT_VIEWS = ("PA", "AP", "AP Supine", "AP semi erect")
PNEUMONIA_FINDINGS = ("SARS", "Pneumocystis", "Streptococcus")
HIERARCHICAL = {
    "COVID-19": "Pneumonia/Viral/COVID-19",
    "COVID-19, ARDS": "Pneumonia/Viral/COVID-19",
    "SARS": "Pneumonia/Viral/SARS",
    "Pneumocystis": "Pneumonia/Fungal/Pneumocystis",
    "Streptococcus": "Pneumonia/Bacterial/Streptococcus",
    "Legionella": "Pneumonia/Bacterial/Legionella",
    "E.Coli": "Pneumonia/Bacterial/E.Coli",
    "ARDS": "ARDS",
}
RSNA_SPECIAL_FRACTION = 0.01  # each of: 16-bit, MONOCHROME1, preamble-less


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`make_synthetic` wrote: the two dataset folders and the counts per source and class."""

    out: Path
    covid_chestxray: Path
    rsna: Path
    counts: dict[str, dict[str, int]]  # source -> class -> images a reader must keep
    excluded_rows: dict[str, int]  # source -> rows a reader must leave out
    files: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("out", "covid_chestxray", "rsna"):
            data[key] = str(data[key])
        return data


def _patients(rng: np.random.Generator, n_images: int, max_per: int) -> list[int]:
    """Images per patient summing to ``n_images``: mostly one, some several (as the real data)."""
    sizes: list[int] = []
    while sum(sizes) < n_images:
        k = 1 if rng.random() < 0.6 else int(rng.integers(2, max_per + 1))
        sizes.append(min(k, n_images - sum(sizes)))
    return sizes


def _cxr_plan(rng: np.random.Generator, n_covid: int, n_pneumonia: int, size: int) -> list[dict[str, Any]]:
    """Rows of metadata.csv with what to draw for each; ``keep`` says whether a reader keeps it."""
    rows: list[dict[str, Any]] = []
    pid = 1

    def add(patient: int, finding: str, label: str, view: str, modality: str, keep: bool) -> None:
        fmt = str(rng.choice(["jpg", "jpeg", "png"], p=[0.5, 0.2, 0.3]))
        side = int(size * rng.uniform(0.35, 0.9))
        aspect = rng.uniform(0.8, 1.3)
        rows.append({
            "patientid": patient, "finding": finding, "label": label, "view": view, "modality": modality,
            "keep": keep, "format": fmt, "rgb": bool(rng.random() < 0.4),
            "width": max(64, int(side * aspect)), "height": max(64, side),
            "folder": "volumes" if modality == "CT" and rng.random() < 0.5 else "images",
        })

    for label, n in (("covid", n_covid), ("pneumonia", n_pneumonia)):
        for k in _patients(rng, n, 4):
            finding = (("COVID-19, ARDS" if rng.random() < 0.06 else "COVID-19") if label == "covid"
                       else str(rng.choice(PNEUMONIA_FINDINGS)))
            for _ in range(k):
                add(pid, finding, label, str(rng.choice(KEPT_VIEWS, p=[0.55, 0.25, 0.15, 0.05])), "X-ray", True)
            if rng.random() < 0.12:  # a lateral view of the same patient: left out
                add(pid, finding, label, "L", "X-ray", False)
            if rng.random() < 0.08:  # a CT slice: left out
                add(pid, finding, label, "Axial", "CT", False)
            pid += 1
    for view, modality in (("L", "X-ray"), ("Axial", "CT")):  # at least one of each quirk, whatever the counts
        if not any(r["view"] == view for r in rows):
            add(1, rows[0]["finding"], rows[0]["label"], view, modality, False)
    n_other = max(2, (n_covid + n_pneumonia) // 25)
    for _ in range(n_other):  # findings of no class we use
        add(pid, str(rng.choice(["Legionella", "ARDS", "E.Coli", "todo"])), "normal", "PA", "X-ray", False)
        pid += 1
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def _rsna_plan(rng: np.random.Generator, n_pneumonia: int, n_normal: int) -> list[dict[str, Any]]:
    n_other = max(2, (n_pneumonia + n_normal) // 10)
    kinds = ["pneumonia"] * n_pneumonia + ["normal"] * n_normal + ["other"] * n_other
    plan = []
    for i in rng.permutation(len(kinds)):
        kind = kinds[i]
        r = rng.random()
        storage = ("16bit" if r < RSNA_SPECIAL_FRACTION else "mono1" if r < 2 * RSNA_SPECIAL_FRACTION
                   else "nopreamble" if r < 3 * RSNA_SPECIAL_FRACTION else "jpeg")
        plan.append({
            "patientId": str(uuid.UUID(bytes=rng.bytes(16), version=4)), "kind": kind, "storage": storage,
            "view": str(rng.choice(["PA", "AP"])), "sex": str(rng.choice(["M", "F"])), "age": int(rng.integers(18, 90)),
        })
    return plan


def _add_marker(img: np.ndarray, rng: np.random.Generator) -> None:
    """A small bright square in a top corner: a source shortcut independent of disease."""
    h, w = img.shape[:2]
    s = max(3, min(h, w) // 20)
    y0 = max(1, h // 30)
    x0 = max(1, w // 30) if rng.random() < 0.5 else w - s - max(1, w // 30)
    img[y0 : y0 + s, x0 : x0 + s] = 255


def _write_cxr_image(job: dict[str, Any]) -> None:
    rng = np.random.default_rng(job["seed"])
    label = job["label"] if job["keep"] else "normal"
    side = max(job["width"], job["height"])
    img = render_chest(rng, side, label).image
    img = cv2.resize(img, (job["width"], job["height"]), interpolation=cv2.INTER_AREA)
    if job["modality"] == "CT":
        img = cv2.GaussianBlur(255 - img, (0, 0), 3)  # anything but a radiograph
    if job["rgb"]:
        tint = np.array(rng.uniform(0.92, 1.0, 3), dtype=np.float32)
        img = np.clip(img[..., None].astype(np.float32) * tint, 0, 255).astype(np.uint8)
    if job["shortcut"] == "marker":
        _add_marker(img, rng)
    ext = ".jpg" if job["format"] in ("jpg", "jpeg") else ".png"
    ok, buf = cv2.imencode(ext, img, [cv2.IMWRITE_JPEG_QUALITY, 92] if ext == ".jpg" else [])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {job['path']}")
    Path(job["path"]).write_bytes(buf.tobytes())


def _write_rsna_image(job: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    """Write one DICOM; return the pneumonia boxes (x, y, width, height) in pixels."""
    rng = np.random.default_rng(job["seed"])
    label = {"pneumonia": "pneumonia", "normal": "normal", "other": "normal"}[job["kind"]]
    side = str(rng.choice(["left", "right", "both"], p=[0.35, 0.35, 0.3])) if label == "pneumonia" else None
    chest = render_chest(rng, job["size"], label, lesion_side=side)
    img = chest.image
    if job["kind"] == "other":  # an abnormality that is not opacity: a bright device line
        x = int(job["size"] * rng.uniform(0.3, 0.7))
        cv2.line(img, (x, job["size"] // 8), (x + job["size"] // 10, job["size"] // 2), 235, max(1, job["size"] // 150))
    write_dicom(Path(job["path"]), img, storage=job["storage"], patient_id=job["patientId"],
                view=job["view"], sex=job["sex"], age=job["age"], rng=rng)
    if label != "pneumonia":
        return []
    n, _, stats, _ = cv2.connectedComponentsWithStats(chest.lesion_mask.astype(np.uint8))
    boxes = [tuple(int(v) for v in stats[i, :4]) for i in range(1, n) if stats[i, 4] >= max(4, job["size"] ** 2 // 4096)]
    return boxes or [tuple(int(v) for v in cv2.boundingRect(chest.lung_mask.astype(np.uint8)))]


def _run(fn: Any, jobs: list[dict[str, Any]], workers: int) -> list[Any]:
    if workers <= 1 or len(jobs) < 16:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, jobs, chunksize=8))


def make_synthetic(
    out: Path,
    *,
    seed: int = 0,
    n_covid: int = 300,
    n_pneumonia: int = 800,
    n_normal: int = 900,
    size: int = 1024,
    hierarchical: bool = False,
    shortcut: str | None = None,
    cxr_pneumonia_fraction: float = 0.08,
    workers: int | None = None,
) -> SynthSummary:
    """Write a synthetic covid-chestxray-dataset and RSNA set under ``out``; return what was written.

    ``n_covid`` images all go to covid-chestxray, ``n_pneumonia`` is split between
    covid-chestxray (``cxr_pneumonia_fraction``, at least 6) and RSNA, ``n_normal`` all go to
    RSNA, as in the real data. ``size`` is the RSNA DICOM size; covid-chestxray images get
    35-90% of it with varied aspect. ``hierarchical`` writes findings as
    ``Pneumonia/Viral/COVID-19``. ``shortcut='marker'`` puts a bright marker in a corner of
    every covid-chestxray image (never in RSNA ones), so the source is learnable.
    """
    start = time.perf_counter()
    for name, value in (("n_covid", n_covid), ("n_pneumonia", n_pneumonia), ("n_normal", n_normal)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    if n_covid < 10 or n_pneumonia < 12 or n_normal < 10:
        raise ValueError("synthetic data needs at least 10 COVID-19, 12 pneumonia and 10 normal images "
                         f"to fill folds; got {n_covid}, {n_pneumonia}, {n_normal}")
    if not 32 <= size <= 4096:
        raise ValueError(f"size must be between 32 and 4096 pixels; got {size}")
    if shortcut is not None and shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {', '.join(SHORTCUTS)} or None; got {shortcut!r}")
    out = Path(out)
    cxr_dir, rsna_dir = out / "covid-chestxray-dataset", out / "rsna"
    taken = [d for d in (cxr_dir, rsna_dir) if d.is_dir() and any(d.iterdir())]
    if taken:  # a second set over the first would leave the first's images beside the new labels
        raise FileExistsError(f"{taken[0]} already holds files (an earlier synthetic set?): give a new --out, or "
                              f"remove {out} first")
    for d in (cxr_dir / "images", cxr_dir / "volumes", rsna_dir / "stage_2_train_images"):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_cxr_pneu = min(n_pneumonia - 6, max(6, round(n_pneumonia * cxr_pneumonia_fraction)))
    cxr_rows = _cxr_plan(rng, n_covid, n_cxr_pneu, size)
    rsna_rows = _rsna_plan(rng, n_pneumonia - n_cxr_pneu, n_normal)
    seeds = np.random.SeedSequence(seed).spawn(len(cxr_rows) + len(rsna_rows))

    cxr_jobs, meta = [], []
    for i, row in enumerate(cxr_rows):
        ext = row["format"]
        filename = f"synth-{row['patientid']:04d}-{i:05d}.{ext}"
        finding = HIERARCHICAL.get(row["finding"], row["finding"]) if hierarchical else row["finding"]
        meta.append({
            "patientid": row["patientid"], "offset": int(rng.integers(0, 20)), "sex": str(rng.choice(["M", "F"])),
            "age": int(rng.integers(20, 90)), "finding": finding, "view": row["view"], "modality": row["modality"],
            "date": "2020", "location": "Synthetic", "folder": row["folder"], "filename": filename,
            "license": "CC0", "clinical_notes": "synthetic image",
        })
        cxr_jobs.append({**row, "seed": int(seeds[i].generate_state(1)[0]), "shortcut": shortcut,
                         "path": str(cxr_dir / row["folder"] / filename)})
    rsna_jobs = [{**row, "size": size, "seed": int(seeds[len(cxr_rows) + i].generate_state(1)[0]),
                  "path": str(rsna_dir / "stage_2_train_images" / f"{row['patientId']}.dcm")}
                 for i, row in enumerate(rsna_rows)]

    workers = workers or min(8, usable_cpus())
    _run(_write_cxr_image, cxr_jobs, workers)
    boxes = _run(_write_rsna_image, rsna_jobs, workers)

    pd.DataFrame(meta).reindex(columns=CXR_COLUMNS).to_csv(cxr_dir / "metadata.csv", index=False)
    labels, info = [], []
    for row, bx in zip(rsna_rows, boxes):
        cls = {"pneumonia": "Lung Opacity", "normal": "Normal", "other": "No Lung Opacity / Not Normal"}[row["kind"]]
        for b in bx or [None]:
            x, y, w, h = b if b else ("", "", "", "")
            labels.append({"patientId": row["patientId"], "x": x, "y": y, "width": w, "height": h,
                           "Target": int(b is not None)})
            info.append({"patientId": row["patientId"], "class": cls})
    pd.DataFrame(labels).to_csv(rsna_dir / "stage_2_train_labels.csv", index=False)
    pd.DataFrame(info).to_csv(rsna_dir / "stage_2_detailed_class_info.csv", index=False)

    kept = [r for r in cxr_rows if r["keep"]]
    counts = {
        "covid-chestxray": {c: sum(r["label"] == c for r in kept) for c in ("covid", "pneumonia")},
        "rsna": {"pneumonia": sum(r["kind"] == "pneumonia" for r in rsna_rows),
                 "normal": sum(r["kind"] == "normal" for r in rsna_rows)},
    }
    settings = {"seed": seed, "n_covid": n_covid, "n_pneumonia": n_pneumonia, "n_normal": n_normal, "size": size,
                "hierarchical": hierarchical, "shortcut": shortcut}
    summary = SynthSummary(
        out=out, covid_chestxray=cxr_dir, rsna=rsna_dir, counts=counts,
        excluded_rows={"covid-chestxray": len(cxr_rows) - len(kept),
                       "rsna": sum(r["kind"] == "other" for r in rsna_rows)},
        files=len(cxr_rows) + len(rsna_rows), seconds=round(time.perf_counter() - start, 2), settings=settings,
    )
    write_json(out / "synth.json", summary.to_dict())
    return summary
