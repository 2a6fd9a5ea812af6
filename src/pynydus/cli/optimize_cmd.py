"""``pynydus optimize IMAGE``: a prefetch list from a start-up of IMAGE, pushed beside it.

The start-up's access trace comes from one of:

- ``--run``: a throwaway container of IMAGE (already pulled through our snapshotter)
  started with ``ctr run`` on containerd (``--address``, ``--namespace``), its command
  (what follows ``--cmd``, else the image's entrypoint) given ``--timeout`` seconds, then killed;
  the trace is then read as with ``--node-root``;
- ``--node-root ROOT``: the pynydusd serving IMAGE on this node, found in the snapshotter's
  records under ROOT (its last mount of the image);
- ``--daemon-sock SOCK [--id /ID]``: a pynydusd's API socket;
- ``--trace FILE``: a trace saved from ``GET /api/v1/metrics/trace``.

``--output FILE`` writes the list; ``--push`` pushes it to IMAGE's repository as an OCI
artifact whose subject is IMAGE's manifest (the image and its digest are unchanged);
snapshotters find it at pull through the referrers API or its fallback tag.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
from typing import Any

from pynydus.errors import FailedPrecondition, InvalidArgument, NotFound, q


def add_optimize(sub: Any) -> None:
    p = sub.add_parser("optimize", help="make a prefetch list from a start-up and push it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image reference (as pulled)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", help="a saved access trace (JSON of /api/v1/metrics/trace)")
    src.add_argument("--daemon-sock", help="API socket of the pynydusd serving the image")
    src.add_argument("--run", action="store_true",
                     help="run the image once in a throwaway container first (ctr run)")
    p.add_argument("--id", default="/", help="the image's mountpoint in --daemon-sock's daemon")
    from pynydus.config import DEFAULT_ROOT

    p.add_argument("--node-root", default=DEFAULT_ROOT, help="the snapshotter's root")
    p.add_argument("--address", default="/run/containerd/containerd.sock",
                   help="containerd's socket (--run)")
    p.add_argument("--namespace", default="k8s.io", help="containerd namespace (--run)")
    p.add_argument("--snapshotter", default="nydus", help="containerd's name of ours (--run)")
    p.add_argument("--ctr", default="ctr", help="the ctr program (--run)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds the --run container may take before it is stopped")
    p.add_argument("--output", help="write the prefetch list here")
    p.add_argument("--push", action="store_true", help="push the list beside the image")
    p.add_argument("--insecure", action="store_true",
                   help="skip TLS verification, fall back to plain HTTP")
    p.add_argument("--cmd", nargs=argparse.REMAINDER, default=[], dest="command",
                   help="the --run container's command: everything after --cmd")
    p.set_defaults(func=run_optimize)


def run_optimize(args: argparse.Namespace) -> int:
    from pynydus.daemon import prefetchlist

    if args.run:
        _run_container(args)
    trace = _load_trace(args)
    plist = prefetchlist.from_trace(trace)
    if not plist:
        raise FailedPrecondition(f"optimize {q(args.image)}: the trace has no reads")
    if args.output:
        with open(args.output, "wb") as f:
            f.write(plist.to_json())
    print(f"prefetch list: {len(plist.files)} files, {len(plist.ranges)} chunk runs, "
          f"{plist.compressed_bytes} bytes")
    if args.push:
        digest = push_list(args.image, plist, insecure=args.insecure)
        print(f"pushed {digest} referring to {args.image}")
    return 0


def push_list(image: str, plist: Any, *, insecure: bool = False) -> str:
    """Push ``plist`` as an artifact referring to ``image``'s manifest; its digest."""
    from pynydus.convert.endpoints import registry_spec
    from pynydus.daemon import prefetchlist
    from pynydus.registry import media, parse_reference
    from pynydus.registry.artifact import Subject, push_artifact

    ref = parse_reference(image)
    with registry_spec(ref, insecure, None).client() as client:
        accept = (media.OCI_MANIFEST, media.DOCKER_MANIFEST, media.OCI_INDEX,
                  media.DOCKER_MANIFEST_LIST)
        m = client.get_manifest(ref.path, ref.digest or ref.tag or "latest", accept=accept)
        subject = Subject(m.media_type, m.digest, len(m.data))
        return push_artifact(client, ref.path, subject, prefetchlist.ARTIFACT_TYPE,
                             prefetchlist.MEDIA_TYPE, plist.to_json(),
                             {"org.opencontainers.image.description":
                              "pynydus prefetch list (pynydus optimize)"})


def _load_trace(args: argparse.Namespace) -> dict[str, Any]:
    from pynydus.manager.client import DaemonClient

    if args.trace:
        try:
            with open(args.trace, "rb") as f:
                doc = json.load(f)
        except (OSError, ValueError) as err:
            raise InvalidArgument(f"--trace {args.trace}: {err}") from err
        if not isinstance(doc, dict):
            raise InvalidArgument(f"--trace {args.trace}: not a trace object")
        return doc
    sock, mountpoint = ((args.daemon_sock, args.id) if args.daemon_sock
                        else find_daemon(args.node_root, args.image))
    return DaemonClient(sock).metrics("trace", mountpoint)


def find_daemon(root: str, image: str) -> tuple[str, str]:
    """(API socket, mountpoint in it) of the daemon serving ``image``'s last mount on the
    node whose snapshotter root is ``root``."""
    from pynydus.manager.store import DaemonStore
    from pynydus.registry import parse_reference

    db = os.path.join(root, "daemons.db")
    if not os.path.exists(db):
        raise NotFound(f"no snapshotter records at {db}")
    want = str(parse_reference(image))
    store = DaemonStore(db)
    try:
        daemons = {d.id: d for d in store.daemons()}
        mounts = [r for r in store.instances() if _same(r.image_ref, want) and r.daemon_id in daemons]
    finally:
        store.close()
    if not mounts:
        raise NotFound(f"image {q(image)} is not mounted on this node (records in {root})")
    rec = max(mounts, key=lambda r: r.seq)
    d = daemons[rec.daemon_id]
    sub = os.path.relpath(rec.mountpoint, d.mountpoint)
    return d.api_socket, ("/" if sub == "." else f"/{sub}")


def _same(ref: str, want: str) -> bool:
    from pynydus.registry import parse_reference

    try:
        return str(parse_reference(ref)) == want
    except Exception:  # noqa: BLE001 - a record with an odd reference is another image
        return False


def _run_container(args: argparse.Namespace) -> None:
    cid = f"pynydus-optimize-{secrets.token_hex(4)}"
    base = [args.ctr, "--address", args.address, "--namespace", args.namespace]
    argv = [*base, "run", "--rm", "--snapshotter", args.snapshotter, args.image, cid,
            *args.command]
    try:
        proc = subprocess.run(argv, check=False, capture_output=True, text=True,
                              timeout=args.timeout)
        if proc.returncode != 0:
            print(f"optimize: the container ended with {proc.returncode}: "
                  f"{proc.stderr.strip()[-500:]}", file=sys.stderr)
    except subprocess.TimeoutExpired:
        pass  # a server that never ends: its start-up is what was wanted
    finally:
        for cmd in (["tasks", "kill", "-s", "KILL", cid], ["tasks", "rm", "-f", cid],
                    ["containers", "rm", cid]):
            subprocess.run([*base, *cmd], check=False, capture_output=True, timeout=60)
