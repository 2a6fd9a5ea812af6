"""Merge per-layer RAFS bootstraps into one image (``image merge``).

:func:`merge` overlays the layers on their records when they are all v6 with 4 KiB
blocks (:mod:`~pynydus.rafs.merge.skeleton`, :mod:`~pynydus.rafs.merge.writer`,
:mod:`~pynydus.rafs.merge.chunktable`), else through loaded trees
(:func:`merge_trees`); both give the same bytes. Either way each layer is put on
the ones below it by :func:`pynydus.rafs.builder.overlay_layer`. A
:class:`ChunkRedirect` hook lets the converter point chunks at lower layers' copies.
"""

from pynydus.rafs.merge.layers import ChunkRedirect, MergeResult, merge, merge_trees

__all__ = ["ChunkRedirect", "MergeResult", "merge", "merge_trees"]
