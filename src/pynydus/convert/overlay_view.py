"""The filesystem an OCI image's layers describe, flattened with overlay semantics.

This is the reference side of ``check-image``, deliberately independent of the
RAFS builder's tar reader (it shares only the check of a sparse map and its bound,
which tarfile lacks): layer tars are read with :mod:`tarfile` directly and
applied one after another the way containerd's overlay snapshotter would see them:

* ``.wh.NAME`` removes NAME (and everything under it) from the layers *below*;
* ``DIR/.wh..wh..opq`` hides everything the layers below put in DIR;
* whiteouts never hide entries of their own layer, so a layer's whiteouts are
  applied before its entries;
* a directory over a directory keeps the lower children (upper metadata wins);
  anything else replaces the lower entry whole;
* a hardlink shares its target's content; paths linked together form a group.

Only metadata and a sha256 of each file's content are kept, never file data.
"""

from __future__ import annotations

import base64
import hashlib
import io
import stat
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, BinaryIO, cast

import zstandard

from pynydus.rafs.format import tarsparse

__all__ = ["FileRecord", "OverlayView", "open_layer_stream"]

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
_XATTR_PREFIXES = ("user.", "trusted.", "security.")
_ACL = ("system.posix_acl_access", "system.posix_acl_default")


@dataclass
class FileRecord:
    """What check-image compares for one path."""

    kind: str                 # reg dir symlink char block fifo
    mode: int                 # permission bits (0o7777)
    uid: int
    gid: int
    mtime: int
    size: int = 0
    sha256: str = ""
    link: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    implicit: bool = False    # directory only implied by a child's path
    group: int = 0            # hardlink group (0: none)


def _norm(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def _xattrs(pax: Mapping[str, str]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for k, v in pax.items():
        if k.startswith("LIBARCHIVE.xattr."):
            try:
                out.setdefault(k[17:].encode("utf-8", "surrogateescape"),
                               base64.b64decode(v + "=" * (-len(v) % 4), altchars=b"-_"))
            except ValueError:
                pass
    for k, v in pax.items():
        if k.startswith("SCHILY.xattr."):
            out[k[13:].encode("utf-8", "surrogateescape")] = v.encode("utf-8", "surrogateescape")
    return {k: v for k, v in out.items()
            if k.decode("latin-1") in _ACL
            or any(k.decode("latin-1").startswith(p) for p in _XATTR_PREFIXES)}


def _mtime(m: tarfile.TarInfo) -> int:
    v = m.pax_headers.get("mtime")
    if v is not None:
        return int(v.split(".")[0] or 0)
    return int(m.mtime)


def _sha256_of(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while block := f.read(1 << 20):
        h.update(block)
    return h.hexdigest()


class _Prefixed(io.RawIOBase):
    def __init__(self, head: bytes, inner: BinaryIO) -> None:
        self._head, self._inner = head, inner

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._inner.read(len(b))
        b[:len(data)] = data
        return len(data)


def open_layer_stream(f: BinaryIO) -> BinaryIO:
    """Undo zstd by magic; gzip and plain are left to tarfile's ``r|*``."""
    head = f.read(4)
    raw = io.BufferedReader(_Prefixed(head, f))
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[return-value,unused-ignore]
    return raw  # type: ignore[return-value,unused-ignore]


class OverlayView:
    """Apply layers with :meth:`apply_layer`; read the result from :attr:`paths`."""

    def __init__(self) -> None:
        self.paths: dict[str, FileRecord] = {"": FileRecord("dir", 0o755, 0, 0, 0, implicit=True)}
        self._groups = 0

    def _remove_tree(self, path: str) -> None:
        self.paths.pop(path, None)
        prefix = path + "/" if path else ""
        for p in [p for p in self.paths if p.startswith(prefix) and p != ""]:
            del self.paths[p]

    def _ensure_parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        cur = ""
        for part in parts:
            cur = f"{cur}/{part}" if cur else part
            rec = self.paths.get(cur)
            if rec is None or rec.kind != "dir":
                if rec is not None:
                    self._remove_tree(cur)
                self.paths[cur] = FileRecord("dir", 0o755, 0, 0, 0, implicit=True)

    def apply_layer(self, stream: BinaryIO, max_sparse_size: int = tarsparse.DEFAULT_MAX_SPARSE_SIZE
                    ) -> None:
        """Read one layer tar (plain, gzip or zstd) and apply it on top. A sparse
        member's map is checked (ValueError: tarfile does not), and the holes of the
        layer's sparse members, which are hashed as zeros, are bounded together by
        ``max_sparse_size`` as the builder bounds them."""
        entries: list[tuple[str, FileRecord, str]] = []  # (path, record, hardlink target)
        removals: list[str] = []
        opaque: list[str] = []
        holes = 0
        with tarfile.open(fileobj=open_layer_stream(stream), mode="r|*",
                          encoding="utf-8", errors="surrogateescape") as tf:
            for m in tf:
                tf.members.clear()  # type: ignore[attr-defined]  # streaming: keep nothing
                path = _norm(m.name)
                base = path.rsplit("/", 1)[-1]
                parent = path.rsplit("/", 1)[0] if "/" in path else ""
                if base == WH_OPAQUE:
                    opaque.append(parent)
                    continue
                if base.startswith(WH_PREFIX):
                    name = base[len(WH_PREFIX):]
                    removals.append(f"{parent}/{name}" if parent else name)
                    continue
                rec = FileRecord("", m.mode & 0o7777, m.uid, m.gid, _mtime(m),
                                 xattrs=_xattrs(m.pax_headers))
                target = ""
                if m.isreg():
                    rec.kind, rec.size = "reg", m.size
                    if m.sparse is not None:
                        # (offset, length) pairs (typeshed has bytes); tarfile keeps the
                        # empty slots of an old GNU header, which Go's reader stops at
                        extents = [(o, n) for o, n in cast(list[tuple[int, int]], m.sparse) if n]
                        stored = sum(n for _, n in extents)
                        tarsparse.check_map(extents, m.size, stored, limit=max_sparse_size)
                        holes += m.size - stored
                        if holes > max_sparse_size:
                            raise ValueError(f"{path}: the holes of the layer's sparse members "
                                             f"add up to more than {max_sparse_size} bytes")
                    f = tf.extractfile(m)
                    assert f is not None
                    rec.sha256 = _sha256_of(f)
                elif m.isdir():
                    rec.kind = "dir"
                elif m.issym():
                    rec.kind, rec.link = "symlink", m.linkname.encode("utf-8", "surrogateescape")
                    rec.size = len(rec.link)
                elif m.islnk():
                    rec.kind, target = "reg", _norm(m.linkname)
                elif m.ischr() or m.isblk():
                    rec.kind = "char" if m.ischr() else "block"
                    rec.rdev = (m.devmajor, m.devminor)
                elif m.isfifo():
                    rec.kind = "fifo"
                else:
                    continue
                entries.append((path, rec, target))
        for d in opaque:
            opq = self.paths.get(d)
            if opq is not None and opq.kind == "dir":
                prefix = d + "/" if d else ""
                for p in [p for p in self.paths if p.startswith(prefix) and p != ""]:
                    del self.paths[p]
        for p in removals:
            self._remove_tree(p)
        for path, rec, target in entries:
            if not path:
                rec.kind = "dir"
                self.paths[""] = rec
                continue
            self._ensure_parents(path)
            if target:
                linked = self.paths.get(target)
                if linked is None or linked.kind != "reg":
                    raise ValueError(f"hardlink {path!r}: target {target!r} missing")
                if not linked.group:
                    self._groups += 1
                    linked.group = self._groups
                self._remove_tree(path)
                self.paths[path] = linked  # same record: one inode, two names
                continue
            old = self.paths.get(path)
            if rec.kind == "dir" and old is not None and old.kind == "dir":
                self.paths[path] = rec
                continue
            if old is not None:
                self._remove_tree(path)
            self.paths[path] = rec

    def items(self) -> Iterator[tuple[str, FileRecord]]:
        for p in sorted(self.paths):
            yield p, self.paths[p]


def kind_of_mode(mode: int) -> str:
    """The record kind for an ``st_mode``."""
    if stat.S_ISREG(mode):
        return "reg"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode):
        return "char"
    if stat.S_ISBLK(mode):
        return "block"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "socket"
