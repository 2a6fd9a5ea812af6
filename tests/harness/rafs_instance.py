"""An image served in-process, as the unit tests of the FUSE operations drive it."""

from __future__ import annotations

import json
from pathlib import Path

from pynydus.daemon.blobcache import LocalFsBackend
from pynydus.daemon.config import parse_daemon_config
from pynydus.daemon.instance import RafsInstance
from pynydus.daemon.metrics import CacheStats


def local_instance(boot: Path, blobs: Path, cache_dir: Path) -> RafsInstance:
    """The image ``boot`` over the blobs in ``blobs`` (localfs backend), with a blob cache in
    ``cache_dir`` and every other setting at its default."""
    text = json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                                  "cache": {"type": "blobcache",
                                            "config": {"work_dir": str(cache_dir)}}}})
    cfg, _ = parse_daemon_config(text)
    return RafsInstance(str(boot), cfg, LocalFsBackend(str(blobs)), CacheStats())


def built_instance(tmp_path: Path, files: dict[str, bytes]) -> RafsInstance:
    """An image of ``files`` (name -> bytes) built in ``tmp_path`` (lz4_block) and served by
    ``local_instance`` with its blob cache in ``tmp_path/cache``."""
    from pynydus.rafs.builder import build

    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    (tmp_path / "blobs").mkdir()
    build(str(src), str(tmp_path / "image.boot"), str(tmp_path / "blobs"), compressor="lz4_block")
    return local_instance(tmp_path / "image.boot", tmp_path / "blobs", tmp_path / "cache")
