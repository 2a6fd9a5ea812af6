"""``pynydus image inspect``: a JSON-ready description of a RAFS bootstrap.

The CLI prints :func:`inspect_bootstrap`'s dict (``--json``) or a rendering of it.
Walking the tree for the statistics also validates every inode, directory and
chunk reference, so a successful inspect means the metadata is well formed; a
malformed bootstrap raises :class:`pynydus.errors.FormatError`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import fields
from typing import Any

from pynydus.rafs.format import BlobFeatures, SuperFlags
from pynydus.rafs.format.layout import RAFS_V6_CHUNK_INFO_SIZE
from pynydus.rafs.read.bootstrap import BlobInfo, Bootstrap
from pynydus.rafs.read.open import open_bootstrap
from pynydus.rafs.read.v5 import BootstrapV5
from pynydus.rafs.read.v6 import BootstrapV6


def _flag_names(value: int, enum_t: type[SuperFlags | BlobFeatures]) -> list[str]:
    return [str(f.name) for f in enum_t if f.value & value]


def _plain(value: object) -> object:
    """JSON-friendly form of a header field: bytes as hex, enums as lower-case names."""
    if isinstance(value, bytes):
        return value.hex()
    return value


def _struct_dict(obj: object) -> dict[str, object]:
    return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}  # type: ignore[arg-type]


def _blob_dict(b: BlobInfo) -> dict[str, object]:
    d = _struct_dict(b)
    d["compressor"] = b.compressor.name.lower()
    d["digester"] = b.digester.name.lower()
    d["ci_compressor"] = b.ci_compressor.name.lower()
    d["features"] = f"0x{b.features:x}"
    d["feature_names"] = _flag_names(b.features, BlobFeatures)
    return d


def describe(bs: Bootstrap) -> dict[str, Any]:
    """Headers, blobs, prefetch table and tree statistics of an open bootstrap.

    Costs one walk over the whole tree (O(entries)).
    """
    out: dict[str, Any] = {
        "version": bs.version,
        "size": bs.size,
        "block_size": bs.block_size,
        "chunk_size": bs.chunk_size,
        "flags": f"0x{bs.flags:x}",
        "flag_names": _flag_names(bs.flags, SuperFlags),
        "compressor": bs.compressor.name.lower(),
        "digester": bs.digester.name.lower(),
        "explicit_uidgid": bs.explicit_uidgid,
        "has_xattr": bs.has_xattr,
        "inode_count": bs.inode_count,
        "root_ino": bs.root_ino,
    }
    if isinstance(bs, BootstrapV6):
        out["superblock"] = _struct_dict(bs.superblock)
        out["ext_superblock"] = _struct_dict(bs.ext_superblock)
        out["devices"] = [
            {
                "blob_id": d.blob_id.decode("ascii"),
                "blocks": d.blocks,
                "mapped_blkaddr": d.mapped_blkaddr,
            }
            for d in bs.devices
        ]
        out["chunk_table_entries"] = bs.ext_superblock.chunk_table_size // RAFS_V6_CHUNK_INFO_SIZE
    elif isinstance(bs, BootstrapV5):
        out["superblock"] = _struct_dict(bs.superblock)
    out["blobs"] = [_blob_dict(b) for b in bs.blobs]

    counts = {
        "entries": 0,
        "inodes": 0,
        "regular": 0,
        "directories": 0,
        "symlinks": 0,
        "char_devices": 0,
        "block_devices": 0,
        "fifos": 0,
        "sockets": 0,
        "hardlinked_inodes": 0,
        "xattr_inodes": 0,
    }
    total_size = 0
    chunk_refs = 0
    unique_chunks: set[tuple[int, int]] = set()
    first_path: dict[int, bytes] = {}
    kinds = {
        stat.S_IFREG: "regular",
        stat.S_IFDIR: "directories",
        stat.S_IFLNK: "symlinks",
        stat.S_IFCHR: "char_devices",
        stat.S_IFBLK: "block_devices",
        stat.S_IFIFO: "fifos",
        stat.S_IFSOCK: "sockets",
    }
    for path, ino in bs.walk():
        counts["entries"] += 1
        if ino in first_path:
            continue
        first_path[ino] = path
        st = bs.stat(ino)
        counts["inodes"] += 1
        counts[kinds[stat.S_IFMT(st.mode)]] += 1
        if bs.xattrs(ino):
            counts["xattr_inodes"] += 1
        if st.is_reg:
            total_size += st.size
            if st.nlink > 1:
                counts["hardlinked_inodes"] += 1
            for c in bs.chunks(ino):
                chunk_refs += 1
                unique_chunks.add((c.blob_index, c.index))
        elif st.is_symlink:
            bs.readlink(ino)
    out["stats"] = {
        **counts,
        "total_file_size": total_size,
        "chunk_refs": chunk_refs,
        "unique_chunks": len(unique_chunks),
    }
    out["prefetch_table"] = list(bs.prefetch_list)
    out["prefetch_paths"] = [
        first_path[i].decode("utf-8", "backslashreplace") if i in first_path else None
        for i in bs.prefetch_list
    ]
    out["prefetch_all"] = bs.prefetch_all
    return out


def inspect_bootstrap(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Open the bootstrap at ``path`` and :func:`describe` it (JSON-serializable dict).

    OSError if unreadable, FormatError if malformed.  Read-only; repeatable.
    """
    with open_bootstrap(path) as bs:
        d = describe(bs)
    d["path"] = os.fspath(path)
    return d
