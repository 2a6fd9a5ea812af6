"""Round trips: random layer tars → build → our reader shows exactly the layer.

Hypothesis generates trees (names incl. non-UTF-8 and 255-byte ones, every tar entry
type, xattrs, ids, nanosecond mtimes, file sizes around chunk boundaries, hardlinks),
writes them as a PAX tar in memory, builds with every compressor, and the RAFS
reader (:mod:`pynydus.rafs.read.bootstrap`, written independently) must report the same
paths, attributes, link targets, xattrs and file bytes (read through its chunk
map from the blob file).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynydus.rafs.builder import build
from pynydus.rafs.format import Compressor, decompress
from pynydus.rafs.merge import merge
from pynydus.rafs.read import Bootstrap, open_bootstrap

CHUNK = 0x1000


@dataclass
class Spec:
    kind: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    nsec: int = 0
    link: bytes = b""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


names = st.one_of(
    st.binary(min_size=1, max_size=12).filter(
        lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
        and not b.startswith(b".wh.")
    ),
    st.just(b"N" * 255),
    st.sampled_from([b"\xff\xfe", b"caf\xc3\xa9", b"-", b"!"]),
)
xattr_names = st.sampled_from(
    [b"user.a", b"user.long." + b"x" * 40, b"trusted.t", b"security.capability", b"security.selinux"]
)
sizes = st.one_of(
    st.integers(0, 64), st.sampled_from([CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    kind = draw(st.sampled_from(["reg", "reg", "reg", "dir", "symlink", "char", "block", "fifo"]))
    s = Spec(
        kind=kind,
        mode=draw(st.integers(0, 0o7777)),
        uid=draw(st.sampled_from([0, 1, 1000, 65535, 65536, 2**31])),
        gid=draw(st.sampled_from([0, 5, 70000])),
        mtime=draw(st.integers(0, 2**33)),
        nsec=draw(st.integers(0, 999_999_999)),
        xattrs=draw(st.dictionaries(xattr_names, st.binary(max_size=40), max_size=3)),
    )
    if kind == "reg":
        n = draw(sizes)
        seed = draw(st.integers(0, 3))  # few seeds: duplicate chunks happen
        s.data = (hashlib.sha256(b"%d" % seed).digest() * (n // 32 + 1))[:n]
    elif kind == "symlink":
        s.link = draw(st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b))
    elif kind in ("char", "block"):
        # major 0 minor 0 is an overlayfs whiteout, which merge() rightly removes
        s.dev = (draw(st.integers(1, 4095)), draw(st.integers(0, 2**20 - 1)))
    return s


@st.composite
def trees(draw: st.DrawFn) -> dict[bytes, Spec]:
    """path -> spec; directories first; plus hardlinks as ("hardlink", target) specs."""
    out: dict[bytes, Spec] = {}
    dirs = [b""]
    for _ in range(draw(st.integers(1, 25))):
        parent = draw(st.sampled_from(dirs))
        name = draw(names)
        path = parent + b"/" + name if parent else name
        if path in out:
            continue
        s = draw(specs())
        out[path] = s
        if s.kind == "dir":
            dirs.append(path)
    regs = [p for p, s in out.items() if s.kind == "reg"]
    if regs and draw(st.booleans()):
        target = draw(st.sampled_from(regs))
        parent = draw(st.sampled_from(dirs))
        path = (parent + b"/" if parent else b"") + b"hardlink-" + os.urandom(2).hex().encode()
        out[path] = Spec(kind="hardlink", link=target)
    return out


def _tar(tree: dict[bytes, Spec]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tf:
        for path, s in tree.items():
            t = tarfile.TarInfo(path.decode("utf-8", "surrogateescape"))
            t.mode, t.uid, t.gid, t.mtime = s.mode, s.uid, s.gid, s.mtime
            t.pax_headers = {"mtime": f"{s.mtime}.{s.nsec:09d}"}
            for k, v in s.xattrs.items():
                t.pax_headers["SCHILY.xattr." + k.decode()] = v.decode("utf-8", "surrogateescape")
            t.type = {"reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                      "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE,
                      "hardlink": tarfile.LNKTYPE}[s.kind]
            if s.kind in ("symlink", "hardlink"):
                t.linkname = s.link.decode("utf-8", "surrogateescape")
            t.devmajor, t.devminor = s.dev
            t.size = len(s.data)
            tf.addfile(t, io.BytesIO(s.data) if s.kind == "reg" else None)
    return buf.getvalue()


def _read_file(bs: Bootstrap, ino: int, size: int, blob_dir: Path) -> bytes:
    out = bytearray()
    cache: dict[str, bytes] = {}
    for r in bs.map_read(ino, 0, size):
        c = r.chunk
        blob = cache.setdefault(c.blob_id, (blob_dir / c.blob_id).read_bytes())
        assert c.compressed_offset is not None and c.compressed_size is not None
        raw = blob[c.compressed_offset : c.compressed_offset + c.compressed_size]
        data = decompress(raw, c.compressor if c.compressed else Compressor.NONE, c.uncompressed_size)
        out += data[r.offset : r.offset + r.length]
    return bytes(out)


_TYPE = {"reg": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
         "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}


def _check(tree: dict[bytes, Spec], boot: Path, blob_dir: Path) -> None:
    with open_bootstrap(boot) as bs:
        seen = dict(bs.walk())
        listed = {p[1:] for p in seen if p != b"/"}
        # implied parents are created; nothing else may appear
        assert set(tree) <= listed
        for p in listed - set(tree):
            assert any(q.startswith(p + b"/") for q in tree), p
        inos: dict[bytes, int] = {}
        for path, s in tree.items():
            ino = seen[b"/" + path]
            st_ = bs.stat(ino)
            if s.kind == "hardlink":
                assert ino == seen[b"/" + s.link]
                continue
            inos[path] = ino
            assert st_.mode == _TYPE[s.kind] | s.mode, path
            assert (st_.uid, st_.gid) == (s.uid, s.gid)
            assert (st_.mtime, st_.mtime_nsec) == (s.mtime, s.nsec)
            assert dict(bs.xattrs(ino)) == s.xattrs
            if s.kind == "reg":
                assert st_.size == len(s.data)
                assert _read_file(bs, ino, st_.size, blob_dir) == s.data
            elif s.kind == "symlink":
                assert bs.readlink(ino) == s.link
            elif s.kind in ("char", "block"):
                assert os.major(_rdev(st_.rdev)) == s.dev[0] and os.minor(_rdev(st_.rdev)) == s.dev[1]
        links = [s.link for s in tree.values() if s.kind == "hardlink"]
        for target in links:
            assert bs.stat(inos[target]).nlink == 1 + links.count(target)


def _rdev(kernel: int) -> int:
    major = (kernel & 0xFFF00) >> 8
    minor = (kernel & 0xFF) | ((kernel >> 12) & 0xFFF00)
    return os.makedev(major, minor)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees(), compressor=st.sampled_from(["none", "lz4_block", "zstd"]),
       digester=st.sampled_from(["blake3", "sha256"]))
def test_random_layer_round_trips_through_the_reader(
    tree: dict[bytes, Spec], compressor: str, digester: str
) -> None:
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        res = build(io.BytesIO(_tar(tree)), work / "boot", work / "blobs", type="tar-rafs",
                    compressor=compressor, digester=digester, chunk_size=CHUNK)
        _check(tree, work / "boot", work / "blobs")
        # a merge of one layer is the same image
        merge([work / "boot"], work / "merged")
        _check(tree, work / "merged", work / "blobs")
        assert res.chunk_count <= res.chunks_written + res.dedup_chunks
