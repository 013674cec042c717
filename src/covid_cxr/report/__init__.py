"""The multi-fold report: evaluations of every fold, external sets and audit results on one page.

``report`` reads evaluation folders (or predictions files), pools and averages the folds, puts
the paper's Table 4 beside ours, and adds the audits' "Did it learn the disease?" section;
``sections`` builds its decision (operating point) and internal-vs-external tables. It sits above
:mod:`covid_cxr.evaluate` and :mod:`covid_cxr.audit` and reads what they wrote.
"""
