"""Plain OCI images through containerd + runc with our snapshotter as proxy plugin ``nydus``.

For plain OCI layers the snapshotter must behave like containerd's overlayfs snapshotter:
the same rootfs (whiteouts, opaque directories, links, modes, owners), the same snapshot
chain in ``ctr snapshot ls``, working ``usage``/``mounts``/``rm``, and running containers
that survive a snapshotter restart. Containerd's built-in overlayfs runs the same check
as the reference.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator

import pytest

from tests.harness import images, oci
from tests.harness.containerd import Containerd
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import HarnessError, wait_until

SNAP = "nydus"


def _cid(tag: str) -> str:
    return f"e2e-{tag}-{secrets.token_hex(3)}"


def snapshot_table(ctrd: Containerd, snapshotter: str = SNAP) -> dict[str, tuple[str, str]]:
    """``ctr snapshot ls`` as {key: (parent, kind)}."""
    out = ctrd.ctr_out("snapshot", "--snapshotter", snapshotter, "ls")
    table = {}
    for line in out.splitlines()[1:]:
        cols = line.split()
        if not cols:
            continue
        if len(cols) == 2:  # no parent
            table[cols[0]] = ("", cols[1])
        else:
            table[cols[0]] = (cols[1], cols[2])
    return table


def run_check(ctrd: Containerd, ref: str, snapshotter: str, tag: str) -> str:
    cid = _cid(tag)
    try:
        return ctrd.ctr_out("run", "--rm", "--snapshotter", snapshotter, ref, cid,
                            "sh", "-c", images.CHECK_SCRIPT, timeout=180).strip()
    finally:
        ctrd.ctr("tasks", "rm", "-f", cid, check=False)
        ctrd.ctr("containers", "rm", cid, check=False)


@pytest.fixture(scope="module")
def pulled(containerd: Containerd, layered_image: tuple[str, oci.BuiltImage]
           ) -> tuple[str, oci.BuiltImage]:
    """The layered image pulled and unpacked into our snapshotter."""
    ref, built = layered_image
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", SNAP, ref, timeout=300)
    return ref, built


@pytest.fixture
def sleeper(containerd: Containerd, pulled: tuple[str, oci.BuiltImage]) -> Iterator[str]:
    """A detached container on our snapshotter that sleeps; killed and deleted afterwards."""
    ref, _ = pulled
    cid = _cid("sleep")
    containerd.ctr("run", "-d", "--snapshotter", SNAP, ref, cid, "sleep", "3600", timeout=180)
    try:
        yield cid
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        containerd.ctr("tasks", "rm", "-f", cid, check=False)
        containerd.ctr("containers", "rm", cid, check=False)


def own_names(snap: Snapshotter) -> list[str]:
    """The snapshotter's own List, without reachability probes (containerd removes those
    from the backend only in its next garbage collection)."""
    return sorted(n for n in snap.list_names() if "/probe-" not in n)


def task_status(ctrd: Containerd, cid: str) -> str:
    for line in ctrd.ctr_out("tasks", "ls").splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] == cid:
            return cols[-1]
    return "MISSING"


# --------------------------------------------------------------------------- pull


def test_pull_commits_one_snapshot_per_layer_in_chain_order(
        containerd: Containerd, snapshotter: Snapshotter,
        pulled: tuple[str, oci.BuiltImage]) -> None:
    _, built = pulled
    table = snapshot_table(containerd)
    chain = built.chain_ids
    for i, cid in enumerate(chain):
        assert cid in table, f"layer {i} chain id {cid} missing from ctr snapshot ls: {table}"
        parent, kind = table[cid]
        assert kind == "Committed"
        assert parent == (chain[i - 1] if i else "")
    # the snapshotter itself holds them (containerd prefixes keys with namespace/txid)
    own = snapshotter.list_infos()
    committed = [i for i in own if i.kind == 3]  # snapshots_pb2.COMMITTED
    assert len(committed) >= len(chain), [i.name for i in own]


def test_pull_again_is_a_no_op(containerd: Containerd, pulled: tuple[str, oci.BuiltImage]
                               ) -> None:
    ref, _ = pulled
    before = snapshot_table(containerd)
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", SNAP, ref)
    assert snapshot_table(containerd) == before


# --------------------------------------------------------------------------- run


def test_run_sees_layers_stacked_like_overlayfs(
        containerd: Containerd, pulled: tuple[str, oci.BuiltImage]) -> None:
    ref, _ = pulled
    out = run_check(containerd, ref, SNAP, "check")
    assert out.splitlines() == images.expected_check_output().splitlines()


def test_overlayfs_baseline_gives_the_same_rootfs(
        containerd: Containerd, layered_image: tuple[str, oci.BuiltImage]) -> None:
    """The reference: containerd's built-in overlayfs snapshotter, same image, same check."""
    ref, _ = layered_image
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
    out = run_check(containerd, ref, "overlayfs", "base")
    assert out.splitlines() == images.expected_check_output().splitlines()


def test_container_writes_stay_in_its_own_snapshot(
        containerd: Containerd, pulled: tuple[str, oci.BuiltImage]) -> None:
    ref, _ = pulled
    cid = _cid("write")
    try:
        out = containerd.ctr_out(
            "run", "--rm", "--snapshotter", SNAP, ref, cid, "sh", "-c",
            "echo changed >/app/hello.txt; rm /app/keep.txt; cat /app/hello.txt", timeout=180)
        assert out.strip() == "changed"
    finally:
        containerd.ctr("containers", "rm", cid, check=False)
    out = run_check(containerd, ref, SNAP, "after-write")
    assert out.splitlines() == images.expected_check_output().splitlines()


# --------------------------------------------------------------------------- ctr snapshot


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "kB": 1000, "MB": 10**6,
          "GB": 10**9}


def usage_table(ctrd: Containerd, *keys: str) -> dict[str, tuple[int, int]]:
    """``ctr snapshot usage`` as {key: (bytes, inodes)}; sizes are printed like '1.1 MiB'."""
    out = ctrd.ctr_out("snapshot", "--snapshotter", SNAP, "usage", *keys)
    table = {}
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) == 4:
            table[cols[0]] = (int(float(cols[1]) * _UNITS[cols[2]]), int(cols[3]))
    return table


def containerd_usage(ctrd: Containerd, snapshotter: str, key: str) -> tuple[int, int]:
    """(bytes, inodes) of ``key`` from containerd's Snapshots service, unrounded."""
    import grpc

    from pynydus.api import snapshots_pb2 as pb
    from pynydus.api import snapshots_pb2_grpc

    with grpc.insecure_channel("unix:" + str(ctrd.socket)) as channel:
        resp = snapshots_pb2_grpc.SnapshotsStub(channel).Usage(
            pb.UsageRequest(snapshotter=snapshotter, key=key),
            metadata=(("containerd-namespace", ctrd.namespace),), timeout=120)
    return resp.size, resp.inodes


def containerd_view(ctrd: Containerd, key: str, parent: str,
                    snapshotter: str = SNAP) -> None:
    """A View through containerd's Snapshots service that is a GC root.

    ``ctr snapshot view`` labels nothing (prepare and commit add containerd.io/gc.root),
    so containerd's scheduled GC may collect its view at any moment; containerd 2.x does
    so soon after the commit that precedes it here."""
    import time

    import grpc

    from pynydus.api import snapshots_pb2 as pb
    from pynydus.api import snapshots_pb2_grpc

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with grpc.insecure_channel("unix:" + str(ctrd.socket)) as channel:
        snapshots_pb2_grpc.SnapshotsStub(channel).View(
            pb.ViewSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent,
                                   labels={"containerd.io/gc.root": stamp}),
            metadata=(("containerd-namespace", ctrd.namespace),), timeout=120)


def test_usage_equals_overlayfs_for_every_layer(containerd: Containerd,
                                                pulled: tuple[str, oci.BuiltImage],
                                                registry: Registry,
                                                containerd_version: str) -> None:
    """Each committed layer's usage, exactly as containerd's own overlayfs snapshotter
    counts the same layer unpacked on the same filesystem; and the inode counts the
    test image's layers are known to have. The overlayfs pull happens in a containerd of
    its own: a pull in the shared one would let its garbage collector run in the middle
    of the next tests' lease-less ``ctr snapshot`` calls."""
    ref, built = pulled
    with Containerd(registry_hosts=[registry.host], version=containerd_version,
                    tag="ctrd-ovl") as reference:
        reference.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref,
                      timeout=300)
        theirs = {cid: containerd_usage(reference, "overlayfs", cid) for cid in built.chain_ids}
    table = usage_table(containerd)
    ours = {cid: containerd_usage(containerd, SNAP, cid) for cid in built.chain_ids}
    assert ours == theirs
    for cid, (size, inodes) in ours.items():  # and ctr prints what the API says
        shown_size, shown_inodes = table[cid]
        assert shown_inodes == inodes and abs(shown_size - size) <= max(size // 20, 1), cid
    # layer 1 (images.layered_image): the root, 5 directories, 13 files (hard2.txt is a
    # second name of hard1.txt) and 2 symlinks; layer 2: the root, app/, the new
    # hello.txt, 3 whiteouts (char devices), the opaque app/opq/ and its new.txt,
    # app/dirlink, app/l2/ with hl-a (hl-b: same inode), ro.txt, owned.txt
    assert ours[built.chain_ids[1]][1] == 21
    assert ours[built.chain_ids[2]][1] == 13
    assert ours[built.chain_ids[1]][0] >= len(images.BIG)


def mount_shape(text: str) -> tuple[str, tuple[str, ...], int]:
    """``ctr snapshot mounts`` output reduced to what must match overlayfs: the mount type,
    the option names (values are paths private to each snapshotter) and the number of
    lower directories."""
    words = text.split()
    mtype = words[words.index("-t") + 1]
    opts = words[words.index("-o") + 1].split(",") if "-o" in words else []
    lowers = next((o.split("=", 1)[1].count(":") + 1 for o in opts
                   if o.startswith("lowerdir=")), 0)
    return mtype, tuple(sorted(o.split("=", 1)[0] for o in opts)), lowers


def test_mounts_have_the_shape_overlayfs_gives(
        containerd: Containerd, pulled: tuple[str, oci.BuiltImage]) -> None:
    """Active and view snapshots over 0, 1 and 4 parents: same mount type, option names and
    lowerdir count as containerd's overlayfs (bind rw/ro, overlay with upperdir or
    lowerdir only)."""
    ref, built = pulled
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
    chain = built.chain_ids
    cases = [("prepare", ""), ("prepare", chain[0]), ("prepare", chain[-1]),
             ("view", chain[0]), ("view", chain[-1])]
    tag = secrets.token_hex(3)
    shapes: dict[str, list[tuple[str, tuple[str, ...], int]]] = {}
    try:
        for snapshotter in (SNAP, "overlayfs"):
            shapes[snapshotter] = []
            for i, (verb, parent) in enumerate(cases):
                key = f"shape-{tag}-{i}"
                if verb == "view":  # a GC root, unlike ctr's (see containerd_view)
                    containerd_view(containerd, key, parent, snapshotter)
                else:
                    containerd.ctr("snapshot", "--snapshotter", snapshotter, verb, key,
                                   *([parent] if parent else []))
                shapes[snapshotter].append(mount_shape(containerd.ctr_out(
                    "snapshot", "--snapshotter", snapshotter, "mounts", "/mnt/x", key)))
    finally:
        for snapshotter in (SNAP, "overlayfs"):
            for i in range(len(cases)):
                containerd.ctr("snapshot", "--snapshotter", snapshotter, "rm",
                               f"shape-{tag}-{i}", check=False)
    assert shapes[SNAP] == shapes["overlayfs"]


def test_prepare_commit_view_rm(containerd: Containerd,
                                pulled: tuple[str, oci.BuiltImage]) -> None:
    _, built = pulled
    top = built.chain_ids[-1]
    key, view, name = (f"scratch-{secrets.token_hex(3)}" for _ in range(3))
    ctr = containerd.ctr
    try:
        ctr("snapshot", "--snapshotter", SNAP, "prepare", key, top)
        info = json.loads(containerd.ctr_out("snapshot", "--snapshotter", SNAP, "info", key))
        assert info["Kind"] == "Active" and info["Parent"] == top
        r = ctr("snapshot", "--snapshotter", SNAP, "prepare", key, top, check=False)
        assert r.returncode != 0 and "already exists" in r.stderr.lower(), r.stderr
        ctr("snapshot", "--snapshotter", SNAP, "commit", name, key)
        assert snapshot_table(containerd)[name] == (top, "Committed")
        assert key not in snapshot_table(containerd)
        containerd_view(containerd, view, name)
        assert snapshot_table(containerd)[view] == (name, "View")
        # a committed snapshot with a child cannot go away
        r = ctr("snapshot", "--snapshotter", SNAP, "rm", name, check=False)
        assert r.returncode != 0, "removing a parent with a child must fail"
        ctr("snapshot", "--snapshotter", SNAP, "rm", view)
        ctr("snapshot", "--snapshotter", SNAP, "rm", name)
        table = snapshot_table(containerd)
        assert view not in table and name not in table
        # removing again reports not found
        r = ctr("snapshot", "--snapshotter", SNAP, "rm", name, check=False)
        assert r.returncode != 0 and "not found" in (r.stderr + r.stdout).lower()
    finally:
        for k in (view, key, name):
            ctr("snapshot", "--snapshotter", SNAP, "rm", k, check=False)


def test_labels_round_trip(containerd: Containerd, pulled: tuple[str, oci.BuiltImage]) -> None:
    key = f"labels-{secrets.token_hex(3)}"
    ctr = containerd.ctr
    try:
        ctr("snapshot", "--snapshotter", SNAP, "prepare", key)
        ctr("snapshot", "--snapshotter", SNAP, "label", key, "e2e.pynydus/test=yes")
        info = json.loads(containerd.ctr_out("snapshot", "--snapshotter", SNAP, "info", key))
        assert info.get("Labels", {}).get("e2e.pynydus/test") == "yes", info
    finally:
        ctr("snapshot", "--snapshotter", SNAP, "rm", key, check=False)


# --------------------------------------------------------------------------- restart


def test_running_container_survives_snapshotter_restart(
        containerd: Containerd, snapshotter: Snapshotter, sleeper: str,
        pulled: tuple[str, oci.BuiltImage]) -> None:
    ref, _ = pulled
    read = ["tasks", "exec", "--exec-id"]
    out = containerd.ctr_out(*read, "r1", sleeper, "cat", "/app/hello.txt", "/app/v3.txt")
    assert out.split() == ["hello", "v2", "three"]
    containerd.collect_garbage()  # snapshots earlier tests removed leave the backend now
    before_ctr = snapshot_table(containerd)
    before_own = own_names(snapshotter)
    assert sleeper in before_ctr, "the container's active snapshot must be listed"

    rc = snapshotter.restart()
    assert rc == 0, f"SIGTERM must stop the snapshotter gracefully (exit status {rc})"
    # containerd redials a restarted proxy with a backoff (up to ~3 s): wait for that
    containerd.wait_snapshotter(SNAP)

    assert task_status(containerd, sleeper) == "RUNNING"
    out = containerd.ctr_out(*read, "r2", sleeper, "sh", "-c",
                             "cat /app/hello.txt; echo x >/app/new-after-restart; "
                             "cat /app/new-after-restart")
    assert out.split() == ["hello", "v2", "x"]
    assert own_names(snapshotter) == before_own
    assert snapshot_table(containerd) == before_ctr
    # the restarted snapshotter serves new containers too
    assert run_check(containerd, ref, SNAP, "post-restart").splitlines() == \
        images.expected_check_output().splitlines()


def test_snapshotter_killed_with_sigkill_recovers(
        containerd: Containerd, snapshotter: Snapshotter, sleeper: str,
        pulled: tuple[str, oci.BuiltImage]) -> None:
    """kill -9 (no graceful shutdown): after a start on the same root every snapshot is
    still there, the running container keeps working and new containers start."""
    ref, _ = pulled
    containerd.collect_garbage()
    before = own_names(snapshotter)
    snapshotter.kill9()
    snapshotter.start()
    containerd.wait_snapshotter(SNAP)
    assert own_names(snapshotter) == before
    assert task_status(containerd, sleeper) == "RUNNING"
    out = containerd.ctr_out("tasks", "exec", "--exec-id", "k9", sleeper, "cat", "/app/keep.txt")
    assert out.strip() == "keep"
    assert run_check(containerd, ref, SNAP, "post-kill9").splitlines() == \
        images.expected_check_output().splitlines()


def test_container_delete_removes_its_snapshot(
        containerd: Containerd, snapshotter: Snapshotter,
        pulled: tuple[str, oci.BuiltImage]) -> None:
    ref, _ = pulled
    cid = _cid("del")
    containerd.ctr("run", "-d", "--snapshotter", SNAP, ref, cid, "sleep", "3600", timeout=180)
    try:
        assert cid in snapshot_table(containerd)
        assert any(n.endswith("/" + cid) for n in snapshotter.list_names())
    finally:
        containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        containerd.ctr("tasks", "rm", "-f", cid, check=False)
        containerd.ctr("containers", "rm", cid, check=False)
    assert cid not in snapshot_table(containerd)
    wait_until(lambda: not any(n.endswith("/" + cid) for n in snapshotter.list_names()),
               15, f"snapshot of {cid} to leave the snapshotter")


def test_image_remove_garbage_collects_all_snapshots(
        containerd: Containerd, snapshotter: Snapshotter,
        pulled: tuple[str, oci.BuiltImage]) -> None:
    """Last in this module: removes the image; containerd's GC must call Remove on the
    proxy for every layer snapshot, leaving the snapshotter empty."""
    ref, _ = pulled
    containerd.remove_all_containers()
    containerd.ctr("images", "rm", "--sync", ref)
    assert snapshot_table(containerd) == {}

    try:
        wait_until(lambda: not snapshotter.list_names(), 20, "snapshotter to become empty")
    except HarnessError as err:
        raise AssertionError(f"left in the snapshotter: {snapshotter.list_names()}") from err
