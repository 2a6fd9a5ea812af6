"""The v6 bootstrap writer's output, pinned: byte-identical bootstraps for fixed trees.

The expected digests were produced by the writer before its per-inode fast path
(commit a111d13); any change to them is a change of the on-disk format and must be
deliberate. The trees are built in memory (no tar parsing, no chunking), so only
the writer is under test, with every inode kind and layout it has: inline and
plain directories (names sorting before ``.``), inline and block symlinks,
devices, fifos, xattrs, hardlinks, multi-chunk files, deduplicated chunks in two
blobs, compact inodes, 512-byte tarfs blocks and a prefetch table.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path

import pytest

from pynydus.errors import InvalidArgument
from pynydus.rafs.builder import BlobDesc, ChunkDesc, Inode, Node, Tree, V6Options, write_bootstrap
from pynydus.rafs.format import encode_rdev
from pynydus.rafs.format import layout as L
from tests.harness import tools

_XATTR_NAMES = (
    b"user.a",
    b"user.long" + b"x" * 40,
    b"trusted.overlay.opaque",
    b"security.capability",
    b"system.posix_acl_access",
)


def _tree(seed: int, bs: int, chunk_size: int) -> tuple[Tree, list[BlobDesc]]:
    rnd = random.Random(seed)
    blobs = [
        BlobDesc(
            blob_id=hashlib.sha256(b"blob%d" % i).hexdigest(),
            chunk_size=chunk_size,
            compressor=L.Compressor.ZSTD,
            digester=L.Digester.BLAKE3,
            chunk_count=1000,
            compressed_size=(1 << 30) + i,
            uncompressed_size=(1 << 30),
        )
        for i in range(2)
    ]
    shared: list[ChunkDesc] = []
    next_off = [0, 0]

    def chunk(fo: int, size: int) -> ChunkDesc:
        if shared and rnd.random() < 0.2:
            return shared[rnd.randrange(len(shared))]
        b = rnd.randrange(2)
        off = next_off[b]
        next_off[b] += -(-size // bs) * bs
        c = ChunkDesc(
            digest=rnd.randbytes(32),
            blob=blobs[b],
            ci_index=rnd.randrange(1 << 24),
            compressed_offset=rnd.randrange(1 << 34),
            compressed_size=rnd.randrange(1, size + 1),
            uncompressed_offset=off,
            uncompressed_size=size,
            compressed=rnd.random() < 0.5,
            file_offset=fo,
        )
        shared.append(c)
        return c

    def meta(mode: int) -> Inode:
        i = Inode(
            mode=mode,
            uid=rnd.choice((0, 1000, 70000)),
            gid=rnd.choice((0, 100, 1 << 20)),
            mtime=rnd.choice((1_700_000_000, 1_700_000_000, 1_600_000_123)),
            mtime_nsec=rnd.choice((0, 0, 5)),
        )
        if rnd.random() < 0.1:
            for name in rnd.sample(_XATTR_NAMES, rnd.randrange(1, 4)):
                i.xattrs[name] = rnd.randbytes(rnd.randrange(0, 200))
        return i

    tree = Tree()
    regs: list[Inode] = []
    dirs = [tree.root]
    for d in range(40):
        parent = rnd.choice(dirs)
        assert parent.children is not None
        name = b"d%d" % d
        node = Node(name, meta(stat.S_IFDIR | 0o755), {})
        parent.children[name] = node
        dirs.append(node)
    big = Node(b"big", meta(stat.S_IFDIR | 0o700), {})
    assert tree.root.children is not None
    tree.root.children[b"big"] = big
    dirs.append(big)
    odd_names = [b"-dash", b".-", b"...", b"!", b"+plus", b".hidden", b"z" * 255]
    for n in range(1500):
        d = big if n < 400 else rnd.choice(dirs)
        assert d.children is not None
        name = odd_names.pop() if odd_names else b"f%05d_%s" % (n, b"n" * rnd.randrange(30))
        kind = rnd.random()
        if kind < 0.6:
            i = meta(stat.S_IFREG | 0o644)
            i.size = rnd.choice(
                (0, 1, 4096, chunk_size, 3 * chunk_size + 7, rnd.randrange(1 << 16))
            )
            i.chunks = [
                chunk(k * chunk_size, min(chunk_size, i.size - k * chunk_size))
                for k in range(-(-i.size // chunk_size))
            ]
            regs.append(i)
        elif kind < 0.7 and regs:
            i = rnd.choice(regs)  # hardlink
        elif kind < 0.85:
            i = meta(stat.S_IFLNK | 0o777)
            i.link = rnd.randbytes(rnd.choice((1, 40, 300, 500, 3000, 4096))).replace(b"\0", b"a")
            i.size = len(i.link)
        elif kind < 0.93:
            i = meta(rnd.choice((stat.S_IFCHR, stat.S_IFBLK)) | 0o600)
            i.rdev = encode_rdev(rnd.randrange(300), rnd.randrange(1 << 12))
        else:
            i = meta(rnd.choice((stat.S_IFIFO, stat.S_IFSOCK)) | 0o644)
        d.children[name] = Node(name, i)
    return tree, blobs


def _write(tmp_path: Path, seed: int, opts: V6Options) -> str:
    tree, blobs = _tree(seed, opts.block_size, opts.chunk_size)
    out = tmp_path / "bootstrap"
    write_bootstrap(tree, blobs, out, opts)
    h = hashlib.sha256(out.read_bytes())
    for path, node in tree.walk():  # what the writer assigns on the tree
        h.update(b"%s %d %d %d\n" % (path, node.inode.nid, node.inode.ino, node.inode.nlink))
    return h.hexdigest()


_CASES = {
    "default": (1, V6Options(chunk_size=1 << 16)),
    "compact-zstd-sha256": (
        2,
        V6Options(
            chunk_size=1 << 16,
            compact_inodes=True,
            compressor=L.Compressor.ZSTD,
            digester=L.Digester.SHA256,
            prefetch=(b"big", b"d3", b"", b"big", b"missing"),
        ),
    ),
    "tarfs-512": (
        3,
        V6Options(
            chunk_size=1 << 12,
            block_size=L.EROFS_BLOCK_SIZE_512,
            tarfs=True,
            digester=L.Digester.SHA256,
            explicit_uidgid=False,
            prefetch=(b"d1",),
        ),
    ),
}

_GOLDEN = {
    "default": "849801b7370d68353dd6426162e0137f8a49aef40c29675deb9eb9f931ca3b0f",
    "compact-zstd-sha256": "9d8a7d4f7b7624121d886b53beaf436a52b81029870a7d76e3be7bbae8226c14",
    "tarfs-512": "967fdf802f87309c0b0961415edf753cf35ecceb5ec01797ea03f8856c7b66a5",
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_bootstrap_bytes_and_assigned_nids_match_the_pinned_digest(
    tmp_path: Path, case: str
) -> None:
    seed, opts = _CASES[case]
    assert _write(tmp_path, seed, opts) == _GOLDEN[case]


def test_a_second_write_of_the_same_tree_is_identical(tmp_path: Path) -> None:
    tree, blobs = _tree(4, 4096, 1 << 16)
    a, b = tmp_path / "a", tmp_path / "b"
    write_bootstrap(tree, blobs, a, V6Options(chunk_size=1 << 16))
    write_bootstrap(tree, blobs, b, V6Options(chunk_size=1 << 16))
    assert a.read_bytes() == b.read_bytes()


def test_chunks_on_a_non_regular_inode_are_rejected(tmp_path: Path) -> None:
    tree, blobs = _tree(5, 4096, 1 << 16)
    reg = next(n.inode for _, n in tree.walk() if n.inode.is_reg and n.inode.chunks)
    link = Inode(mode=stat.S_IFLNK | 0o777, link=b"t", size=1, chunks=list(reg.chunks))
    assert tree.root.children is not None
    tree.root.children[b"odd"] = Node(b"odd", link)
    with pytest.raises(InvalidArgument, match="has chunks"):
        write_bootstrap(tree, blobs, tmp_path / "b", V6Options(chunk_size=1 << 16))
    assert not (tmp_path / "b").exists()


# --- the same outputs, refereed by erofs-utils and the kernel ----------------------------
# The digests above only say the bytes did not change. Whether those bytes are a correct
# EROFS image is for fsck.erofs and the kernel's EROFS to say: each pinned case is checked
# by fsck.erofs and mounted, and the mount must show the tree the writer was given (names,
# types, modes, owners, sizes, mtimes, link targets, device numbers, xattrs, link counts
# and hardlink identity). The blobs are sparse files of their declared size (file data is
# not compared: the chunks point at made-up data). The trees fill xattr values with random
# bytes, which the kernel parses for POSIX ACLs: the mount is ``noacl`` (an invalid ACL
# would fail every permission check on its inode, hiding whole subtrees), so ACL names
# are not listed and not expected.


def _blob_devices(tmp_path: Path, blobs: list[BlobDesc]) -> list[Path]:
    devices = []
    for b in blobs:
        dev = tmp_path / f"{b.blob_id[:12]}.dev"
        with dev.open("wb") as f:
            f.truncate(b.uncompressed_size)
        devices.append(dev)
    return devices


def _model(tree: Tree) -> dict[bytes, Inode]:
    return {path: node.inode for path, node in tree.walk()}


def _kernel_view(root: Path) -> dict[bytes, tuple[os.stat_result, bytes, list[bytes]]]:
    out = {b"": (os.lstat(root), b"", sorted(os.fsencode(n) for n in os.listxattr(root)))}

    def fail(err: OSError) -> None:
        raise err

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            link = os.fsencode(os.readlink(full)) if stat.S_ISLNK(st.st_mode) else b""
            names = sorted(os.fsencode(n) for n in os.listxattr(full, follow_symlinks=False))
            out[os.fsencode(os.path.relpath(full, root))] = (st, link, names)
    return out


def _value_readable(i: Inode, name: bytes) -> bool:
    """Whether the kernel hands back this xattr's value as written: security.capability
    values are parsed (random bytes are EINVAL) and user.* exists on regular files and
    directories only (VFS)."""
    if name == b"security.capability":
        return False
    if name.startswith(b"user."):
        return i.is_reg or i.is_dir
    return True


_ACL = b"system.posix_acl"
# A symlink target is at most a page less its terminating NUL (nd_terminate_link).
_MAX_LINK = 4095


def _differences(tree: Tree, mnt: Path) -> tuple[list[str], int]:
    """Differences of the mount from ``tree``, and how many xattr values were compared."""
    model, seen = _model(tree), _kernel_view(mnt)
    diffs = [f"{p!r} missing in the mount" for p in sorted(set(model) - set(seen))]
    diffs += [f"{p!r} not in the tree" for p in sorted(set(seen) - set(model))]
    ino_of: dict[int, int] = {}  # id(model inode) -> st_ino
    values = 0
    for path in sorted(set(model) & set(seen)):
        i, (st, link, names) = model[path], seen[path]
        want = {"mode": i.mode, "uid": i.uid, "gid": i.gid, "nlink": i.nlink,
                "mtime": (i.mtime, i.mtime_nsec),
                "xattr names": sorted(k for k in i.xattrs if not k.startswith(_ACL))}
        got = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
               "mtime": (int(st.st_mtime_ns // 10**9), st.st_mtime_ns % 10**9),
               "xattr names": names}
        if not i.is_dir:
            want["size"], got["size"] = i.size, st.st_size
        if stat.S_ISLNK(i.mode):
            want["link"], got["link"] = i.link[:_MAX_LINK], link
        if stat.S_ISCHR(i.mode) or stat.S_ISBLK(i.mode):
            want["rdev"], got["rdev"] = i.rdev, _encode(st.st_rdev)
        for k, value in want.items():
            if value != got[k]:
                shown = (value, got[k]) if k != "link" else (f"{len(value)} bytes", f"{len(got[k])}")
                diffs.append(f"{path!r}: {k} {shown[0]!r} != {shown[1]!r}")
        full = os.path.join(mnt, os.fsdecode(path))
        for name, value in sorted(i.xattrs.items()):
            if name in names and _value_readable(i, name):
                values += 1
                if os.getxattr(full, os.fsdecode(name), follow_symlinks=False) != value:
                    diffs.append(f"{path!r}: xattr {name!r} value differs")
        if ino_of.setdefault(id(i), st.st_ino) != st.st_ino:
            diffs.append(f"{path!r}: a hardlink of the tree is a separate inode in the mount")
    if len(set(ino_of.values())) != len(ino_of):
        diffs.append("two inodes of the tree share an inode number in the mount")
    return diffs, values


def _encode(rdev: int) -> int:
    return encode_rdev(os.major(rdev), os.minor(rdev))


@pytest.mark.parametrize("case", sorted(_CASES))
def test_pinned_outputs_are_valid_erofs_for_fsck_and_the_kernel(tmp_path: Path, case: str) -> None:
    tools.require("fsck.erofs")
    if os.geteuid() != 0:
        pytest.skip("kernel EROFS mounts need root")
    from tests.integration.rafs.erofs_harness import fsck, mounted

    seed, opts = _CASES[case]
    assert _write(tmp_path, seed, opts) == _GOLDEN[case]  # the very bytes pinned above
    tree, blobs = _tree(seed, opts.block_size, opts.chunk_size)
    boot = tmp_path / "bootstrap"
    write_bootstrap(tree, blobs, boot, opts)
    devices = _blob_devices(tmp_path, blobs)
    if opts.block_size == 4096:  # fsck.erofs 1.5: "blksize 512 isn't supported"; the kernel is
        fsck(boot, devices)
    with mounted(boot, devices, options=("noacl",)) as mnt:
        diffs, values = _differences(tree, mnt)
    assert not diffs, f"{len(diffs)} differences:\n" + "\n".join(diffs[:40])
    assert values > 20, values  # xattr values were compared, not only names
