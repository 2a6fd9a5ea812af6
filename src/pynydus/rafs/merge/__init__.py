"""Merge per-layer RAFS bootstraps into one image (``image merge``).

:func:`merge` overlays the layers on their records when they are all v6 with 4 KiB
blocks (:mod:`~pynydus.rafs.merge.skeleton`, :mod:`~pynydus.rafs.merge.writer`,
:mod:`~pynydus.rafs.merge.chunktable`), else through loaded trees
(:func:`merge_trees`); both give the same bytes.
"""

from pynydus.rafs.merge.layers import MergeResult, merge, merge_trees

__all__ = ["MergeResult", "merge", "merge_trees"]
