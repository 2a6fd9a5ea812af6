"""httpx and its transport httpcore, imported as this package uses them: now, sync only.

The package imports this module first, so both are imported with it. httpx imports
httpcore only when the first client is made: the thread building it then held the
modules' import locks (and the GIL) for 0.5-0.9 s under load while the rest of the
process served, so importers of the registry client take it at their own import, before
they start threads.

Optional modules the two import only for what our clients never do are hidden from that
one import (``None`` in sys.modules: an ImportError, which both expect): httpcore's async
backends (trio, anyio: 5.7 MB of RSS; our clients are sync) and httpx's decoders of the
``br`` and ``zstd`` content encodings (registries serve blobs unencoded; without them httpx
does not offer those encodings). A module already imported (pyfuse3's trio, the zstd
codec of an image) is left alone and used; a later import of a hidden one works.
"""

from __future__ import annotations

import sys

_HIDDEN = ("trio", "anyio", "zstandard", "brotli", "brotlicffi")


def _import_sync() -> None:
    hidden = [name for name in _HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import httpcore  # noqa: F401
        import httpx  # noqa: F401
    finally:
        for name in hidden:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]


_import_sync()
