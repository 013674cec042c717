"""Pipelines that chain the library end to end: the demo (:mod:`.demo`) and its sizing to a time budget
(:mod:`.budget`), and cross-validation over a prepared folder's folds (:mod:`.cv`)."""
