"""Fixtures for end-to-end tests: a registry with the test images, our snapshotter, and a
private containerd that uses it as proxy plugin ``nydus``.

``containerd_version`` is parametrized over Debian's containerd 1.6 and the containerd 2.x
peer (``scripts/peers.sh containerd2``): every test that asks for it, directly or through
``containerd``/``snapshotter``, runs against both (test ids ``[ctrd1.6]``/``[ctrd2]``), each
with a snapshotter of its own. A test that holds for one version only parametrizes
``containerd_version`` itself (``@pytest.mark.parametrize("containerd_version", [...])``).

Skipped when not root; a missing system tool fails every test here, naming the tool
and its package (``scripts/setup.sh`` installs them all). When a test fails, the tails of the snapshotter, containerd
and registry logs are attached to its report.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import images, oci, tools
from tests.harness.containerd import VERSIONS, Containerd
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import make_workdir, remove_tree, sweep_stale

REQUIRED = ["/usr/bin/containerd", "/usr/bin/ctr", "/usr/bin/docker-registry", "runc",
            "skopeo", "/bin/busybox", "containerd-shim-runc-v2"]

# components alive right now, for log tails on failure
_LIVE: list[object] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root")
    for item in items:
        if Path(str(item.path)).parent == here:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.root)
            if reasons:
                item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for comp in _LIVE:
            proc = getattr(comp, "proc", None)
            if proc is not None:
                rep.sections.append((f"{proc.name} log (tail)", proc.log_tail(60)))


@pytest.fixture(scope="session", autouse=True)
def _tools_present() -> None:
    """A missing program fails the e2e tests (it never skips them)."""
    tools.require(*REQUIRED)


@pytest.fixture(scope="session", autouse=True)
def _sweep_leftovers() -> None:
    """With PYNYDUS_E2E_SWEEP=1 (CI: the machine is ours alone), first clean what an
    interrupted earlier run left behind: work directories whose owning process is gone,
    with their processes, shims and mounts."""
    if os.environ.get("PYNYDUS_E2E_SWEEP") == "1":
        sweep_stale()


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    with Registry() as reg:
        _LIVE.append(reg)
        try:
            yield reg
        finally:
            _LIVE.remove(reg)


@pytest.fixture(scope="session")
def layouts() -> Iterator[Path]:
    d = make_workdir("img")
    try:
        yield d
    finally:
        remove_tree(d)


@pytest.fixture(scope="session")
def layered_image(registry: Registry, layouts: Path) -> tuple[str, oci.BuiltImage]:
    """The multi-layer check image, pushed: (reference, built image)."""
    built = images.layered_image().write_layout(layouts / "layered")
    ref = registry.ref("e2e/layered")
    oci.push(built, ref)
    return ref, built


@pytest.fixture(scope="session")
def pause_ref(registry: Registry, layouts: Path) -> str:
    """The CRI pods' sandbox image, pushed (there is no registry.k8s.io here)."""
    ref = registry.ref("e2e/pause", "3.10")
    oci.push(images.pause_image().write_layout(layouts / "pause"), ref)
    return ref


@pytest.fixture(scope="session")
def small_image(registry: Registry, layouts: Path) -> tuple[str, oci.BuiltImage]:
    built = images.small_image("e2e").write_layout(layouts / "small")
    ref = registry.ref("e2e/small")
    oci.push(built, ref)
    return ref, built


@pytest.fixture(scope="session", params=VERSIONS, ids=[f"ctrd{v}" for v in VERSIONS])
def containerd_version(request: pytest.FixtureRequest) -> str:
    """The containerd under test: "1.6" (Debian's) or "2" (the containerd2 peer)."""
    return str(request.param)


@pytest.fixture(scope="module")
def snapshotter(containerd_version: str) -> Iterator[Snapshotter]:
    """A snapshotter per module and containerd version (the name keeps them apart)."""
    with Snapshotter() as snap:
        _LIVE.append(snap)
        try:
            yield snap
        finally:
            _LIVE.remove(snap)


@pytest.fixture(scope="module")
def containerd(snapshotter: Snapshotter, registry: Registry, containerd_version: str
               ) -> Iterator[Containerd]:
    with Containerd(snapshotter.socket, registry_hosts=[registry.host],
                    version=containerd_version) as ctrd:
        _LIVE.append(ctrd)
        try:
            yield ctrd
        finally:
            _LIVE.remove(ctrd)
