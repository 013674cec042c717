"""Speed and memory of covid-cxr against the authors' Keras + TensorFlow stack, measured side by side.

``python -m benchmarks`` runs every configuration in its own process (so each peak memory figure
is its own and process-wide settings never leak between configurations), prints a table and
writes JSON with ratios to the Keras figures. ``benchmarks/RESULTS.md`` records the numbers.
This package imports neither torch nor TensorFlow at the top: the Keras worker runs under a
separate interpreter (``COVID_CXR_KERAS_PYTHON``) that has TensorFlow and not our package.
"""
