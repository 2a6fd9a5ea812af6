"""``stat_fields`` and ``readdir_fields``: the tuple forms of ``stat`` and ``readdir``.

Contract: for every inode, ``stat_fields(ino)`` is ``(mode, nlink, uid, gid, size, blocks,
mtime, mtime_nsec, rdev)`` of ``stat(ino)`` and raises what ``stat`` raises (NotFound for a
nid no inode can have, FormatError for a corrupt inode); ``readdir_fields(ino)`` is
``readdir(ino)`` as ``(name, ino, file type)``. Checked on upstream's v5 and v6 fixtures,
on the synthetic images and on mutations of them (the fuzz test's inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from test_rafs_fuzz import INPUTS, mutations

from pynydus.errors import NydusError
from pynydus.rafs.read import Bootstrap, bootstrap_from_bytes


def _outcome(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except NydusError as err:
        return type(err)


def _listing(bs: Bootstrap, ino: int) -> list[tuple[bytes, int, int]]:
    return [(e.name, e.ino, int(e.file_type)) for e in bs.readdir(ino)]


def _fields_listing(bs: Bootstrap, ino: int) -> list[tuple[bytes, int, int]]:
    return list(bs.readdir_fields(ino))


def _stat_tuple(bs: Bootstrap, ino: int) -> tuple[int, ...]:
    st = bs.stat(ino)
    return (st.mode, st.nlink, st.uid, st.gid, st.size, st.blocks, st.mtime, st.mtime_nsec,
            st.rdev)


def _check_tree(bs: Bootstrap, limit: int = 5000) -> int:
    """Compare both forms on every inode reachable from the root; inodes checked."""
    seen: set[int] = set()
    stack = [bs.root_ino]
    while stack and len(seen) < limit:
        ino = stack.pop()
        if ino in seen:
            continue
        seen.add(ino)
        want = _outcome(_stat_tuple, bs, ino)
        assert _outcome(bs.stat_fields, ino) == want, ino
        if isinstance(want, tuple) and want[0] & 0o170000 == 0o040000:
            entries = _outcome(_listing, bs, ino)
            assert _outcome(_fields_listing, bs, ino) == entries, ino
            if isinstance(entries, list):
                stack.extend(i for name, i, _ in entries if name not in (b".", b".."))
    return len(seen)


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_fields_agree_with_stat_and_readdir(name: str) -> None:
    bs = bootstrap_from_bytes(INPUTS[name])
    assert _check_tree(bs) > 1
    for ino in (-1, 10**9, bs.root_ino + 1, bs.root_ino + 7):
        assert _outcome(bs.stat_fields, ino) == _outcome(_stat_tuple, bs, ino)


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_fields_agree_on_corrupt_bootstraps(name: str) -> None:
    for _, mutated in zip(range(60), mutations(INPUTS[name], seed=len(name))):
        try:
            bs = bootstrap_from_bytes(mutated)
        except NydusError:
            continue
        _check_tree(bs, limit=300)
        for ino in range(64):  # nids that may land inside or across inodes
            assert _outcome(bs.stat_fields, ino) == _outcome(_stat_tuple, bs, ino)
