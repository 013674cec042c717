"""The source probes' cross-fitting groups patients by source and id: NIH's patient 3 is not covid-chestxray's."""

from __future__ import annotations

import pandas as pd

from covid_cxr.audit.probes import crossfit_parts


def test_crossfit_parts_keep_each_patient_whole_and_tell_sources_apart() -> None:
    rows = [{"image_id": f"{src}/{p}-{i}", "patient_id": str(p), "source": src, "label": "normal"}
            for src in ("covid-chestxray", "nih") for p in range(1, 9) for i in range(2)]
    frame = pd.DataFrame(rows)
    key = frame["source"] + ":" + frame["patient_id"]
    one_source_held = 0
    for seed in range(5):
        for _, test in crossfit_parts(frame, k=4, seed=seed):
            assert set(key.drop(index=test)).isdisjoint(key[test]), seed  # each patient's two images in one part
            per_id = frame.iloc[test].groupby("patient_id")["source"].nunique()
            one_source_held += int((per_id == 1).sum())  # an id held out for one source only
    assert one_source_held > 0  # merged by the bare id, both sources' patient 3 would always be held out together
