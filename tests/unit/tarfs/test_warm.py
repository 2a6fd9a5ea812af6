"""``tarfs.warm.cache_tree``: every entry of a tree looked up once, nothing followed out of
it, stopped when cancelled."""

from __future__ import annotations

import os
from pathlib import Path

from pynydus.tarfs.warm import cache_tree


def _tree(root: Path, dirs: int = 3, files: int = 4) -> int:
    n = 0
    for i in range(dirs):
        d = root / f"d{i}" / "sub"
        d.mkdir(parents=True)
        n += 2
        for j in range(files):
            (d / f"f{j}").write_bytes(b"x")
            n += 1
    (root / "top").write_bytes(b"")
    os.link(root / "top", root / "hard")
    return n + 2


def test_every_entry_below_the_root_is_looked_up_once(tmp_path: Path) -> None:
    n = _tree(tmp_path)
    assert cache_tree(str(tmp_path)) == n


def test_symlinks_are_counted_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _tree(outside)
    root = tmp_path / "root"
    root.mkdir()
    n = _tree(root)
    (root / "link").symlink_to(outside)
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    assert cache_tree(str(root)) == n + 2


def test_a_cancelled_walk_stops_at_the_next_directory(tmp_path: Path) -> None:
    _tree(tmp_path, dirs=20)
    seen = []

    def cancelled() -> bool:
        seen.append(1)
        return len(seen) > 1  # after the root's own directory

    assert cache_tree(str(tmp_path), cancelled) == 22  # the root's entries only
    assert cache_tree(str(tmp_path), lambda: True) == 0
