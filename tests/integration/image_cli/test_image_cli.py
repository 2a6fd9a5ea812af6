"""``pynydus image`` end to end: build → check → unpack gives the layer back."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.paths import FIXTURES as SHARED_FIXTURES

FIXTURES = SHARED_FIXTURES
PYNYDUS = [sys.executable, "-m", "pynydus.cli.main"]


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*PYNYDUS, *args], capture_output=True, text=True, timeout=300,
                          check=False)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def entries(tar_path: Path) -> dict[str, tuple]:
    """name -> (type, mode, size, linkname, sha256 of data) with hardlinks resolved to data."""
    out: dict[str, tuple] = {}
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        data: dict[str, str] = {}
        for m in members:
            if m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                data[m.name.rstrip("/")] = hashlib.sha256(f.read()).hexdigest()
        for m in members:
            name = m.name.rstrip("/")
            if m.islnk():  # a hardlink is the same file: compare by content
                out[name] = ("file", m.mode & 0o7777, data[m.linkname.rstrip("/")])
            elif m.isreg():
                out[name] = ("file", m.mode & 0o7777, data[name])
            elif m.isdir():
                out[name] = ("dir", m.mode & 0o7777)
            elif m.issym():
                out[name] = ("sym", m.linkname)
            else:
                out[name] = ("other", m.type, m.devmajor, m.devminor)
    return out


@pytest.mark.parametrize("compressor", ["none", "lz4_block", "zstd"])
def test_fixture_tar_round_trip(tmp_path: Path, compressor: str) -> None:
    src = FIXTURES / "tar" / "all-entry-type.tar"
    run("image", "build", str(src), "--bootstrap", str(tmp_path / "boot"), "--blob-dir", str(tmp_path / "blobs"),
        "--compressor", compressor)
    check = run("image", "check", str(tmp_path / "boot"), "--blob-dir", str(tmp_path / "blobs"))
    assert " ok: " in check.stdout
    run("image", "unpack", str(tmp_path / "boot"), "--blob-dir", str(tmp_path / "blobs"),
        "--output", str(tmp_path / "out.tar"))
    assert entries(tmp_path / "out.tar") == entries(src)


def test_check_detects_corrupt_blob(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(200_000))
    run("image", "build", str(src), "--bootstrap", str(tmp_path / "boot"), "--blob-dir", str(tmp_path / "b"),
        "--compressor", "none")
    (blob,) = (tmp_path / "b").iterdir()
    raw = bytearray(blob.read_bytes())
    raw[1000] ^= 0x55
    blob.write_bytes(raw)
    proc = run("image", "check", str(tmp_path / "boot"), "--blob-dir", str(tmp_path / "b"), ok=False)
    assert proc.returncode != 0
    assert "digest mismatch" in proc.stderr and blob.name in proc.stderr
    blob.write_bytes(raw[:500])
    proc = run("image", "check", str(tmp_path / "boot"), "--blob-dir", str(tmp_path / "b"), ok=False)
    assert "truncated" in proc.stderr


def test_invalid_bootstraps_rejected_cleanly(tmp_path: Path) -> None:
    for name in ("invalid.tar.gz", "invalid-bootstrap-file-size-133513.tar.gz"):
        with tarfile.open(FIXTURES / "snapshotter-testdata" / "archives" / name) as tar:
            tar.extractall(tmp_path / name, filter="data")
        for f in (tmp_path / name).rglob("*"):
            if f.is_file() and f.suffix != ".md":
                proc = run("image", "check", str(f), ok=False)
                assert proc.returncode == 2, proc.stderr
                assert "Traceback" not in proc.stderr and proc.stderr.startswith("pynydus image:")


names = st.text(alphabet="abcxyz_.-0123456789", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(st.tuples(names, names), st.binary(max_size=300_000), min_size=1, max_size=12),
       compressor=st.sampled_from(["lz4_block", "zstd"]))
def test_generated_trees_round_trip(tmp_path: Path, files: dict, compressor: str) -> None:
    work = tmp_path / f"w{abs(hash((tuple(files), compressor)))}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = set()
        for (d, f), data in sorted(files.items()):
            if d not in dirs:
                ti = tarfile.TarInfo(d)
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                tar.addfile(ti)
                dirs.add(d)
            if f"{d}/{f}" in dirs:
                continue
            ti = tarfile.TarInfo(f"{d}/{f}")
            ti.size = len(data)
            ti.mode = 0o640
            tar.addfile(ti, io.BytesIO(data))
    work.mkdir()
    (work / "in.tar").write_bytes(buf.getvalue())
    run("image", "build", str(work / "in.tar"), "--bootstrap", str(work / "boot"), "--blob-dir",
        str(work / "b"), "--compressor", compressor, "--chunk-size", "0x10000")
    run("image", "check", str(work / "boot"), "--blob-dir", str(work / "b"))
    run("image", "unpack", str(work / "boot"), "--blob-dir", str(work / "b"), "--output", str(work / "out.tar"))
    assert entries(work / "out.tar") == entries(work / "in.tar")


def test_build_progress_modes_on_stderr(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(os.urandom(1000 + i))
    out = {}
    for mode in ("plain", "quiet", "line", "auto"):
        r = subprocess.run([*PYNYDUS, "image", "build", str(src), "--bootstrap",
                            str(tmp_path / f"{mode}.boot"), "--blob-dir", str(tmp_path / "blobs"),
                            "--progress", mode], capture_output=True, timeout=300, check=True)
        out[mode] = r.stderr.decode()  # bytes: text mode would turn \r into \n
    assert "[build" in out["plain"] and "writing the bootstrap" in out["plain"]
    assert "\r" not in out["plain"]
    assert "[build" not in out["quiet"] and "built " in out["quiet"]
    assert "\r\x1b[K[build" in out["line"] and "writing the bootstrap" in out["line"]
    assert "\r" not in out["auto"] and "[build" in out["auto"]  # stderr is not a terminal
    bad = run("image", "build", str(src), "--bootstrap", str(tmp_path / "x.boot"),
              "--blob-dir", str(tmp_path / "blobs"), "--progress", "loud", ok=False)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
