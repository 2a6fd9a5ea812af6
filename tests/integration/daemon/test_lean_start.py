"""What a fresh pynydusd has imported: only what its config and its images need.

Contract (issue 11's idle RSS): a daemon whose config names the localfs backend never
imports the registry client (httpx, ssl: ~16 MB), libcrypto (hashlib), the ZRAN code
(ctypes' libz) nor a codec its image does not use; the codec of its image is loaded by
the first read that decodes a chunk. A daemon that may serve from a registry has the
registry client and httpcore imported by the time it is ready (at start, before its
threads: imported later by a serving thread, it stalled the first chunk miss), without
httpcore's async backends (trio, anyio).

The real console script runs with ``PYTHONPROFILEIMPORTTIME=1``: the interpreter writes a
line to stderr (the daemon's log here) for every module it imports, on any thread. It
writes one for an import that was refused, too (a module hidden from httpx and httpcore,
see ``registry/_http.py``), so a package counts as imported by a submodule that every
real import of it loads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .conftest import StartFn, build_image, localfs_config, registry_config

_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$", re.MULTILINE)

# never imported by a localfs daemon whose image is lz4_block, not ZRAN, not validated
NOT_FOR_LOCALFS_LZ4 = {
    "zstandard", "zstandard.backend_c", "blake3", "hashlib", "_hashlib", "ssl", "httpx", "httpcore", "trio",
    "anyio", "tarfile", "pynydus.registry", "pynydus.registry.client",
    "pynydus.daemon.registry_backend", "pynydus.rafs.format.zran",
    "pynydus.rafs.format.libz", "pynydus.rafs.read.unpack", "pynydus.rafs.read.inspect",
    # nor what dataclasses, argparse and the API's query strings would bring (a daemon's
    # stdlib; tests/unit/test_lean_imports.py)
    "inspect", "ast", "dis", "shutil", "bz2", "lzma", "urllib.parse", "ipaddress",
    "gettext", "locale",
    "ctypes.util", "subprocess", "tempfile",  # liblz4 is loaded by its soname
}


def imported(log: Path) -> set[str]:
    return set(_IMPORT_LINE.findall(log.read_text(errors="replace")))


def mapped(pid: int) -> str:
    """The files a process has mapped (its shared libraries among them)."""
    return Path(f"/proc/{pid}/maps").read_text()


def importtime_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}


def test_localfs_daemon_imports_its_images_codec_at_the_first_read_and_nothing_else(
        workdir: Path, start_daemon: StartFn) -> None:
    src = workdir / "src"
    src.mkdir()
    (src / "text").write_bytes(b"compressible line of text\n" * 8192)  # lz4 shrinks it
    img = build_image(src, workdir / "img", compressor="lz4_block")
    d = start_daemon(bootstrap=img.bootstrap, env=importtime_env(),
                     config=localfs_config(img.blob_dir, workdir / "cache"))
    at_start = imported(d.log)
    assert "pynydus.daemon.fuseloop" in at_start, "no import lines in the daemon's log"
    assert not at_start & NOT_FOR_LOCALFS_LZ4
    assert "lz4.block" not in at_start and "liblz4" not in mapped(d.pid)
    assert (d.mountpoint / "text").read_bytes() == (src / "text").read_bytes()
    after_read = imported(d.log)
    # lz4_block is decoded by liblz4 through ctypes (it lets go of the GIL); python-lz4
    # only where the library is missing, which setup.sh installs
    assert "liblz4.so" in mapped(d.pid)
    assert not after_read & NOT_FOR_LOCALFS_LZ4


def test_registry_daemon_has_the_client_imported_when_ready_without_async_backends(
        workdir: Path, start_daemon: StartFn) -> None:
    src = workdir / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    img = build_image(src, workdir / "img")
    # nothing listens on port 9 of 127.0.0.1: no read is made, the client is only built
    d = start_daemon(bootstrap=img.bootstrap, env=importtime_env(),
                     config=registry_config("127.0.0.1:9", "lean/start", workdir / "cache"))
    at_start = imported(d.log)
    assert {"httpx", "httpcore", "pynydus.registry.client",
            "pynydus.daemon.registry_backend"} <= at_start
    assert not at_start & {"trio._core", "anyio._core", "zstandard.backend_c",
                           "pynydus.rafs.format.zran"}
