"""VTAB-1k's splits, named once, and how they relate.

The final runs train on ``train800val200`` and report ``test``; a search trains each grid point on
``train800`` and scores it on ``val200``. Those two are the parts of ``train800val200``, so a feature
cache of ``train800val200`` holds them too (:data:`WHOLE_SPLIT`).
"""

from __future__ import annotations

TRAIN = "train800val200"
TEST = "test"
SEARCH_TRAIN = "train800"
SEARCH_VAL = "val200"

FINAL = (TRAIN, TEST)  # (training split, evaluation split) of the final runs
SEARCH = (SEARCH_TRAIN, SEARCH_VAL)  # of a search's grid points
WHOLE_SPLIT = {SEARCH_TRAIN: TRAIN, SEARCH_VAL: TRAIN}  # part -> the split it is part of

