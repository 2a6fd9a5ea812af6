"""``nydusctl``: upstream's daemon client command line (nydus-rs 2.2), for pynydusd and nydusd.

``nydusctl --sock S [--raw] info | set log-level L | metrics backend|cache|fsstats
[-I SECS] | mount -s SRC -c CFG -m MP -t rafs | umount -m MP``, speaking the daemon's
HTTP API through :class:`pynydus.manager.client.DaemonClient`. The text reports are
upstream's, line for line (values shown as upstream's JSON Display shows them);
``--raw`` prints the API's JSON as compact JSON with sorted keys, as upstream does.
Exit codes: 0, 2 for a usage error, 1 when the daemon cannot be reached or refuses.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from pynydus import __version__
from pynydus.cli.pipes import quiet_on_closed_pipe
from pynydus.cli.upstream import ClapParser, json_value, run, rust_f64
from pynydus.manager.client import DaemonClient

SIZES = ["<1K", "1K~", "4K~", "16K~", "64K~", "128K~", "512K~", "1M~"]
PERIODS = ["<1ms", "~20ms", "~50ms", "~100ms", "~500ms", "~1s", "~2s", "2s~"]


def build_parser() -> ClapParser:
    p = ClapParser(prog="nydusctl",
                   description="A client to query and configure the nydusd daemon (pynydus)")
    p.add_argument("-V", "--version", action="version", version=f"nydusctl {__version__}")
    p.add_argument("-S", "--sock", required=True, help="Sets file path for the nydusd API socket")
    p.add_argument("-r", "--raw", action="store_true", help="Outputs messages in plain json mode")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ClapParser)

    def cmd(name: str, help: str) -> ClapParser:
        c: ClapParser = sub.add_parser(name, help=help, description=help)
        c.add_argument("-r", "--raw", action="store_true", default=argparse.SUPPRESS,
                       help="Outputs messages in plain json mode")
        return c

    cmd("info", "Gets information about the nydusd daemon")
    s = cmd("set", "Configures parameters for the nydusd daemon")
    s.add_argument("KIND", choices=["log-level"], help="the parameter to configure")
    s.add_argument("VALUE", help="the configuration value (trace, debug, info, warn, error)")
    m = cmd("metrics", "Gets runtime metrics about backend, cache and filesystems")
    m.add_argument("category", choices=["backend", "cache", "fsstats"],
                   help="the metrics category to fetch")
    m.add_argument("-I", "--interval", help="interval to refresh the metrics")
    mo = cmd("mount", "Mounts a new filesystem instance")
    mo.add_argument("-s", "--source", required=True,
                    help="Storage backend for the filesystem instance")
    mo.add_argument("-c", "--config", required=True,
                    help="Configuration file for the new filesystem instance")
    mo.add_argument("-m", "--mountpoint", required=True,
                    help="Mountpoint for the new filesystem instance")
    mo.add_argument("-t", "--type", required=True, choices=["rafs", "passthrough_fs"],
                    help="Type of the new filesystem instance")
    u = cmd("umount", "Umounts a filesystem instance")
    # upstream documents -m but its parser only takes the mountpoint positionally
    u.add_argument("MOUNTPOINT", nargs="?", help="Mountpoint of the filesystem instance")
    u.add_argument("-m", dest="mountpoint", help=argparse.SUPPRESS)
    return p


@quiet_on_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "umount":
        if bool(args.MOUNTPOINT) == bool(args.mountpoint):
            parser.error("umount takes one mountpoint: umount <mountpoint>")
        args.mountpoint = args.mountpoint or args.MOUNTPOINT
    client = DaemonClient(args.sock)
    if args.command is None:
        return 0

    def body() -> int:
        if args.command == "info":
            info(client, args.raw)
        elif args.command == "set":
            client.set_log_level(args.VALUE)
        elif args.command == "metrics":
            metrics(client, args.category, args.raw, args.interval)
        elif args.command == "mount":
            with open(args.config) as f:
                config = f.read()
            client.mount(args.mountpoint, args.source, config, fs_type=args.type)
        elif args.command == "umount":
            client.umount(args.mountpoint)
        return 0

    return run("nydusctl", body)


# --------------------------------------------------------------------------- info

_MOUNTED = re.compile(r"^(\d{4}-\d\d-\d\d) (\d\d):(\d\d:\d\d)(?:\.(\d+))? (.*)$")


def offset_datetime_display(value: Any) -> str:
    """The Rust time crate's Display of a mount time from its serde text
    (``2026-12-07 05:36:07.183990879 +00:00:00`` shows as ``2026-12-07 5:36:07.183990879
    +00:00:00``: hour unpadded, fraction without trailing zeros)."""
    m = _MOUNTED.match(str(value))
    if m is None:
        return str(value)
    date, hour, rest, frac, offset = m.groups()
    frac = (frac or "0").rstrip("0") or "0"
    return f"{date} {int(hour)}:{rest}.{frac} {offset}"


def info(client: DaemonClient, raw: bool) -> None:
    i = client.info()
    if raw:
        print(json_value(i))
        return
    v = i.get("version") or {}
    sys.stdout.write(f"""
Version:                {json_value(v.get("package_ver"))}
Status:                 {json_value(i.get("state"))}
Profile:                {json_value(v.get("profile"))}
Commit:                 {json_value(v.get("git_commit"))}
""")
    backends = i.get("backend_collection") or {}
    if isinstance(backends, dict) and backends:
        print("Instances:")
    for mountpoint, b in (backends.items() if isinstance(backends, dict) else ()):
        print(f"\tInstance Mountpoint:  {mountpoint}")
        print(f"\tType:  {b.get('backend_type')}")
        print(f"\tMounted Time:  {offset_datetime_display(b.get('mounted_time'))}")
        if b.get("backend_type") == "Rafs":
            cfg = b.get("config") or {}
            prefetch = (cfg.get("cache") or {}).get("prefetch") or {}
            print(f"\tMode:  {(cfg.get('rafs') or {}).get('mode', 'direct')}")
            print(f"\tPrefetch:  {str(bool(prefetch.get('enable'))).lower()}")
            print(f"\tPrefetch Merging Size:  {prefetch.get('batch_size', 0)}")
            print()


# --------------------------------------------------------------------------- metrics

def metrics(client: DaemonClient, category: str, raw: bool, interval: str | None,
            sid: str | None = None) -> None:
    """``metrics backend|cache|fsstats``; ``sid`` names one image of a shared daemon
    (``?id=``, which upstream's nydusctl never sends)."""
    if category == "backend":
        m = client.metrics("backend", sid)
        if interval is not None:
            try:
                secs = int(interval)
            except ValueError as err:
                raise ValueError(f"Invalid interval input. {err}") from None
            _backend_every(client, m, secs)
        if raw:
            print(json_value(m))
        else:
            _backend(m)
    elif category == "cache":
        m = client.metrics("blobcache", sid)
        duration = (m["prefetch_end_time_secs"] + m["prefetch_end_time_millis"] / 1000.0
                    - (m["prefetch_begin_time_secs"] + m["prefetch_begin_time_millis"] / 1000.0))
        if raw:
            print(json_value(m))
        else:
            _cache(m, float(duration))
    else:
        m = client.metrics("", sid)
        if raw:
            print(json_value(m))
        else:
            _fsstats(m)


def _div(a: float, b: float) -> float:
    """f64 division as Rust does it: x/0 is inf or NaN, not an exception."""
    if b == 0:
        return float("nan") if a == 0 else float("inf") if a > 0 else float("-inf")
    return a / b


def _cache(m: dict[str, Any], duration: float) -> None:
    amount = float(m["prefetch_data_amount"])
    requests = int(m["prefetch_requests_count"])
    latency = _div(float(m["prefetch_cumulative_time_millis"]), float(requests)) / 1000.0
    sys.stdout.write(f"""
Partial Hits:               {json_value(m["partial_hits"])}
Whole Hits:                 {json_value(m["whole_hits"])}
Total Read:                 {json_value(m["total"])}
Directory:                  {json_value(m["store_path"])}
Files:                      {json_value(m["underlying_files"])}
Persister Buffer:           {json_value(m["buffered_backend_size"])}

Prefetch Workers:           {json_value(m["prefetch_workers"])}
Prefetch Amount:            {rust_f64(amount)} = {rust_f64(amount / 1024.0)} KB
Prefetch Requests:          {json_value(m["prefetch_requests_count"])}
Prefetch Average Size:      {int(m["prefetch_data_amount"]) // requests if requests else 0} Bytes
Prefetch Duration:          {rust_f64(duration)} Seconds
Prefetch Bandwidth:         {rust_f64(_div(amount / 1024.0 / 1024.0, duration))} MB/S
Prefetch Request Latency:   {rust_f64(latency)} Seconds
Prefetch Unmerged:          {json_value(m["prefetch_unmerged_chunks"])}
""")


def _row(label: str, values: Sequence[Any], width: int) -> str:
    return f"{label:<{width}}" + "".join(f"{v!s:<8}" for v in values)


def _backend(m: dict[str, Any]) -> None:
    sys.stdout.write(f"""
Backend Type:       {json_value(m["backend_type"])}
Read Amount:        {json_value(m["read_amount_total"])} Bytes ({rust_f64(float(m["read_amount_total"]) / 1024.0 / 1024.0)} MB)
Read Count:         {json_value(m["read_count"])}
Read Errors:        {json_value(m["read_errors"])}
""")
    lat, hits = m["read_cumulative_latency_millis_dist"], m["read_count_block_size_dist"]
    print("\n" + _row("Block Sizes:", SIZES, 25))
    print(_row("Average Latency(millis):",
               [lat[i] // hits[i] if hits[i] else 0 for i in range(len(SIZES))], 25))
    print("\n" + _row("Block Sizes:", SIZES, 25))
    print(_row("Request Count:", hits[:len(SIZES)], 25))


def _backend_every(client: DaemonClient, last: dict[str, Any], secs: int) -> None:
    """``metrics backend -I N``: deltas every N seconds until interrupted."""
    while True:
        time.sleep(secs)
        cur = client.metrics("backend")
        data, reqs, latency = (int(cur[k]) - int(last[k]) for k in (
            "read_amount_total", "read_count", "read_cumulative_latency_millis_total"))
        dist, hits = ([int(a) - int(b) for a, b in zip(cur[k], last[k], strict=True)]
                      for k in ("read_cumulative_latency_millis_dist",
                                "read_count_block_size_dist"))
        sys.stdout.write(f"""
>>> >>> >>> >>> >>>
Backend Read Bandwidth:     {data // (secs * 1024) if secs else 0} KB/S
Backend Average IO Size:    {data // reqs if reqs else 0} Bytes
Backend Average Latency:    {latency // reqs if reqs else 0} millis

Block Sizes/millis:
{"".join(f"{s:<8}" for s in SIZES)}
""")
        sys.stdout.write("".join(f"{(dist[i] // hits[i] if hits[i] else 0):<8}"
                                 for i in range(len(SIZES))))
        print()
        print("<<< <<< <<< <<< <<<")
        sys.stdout.flush()
        last = cur


def _fsstats(m: dict[str, Any]) -> None:
    fop, errors = m["fop_hits"], m["fop_errors"]
    print("\n" + _row("Read Latency:", PERIODS, 16))
    sys.stdout.write(f"{'Reads Count:':<16}" + "".join(f"{d:<8}" for d in m["read_latency_dist"]))
    print("\n")
    print(f"Read Errors: {json_value(errors[4])}")
    data = int(m["data_read"])
    print(f"Read Data: {data}Bytes ({data // 1024 // 1024}MB)")
    sys.stdout.write(f"""
FOP Counters:
Getattr({fop[0]}) Readlink({fop[1]}) Open({fop[2]}) Release({fop[3]}) Read({fop[4]}) Statfs({fop[5]}) Getxattr({fop[6]}) Listxattr({fop[7]})
Opendir({fop[8]}) Lookup({fop[9]}) Readdir({fop[10]}) Readdirplus({fop[11]}) Access({fop[12]}) Forget({fop[13]}) BatchForget({fop[14]})
""")


if __name__ == "__main__":
    sys.exit(main())
