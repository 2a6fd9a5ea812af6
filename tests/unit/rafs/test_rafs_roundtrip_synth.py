"""Property: whatever tree the synthetic v6 writer lays out, the reader gives it back.

Random names (any bytes but ``/`` and NUL), sizes around block and chunk
boundaries, xattrs, symlinks of every storage form and directories spilling
over several blocks exercise the inline/plain and multi-block paths of the reader.
"""

from __future__ import annotations

import stat

import synth_v6 as S
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynydus.rafs.read import bootstrap_from_bytes

CHUNK = 4096 * 4

names = st.binary(min_size=1, max_size=40).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)
xattrs = st.lists(
    st.tuples(
        st.sampled_from([b"user.a", b"user.bb", b"trusted.x", b"security.selinux"]),
        st.binary(max_size=40),
    ),
    max_size=3,
    unique_by=lambda kv: kv[0],
)


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> S.Node:
    node = S.d(mode=draw(st.sampled_from([0o755, 0o700])), xattrs=draw(xattrs))
    for name in draw(st.lists(names, max_size=12 if depth else 150, unique=True)):
        kind = draw(
            st.sampled_from(["reg", "reg", "link", "dir", "fifo"] if depth < 2 else ["reg", "link"])
        )
        if kind == "reg":
            size = draw(
                st.one_of(st.integers(0, 100), st.sampled_from([CHUNK - 1, CHUNK, 2 * CHUNK + 1]))
            )
            child = S.f(size, xattrs=draw(xattrs), uid=draw(st.integers(0, 70000)))
        elif kind == "link":
            child = S.ln(
                draw(st.binary(min_size=1, max_size=4096).filter(lambda b: b"\0" not in b))
            )
        elif kind == "fifo":
            child = S.Node(stat.S_IFIFO | 0o600)
        else:
            child = draw(trees(depth + 1))
        node.children[name] = child
    return node


def expected(root: S.Node) -> dict[bytes, S.Node]:
    out = {b"/": root}
    stack = [(b"", root)]
    while stack:
        prefix, node = stack.pop()
        for name, child in node.children.items():
            path = prefix + b"/" + name
            out[path] = child
            if stat.S_ISDIR(child.mode):
                stack.append((path, child))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_reader_returns_the_tree_the_writer_laid_out(root: S.Node) -> None:
    img = S.build(root, chunk_size=CHUNK)
    bs = bootstrap_from_bytes(img.data)
    want = expected(root)
    got = dict(bs.walk())
    assert set(got) == set(want)
    for path, ino in got.items():
        node = want[path]
        assert ino == node.nid
        st_ = bs.stat(ino)
        assert st_.mode == node.mode and st_.uid == node.uid and st_.nlink == node.nlink
        assert bs.xattrs(ino) == node.xattrs
        assert bs.lookup_path(path) == ino
        if stat.S_ISLNK(node.mode):
            assert bs.readlink(ino) == node.target
        elif stat.S_ISREG(node.mode):
            assert st_.size == node.data_size
            chunks = bs.chunks(ino)
            assert [
                (c.index, c.uncompressed_offset, c.uncompressed_size) for c in chunks
            ] == img.chunks[ino]
            assert sum(r.length for r in bs.map_read(ino, 0, node.data_size)) == node.data_size
        elif stat.S_ISDIR(node.mode):
            names_ = [e.name for e in bs.readdir(ino) if e.name not in (b".", b"..")]
            assert names_ == sorted(node.children)
