"""Validity audits: did a model learn the disease, or the dataset it came from?

In the paper's data every COVID-19 image comes from one collection and every normal image from
another, so a network can score well by recognising the source (DeGrave et al., Nature Machine
Intelligence 2021; Roberts et al., same journal 2021; Maguolo & Nanni 2021). Each audit here
writes one JSON file with its metrics, their intervals, the thresholds it used and a list of
plain-language ``flags``:

- :mod:`~covid_cxr.audit.source`: can the image's source be predicted from its pixels?
- :mod:`~covid_cxr.audit.ablation`: does the score survive when the lung fields are hidden?
- :mod:`~covid_cxr.audit.cross_source`: does a class's recall hold on a source never seen for it?
- :mod:`~covid_cxr.audit.cam_stats`: how much Grad-CAM mass lies inside the lung fields?

:mod:`~covid_cxr.audit.results` renders them as the report's "Did it learn the disease?" section.
"""
