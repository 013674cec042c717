"""Synthetic chest radiographs and datasets in the real public layouts.

:func:`render_chest` draws one image with known lung and lesion geometry;
:func:`make_synthetic` writes a whole covid-chestxray-dataset + RSNA pair that
``covid-cxr prepare`` reads exactly like the real data.
"""

from covid_cxr.synth.layouts import SynthSummary, make_synthetic
from covid_cxr.synth.render import ChestImage, render_chest

__all__ = ["ChestImage", "SynthSummary", "make_synthetic", "render_chest"]
