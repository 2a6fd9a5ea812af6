"""``pynydus ctl``: an operator's client of a running node, nydusctl's counterpart.

It reads the snapshotter and its daemons through what they already serve, nothing else:

    daemons                 the system controller's GET /api/v1/daemons
    records                 its GET /api/v1/daemons/records (the daemon store as persisted)
    metrics [PREFIX...]     the snapshotter's Prometheus exporter ([metrics] address)
    daemon D info|metrics|backend|blobcache
                            a daemon's API (D: a daemon id, looked up in the system
                            controller, or the path of its API socket); the text reports
                            are nydusctl's (``pynydus.cli.nydusctl``), ``--id`` names one
                            image of a shared daemon
    health                  readiness: a Stat of a key that does not exist on the
                            snapshots socket answers NOT_FOUND (exit 0) within --timeout

Sockets and addresses come from the flags, else from the snapshotter's ``--config``, else
the defaults a snapshotter uses. Human tables by default, ``--json`` for the answers as
JSON. Exit codes: 0, 1 when a server cannot be reached or refuses, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from pynydus.cli import nydusctl
from pynydus.config import DEFAULT_ADDRESS, DEFAULT_SYSTEM_ADDRESS, SnapshotterConfig, parse_config
from pynydus.errors import InvalidArgument, NotFound, Unavailable, q
from pynydus.manager.client import DaemonClient

API = "/api/v1"
# nydusctl's report for each daemon command, and the API endpoint --json prints
_DAEMON_COMMANDS = {"info": ("", "/daemon"), "metrics": ("fsstats", "/metrics"),
                    "backend": ("backend", "/metrics/backend"),
                    "blobcache": ("cache", "/metrics/blobcache")}
# a key the snapshotter never holds: the health probe's Stat must answer NOT_FOUND
_PROBE_KEY = "pynydus-ctl-health-probe"


def _options(defaults: bool) -> argparse.ArgumentParser:
    """The options, with their defaults for ``ctl`` itself and with none for each command
    (so that an option given after the command wins and one given before it stays)."""
    o = argparse.ArgumentParser(add_help=False)
    d: dict[str, Any] = ({"json": False, "config": None, "sock": None, "address": None,
                          "metrics_address": None, "timeout": 10.0} if defaults else
                         dict.fromkeys(("json", "config", "sock", "address", "metrics_address",
                                        "timeout"), argparse.SUPPRESS))
    o.add_argument("--json", action="store_true", default=d["json"],
                   help="print the answers as JSON")
    o.add_argument("--config", default=d["config"],
                   help="the snapshotter's TOML: where its sockets are")
    o.add_argument("--sock", default=d["sock"], help=f"system controller socket ([system] "
                   f"address; default {DEFAULT_SYSTEM_ADDRESS})")
    o.add_argument("--address", default=d["address"], help=f"snapshots gRPC socket, for "
                   f"health (address; default {DEFAULT_ADDRESS})")
    o.add_argument("--metrics-address", default=d["metrics_address"],
                   help="the snapshotter's Prometheus exporter, host:port ([metrics] address)")
    o.add_argument("--timeout", type=float, default=d["timeout"],
                   help="seconds per request (default 10)")
    return o


def add_ctl(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ctl", parents=[_options(True)],
                       help="query a running snapshotter and its daemons (nydusctl's counterpart)",
                       description="Query a running snapshotter (its system controller, "
                       "metrics and snapshots socket) and its daemons' APIs.")
    p.set_defaults(func=run)
    common = _options(False)
    cmds = p.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")
    cmds.add_parser("daemons", parents=[common], help="the daemons, their images, memory, data read")
    cmds.add_parser("records", parents=[common], help="the daemon store's records")
    m = cmds.add_parser("metrics", parents=[common], help="the snapshotter's Prometheus metrics")
    m.add_argument("prefix", nargs="*", help="only metrics whose name starts with one of these")
    m.add_argument("--all", action="store_true", help="also histogram buckets")
    d = cmds.add_parser("daemon", parents=[common], help="ask one daemon's API")
    d.add_argument("daemon", help="daemon id (see `daemons`) or the path of its API socket")
    d.add_argument("what", choices=list(_DAEMON_COMMANDS))
    d.add_argument("--id", dest="sid", help="the image (snapshot id) of a shared daemon")
    cmds.add_parser("health", parents=[common], help="exit 0 if the snapshots service answers")


def run(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    out: Any
    if args.ctl_command == "health":
        out = health(args.address or cfg.address, args.timeout)
        _print(out, args.json, _health_text)
        return 0 if out["ok"] else 1
    if args.ctl_command == "metrics":
        address = args.metrics_address or cfg.metrics.address
        if not address:
            raise InvalidArgument("no metrics address: give --metrics-address, or --config "
                                  "with [metrics] address")
        out = [s for s in scrape(address, args.timeout)
               if not args.prefix or s["name"].startswith(tuple(args.prefix))]
        _print(out, args.json, lambda o: metrics_table(o, all_samples=args.all))
        return 0
    system = DaemonClient(args.sock or cfg.system.address, args.timeout,
                          what="system controller")
    if args.ctl_command == "daemons":
        _print(system.get(f"{API}/daemons"), args.json, daemons_table)
    elif args.ctl_command == "records":
        _print(system.get(f"{API}/daemons/records"), args.json, records_table)
    else:
        client = DaemonClient(daemon_socket(system, args.daemon), args.timeout)
        report, endpoint = _DAEMON_COMMANDS[args.what]
        if args.json:
            sid = f"?id={args.sid}" if args.sid and endpoint != "/daemon" else ""
            print(json.dumps(client.get(f"{API}{endpoint}{sid}"), indent=2, sort_keys=True))
        elif args.what == "info":
            nydusctl.info(client, raw=False)
        else:
            nydusctl.metrics(client, report, raw=False, interval=None, sid=args.sid)
    return 0


def _config(path: str | None) -> SnapshotterConfig:
    if path is None:
        return SnapshotterConfig()
    cfg, _ = parse_config(path)  # what it says, even keys a start would refuse
    return cfg


def _print(value: Any, as_json: bool, text: Any) -> None:
    if as_json:
        print(json.dumps(value, indent=2, sort_keys=True))
    else:
        sys.stdout.write(text(value))


def daemon_socket(system: DaemonClient, daemon: str) -> str:
    """A daemon's API socket: ``daemon`` itself if it is a path, else the socket of the
    daemon with that id in the system controller's list."""
    if "/" in daemon:
        return daemon
    daemons = system.get(f"{API}/daemons") or []
    for d in daemons:
        if d.get("id") == daemon:
            return str(d["api_socket"])
    known = ", ".join(str(d.get("id")) for d in daemons) or "none"
    raise NotFound(f"daemon {q(daemon)} not found (daemons: {known})")


# --------------------------------------------------------------------------- tables

def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart, a header line first; "" cells stay empty."""
    cells = [list(map(str, headers))] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
                   for r in cells)


def size(n: float) -> str:
    """Bytes as an operator reads them: 512 B, 3.0 KiB, 41.2 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def daemons_table(daemons: list[dict[str, Any]]) -> str:
    rows = []
    for d in daemons:
        images = sorted({i.get("image_id", "") for i in (d.get("instances") or {}).values()})
        rows.append((d.get("id"), d.get("pid"), d.get("state", ""),
                     size(float(d.get("memory_rss_kb") or 0) * 1024),
                     size(float(d.get("read_data_kb") or 0) * 1024),
                     len(d.get("instances") or {}), ", ".join(images) or "-"))
    return table(("ID", "PID", "STATE", "RSS", "READ", "INSTANCES", "IMAGES"), rows)


def records_table(records: dict[str, list[dict[str, Any]]]) -> str:
    daemons = table(("DAEMON", "MODE", "PID", "MOUNTPOINT", "API SOCKET"),
                    [(d.get("id"), d.get("mode"), d.get("pid"), d.get("mountpoint"),
                      d.get("api_socket")) for d in records.get("daemons", [])])
    instances = table(("SNAPSHOT", "DAEMON", "IMAGE", "MOUNTPOINT"),
                      [(i.get("snapshot_id"), i.get("daemon_id"), i.get("image_ref"),
                        i.get("mountpoint")) for i in records.get("instances", [])])
    return f"{daemons}\n{instances}"


def metrics_table(samples: list[dict[str, Any]], *, all_samples: bool = False) -> str:
    rows = [(s["name"], ",".join(f"{k}={v}" for k, v in s["labels"].items()), _number(s["value"]))
            for s in samples
            if all_samples or not s["name"].endswith(("_bucket", "_created"))]
    return table(("METRIC", "LABELS", "VALUE"), rows)


def _number(v: float) -> str:
    return str(int(v)) if v == int(v) and abs(v) < 1e15 else f"{v:g}"


def _health_text(h: dict[str, Any]) -> str:
    if h["ok"]:
        return f"ok: snapshots service on {h['address']} answered in {h['millis']:.1f} ms\n"
    return f"not ready: snapshots service on {h['address']}: {h['error']}\n"


# --------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[dict[str, Any]]:
    """Samples of Prometheus's text format: ``{"name", "labels", "value"}`` in order;
    comments and lines that are not samples are skipped."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = {k: re.sub(r"\\(.)", lambda e: "\n" if e[1] == "n" else e[1], v)
                  for k, v in _LABEL.findall(m[2] or "")}
        try:
            value = float(m[3])
        except ValueError:
            continue
        out.append({"name": m[1], "labels": labels, "value": value})
    return out


def scrape(address: str, timeout: float) -> list[dict[str, Any]]:
    """The snapshotter's samples from ``http://<address>/v1/metrics``."""
    host, _, port = address.rpartition(":")
    try:
        conn = http.client.HTTPConnection(host or "127.0.0.1", int(port), timeout=timeout)
    except ValueError as err:
        raise InvalidArgument(f"metrics address {q(address)}: want host:port") from err
    try:
        conn.request("GET", "/v1/metrics")
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as err:
        raise Unavailable(f"metrics on {address}: {err!r}") from err
    finally:
        conn.close()
    if resp.status != 200:
        raise Unavailable(f"metrics on {address}: HTTP {resp.status}")
    return parse_prometheus(body.decode("utf-8", errors="replace"))


# --------------------------------------------------------------------------- health

def health(address: str, timeout: float) -> dict[str, Any]:
    """Readiness of the snapshots service on ``address``: a Stat of a key nobody holds,
    answered NOT_FOUND, is a snapshotter that serves (metadata store open, daemons
    recovered: the socket is served only after both). Any other answer, or none within
    ``timeout``, is not ready."""
    import grpc

    from pynydus.api import snapshots_pb2, snapshots_pb2_grpc

    start = time.monotonic()
    result: dict[str, Any] = {"address": address, "ok": False}
    with grpc.insecure_channel(f"unix://{address}") as channel:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        try:
            stub.Stat(snapshots_pb2.StatSnapshotRequest(snapshotter="nydus", key=_PROBE_KEY),
                      timeout=timeout)
            result["error"] = f"Stat of {_PROBE_KEY!r} found a snapshot"
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            if code == grpc.StatusCode.NOT_FOUND:
                result["ok"] = True
            else:
                detail = err.details() if hasattr(err, "details") else str(err)
                result["error"] = f"{code.name if code else 'error'}: {detail}"
    result["millis"] = (time.monotonic() - start) * 1000
    return result


__all__ = ["add_ctl", "daemon_socket", "health", "parse_prometheus", "run", "table"]
