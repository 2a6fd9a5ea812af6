"""A node as the e2e tests build it: our snapshotter behind containerd with its CRI plugin.

    with cri_node(registry, containerd_version, 'version = 1\\ndaemon_mode = "shared"\\n') \\
            as (snap, ctrd):
        CriImages(str(ctrd.socket)).pull(ref)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from .containerd import Containerd
from .registry import Registry
from .snapshotter import Snapshotter
from .util import make_workdir, remove_tree


@contextmanager
def cri_node(registry: Registry, version: str, config: str | None = None, *,
             env: Mapping[str, str] | None = None, sandbox_image: str = "",
             namespace: str = "k8s.io") -> Iterator[tuple[Snapshotter, Containerd]]:
    """Our snapshotter with ``config`` (the TOML text; none: its defaults) and containerd
    ``version`` ("1.6" or "2") with the CRI plugin, pulling from ``registry``."""
    work = make_workdir("node")
    try:
        path = None
        if config is not None:
            path = work / "config.toml"
            path.write_text(config)
        with Snapshotter(config=path, env=env) as snap, Containerd(
                snap.socket, registry_hosts=[registry.host], cri=True, namespace=namespace,
                sandbox_image=sandbox_image, version=version) as ctrd:
            yield snap, ctrd
    finally:
        remove_tree(work)
