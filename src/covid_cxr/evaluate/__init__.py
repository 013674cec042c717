"""Evaluation: the paper's Tables 3 and 4 with confidence intervals, ROC, calibration.

``metrics`` holds pure functions; ``predictions`` reads and checks predictions files;
``run`` evaluates a checkpoint on a prepared split. The cross-fold report is :mod:`covid_cxr.report`.
"""
