"""The ``hpack`` package's internals we use, imported in one place.

``hpack`` exports an Encoder and a Decoder; we take three pieces from its modules instead
(the static table, the table-driven Huffman decoder and the prefix-integer encoder), which
exist under these names in every release from 3.0 to 4.x. pyproject.toml pins ``<5``; a
release that moves them fails here, at import, with what to do.
"""

from __future__ import annotations

try:
    from hpack.hpack import encode_integer
    from hpack.huffman_table import decode_huffman
    from hpack.table import HeaderTable
except ImportError as err:  # pragma: no cover - only with an unsupported hpack
    raise ImportError(
        f"pynydus.grpcwire needs hpack's internal modules (hpack.hpack.encode_integer, "
        f"hpack.huffman_table.decode_huffman, hpack.table.HeaderTable), which this hpack "
        f"does not have ({err}); install a supported release: pip install 'hpack>=4.0,<5'"
    ) from err

STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE

__all__ = ["STATIC_TABLE", "decode_huffman", "encode_integer"]
