"""The converted image as a runtime sees it: ``pynydusd`` mounts the image bootstrap
(unpacked from the bootstrap layer) with a registry backend on the target repository,
and the mounted tree equals the source image's layers applied with overlay semantics
(content read through FUSE, so every chunk comes from the pushed blobs by range)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynydus.convert.overlay_view import OverlayView
from pynydus.convert.pack import bootstrap_from_layer
from tests.harness.pynydusd import Pynydusd
from tests.harness.registry import Registry
from tests.harness.util import make_workdir, remove_tree

from .conftest import client_for, convert_args, pynydus

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse"),
]


@pytest.fixture
def mountdir() -> Iterator[Path]:
    d = make_workdir("cvm")
    yield d
    remove_tree(d)


def test_pynydusd_serves_the_converted_image(registry: Registry, layered: str, cache_dir: str,
                                             mountdir: Path) -> None:
    dst = registry.ref("nydus/mounted", "v1")
    r = pynydus(*convert_args(layered, dst, cache_dir))
    assert r.rc == 0, r.err
    view = OverlayView()
    with client_for(registry) as c:
        m = json.loads(c.get_manifest("nydus/mounted", "v1").data)
        boot = bootstrap_from_layer(b"".join(c.get_blob("nydus/mounted",
                                                        m["layers"][-1]["digest"])))
        src = json.loads(c.get_manifest("src/layered", "latest").data)
        for lyr in src["layers"]:
            view.apply_layer(io.BytesIO(b"".join(c.get_blob("src/layered", lyr["digest"]))))
    (mountdir / "image.boot").write_bytes(boot)
    cfg = {"device": {"backend": {"type": "registry", "config": {
               "scheme": "http", "host": registry.host, "repo": "nydus/mounted",
               "timeout": 10, "connect_timeout": 10, "retry_limit": 2}},
               "cache": {"type": "blobcache", "config": {"work_dir": str(mountdir / "cache")}}},
           "mode": "direct", "enable_xattr": True}
    with Pynydusd(mountdir, bootstrap=mountdir / "image.boot", config=cfg) as d:
        root = d.mountpoint
        seen = {""}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                full = Path(dirpath, name)
                rel = str(full.relative_to(root))
                seen.add(rel)
                want = view.paths.get(rel)
                assert want is not None, f"/{rel} is in the mount but not in the source"
                st = os.lstat(full)
                assert stat.S_IMODE(st.st_mode) == want.mode, rel
                assert (st.st_uid, st.st_gid) == (want.uid, want.gid), rel
                if stat.S_ISREG(st.st_mode):
                    assert want.kind == "reg", rel
                    assert hashlib.sha256(full.read_bytes()).hexdigest() == want.sha256, rel
                elif stat.S_ISLNK(st.st_mode):
                    assert os.readlink(full).encode() == want.link, rel
                else:
                    assert want.kind == "dir" if stat.S_ISDIR(st.st_mode) else True, rel
                for key, value in want.xattrs.items():
                    assert os.getxattr(full, key, follow_symlinks=False) == value, (rel, key)
        assert seen == set(view.paths)
        hl = [p for p, rec in view.paths.items() if rec.group]
        assert hl and len({os.lstat(root / p).st_ino for p in hl if "hard" in p}) == 1
