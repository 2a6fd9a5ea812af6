"""Build progress: reports while data is read, then the bootstrap and done phases."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from pynydus.rafs.builder import BuildProgress, build


def _tree(root: Path) -> int:
    total = 0
    for i in range(60):
        d = root / f"d{i % 6}"
        d.mkdir(exist_ok=True)
        data = bytes([i]) * (i * 997)
        (d / f"f{i}").write_bytes(data)
        total += len(data)
    return total


@pytest.mark.parametrize("kind", ["dir-rafs", "tar-rafs", "tar-tarfs"])
def test_progress_reports_grow_and_end_with_the_bootstrap_and_done(
    tmp_path: Path, kind: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    total = _tree(src)
    source: Path = src
    if kind != "dir-rafs":
        source = tmp_path / "layer.tar"
        with tarfile.open(source, "w") as tf:
            tf.add(src, arcname=".")
    seen: list[BuildProgress] = []
    result = build(source, tmp_path / "bs", tmp_path / "blobs", type=kind,  # type: ignore[arg-type]
                   progress=seen.append, progress_interval=0.0)
    data = [p for p in seen if p.phase == "data"]
    assert [p.phase for p in seen[len(data):]] == ["bootstrap", "done"]
    assert len(data) >= 60  # one report per entry at interval 0
    assert [p.entries for p in data] == sorted(p.entries for p in data)
    assert [p.bytes_in for p in data] == sorted(p.bytes_in for p in data)
    assert [p.elapsed for p in seen] == sorted(p.elapsed for p in seen)
    end = seen[-1]
    assert end.entries >= 67  # 60 files, 6 directories, the root
    assert end.bytes_in == result.bytes_in == total


def test_no_callback_no_reports_and_a_failing_build_reports_no_done(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        t = tarfile.TarInfo("f")
        t.size = 10
        tf.addfile(t, io.BytesIO(bytes(10)))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw.getvalue()[:520])  # the header and a few data bytes
    seen: list[BuildProgress] = []
    with pytest.raises(Exception, match="expected 10 bytes"):
        build(cut, tmp_path / "bs", tmp_path / "blobs", type="tar-rafs",
              progress=seen.append, progress_interval=0.0)
    assert "done" not in [p.phase for p in seen]
    assert not (tmp_path / "bs").exists()


def test_the_collector_is_off_while_builds_run_and_back_as_it_was_after(tmp_path: Path) -> None:
    """A build's tree is acyclic: the collector's passes over it were 15% of a large
    layer's CPU. It is paused during the build (across concurrent builds: until the
    last ends) and left as the caller had it, after a failed build too."""
    import gc
    import threading

    src = tmp_path / "src"
    src.mkdir()
    _tree(src)
    during: list[bool] = []
    inner_done = threading.Event()

    def inner(p: BuildProgress) -> None:
        during.append(gc.isenabled())
        if p.phase == "done":
            inner_done.set()

    def outer(p: BuildProgress) -> None:
        during.append(gc.isenabled())
        if p.phase == "bootstrap" and not inner_done.is_set():
            # a second build, in another thread, ends while this one still runs
            t = threading.Thread(target=build, args=(src, tmp_path / "bs2", tmp_path / "b2"),
                                 kwargs={"progress": inner})
            t.start()
            t.join()
            during.append(gc.isenabled())

    assert gc.isenabled()
    build(src, tmp_path / "bs", tmp_path / "blobs", progress=outer, progress_interval=0.0)
    assert inner_done.is_set()
    assert during and not any(during)
    assert gc.isenabled()
    with pytest.raises(Exception):  # noqa: B017 - any failure
        build(tmp_path / "missing", tmp_path / "bs3", tmp_path / "b3")
    assert gc.isenabled()
    gc.disable()
    try:
        build(src, tmp_path / "bs4", tmp_path / "b4")
        assert not gc.isenabled()  # the caller's choice stands
    finally:
        gc.enable()


def test_a_child_forked_during_a_build_has_the_collector_as_before(tmp_path: Path) -> None:
    import gc
    import os

    from pynydus.rafs.builder import create

    assert gc.isenabled()
    with create._gc_paused():  # a build under way (in another thread, say)
        assert not gc.isenabled()
        pid = os.fork()
        if pid == 0:  # the child: no build runs here
            os._exit(0 if gc.isenabled() and create._gc_pauses == 0 else 1)
        _, status = os.waitpid(pid, 0)
        assert not gc.isenabled()  # the parent's build goes on
    assert os.waitstatus_to_exitcode(status) == 0
    assert gc.isenabled()
