"""The source audit keeps byte-identical images on one side, as the splitter does.

The same study is often filed under two patient ids (a re-upload, a second export). ``prepare``
merges such patients into one group for the folds (``data.splits.merge_identical``); the source
probes' cross-fitting and their patient bootstrap must do the same, or a probe is tested on one
copy of a file while trained on the other. Real files here: a labels.csv of two sources, ten
patients each, in which patient a/0's image is copied byte for byte as patient a/1's.
"""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from covid_cxr.audit.probes import crossfit_parts
from covid_cxr.audit.source import fold_images
from covid_cxr.audit.source_findings import probe_metrics, source_metrics
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.splits import GROUP, patient_key
from covid_cxr.synth import render_chest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
    from covid_cxr.data.splits import SplitSettings

    root = tmp_path_factory.mktemp("identical")
    rng = np.random.default_rng(0)
    rows = []
    for source in ("a", "b"):
        (root / "images" / source).mkdir(parents=True)
        for p in range(10):
            label = "covid" if p % 2 else "normal"
            name = f"{source}/{p}.png"
            if (source, p) == ("a", 1):  # the study of a/0 filed again under a/1
                shutil.copyfile(root / "images" / "a" / "0.png", root / "images" / name)
                label = "normal"
            else:
                cv2.imwrite(str(root / "images" / name), render_chest(rng, 48, label).image)
            rows.append({"path": name, "label": label, "patient_id": str(p), "source": source})
    pd.DataFrame(rows).to_csv(root / "images" / "labels.csv", index=False)
    out = root / "data"
    prepare_dataset(PrepareSettings(out=out, folder=root / "images" / "labels.csv", image_size=72,
                                    split=SplitSettings(folds=2, phases=1, seed=0)), progress=False)
    return PreparedData(out)


def test_crossfit_parts_keep_byte_identical_images_together(prepared: PreparedData) -> None:
    every = fold_images(prepared, 1)
    assert len(every) == 20
    key = patient_key(every)
    twins = every.index[key.isin(["a:0", "a:1"])]
    assert len(twins) == 2 and every.loc[twins, GROUP].nunique() == 1  # merged by the cache's sha256
    assert every[GROUP].nunique() == 19
    split_twins = 0
    for seed in range(6):
        for train, test in crossfit_parts(every, seed=seed):
            split_twins += len(set(twins) & set(train)) == 1 and len(set(twins) & set(test)) == 1
    assert split_twins == 0


def test_probe_bootstrap_draws_the_merged_groups(prepared: PreparedData) -> None:
    every = fold_images(prepared, 1)
    rng = np.random.default_rng(0)
    probs = rng.random((len(every), 2))
    names = ["a", "b"]
    overall = probe_metrics(probs, every, names, n_boot=200)["overall"]
    merged = source_metrics(probs, every["source"], names, every[GROUP], n_boot=200)
    by_patient = source_metrics(probs, every["source"], names, patient_key(every), n_boot=200)
    assert overall["auc"] == merged["auc"]
    assert (overall["auc"]["low"], overall["auc"]["high"]) != (by_patient["auc"]["low"], by_patient["auc"]["high"])
