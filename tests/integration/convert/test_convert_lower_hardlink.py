"""``pynydus convert`` of an image whose upper layer hardlinks to a lower layer's file.

Layers are converted independently (in parallel), so the upper layer's builder
cannot see the target; the merged bootstrap binds the link (rafs.tree). The
converted image must hold what the source layers extracted in order hold, the
link sharing the target's inode (``check-image`` compares hardlink groups too).
"""

from __future__ import annotations

import json
from pathlib import Path

from pynydus.convert.pack import bootstrap_from_layer
from pynydus.rafs.read import bootstrap_from_bytes
from tests.harness import oci
from tests.harness.registry import Registry

from .conftest import client_for, convert_and_check

TOOL = bytes(range(256)) * 5000


def test_link_to_a_lower_layer_file_converts_and_checks(
    registry: Registry, workdir: Path, cache_dir: str
) -> None:
    image = oci.Image([
        oci.Layer("base").file("usr/bin/tool", TOOL, 0o755).file("etc/os-release", "v1\n"),
        oci.Layer("upgrade").file("etc/os-release", "v2\n")
        .hardlink("usr/bin/tool.old", "usr/bin/tool")
        .hardlink("usr/lib/os-release", "etc/os-release"),  # the layer's own new file
    ])
    src = registry.ref("src/lower-hardlink")
    oci.push(image.write_layout(workdir / "lower-hardlink"), src)
    dst = registry.ref("nydus/lower-hardlink", "v1")
    convert_and_check(src, dst, cache_dir)
    with client_for(registry) as cl:
        m = json.loads(cl.get_manifest("nydus/lower-hardlink", "v1").data)
        boot = b"".join(cl.get_blob("nydus/lower-hardlink", m["layers"][-1]["digest"]))
    with bootstrap_from_bytes(bootstrap_from_layer(boot)) as bs:
        ino = {p: i for p, i in bs.walk()}
        tool, old = ino[b"/usr/bin/tool"], ino[b"/usr/bin/tool.old"]
        assert tool == old and bs.stat(tool).nlink == 2 and bs.stat(tool).size == len(TOOL)
        assert bs.xattrs(old) == []  # the waiting-link marker is gone
