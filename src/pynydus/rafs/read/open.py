"""Open a RAFS bootstrap: tell v5 from v6 by its magic and construct that reader.

The only place that knows both readers: :class:`~pynydus.rafs.read.bootstrap.Bootstrap`
holds what they share, :class:`~pynydus.rafs.read.v5.BootstrapV5` and
:class:`~pynydus.rafs.read.v6.BootstrapV6` build on it, and this module picks one by
:func:`pynydus.rafs.format.bootstrap_version`.
A data blob with inline metadata opens like a bootstrap, as upstream allows
(:mod:`pynydus.rafs.read.inline`).
"""

from __future__ import annotations

import dataclasses
import mmap
import os

from pynydus.errors import FormatError
from pynydus.rafs.format import bootstrap_version
from pynydus.rafs.format.layout import format_error
from pynydus.rafs.read import inline
from pynydus.rafs.read.bootstrap import Bootstrap, Buffer
from pynydus.rafs.read.v5 import BootstrapV5
from pynydus.rafs.read.v6 import BootstrapV6

__all__ = ["bootstrap_from_bytes", "open_bootstrap"]


def bootstrap_from_bytes(buf: Buffer) -> Bootstrap:
    """Detect the version and parse the headers of a bootstrap held in memory.

    Costs O(number of blobs + prefetch entries); no inode is decoded. The buffer is
    not copied (except a memoryview) and must outlive the bootstrap.
    """
    version = bootstrap_version(buf)
    if version == 5:
        return BootstrapV5(buf)
    if version == 6:
        return BootstrapV6(buf)
    raise format_error(
        "bootstrap magic",
        0,
        f"neither RAFS v5 (offset 0) nor RAFS v6/EROFS (offset 1024); size {len(buf)}",
    )


def open_bootstrap(path: str | os.PathLike[str]) -> Bootstrap:
    """mmap the bootstrap file at ``path`` read-only and parse its headers.

    ``path`` may also be a data blob with inline metadata: its ``image.boot`` is read
    into memory and the blobs with inline metadata take the file's name as their id
    (upstream's rule, :mod:`pynydus.rafs.read.inline`).

    OSError if the file cannot be read; FormatError if it is not a valid bootstrap.
    ``close()`` (or leaving a ``with`` block) releases the mapping.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise format_error("bootstrap", 0, f"{os.fspath(path)!r} is empty")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        bs = bootstrap_from_bytes(mm)
    except FormatError:
        try:
            boot = inline.extract_bootstrap(mm)
        finally:
            mm.close()
        if boot is None:
            raise
        bs = bootstrap_from_bytes(boot)
        blob_id = inline.blob_id_from_path(path)
        for i, b in enumerate(bs.blobs):
            if inline.renames_blob(b.features):
                bs.blobs[i] = dataclasses.replace(b, blob_id=blob_id)
        return bs
    except BaseException:
        mm.close()
        raise
    bs.adopt(mm)
    return bs
