"""From raw public datasets to what training reads.

sources/ (one adapter per dataset) -> manifest.py (one table) -> splits.py (patient folds,
phases, validation) -> cache.py (decode once into a memory-mapped array) -> prepared.py (what
training, evaluation and audits open). images.py decodes any X-ray file.
"""
