"""Evaluation: the paper's Tables 3 and 4 with confidence intervals, ROC, calibration, reports.

``metrics`` holds pure functions; ``predictions`` reads and checks predictions files;
``run`` evaluates a checkpoint on a prepared split (it loads torch; the rest does not);
``report`` compares folds and the paper.
"""
