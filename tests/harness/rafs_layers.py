"""Random OCI layers for merge tests, and the image they must give, computed on its own.

:func:`random_layers` draws a few tar layers over a small name space (so paths
collide across layers): directories, files with xattrs, short and long symlinks,
hardlinks, fifos, char devices, ``.wh.NAME`` and ``.wh..wh..opq``, deep paths;
files replace directories and directories replace files from one layer to the next.
:func:`expected_listing` applies the layers with OCI rules to a dict, without any
pynydus code; :func:`bootstrap_listing` and :func:`mount_listing` describe a merged
bootstrap (through the reader) and a mounted image (through the kernel) the same way.

A listing maps every path to (kind, mode, uid, gid, size, mtime, xattrs, symlink
target, rdev, nlink, data) plus, for regular files, the set of paths sharing its
inode. ``data`` is the chunk digests (reader) or sha256 of the content (kernel),
so the model computes both from the bytes it wrote.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

NAMES = ["a", "b", "c"]
CHUNK = 1 << 20
T0 = 1_600_000_000


@dataclass
class Ent:
    """One tar entry of a layer."""

    kind: str  # dir | file | symlink | hardlink | fifo | char | wh | opq
    path: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = T0
    data: bytes = b""
    link: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)


def random_layers(
    rng: random.Random, n_layers: int, *, explicit_dirs: bool, tries: int = 12
) -> list[list[Ent]]:
    """``n_layers`` layers of up to ``tries`` entries (plus their parent directories). With ``explicit_dirs`` every
    directory a layer touches has its own entry (as ``tar -C dir .`` gives); without,
    parents are only implied by their children's paths."""
    return [_layer(rng, k, explicit_dirs, tries) for k in range(n_layers)]


def _layer(rng: random.Random, k: int, explicit_dirs: bool, tries: int) -> list[Ent]:
    ents: list[Ent] = []
    used: dict[str, str] = {}  # path -> kind, one entry per path
    files: list[str] = []

    def meta(kind: str) -> dict[str, Any]:
        mode = {"dir": 0o755, "symlink": 0o777}.get(kind, 0o644)
        return {
            "mode": rng.choice([mode, mode & 0o750, mode | 0o4000 if kind == "file" else mode]),
            "uid": rng.choice([0, 1000, 70000]),
            "gid": rng.choice([0, 100]),
            "mtime": T0 + 1000 * k + rng.randrange(1000),
            # user.* xattrs exist on files and directories only (the kernel hides others)
            "xattrs": {"user.k": b"%d" % rng.randrange(9)}
            if kind in ("file", "dir") and rng.random() < 0.25
            else {},
        }

    def parents_ok(parts: list[str]) -> bool:
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(used.get(p, "dir") != "dir" for p in prefixes):
            return False
        for p in prefixes:
            if p not in used:
                used[p] = "dir"
                if explicit_dirs:
                    ents.append(Ent("dir", p, **meta("dir")))
        return True

    for _ in range(rng.randrange(1, tries + 1)):
        depth = rng.choice([1, 1, 2, 2, 3, 5])
        parts = [rng.choice(NAMES) for _ in range(depth)]
        path = "/".join(parts)
        kind = rng.choice(
            ["dir", "file", "file", "file", "symlink", "hardlink", "fifo", "char", "wh", "opq"]
        )
        if kind == "wh":
            parts = [*parts[:-1], ".wh." + parts[-1]]
        elif kind == "opq":
            parts = [*parts[:-1], ".wh..wh..opq"]
        path = "/".join(parts)
        if path in used or (kind != "dir" and any(u.startswith(path + "/") for u in used)):
            continue
        if kind == "hardlink" and not files:
            continue
        if not parents_ok(parts):
            continue
        used[path] = kind
        if kind in ("wh", "opq"):
            ents.append(Ent(kind, path, mode=0o644, mtime=T0))
        elif kind == "file":
            size = rng.choice([0, 1, 100, 5000, CHUNK + 10])
            seed = rng.randrange(4)  # few contents, so chunks repeat within and across layers
            data = (b"%d:%d;" % (seed, size) * (size // 4 + 1))[:size]
            ents.append(Ent("file", path, data=data, **meta("file")))
            files.append(path)
        elif kind == "symlink":
            target = rng.choice(["a", "../b/c", "x" * 3000, "/abs/" + "y" * 4090])
            ents.append(Ent("symlink", path, link=target, **meta("symlink")))
        elif kind == "hardlink":
            ents.append(Ent("hardlink", path, link=rng.choice(files), mtime=T0))
        else:
            ents.append(Ent(kind, path, **meta(kind)))
    return ents


def layer_tar(ents: list[Ent]) -> bytes:
    """The layer as a PAX tar (xattrs as SCHILY.xattr records)."""
    buf = io.BytesIO()
    types = {
        "dir": tarfile.DIRTYPE,
        "file": tarfile.REGTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "fifo": tarfile.FIFOTYPE,
        "char": tarfile.CHRTYPE,
        "wh": tarfile.REGTYPE,
        "opq": tarfile.REGTYPE,
    }
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in ents:
            t = tarfile.TarInfo(e.path)
            t.type = types[e.kind]
            t.mode, t.uid, t.gid, t.mtime = e.mode, e.uid, e.gid, e.mtime
            t.pax_headers = {"SCHILY.xattr." + k: v.decode() for k, v in e.xattrs.items()}
            if e.kind in ("symlink", "hardlink"):
                t.linkname = e.link
            if e.kind == "char":
                t.devmajor, t.devminor = 1, 3
            t.size = len(e.data)
            tf.addfile(t, io.BytesIO(e.data) if e.kind == "file" else None)
    return buf.getvalue()


# --------------------------------------------------------------------------- model


@dataclass(eq=False)
class _Obj:
    kind: str
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    data: bytes = b""
    link: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)


_IFMT = {
    "dir": stat.S_IFDIR,
    "file": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "char": stat.S_IFCHR,
}


def _apply(layers: list[list[Ent]]) -> dict[str, _Obj]:
    """OCI layer application (image-spec "Applying Changesets") on a path -> object map."""
    state: dict[str, _Obj] = {}

    def drop(path: str) -> None:
        for p in [p for p in state if p == path or p.startswith(path + "/")]:
            del state[p]

    for ents in layers:
        for e in ents:  # whiteouts see only the layers below
            parent, _, name = e.path.rpartition("/")
            if e.kind == "opq":
                for p in [p for p in state if p.startswith(parent + "/" if parent else "")]:
                    del state[p]
            elif e.kind == "wh":
                drop((parent + "/" if parent else "") + name[len(".wh.") :])
        for e in ents:
            parts = e.path.split("/")
            for i in range(1, len(parts)):  # implied parents: a lower dir stays as it is
                p = "/".join(parts[:i])
                if p in state and state[p].kind != "dir":
                    drop(p)
                if p not in state:
                    state[p] = _Obj("dir", stat.S_IFDIR | 0o755)
            if e.kind in ("wh", "opq"):
                continue
            meta = {"uid": e.uid, "gid": e.gid, "mtime": e.mtime, "xattrs": dict(e.xattrs)}
            if e.kind == "hardlink":
                target = state[e.link]
                drop(e.path)
                state[e.path] = target
                continue
            obj = _Obj(e.kind, _IFMT[e.kind] | e.mode, data=e.data, link=e.link, **meta)
            old = state.get(e.path)
            if e.kind == "dir" and old is not None and old.kind == "dir":
                old.mode, old.uid, old.gid = obj.mode, obj.uid, obj.gid
                old.mtime, old.xattrs = obj.mtime, obj.xattrs
                continue
            drop(e.path)
            state[e.path] = obj
    return state


Listing = dict[str, tuple[Any, ...]]


def expected_listing(layers: list[list[Ent]], *, data: str = "chunks") -> Listing:
    """The listing the merged image of ``layers`` must have (``data``: "chunks" for
    blake3 chunk digests as the reader shows them, "sha256" for file content)."""
    state = _apply(layers)
    names: dict[int, list[str]] = {}
    for p, o in state.items():
        names.setdefault(id(o), []).append("/" + p)
    subdirs: dict[str, int] = {}
    for p, o in state.items():
        if o.kind == "dir":
            parent = p.rpartition("/")[0]
            subdirs[parent] = subdirs.get(parent, 0) + 1
    out: Listing = {
        "/": (
            "dir",
            stat.S_IFDIR | 0o755,
            0,
            0,
            None,
            0,
            (),
            None,
            None,
            2 + subdirs.get("", 0),
            None,
            None,
        )
    }
    for p, o in state.items():
        nlink = 2 + subdirs.get(p, 0) if o.kind == "dir" else len(names[id(o)])
        if o.kind == "file":
            payload: Any = (
                tuple(
                    blake3.blake3(o.data[i : i + CHUNK]).digest()
                    for i in range(0, len(o.data), CHUNK)
                )
                if data == "chunks"
                else hashlib.sha256(o.data).hexdigest()
            )
        else:
            payload = None
        size = {"dir": None, "file": len(o.data), "symlink": len(o.link)}.get(o.kind, 0)
        out["/" + p] = (
            o.kind,
            o.mode,
            o.uid,
            o.gid,
            size,
            o.mtime,
            tuple(sorted(o.xattrs.items())),
            o.link.encode() if o.kind == "symlink" else None,
            os.makedev(1, 3) if o.kind == "char" else None,
            nlink,
            payload,
            tuple(sorted(names[id(o)])) if o.kind == "file" else None,
        )
    return out


# --------------------------------------------------------------------------- views


def bootstrap_listing(boot: str | Path, *, data: str = "chunks") -> Listing:
    """A merged bootstrap seen through the reader (``data="map"``: the full chunk map,
    blob id, index, compressed and uncompressed location and digest per chunk)."""
    from pynydus.rafs.format import decode_rdev
    from pynydus.rafs.read import open_bootstrap

    out: Listing = {}
    groups: dict[int, list[str]] = {}
    with open_bootstrap(boot) as bs:
        entries = list(bs.walk())
        # A file's identity is its i_ino: nydus-image writes a record per hardlink name.
        ident = {ino: bs.raw_inode(ino).ino if bs.version == 6 else ino for _, ino in entries}
        for path, ino in entries:
            if bs.stat(ino).is_reg:
                groups.setdefault(ident[ino], []).append(path.decode())
        for path, ino in entries:
            st = bs.stat(ino)
            kind = (
                "dir"
                if st.is_dir
                else "file"
                if st.is_reg
                else "symlink"
                if st.is_symlink
                else "char"
                if stat.S_ISCHR(st.mode)
                else "fifo"
            )
            chunks = bs.chunks(ino) if st.is_reg else []
            payload: Any = None
            if st.is_reg:
                payload = tuple(
                    c.digest
                    if data == "chunks"
                    else (
                        c.blob_id,
                        c.index,
                        c.compressed_offset,
                        c.compressed_size,
                        c.uncompressed_offset,
                        c.uncompressed_size,
                        c.digest,
                    )
                    for c in chunks
                )
            out[path.decode()] = (
                kind,
                st.mode,
                st.uid,
                st.gid,
                None if st.is_dir else st.size,
                st.mtime,
                tuple(sorted((k.decode(), v) for k, v in bs.xattrs(ino))),
                bs.readlink(ino) if st.is_symlink else None,
                os.makedev(*decode_rdev(st.rdev)) if kind == "char" else None,
                st.nlink,
                payload,
                tuple(sorted(groups[ident[ino]])) if st.is_reg else None,
            )
    return out


#: nydusd 2.2 answers a file's first LOOKUP with its RAFS inode number and, once its
#: directory has been read (READDIRPLUS), with the same number plus its VFS index in the
#: top byte (fuse-backend-rs keeps the index of the mounted file system there): measured
#: st_ino 136, then 0x0100000000000088 for the same file. A walk whose attributes arrive
#: by both paths (the kernel picks per entry and cache state) sees one hardlinked file as
#: two; a file's identity on a FUSE mount is the low 56 bits.
FUSE_VFS_INO_MASK = (1 << 56) - 1


def mount_listing(root: Path) -> Listing:
    """A mounted image seen through the kernel, in the model's terms (sha256 data)."""
    out: Listing = {}
    groups: dict[int, list[str]] = {}
    recs: list[tuple[str, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [".", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]:
            p = os.path.normpath(os.path.join(dirpath, n))
            rel = "/" + os.path.relpath(p, root) if p != str(root) else "/"
            st = os.lstat(p)
            recs.append((rel, st))
            if stat.S_ISREG(st.st_mode):
                groups.setdefault(st.st_ino & FUSE_VFS_INO_MASK, []).append(rel)
    for rel, st in recs:
        p = os.path.join(root, rel.lstrip("/"))
        m = st.st_mode
        kind = (
            "dir"
            if stat.S_ISDIR(m)
            else "file"
            if stat.S_ISREG(m)
            else "symlink"
            if stat.S_ISLNK(m)
            else "char"
            if stat.S_ISCHR(m)
            else "fifo"
        )
        payload = None
        if kind == "file":
            payload = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        xattrs = tuple(
            sorted(
                (k, os.getxattr(p, k, follow_symlinks=False))
                for k in os.listxattr(p, follow_symlinks=False)
            )
        )
        out[rel] = (
            kind,
            m,
            st.st_uid,
            st.st_gid,
            None if kind == "dir" else st.st_size,
            st.st_mtime_ns // 10**9,
            xattrs,
            os.readlink(p).encode() if kind == "symlink" else None,
            st.st_rdev if kind == "char" else None,
            st.st_nlink,
            payload,
            tuple(sorted(groups[st.st_ino & FUSE_VFS_INO_MASK])) if kind == "file" else None,
        )
    return out
