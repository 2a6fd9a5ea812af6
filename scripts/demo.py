#!/usr/bin/env python3
"""pynydus end to end on one machine, offline (run through scripts/demo.sh, as root).

1. clean up what an interrupted earlier run left (its processes, mounts, directories);
2. start a private registry on 127.0.0.1 and push a multi-layer OCI image built offline
   (busybox + three layers with overrides, whiteouts, an opaque directory, links);
3. start ``pynydus snapshotter`` and a private containerd that uses it as proxy plugin
   ``nydus``;
4. ``ctr images pull --snapshotter nydus``, show the snapshots, ``ctr run --rm
   --snapshotter nydus`` a shell that checks the assembled rootfs;
5. remove the image (containerd's GC removes every snapshot through the proxy);
6. part 2 (skip with --no-lazy): ``pynydus convert`` the image to a Nydus image in the
   same registry, pull it through containerd's CRI ImageService as kubelet does (only the
   small bootstrap layer is downloaded), run the same check (pynydusd fetches file data
   from the registry on demand) and count the registry's blob GETs at each step;
7. stop everything by PID and verify nothing is left running or mounted.

Exit status 0 only when every step worked and everything was torn down.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import images, oci
from tests.harness.containerd import Containerd
from tests.harness.cri import CriImages
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import (
    make_workdir,
    mounts_under,
    pid_alive,
    proc_cmdline,
    processes_using,
    remove_tree,
    run,
    sweep_stale,
)

T = TypeVar("T")
SNAP = "nydus"
CRI_NS = "k8s.io"  # the CRI plugin's namespace


def say(msg: str = "") -> None:
    print(msg, flush=True)


def step(title: str, fn: Callable[[], T]) -> T:
    t0 = time.monotonic()
    say(f"==> {title}")
    out = fn()
    say(f"    ({time.monotonic() - t0:.2f} s)")
    return out


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-lazy", action="store_true",
                    help="skip part 2 (convert to Nydus, lazy pull through the CRI)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        say("demo: needs root (containerd, runc, overlay mounts)")
        return 1
    # SIGTERM/SIGHUP unwind like Ctrl-C: every component is stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    t_start = time.monotonic()
    stale = sweep_stale("demo")  # only directories of earlier demo runs (pyn-demo-*)
    if stale:
        say(f"==> cleaned up {len(stale)} directories left by an interrupted run: "
            + ", ".join(str(p) for p in stale))

    pids: list[int] = []
    dirs: list[Path] = []
    ok = False
    layouts = make_workdir("demo-img")
    dirs.append(layouts)
    try:
        with Registry(tag="demo-reg") as reg:
            pids.append(reg.proc.pid if reg.proc else 0)
            dirs.append(reg.workdir)
            say(f"==> registry: docker-registry pid {reg.proc.pid if reg.proc else '?'} "
                f"on {reg.url}")
            built = step("build a 4-layer OCI image offline (busybox + 3 app layers)",
                         lambda: images.layered_image().write_layout(layouts / "demo"))
            say(f"    manifest {built.manifest_digest}, {len(built.layers)} layers, "
                f"{built.size / 1e6:.1f} MB compressed")
            ref = reg.ref("demo/layered")
            step(f"push {ref} (skopeo)", lambda: oci.push(built, ref))

            with Snapshotter(log_level="info", tag="demo-snap") as snap:
                pids.append(snap.pid)
                dirs.append(snap.workdir)
                say(f"==> snapshotter: pynydus snapshotter pid {snap.pid}, socket {snap.socket},"
                    f" root {snap.root}")
                # CRI plugin on for part 2: kubelet's way to pull hands a remote snapshotter
                # the labels it needs for lazy pulling (ctr 1.6 does not)
                with Containerd(snap.socket, registry_hosts=[reg.host], tag="demo-ctrd",
                                cri=not args.no_lazy) as ctrd:
                    pids.append(ctrd.pid)
                    dirs.append(ctrd.workdir)
                    say(f"==> containerd: pid {ctrd.pid}, socket {ctrd.socket}, namespace "
                        f"{ctrd.namespace}, proxy plugin '{SNAP}' -> {snap.socket}")
                    ok = demo_containerd(ctrd, snap, reg, ref, built)
                    if ok and not args.no_lazy:
                        ok = demo_lazy(ctrd, snap, reg, ref, layouts / "convert-cache")
    finally:
        remove_tree(layouts)
    say("==> teardown: registry, snapshotter and containerd stopped by PID")
    alive = [p for p in pids if p and pid_alive(p)]
    alive += [p for d in dirs for p in processes_using(d)]  # e.g. pynydusd daemons, shims
    left_dirs = [d for d in dirs if d.exists()]
    left_mounts = mounts_under(*[d for d in dirs if d.exists()]) if left_dirs else []
    say(f"    processes still running: {alive or 'none'}; directories left: "
        f"{[str(d) for d in left_dirs] or 'none'}; mounts left: {left_mounts or 'none'}")
    clean = not alive and not left_dirs and not left_mounts
    say(f"==> demo {'OK' if ok and clean else 'FAILED'} in {time.monotonic() - t_start:.1f} s")
    return 0 if ok and clean else 1


def demo_containerd(ctrd: Containerd, snap: Snapshotter, reg: Registry, ref: str,
                    built: oci.BuiltImage) -> bool:
    step(f"ctr images pull --plain-http --snapshotter {SNAP} {ref}",
         lambda: ctrd.ctr("images", "pull", "--plain-http", "--snapshotter", SNAP, ref))
    say(f"    registry served {reg.blob_gets()} blob GETs")
    say(f"--- ctr snapshot --snapshotter {SNAP} ls")
    say(indent(ctrd.ctr_out("snapshot", "--snapshotter", SNAP, "ls")))
    say(f"--- ctr snapshot --snapshotter {SNAP} usage")
    say(indent(ctrd.ctr_out("snapshot", "--snapshotter", SNAP, "usage")))
    names = snap.list_names()
    say(f"--- the snapshotter's own List: {len(names)} snapshots")

    cid = f"demo-{os.getpid()}"
    out = step(f"ctr run --rm --snapshotter {SNAP} {ref} {cid} sh -c '<rootfs check>'",
               lambda: ctrd.ctr_out("run", "--rm", "--snapshotter", SNAP, ref, cid, "sh", "-c",
                                    images.CHECK_SCRIPT, timeout=180))
    say("--- container output")
    say(indent(out))
    check_ok = out.strip().splitlines() == images.expected_check_output().splitlines()
    say(f"    rootfs check: {'OK (matches the expected layer stacking)' if check_ok else 'MISMATCH'}")
    if not check_ok:
        say("--- expected")
        say(indent(images.expected_check_output()))

    out2 = step(f"ctr run --rm --snapshotter {SNAP} {ref} (the image's own Cmd)",
                lambda: ctrd.ctr_out("run", "--rm", "--snapshotter", SNAP, ref, cid + "-cmd",
                                     timeout=180))
    say(indent(out2))

    step(f"ctr images rm --sync {ref} (containerd GC removes the snapshots via the proxy)",
         lambda: ctrd.ctr("images", "rm", "--sync", ref))
    left = snap.list_names()
    say(f"    snapshots left in the snapshotter: {len(left)}")
    return check_ok and out2.strip() == "hello v2" and not left


def demo_lazy(ctrd: Containerd, snap: Snapshotter, reg: Registry, ref: str,
              cache: Path) -> bool:
    """Part 2: the same image as a Nydus image, pulled lazily and run."""
    nref = reg.ref("demo/layered", "nydus")
    pynydus = str(Path(sys.executable).parent / "pynydus")
    say("")
    say("==> part 2: lazy pulling")
    step(f"pynydus convert --source {ref} --target {nref}",
         lambda: run([pynydus, "convert", "--source", ref, "--target", nref,
                      "--source-insecure", "--target-insecure", "--cache-dir", str(cache),
                      "--progress", "quiet"], timeout=600))
    manifest = json.loads(run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                               f"docker://{nref}"]).stdout)
    data = [lyr["digest"] for lyr in manifest["layers"]
            if "containerd.io/snapshot/nydus-blob" in lyr.get("annotations", {})]
    boot = [lyr["digest"] for lyr in manifest["layers"]
            if "containerd.io/snapshot/nydus-bootstrap" in lyr.get("annotations", {})]
    sizes = {lyr["digest"]: lyr["size"] for lyr in manifest["layers"]}
    say(f"    Nydus manifest: {len(data)} data blobs "
        f"({sum(sizes[d] for d in data) / 1e6:.2f} MB) + 1 bootstrap layer "
        f"({sum(sizes[d] for d in boot) / 1e3:.1f} kB)")

    def gets(digests: list[str]) -> int:
        return sum(reg.blob_gets(d) for d in digests)

    d0, b0 = gets(data), gets(boot)
    bytes0 = reg.blob_bytes()
    cri = CriImages(str(ctrd.socket))
    try:
        t0 = time.monotonic()
        step(f"CRI PullImage {nref} (as kubelet pulls; containerd's snapshotter is {SNAP})",
             lambda: cri.pull(nref))
        lazy_pull_s = time.monotonic() - t0
        d1, b1 = gets(data), gets(boot)
        bytes_pull = reg.blob_bytes() - bytes0
        say(f"    registry blob GETs during the pull: data blobs {d1 - d0}, bootstrap {b1 - b0}"
            " (only the bootstrap is downloaded)")
        cid = f"demo-lazy-{os.getpid()}"
        t0 = time.monotonic()
        out = step(f"ctr -n {CRI_NS} run --rm --snapshotter {SNAP} {nref} {cid} sh -c "
                   "'<rootfs check>'",
                   lambda: ctrd.ctr("run", "--rm", "--snapshotter", SNAP, nref, cid, "sh",
                                    "-c", images.CHECK_SCRIPT, timeout=180,
                                    namespace=CRI_NS).stdout)
        lazy_run_s = time.monotonic() - t0
        check_ok = out.strip().splitlines() == images.expected_check_output().splitlines()
        d2 = gets(data)
        bytes_lazy = reg.blob_bytes() - bytes0
        daemons = [p for p in processes_using(snap.root)
                   if any("pynydusd" in a for a in proc_cmdline(p)[:2])]
        say(f"    rootfs check: {'OK' if check_ok else 'MISMATCH'}; data fetched on demand "
            f"while the container ran: {d2 - d1} blob GETs (ranged reads); pynydusd "
            f"daemons: {len(daemons)} (pid {', '.join(map(str, daemons)) or '-'})")
        if not check_ok:
            say(indent(out))
        step(f"CRI RemoveImage {nref}", lambda: cri.remove(nref))
    finally:
        cri.close()

    # The same OCI image pulled whole into containerd's built-in overlayfs, for comparison.
    ns = "demo-overlayfs"
    bytes1 = reg.blob_bytes()
    t0 = time.monotonic()
    step(f"ctr -n {ns} images pull {ref} (full pull into containerd's overlayfs)",
         lambda: ctrd.ctr("images", "pull", "--plain-http", ref, namespace=ns, timeout=600))
    full_pull_s = time.monotonic() - t0
    bytes_full = reg.blob_bytes() - bytes1
    t0 = time.monotonic()
    step(f"ctr -n {ns} run --rm {ref} (overlayfs) sh -c '<rootfs check>'",
         lambda: ctrd.ctr("run", "--rm", ref, f"demo-ovl-{os.getpid()}", "sh", "-c",
                          images.CHECK_SCRIPT, namespace=ns, timeout=180))
    full_run_s = time.monotonic() - t0
    ctrd.ctr("images", "rm", "--sync", ref, namespace=ns, check=False)
    say("")
    say("    pull + run of the same image      pull      run    total   bytes from the registry")
    say(f"    overlayfs (full pull)          {full_pull_s:6.2f} s {full_run_s:6.2f} s "
        f"{full_pull_s + full_run_s:6.2f} s   {bytes_full / 1e6:8.2f} MB")
    say(f"    nydus (lazy pull, pynydusd)    {lazy_pull_s:6.2f} s {lazy_run_s:6.2f} s "
        f"{lazy_pull_s + lazy_run_s:6.2f} s   {bytes_lazy / 1e6:8.2f} MB "
        f"({bytes_pull / 1e3:.1f} kB at pull)")
    say("    (a tiny image on loopback: lazy pulling pays off on big images and real networks;"
        " see docs/benchmarks.md)")
    lazy_ok = check_ok and d1 == d0 and b1 > b0 and d2 > d1
    say(f"    lazy pull: {'OK' if lazy_ok else 'NOT AS EXPECTED'}")
    return lazy_ok


if __name__ == "__main__":
    sys.exit(main())
