"""covid-cxr: chest X-ray classifiers for COVID-19, pneumonia and normal.

A faithful PyTorch reproduction of Rahimzadeh & Attar (2020), the concatenation of
Xception and ResNet50V2, with the paper's phased training over patient folds, its
metrics with confidence intervals, and the audits the paper lacks.
"""

__version__ = "0.1.0"
