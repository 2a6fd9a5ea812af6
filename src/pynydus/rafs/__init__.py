"""RAFS, the Nydus image format: read it, build it, merge it.

Six packages, each importing only the ones above it in this list:

* :mod:`~pynydus.rafs.format` -- on-disk structures and codecs: bootstrap records
  (v5, v6/EROFS), chunk compression and digests, blob metadata (chunk-info arrays,
  TOC), tar headers, whiteout marks. Bytes in, values out.
* :mod:`~pynydus.rafs.decoder` -- the uncompressed bytes of a gzip or zstd layer tar,
  decoded ahead on a thread or in a child process (which imports nothing else).
* :mod:`~pynydus.rafs.read` -- open a bootstrap (v5 or v6) and answer lookups, stats
  and chunk maps from it; blob files; ``image inspect``, ``check`` and ``unpack``.
* :mod:`~pynydus.rafs.source` -- what a build reads: the entries of an OCI layer tar
  or of a local directory.
* :mod:`~pynydus.rafs.builder` -- ``image build``: the blob writer (chunking, dedup,
  compression), the in-memory tree, the v6 bootstrap writer, the loader that turns a
  bootstrap back into a tree, and the overlay of a layer on the ones below it (the
  whiteout rules).
* :mod:`~pynydus.rafs.merge` -- ``image merge``: per-layer bootstraps overlaid into
  one image, on their records or on loaded trees.

Code outside a package imports the names its ``__init__`` exports.
"""
