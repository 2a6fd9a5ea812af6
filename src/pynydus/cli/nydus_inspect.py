"""``nydus-image inspect``: upstream's inspector commands over pynydus's RAFS reader.

``-R CMD`` (request mode) prints one JSON value: ``stats`` → ``{"inodes_count": N}``,
``blobs`` → the blob table, ``prefetch`` → the prefetch table's inodes with their paths;
the other commands print upstream's text and then ``null``. Without ``-R`` the
commands are read from stdin after upstream's ``Inspecting RAFS :>`` prompt.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Self

from pynydus.errors import InvalidArgument, NotFound
from pynydus.rafs.format import BlobFeatures
from pynydus.rafs.read import Bootstrap, Stat, describe, open_bootstrap

USAGE = """
    stats:              Display RAFS filesystesm metadata
    ls:                 Show files in current directory
    cd DIR:             Change current directory
    stat FILE_NAME:     Show particular information of RAFS file
    blobs:              Show blob table
    prefetch:           Show prefetch table
    chunk OFFSET:       List basic info of a single chunk together with a list of files that share it
    icheck INODE:       Show path of the inode and basic information
    exit:               Exit
        """

#: upstream's names for blob feature bits (bitflags' Debug), in bit order
_FEATURES = tuple((f, str(f.name)) for f in (
    BlobFeatures.ALIGNED, BlobFeatures.INLINED_FS_META, BlobFeatures.CHUNK_INFO_V2,
    BlobFeatures.ZRAN, BlobFeatures.SEPARATE, BlobFeatures.INLINED_CHUNK_DIGEST,
    BlobFeatures.HAS_TAR_HEADER, BlobFeatures.HAS_TOC, BlobFeatures.CAP_TAR_TOC,
)) + ((BlobFeatures.V5_NO_EXT_BLOB_TABLE, "_V5_NO_EXT_BLOB_TABLE"),)


class Exit(Exception):
    """``exit`` / ``q``."""


class Unsupported(InvalidArgument):
    """A command the inspector does not know (upstream prints the usage)."""


def rust_debug(name: bytes) -> str:
    """A file name as Rust's Debug of an OsStr shows it: quoted, escaped."""
    text = name.decode("utf-8", "replace")
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _feature_names(bits: int) -> str:
    names = [n for b, n in _FEATURES if bits & b]
    return " | ".join(names) if names else "(empty)"


def _algo(name: str) -> str:
    return {"none": "None", "lz4_block": "Lz4Block", "gzip": "GZip", "zstd": "Zstd",
            "blake3": "Blake3", "sha256": "Sha256"}.get(name.lower(), name)


class Inspector:
    """One bootstrap, a current directory, and upstream's commands on them."""

    def __init__(self, path: str, *, request_mode: bool) -> None:
        self.bs: Bootstrap = open_bootstrap(path)
        self.request_mode = request_mode
        self.cwd = self.bs.root_ino
        self.parents: list[int] = []
        self._paths: dict[int, list[bytes]] | None = None

    def close(self) -> None:
        self.bs.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, line: str) -> Any:
        """Run one command line; returns its JSON value (None for text commands)."""
        parts = line.split()
        if not parts:
            return None
        cmd, arg = parts[0], (parts[1] if len(parts) > 1 else None)
        if cmd == "help":
            print(USAGE)
            return None
        if cmd in ("exit", "q"):
            raise Exit()
        table = {("stats", False): lambda: self.stats(), ("ls", False): lambda: self.ls(),
                 ("blobs", False): lambda: self.blobs(),
                 ("prefetch", False): lambda: self.prefetch(),
                 ("cd", True): lambda: self.cd(str(arg)),
                 ("stat", True): lambda: self.stat(str(arg)),
                 ("chunk", True): lambda: self.chunk(str(arg)),
                 ("icheck", True): lambda: self.icheck(str(arg))}
        fn = table.get((cmd, arg is not None))
        if fn is None:
            print(f"Unsupported command: {cmd}")
            print(USAGE)
            raise Unsupported(f"inspect: unsupported command {line.strip()!r}")
        return fn()

    # -- commands ----------------------------------------------------------------------

    def stats(self) -> Any:
        d = describe(self.bs)
        if self.request_mode:
            return {"inodes_count": d["inode_count"]}
        ext = d.get("ext_superblock") or {}
        print(f"""
    Version:                {d["version"]}
    Inodes Count:           {d["inode_count"]}
    Chunk Size:             {d["chunk_size"] // 1024}KB
    Root Inode:             {d["root_ino"]}
    Flags:                  {" | ".join(d["flag_names"])}
    Blob table offset:      0x{ext.get("blob_table_offset", 0):x}
    Blob table size:        0x{ext.get("blob_table_size", 0):x}
    Prefetch table offset:  0x{ext.get("prefetch_table_offset", 0):x}
    Prefetch table entries: 0x{len(self.bs.prefetch_list):x}
    Chunk table offset:     0x{ext.get("chunk_table_offset", 0):x}
    Chunk table size:       0x{ext.get("chunk_table_size", 0):x}
    """)
        return None

    def blobs(self) -> Any:
        if self.request_mode:
            return [{"blob_id": b.blob_id, "readahead_offset": b.readahead_offset,
                     "readahead_size": b.readahead_size,
                     "decompressed_size": b.uncompressed_size,
                     "compressed_size": b.compressed_size} for b in self.bs.blobs]
        for b in self.bs.blobs:
            sys.stdout.write(f"""
Blob Index:             {b.index}
Blob ID:                {b.blob_id}
Raw Blob ID:            {b.blob_id}
Blob Size:              {b.compressed_size}
Compressed Data Size:   {b.compressed_data_size}
Uncompressed Data Size: {b.uncompressed_size}
Features:               {_feature_names(b.features)}
Compressor:             {_algo(b.compressor.name)}
Digester:               {_algo(b.digester.name)}
Chunk Size:             0x{b.chunk_size:x}
Chunk Count:            {b.chunk_count}
Prefetch Table Offset:  {b.readahead_offset}
Prefetch Table Size:    {b.readahead_size}
Meta Compressor:        {_algo(b.ci_compressor.name)}
Meta Offset:            {b.ci_offset}
Meta Compressed Size:   {b.ci_compressed_size}
Meta Uncompressed Size: {b.ci_uncompressed_size}
ToC Digest:             {b.blob_toc_digest.hex()}
ToC Size:               {b.blob_toc_size}
RAFS Blob Digest:       {b.blob_meta_digest.hex()}
RAFS Blob Size:         {b.blob_meta_size}
""")
        return None

    def prefetch(self) -> Any:
        inos = self.bs.prefetch_list
        if self.request_mode:
            return [{"inode": ino, "path": [p.decode("utf-8", "surrogateescape")
                                            for p in self._paths_of(ino)]} for ino in inos]
        print(f"Total Prefetching Files: {len(inos)}")
        for ino in inos:
            paths = " ".join(p.decode("utf-8", "replace") for p in self._paths_of(ino))
            print(f"Inode Number:{ino:10} | Path: {rust_debug(paths.encode())} ")
        return None

    def ls(self) -> Any:
        for e in self.bs.readdir(self.cwd):
            if e.name in (b".", b".."):
                continue
            s = self.bs.stat(e.ino)
            sign = "-" if s.is_reg else "d" if s.is_dir else "l" if s.is_symlink else " "
            print(f"{sign}    {e.ino:<8} {rust_debug(e.name)}")
        return None

    def cd(self, name: str) -> Any:
        if name == ".":
            return None
        if name == "..":
            if self.parents:
                self.cwd = self.parents.pop()
            return None
        ino = self._child(name)
        if ino is not None and self.bs.stat(ino).is_dir:
            self.parents.append(self.cwd)
            self.cwd = ino
        else:
            print(f"{name} is {'not a directory' if ino is not None else ''}")
        return None

    def stat(self, name: str) -> Any:
        if name == ".":
            parent = self.parents[-1] if self.parents else self.bs.root_ino
            self._print_stat(self.cwd, self._name_in(parent, self.cwd), parent)
            return None
        ino = self._child(name)
        if ino is None:
            return None
        s = self.bs.stat(ino)
        self._print_stat(ino, name.encode(), self.cwd)
        if not s.is_reg:
            return None
        print("  Chunk list:")
        chunk_size = self.bs.chunk_size
        for i, c in enumerate(self.bs.chunks(ino)):
            print(f"""        {i} ->
        file offset: {i * chunk_size}, chunk index: {c.index}
        compressed size: {c.compressed_size}, decompressed size: {c.uncompressed_size}
        compressed offset: {c.compressed_offset}, decompressed offset: {c.uncompressed_offset}
        blob id: {c.blob_id}
        chunk id: {(c.digest or b"").hex()}
    """)
        return None

    def chunk(self, arg: str) -> Any:
        try:
            offset = int(arg)
        except ValueError:
            raise InvalidArgument(f"chunk: {arg!r} is not a blob offset") from None
        for raw, ino in self.bs.walk():
            s = self.bs.stat(ino)
            if not s.is_reg:
                continue
            for c in self.bs.chunks(ino):
                if c.compressed_offset != offset:
                    continue
                parent, _, name = raw.rpartition(b"/")
                print(f"""
File: {name.decode("utf-8", "replace"):32} Parent Path: {(parent or b"/").decode("utf-8", "replace"):32}
Compressed Offset: {c.compressed_offset}, Compressed Size: {c.compressed_size}
Decompressed Offset: {c.uncompressed_offset}, Decompressed Size: {c.uncompressed_size}
Chunk ID: {(c.digest or b"").hex():50}, 
Blob ID: {c.blob_id}
""")
        return None

    def icheck(self, arg: str) -> Any:
        try:
            ino = int(arg)
        except ValueError:
            print("Wrong INODE is specified. Is it a inode number?")
            raise InvalidArgument(f"icheck: {arg!r} is not an inode number") from None
        try:
            self.bs.stat(ino)
        except NotFound:
            raise InvalidArgument(f"icheck: no inode {ino}") from None
        for raw, child in self.bs.walk():
            if child != ino:
                continue
            print(raw.decode("utf-8", "replace"))
            if raw != b"/":
                parent_path = raw.rpartition(b"/")[0] or b"/"
                self._print_stat(ino, raw.rpartition(b"/")[2], self.bs.lookup_path(parent_path))
        return None

    # -- helpers -------------------------------------------------------------------------

    def _child(self, name: str) -> int | None:
        try:
            return self.bs.lookup(self.cwd, name.encode())
        except NotFound:
            return None

    def _name_in(self, parent: int, ino: int) -> bytes:
        if ino == self.bs.root_ino:
            return b"/"
        for e in self.bs.readdir(parent):
            if e.ino == ino and e.name not in (b".", b".."):
                return e.name
        return b""

    def _paths_of(self, ino: int) -> list[bytes]:
        if self._paths is None:
            self._paths = {}
            for raw, i in self.bs.walk():
                self._paths.setdefault(i, []).append(raw)
        return self._paths.get(ino, [])

    def _print_stat(self, ino: int, name: bytes, parent: int) -> None:
        s: Stat = self.bs.stat(ino)
        print(f"""
Inode Number:       {ino}
Name:               {rust_debug(name)}
Size:               {s.size}
Parent:             {parent}
Mode:               0x{s.mode:X}
Permissions:        {s.mode:o}
Nlink:              {s.nlink}
UID:                {s.uid}
GID:                {s.gid}
Mtime:              {s.mtime}
MtimeNsec:          {s.mtime_nsec}
Blocks:             {s.blocks}""")


def interactive(insp: Inspector) -> None:
    """upstream's prompt loop: a command per line until ``exit``/``q`` or end of input."""
    while True:
        sys.stdout.write("Inspecting RAFS :> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return
        try:
            out = insp.execute(line)
        except Exit:
            return
        except Unsupported:
            continue
        except (InvalidArgument, NotFound) as err:
            print(f"Failed to execute command, {err}")
            continue
        if out is not None:
            sys.stdout.write(json.dumps(out, separators=(",", ":"), sort_keys=True))
