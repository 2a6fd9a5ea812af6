"""Source trees and layers for the compatibility matrix.

The trees are the kernel tests' (``tests/integration/rafs/erofs_harness.make_rich_tree``:
hardlinks, long and non-UTF-8 names, sparse, empty and multi-chunk files, symlinks up to
4095 bytes, devices, fifos, a socket, xattrs, 400 small files, a 40-level path) and the
merge tests' OCI layers (``tests/harness/rafs_layers``: whiteouts, opaque directories,
hardlinks, files replacing directories across layers).

nydus-image 2.2 cannot build two things of the full rich tree (docs/compat.md has the
evidence): POSIX ACL xattrs (``system.posix_acl_*``: its prefix check wants a name
*longer* than the prefix) and, from tar layers, an xattr value with a newline byte (the
``tar`` crate 0.4.38 splits PAX records at newlines). :func:`rich_tree` leaves both out
unless asked, so every other cell still runs over the whole tree; the cells with them
show the failure.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

from tests.harness.rafs_layers import Ent, layer_tar, random_layers
from tests.integration.rafs.erofs_harness import make_rich_tree

#: ``user.bin`` of the rich tree: every byte value but the newline (see module doc).
BINARY_NO_NEWLINE = bytes(b for b in range(256) if b != 0x0A)


def rich_tree(root: Path, *, acls: bool = False, newline_xattr: bool = False,
              big: bool = True) -> Path:
    """The kernel tests' rich tree at ``root`` (created)."""
    root.mkdir(parents=True)
    make_rich_tree(root, big=big, acls=acls,
                   binary_xattr=bytes(range(256)) if newline_xattr else BINARY_NO_NEWLINE)
    return root


def tar_of(src: Path, out: Path, *, gz: bool = False) -> Path:
    """``src`` as a PAX tar (GNU tar, xattrs kept; sockets cannot be in a tar), gzip'ed
    at level 6 when ``gz`` (a multi-member-free stream, as registries serve layers)."""
    subprocess.run(["tar", "--format=posix", "--xattrs", "--xattrs-include=*",
                    "--numeric-owner", "-cpf", str(out), "-C", str(src), "."],
                   check=True, capture_output=True)
    if not gz:
        return out
    gz_path = out.with_name(out.name + ".gz")
    with open(out, "rb") as f, gzip.open(gz_path, "wb", compresslevel=6) as g:
        shutil.copyfileobj(f, g)
    out.unlink()
    return gz_path


T1, T2, T3 = 1_600_000_000, 1_650_000_000, 1_700_000_000
BIG = bytes(range(256)) * 12288  # 3 MiB: three chunks, compressible


def layered_image() -> list[list[Ent]]:
    """Three OCI layers that exercise what a merge must get right.

    1: base tree (multi-chunk file, an empty file, hardlinks inside the layer, xattrs,
       symlinks, a fifo, a char device, a 255-byte name, 300 small files in one
       directory, a directory to be made opaque, files to be whited out);
    2: ``.wh.`` of a file and of a whole directory, ``.wh..wh..opq`` of a directory that
       gets new content, a file replacing a directory, a directory replacing a file,
       a file whose chunks repeat layer 1's, a new hardlink pair, a whiteout among the
       small files;
    3: an opaque directory over nothing, a whiteout of a layer-2 file, a file replaced.
    """
    d = {"mode": 0o755}
    l1 = [
        Ent("dir", "usr", mtime=T1, **d), Ent("dir", "usr/bin", mtime=T1, **d),
        Ent("file", "usr/bin/tool", data=BIG, mode=0o755, mtime=T1,
            xattrs={"user.origin": b"layer1"}),
        Ent("hardlink", "usr/bin/tool-alias", link="usr/bin/tool", mode=0o755, mtime=T1),
        Ent("symlink", "usr/bin/short", link="tool", mode=0o777, mtime=T1),
        Ent("symlink", "usr/bin/long", link="/" + "p" * 3000, mode=0o777, mtime=T1),
        Ent("dir", "etc", mtime=T1, **d),
        Ent("file", "etc/config", data=b"key=1\n", mtime=T1, uid=1000, gid=1000),
        Ent("file", "etc/removed", data=b"gone in layer 2\n", mtime=T1),
        Ent("dir", "etc/conf.d", mtime=T1, **d),
        Ent("file", "etc/conf.d/a", data=b"a\n", mtime=T1),
        Ent("file", "etc/conf.d/b", data=b"b\n", mtime=T1),
        Ent("dir", "var", mtime=T1, **d), Ent("dir", "var/cache", mtime=T1, **d),
        Ent("file", "var/cache/blob", data=b"c" * 70000, mtime=T1),
        Ent("fifo", "var/pipe", mtime=T1), Ent("char", "var/null", mode=0o666, mtime=T1),
        Ent("dir", "opt", mtime=T1, **d), Ent("file", "opt/was-file", data=b"f", mtime=T1),
        Ent("dir", "opt/was-dir", mtime=T1, **d),
        Ent("file", "opt/was-dir/inner", data=b"inner", mtime=T1),
        Ent("file", "etc/empty", data=b"", mtime=T1),
        Ent("file", "opt/" + "L" * 255, data=b"long name\n", mtime=T1),
        Ent("dir", "usr/lib", mtime=T1, **d),
        *(Ent("file", f"usr/lib/f{i:03d}", data=b"%d\n" % i, mtime=T1) for i in range(300)),
    ]
    l2 = [
        Ent("dir", "etc", mtime=T2, **d),
        Ent("wh", "etc/.wh.removed"),
        Ent("dir", "etc/conf.d", mtime=T2, mode=0o750),
        Ent("opq", "etc/conf.d/.wh..wh..opq"),
        Ent("file", "etc/conf.d/c", data=b"only c now\n", mtime=T2),
        Ent("dir", "var", mtime=T2, **d), Ent("wh", "var/.wh.cache"),
        Ent("dir", "opt", mtime=T2, **d),
        Ent("dir", "opt/was-file", mtime=T2, **d),
        Ent("file", "opt/was-file/now-inside", data=b"x", mtime=T2),
        Ent("file", "opt/was-dir", data=b"now a file\n", mtime=T2),
        Ent("file", "opt/copy-of-tool", data=BIG, mtime=T2),  # same chunks as layer 1
        Ent("file", "opt/pair-a", data=b"pair\n", mtime=T2, xattrs={"user.pair": b"1"}),
        Ent("hardlink", "opt/pair-b", link="opt/pair-a", mtime=T2),  # same mode as pair-a
        Ent("dir", "usr", mtime=T2, **d), Ent("dir", "usr/lib", mtime=T2, **d),
        Ent("wh", "usr/lib/.wh.f007"),
    ]
    l3 = [
        Ent("dir", "srv", mtime=T3, **d), Ent("opq", "srv/.wh..wh..opq"),
        Ent("file", "srv/data", data=b"srv\n", mtime=T3),
        Ent("dir", "opt", mtime=T3, **d), Ent("wh", "opt/.wh.copy-of-tool"),
        Ent("dir", "etc", mtime=T3, **d),
        Ent("file", "etc/config", data=b"key=3\n", mtime=T3, uid=1000, gid=1000),
    ]
    return [l1, l2, l3]


def random_image(seed: int, n_layers: int = 3) -> list[list[Ent]]:
    """The merge property tests' random layers for one seed (deterministic), each hardlink
    entry carrying its target's mode, owner and mtime, as tar writers (GNU tar, Go's
    archive/tar) write them: nydus-image 2.2 gives the file the hardlink entry's
    attributes (see test_upstream_hardlink_entry_keeps_target_attributes)."""
    import dataclasses
    import random

    layers = random_layers(random.Random(seed), n_layers, explicit_dirs=True)
    for ents in layers:
        by_path = {e.path: e for e in ents}
        for i, e in enumerate(ents):
            if e.kind == "hardlink":
                t = by_path[e.link]
                ents[i] = dataclasses.replace(e, mode=t.mode, uid=t.uid, gid=t.gid,
                                              mtime=t.mtime)
    return layers


def write_layers(layers: list[list[Ent]], out: Path, *, numeric_fifo_devs: bool = True
                 ) -> list[Path]:
    """Each layer as ``out/layerN.tar``.

    ``numeric_fifo_devs``: give fifo entries device numbers 0/0, as GNU tar and Go's
    archive/tar write them; Python's tarfile leaves the fields empty (they mean nothing
    for a fifo), which nydus-image 2.2 cannot parse (docs/compat.md)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ents in enumerate(layers):
        p = out / f"layer{i}.tar"
        data = layer_tar(ents)
        p.write_bytes(fifo_devs_numeric(data) if numeric_fifo_devs else data)
        paths.append(p)
    return paths


def fifo_devs_numeric(tar: bytes) -> bytes:
    """``tar`` with each fifo header's empty devmajor/devminor set to octal 0."""
    out = bytearray(tar)
    pos = 0
    while pos + 512 <= len(out) and any(out[pos:pos + 512]):
        h = out[pos:pos + 512]
        size = int(bytes(h[124:136]).rstrip(b"\0 ") or b"0", 8)
        if h[156:157] == b"6":
            h[329:345] = b"0000000\0" * 2
            h[148:156] = b" " * 8
            h[148:156] = b"%06o\0 " % sum(h)
            out[pos:pos + 512] = h
        pos += 512 + (size + 511) // 512 * 512
    return bytes(out)
