"""The run folder's owner: the checkpoint format, the folder's files, and what a run resolves to.

:mod:`.checkpoint` (the one model file format), :mod:`.folder` (``RunFolder``: every path of a
run folder; ``RunInfo``: what ``run.json`` holds), :mod:`.resolve` (a run folder or checkpoint ->
checkpoint, prepared data, fold, split and image cache, checked once), :mod:`.results` (audit
result files), :mod:`.evaluations` (the evaluation folders a run holds, and which internal one an
external one is compared with), :mod:`.own_images` (which images of a set the model trained on), :mod:`.model_card`
and :mod:`.card_text` (``MODEL_CARD.md``), :mod:`.keras_import` (Keras files -> checkpoint). Everything
that reads or writes a run folder goes through here; files are written by :mod:`covid_cxr.atomic`.
"""
