"""On-disk RAFS: structures, codecs, blob metadata, tar headers and whiteout marks.

Sans-I/O: bytes in, values out; malformed input is a :class:`pynydus.errors.FormatError`
naming the field and offset. Nothing here imports the rest of :mod:`pynydus.rafs`.
The record layouts are used as modules (``from pynydus.rafs.format import layout as L``);
the names below are what other packages use most.
"""

from pynydus.rafs.format.blobmeta import TocEntry, pack_section_header
from pynydus.rafs.format.compress import (
    Compressor,
    Digester,
    compress,
    decode_chunk,
    decompress,
    decompress_frames,
    digest,
    parse_compressor,
    parse_digester,
    toc_flag_for_compressor,
)
from pynydus.rafs.format.layout import (
    BlobFeatures,
    FileType,
    RafsChunkInfo,
    SuperFlags,
    decode_rdev,
    encode_rdev,
)
from pynydus.rafs.format.version import VERSION_HEAD_SIZE, bootstrap_version
from pynydus.rafs.format.whiteout import (
    LOWER_HARDLINK_XATTR,
    OCI_WHITEOUT_OPAQUE,
    OCI_WHITEOUT_PREFIX,
    OVERLAY_OPAQUE_XATTR,
    is_overlay_whiteout,
)

__all__ = [
    "LOWER_HARDLINK_XATTR",
    "OCI_WHITEOUT_OPAQUE",
    "OCI_WHITEOUT_PREFIX",
    "OVERLAY_OPAQUE_XATTR",
    "VERSION_HEAD_SIZE",
    "BlobFeatures",
    "Compressor",
    "Digester",
    "FileType",
    "RafsChunkInfo",
    "SuperFlags",
    "TocEntry",
    "bootstrap_version",
    "compress",
    "decode_chunk",
    "decode_rdev",
    "decompress",
    "decompress_frames",
    "digest",
    "encode_rdev",
    "is_overlay_whiteout",
    "pack_section_header",
    "parse_compressor",
    "parse_digester",
    "toc_flag_for_compressor",
]
