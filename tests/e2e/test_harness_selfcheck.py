"""The harness itself: a crashed run is cleaned up completely, and the registry's auth hook
works end to end. If these fail, e2e failures elsewhere may be the harness's fault."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.harness import images, oci
from tests.harness.containerd import Containerd
from tests.harness.registry import Registry, write_htpasswd
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import (
    WORK_PARENT,
    make_workdir,
    mounts_under,
    pid_alive,
    processes_using,
    remove_tree,
    sweep_stale,
)

REPO = Path(__file__).resolve().parents[2]

# Starts registry, snapshotter and containerd, pulls and runs a sleeping container through
# the snapshotter, prints what it started, then waits to be killed.
CRASHER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from tests.harness import images, oci
    from tests.harness.containerd import Containerd
    from tests.harness.registry import Registry
    from tests.harness.snapshotter import Snapshotter
    from tests.harness.util import make_workdir
    tag, version = sys.argv[1], sys.argv[2]
    layouts = make_workdir(tag + "-img")
    built = images.small_image().write_layout(layouts / "small")
    reg = Registry(tag=tag + "-reg").start()
    snap = Snapshotter(tag=tag + "-snap").start()
    ctrd = Containerd(snap.socket, tag=tag + "-ctrd", version=version).start()
    ref = reg.ref("selfcheck/small")
    oci.push(built, ref)
    ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "nydus", ref)
    ctrd.ctr("run", "-d", "--snapshotter", "nydus", ref, "sleeper", "sleep", "600")
    bundle = ctrd.state / "io.containerd.runtime.v2.task" / ctrd.namespace / "sleeper"
    print(json.dumps({"pids": [reg.proc.pid, snap.pid, ctrd.pid],
                      "init": int((bundle / "init.pid").read_text()),
                      "dirs": [str(layouts), str(reg.workdir), str(snap.workdir),
                               str(ctrd.workdir)]}), flush=True)
    time.sleep(600)
""")


def test_a_crashed_run_is_swept_completely(containerd_version: str) -> None:
    """kill -9 of the process that owns a registry, a snapshotter, a containerd and a
    running container leaves all of them running; ``sweep_stale`` then stops every one
    (shim and container included), unmounts and removes the directories. For each
    containerd version: their shims are found differently."""
    tag = f"sc{secrets.token_hex(3)}"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", CRASHER, tag, containerd_version],
                             stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                             start_new_session=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            pytest.fail(f"crasher did not start: {child.communicate(timeout=30)[1]}")
        info = json.loads(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    dirs = [Path(d) for d in info["dirs"]]
    assert all(pid_alive(p) for p in info["pids"]), "the components outlive their owner"
    assert pid_alive(info["init"]), "the container outlives its owner"
    assert mounts_under(*dirs), "the container's rootfs is still mounted"

    swept = sweep_stale(tag)

    assert sorted(swept) == sorted(dirs)
    assert not [p for p in info["pids"] + [info["init"]] if pid_alive(p)]
    assert not [p for d in dirs for p in processes_using(d)], "a shim or daemon survived"
    assert not any(d.exists() for d in dirs)
    assert not [m for m in mounts_under(WORK_PARENT) if any(m.startswith(str(d)) for d in dirs)]


def test_registry_basic_auth_end_to_end() -> None:
    """htpasswd hook: anonymous access is refused, skopeo pushes and containerd pulls with
    credentials, through our snapshotter."""
    work = make_workdir("auth")
    try:
        htpasswd = write_htpasswd(work / "htpasswd", "alice", "s3cret")
        built = images.small_image("auth").write_layout(work / "small")
        with Registry(htpasswd=htpasswd) as reg, Snapshotter() as snap, \
                Containerd(snap.socket) as ctrd:
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"{reg.url}/v2/_catalog", timeout=10)
            assert err.value.code == 401
            ref = reg.ref("auth/small")
            oci.push(built, ref, creds="alice:s3cret")
            anon = ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", "nydus", ref,
                            check=False)
            assert anon.returncode != 0
            ctrd.ctr("images", "pull", "--plain-http", "--user", "alice:s3cret",
                     "--snapshotter", "nydus", ref)
            out = ctrd.ctr_out("run", "--rm", "--snapshotter", "nydus", ref, "auth-run")
            assert out.strip() == "hello from auth"
    finally:
        remove_tree(work)
