"""Our ``nydus-image`` against upstream's, run on the same inputs: the outputs scripts
parse (``--output-json`` documents, the ``check`` report, ``inspect -R`` answers, the
unpacked tar) have upstream's shape and values, exit codes match on errors, and a
flag we do not implement is refused by name (exit 2), never accepted and ignored.

Each image one tool builds is read by the other (``check``, ``inspect``), so the
comparison is also a format cross-check. Upstream's binary comes from
``scripts/peers.sh``; a missing one is a failure naming that script.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.peers import peer_bin
from tests.harness.util import make_workdir, remove_tree

OURS = str(Path(sys.executable).with_name("nydus-image"))


@pytest.fixture
def work() -> Iterator[Path]:
    d = make_workdir("dropin")
    try:
        yield d
    finally:
        remove_tree(d)


@pytest.fixture
def src(work: Path) -> Path:
    """A small tree: nested dirs, a multi-chunk file, a symlink, a hardlink, an empty file."""
    s = work / "src"
    (s / "a/b").mkdir(parents=True)
    (s / "a/b/hello.txt").write_bytes(b"hello\n")
    (s / "big.bin").write_bytes(hashlib.sha256(b"seed").digest() * (3 * 65536 // 2))
    (s / "empty").write_bytes(b"")
    (s / "a/link").symlink_to("b/hello.txt")
    os.link(s / "a/b/hello.txt", s / "a/hard.txt")
    for p in [s, *s.rglob("*")]:
        os.utime(p, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    return s


def run(exe: str, *args: str | Path, stdin: str = "", cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe, *(str(a) for a in args)], capture_output=True, text=True,
                          input=stdin, timeout=300, check=False, cwd=cwd)


def both(*args: str | Path, **kw: object) -> tuple[subprocess.CompletedProcess[str],
                                                   subprocess.CompletedProcess[str]]:
    up = str(peer_bin("nydus-rs", "nydus-image"))
    return run(up, *args, **kw), run(OURS, *args, **kw)  # type: ignore[arg-type]


def build_both(work: Path, source: Path, *extra: str) -> dict[str, dict[str, object]]:
    """``create`` by each tool into work/<tool>/; returns each tool's -J document."""
    out = {}
    for tool, exe in (("up", str(peer_bin("nydus-rs", "nydus-image"))), ("ours", OURS)):
        d = work / tool
        (d / "blobs").mkdir(parents=True, exist_ok=True)
        r = run(exe, "create", source, "-B", d / "boot", "-D", d / "blobs", "-J", d / "out.json",
                *extra)
        assert r.returncode == 0, (tool, r.stderr)
        out[tool] = json.loads((d / "out.json").read_text())
    return out


def shape(doc: object) -> object:
    """Keys and value types of a JSON document (the parts scripts rely on)."""
    if isinstance(doc, dict):
        return {k: shape(v) for k, v in doc.items() if k != "trace"} | (
            {"trace": sorted(doc["trace"])} if "trace" in doc else {})
    if isinstance(doc, list):
        return [shape(doc[0])] if doc else []
    return type(doc).__name__


@pytest.mark.parametrize("kind", ["dir-rafs", "tar-rafs", "targz-rafs"])
def test_create_output_json_and_cross_check(work: Path, src: Path, kind: str) -> None:
    source = src
    if kind != "dir-rafs":
        source = work / "layer.tar"
        with tarfile.open(source, "w:gz" if kind == "targz-rafs" else "w") as tf:
            tf.add(src, arcname=".")
    docs = build_both(work, source, "--type", kind)
    assert shape(docs["ours"]) == shape(docs["up"])
    assert docs["ours"]["bootstrap"] == str(work / "ours/boot")
    for tool in ("up", "ours"):
        blobs = docs[tool]["blobs"]
        assert isinstance(blobs, list) and len(blobs) == 1
        blob = work / tool / "blobs" / str(blobs[0])
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blobs[0]  # named by digest
    # both tools check each image; the report lines are upstream's
    for tool in ("up", "ours"):
        theirs, ours = both("check", work / tool / "boot", "-D", work / tool / "blobs")
        assert theirs.returncode == 0 and ours.returncode == 0, (tool, theirs.stderr, ours.stderr)
        assert ours.stdout == theirs.stdout, tool
        assert ours.stdout.startswith("RAFS filesystem metadata is valid, referenced data blobs: ")


def test_create_without_bootstrap_or_with_a_blob_file_names_outputs_as_upstream(
        work: Path, src: Path) -> None:
    up = str(peer_bin("nydus-rs", "nydus-image"))
    for tool, exe in (("up", up), ("ours", OURS)):
        d = work / tool
        d.mkdir()
        r = run(exe, "create", src, "-D", d, "-J", d / "dir.json")
        assert r.returncode == 0, r.stderr
        doc = json.loads((d / "dir.json").read_text())
        boot = Path(doc["bootstrap"])
        assert boot.parent == d and hashlib.sha256(boot.read_bytes()).hexdigest() == boot.name
        r = run(exe, "create", src, "-B", d / "one.boot", "--blob", d / "one.blob",
                "-J", d / "file.json")
        assert r.returncode == 0, r.stderr
        doc = json.loads((d / "file.json").read_text())
        assert doc["bootstrap"] == str(d / "one.boot")
        assert doc["blobs"] == [hashlib.sha256((d / "one.blob").read_bytes()).hexdigest()]


def test_check_output_json_matches_upstreams(work: Path, src: Path) -> None:
    build_both(work, src)
    for tool in ("up", "ours"):
        boot = work / tool / "boot"
        theirs, ours = both("check", boot, "-J", work / f"{tool}-up.json")
        ours = run(OURS, "check", boot, "-J", work / f"{tool}-ours.json")
        assert ours.returncode == 0, ours.stderr
        want = json.loads((work / f"{tool}-up.json").read_text()) if theirs.returncode == 0 \
            else None
        got = json.loads((work / f"{tool}-ours.json").read_text())
        assert set(got) == {"version", "bootstrap", "blobs", "trace"}
        assert got["bootstrap"] == str(boot)
        if want is not None:
            assert shape(got) == shape(want) and got["blobs"] == want["blobs"]


@pytest.mark.parametrize("request_", ["stats", "blobs", "prefetch", "ls", "stat big.bin",
                                      "cd a", "chunk 0", "icheck {ino}"])
def test_inspect_requests_answer_like_upstream(work: Path, src: Path, request_: str) -> None:
    build_both(work, src)
    for tool in ("up", "ours"):
        boot = work / tool / "boot"
        if "{ino}" in request_:
            listing = run(OURS, "inspect", boot, "-R", "ls").stdout.splitlines()
            ino = next(line.split()[1] for line in listing if line.endswith('"big.bin"'))
            req = request_.format(ino=ino)
        else:
            req = request_
        theirs, ours = both("inspect", boot, "-R", req)
        assert theirs.returncode == ours.returncode == 0, (req, theirs.stderr, ours.stderr)
        assert ours.stdout == theirs.stdout, (tool, req)


def test_inspect_prompt_runs_a_session_like_upstream(work: Path, src: Path) -> None:
    build_both(work, src)
    session = "stats\nls\ncd a\nls\nstat hard.txt\ncd ..\nblobs\nbogus\nhelp\nexit\n"
    theirs, ours = both("inspect", work / "up/boot", stdin=session)
    assert theirs.returncode == ours.returncode == 0
    assert ours.stdout == theirs.stdout


def test_prefetch_policy_fs_reads_paths_from_stdin(work: Path, src: Path) -> None:
    build_both(work, src, "--prefetch-policy", "fs")  # stdin empty: no table
    for tool, exe in (("up", str(peer_bin("nydus-rs", "nydus-image"))), ("ours", OURS)):
        d = work / tool
        r = run(exe, "create", src, "-B", d / "pf.boot", "-D", d / "blobs",
                "--prefetch-policy", "fs", stdin="/a/b/hello.txt\n/big.bin\n")
        assert r.returncode == 0, r.stderr
    ours = json.loads(run(OURS, "inspect", work / "ours/pf.boot", "-R", "prefetch").stdout)
    assert sorted(p for e in ours for p in e["path"]) == ["/a/b/hello.txt", "/a/hard.txt",
                                                         "/big.bin"]
    theirs = json.loads(run(OURS, "inspect", work / "up/pf.boot", "-R", "prefetch").stdout)
    assert len(theirs) == len(ours) == 2


def test_merge_output_json_and_blob_lists(work: Path, src: Path) -> None:
    up = str(peer_bin("nydus-rs", "nydus-image"))
    layers = []
    (work / "blobs").mkdir()
    for i, sub in enumerate(("a", "big.bin")):
        tree = work / f"l{i}"
        tree.mkdir()
        target = src / sub
        if target.is_dir():
            subprocess.run(["cp", "-a", str(target), str(tree)], check=True)
        else:
            subprocess.run(["cp", "-a", str(target), str(tree / sub)], check=True)
        boot = work / f"l{i}.boot"
        r = run(up, "create", tree, "-B", boot, "-D", work / "blobs", "-J", work / f"l{i}.json")
        assert r.returncode == 0, r.stderr
        blob = json.loads((work / f"l{i}.json").read_text())["blobs"][0]
        named = work / "layers" / blob  # upstream names a layer's blob after its file
        named.parent.mkdir(exist_ok=True)
        boot.rename(named)
        layers.append((named, blob, (work / "blobs" / blob).stat().st_size))
    paths = [p for p, _, _ in layers]
    digests = ",".join(b for _, b, _ in layers)
    sizes = ",".join(str(s) for _, _, s in layers)
    docs = {}
    for tool, exe in (("up", up), ("ours", OURS)):
        r = run(exe, "merge", "-B", work / f"{tool}.merged", "-J", work / f"{tool}.m.json",
                "--blob-digests", digests, "--blob-sizes", sizes, *paths)
        assert r.returncode == 0, (tool, r.stderr)
        docs[tool] = json.loads((work / f"{tool}.m.json").read_text())
    assert shape(docs["ours"]) == shape(docs["up"])
    assert docs["ours"]["blobs"] == docs["up"]["blobs"] == [b for _, b, _ in layers]
    theirs, ours = both("inspect", work / "ours.merged", "-R", "blobs")
    assert ours.stdout == theirs.stdout
    bad = run(OURS, "merge", "-B", work / "x", "--blob-digests", "ab," + layers[1][1], *paths)
    assert bad.returncode == 2 and "--blob-digests" in bad.stderr


def test_unpack_writes_the_entries_upstream_writes(work: Path, src: Path) -> None:
    build_both(work, src)
    up = str(peer_bin("nydus-rs", "nydus-image"))
    blob = next((work / "up/blobs").iterdir())
    assert run(up, "unpack", work / "up/boot", "--blob", blob, "--output",
               work / "up.tar").returncode == 0
    for how in (("--blob", str(blob)), ("-D", str(work / "up/blobs"))):
        r = run(OURS, "unpack", work / "up/boot", *how, "--output", work / "ours.tar")
        assert r.returncode == 0, r.stderr

        # upstream writes hardlink targets as absolute paths, we as relative ones (what
        # OCI layers carry); tar strips the "/" when extracting either
        def entries(path: Path) -> list[tuple[str, int, int, str, bytes]]:
            with tarfile.open(path) as tf:
                return sorted((m.name.strip("./"), m.type[0] if m.type else 0, m.size,
                               m.linkname.lstrip("/") if m.islnk() else m.linkname,
                               tf.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
                              for m in tf.getmembers() if m.name.strip("./"))
        assert entries(work / "ours.tar") == entries(work / "up.tar")


ERRORS = [
    # (args, upstream's exit code) on the same inputs
    (("create", "{src}", "-B", "{work}/x.boot"), 2),                       # no --blob/--blob-dir
    (("create", "/nonexistent", "-B", "{work}/x", "-D", "{work}"), 1),
    (("create", "{src}", "-B", "{work}/x", "-D", "{work}", "--chunk-size", "0x3000"), 1),
    (("create", "{src}", "-B", "{work}/x", "-D", "{work}/missing"), 1),
    (("create", "{src}", "-B", "{work}/x", "-D", "{work}", "--compressor", "gzip"), 2),
    (("check",), 2),
    (("check", "{work}/nonexistent"), 1),
    (("check", "{work}/garbage"), 1),
    (("inspect", "{work}/nonexistent", "-R", "stats"), 1),
    (("merge",), 2),
    (("merge", "{work}/garbage"), 1),
    (("unpack", "{work}/garbage"), 2),                                      # no --output
    (("bogus",), 2),
]


@pytest.mark.parametrize(("args", "rc"), ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_errors_exit_like_upstream(work: Path, src: Path, args: tuple[str, ...], rc: int) -> None:
    (work / "garbage").write_bytes(b"\0" * 8192)
    argv = [a.format(src=src, work=work) for a in args]
    theirs, ours = both(*argv)
    assert theirs.returncode == rc, theirs.stderr
    assert ours.returncode == rc, ours.stderr
    prefix = "error:" if rc == 2 else "Error:"
    assert ours.stderr.lstrip().startswith(prefix) or prefix in ours.stderr, ours.stderr


REFUSED = [
    ("--fs-version 5", ("-v", "5")),
    ("--blob-inline-meta", ("--blob-inline-meta",)),
    ("--blob-id", ("--blob-id", "x")),
    ("--type estargz-rafs", ("--type", "estargz-rafs")),
    ("--features", ("--features", "blob-toc")),
    ("--repeatable", ("--repeatable",)),
    ("--config", ("-C", "/dev/null")),
    ("--prefetch-policy blob", ("--prefetch-policy", "blob")),
    ("--blob-offset", ("--blob-offset", "512")),
]


@pytest.mark.parametrize(("flag", "extra"), REFUSED, ids=[f for f, _ in REFUSED])
def test_flags_we_do_not_implement_are_refused_by_name(work: Path, src: Path, flag: str,
                                                        extra: tuple[str, ...]) -> None:
    (work / "blobs").mkdir()
    r = run(OURS, "create", src, "-B", work / "x.boot", "-D", work / "blobs", *extra)
    assert r.returncode == 2, r.stderr
    assert f"{flag} is not supported by pynydus" in r.stderr, r.stderr
    assert not (work / "x.boot").exists() and list((work / "blobs").iterdir()) == []


@pytest.mark.parametrize("sub", ["stat", "compact"])
def test_subcommands_we_do_not_implement_are_refused(work: Path, sub: str) -> None:
    r = run(OURS, sub, "-B", work / "x")
    assert r.returncode == 2 and f"nydus-image {sub}" in r.stderr


def test_version_and_bare_invocation(work: Path) -> None:
    up = str(peer_bin("nydus-rs", "nydus-image"))
    for exe in (up, OURS):
        assert run(exe, "--version").returncode == 0
        bare = run(exe)
        assert bare.returncode == 0 and "Usage:" in bare.stdout
