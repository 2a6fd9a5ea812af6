#!/usr/bin/env python3
"""Write docs/compat.md, the compatibility matrix with upstream Nydus, from a test run.

    scripts/compat-report.py                 # run tests/compat (needs root, the peers) and write it
    scripts/compat-report.py RUN.xml         # from a pytest --junitxml report of tests/compat
    scripts/compat-report.py RUN.xml -o F    # write F instead of docs/compat.md

One row per cell (a test, or one parameter of it): pass, FAIL, or "upstream bug" for a
strict xfail, whose recorded reason quotes upstream's own output ("not in upstream 2.2"
when the reason says upstream predates the feature). Cells upstream's pinned
version cannot have at all are listed at the end with the reason.

The section from "## Issue 11 checklist" on is written by hand (the audit of issue 11
against the repository) and is kept as it is when the matrix is rewritten.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HAND_WRITTEN = "## Issue 11 checklist"

CELLS = {
    "test_upstream_to_ours": (
        "1", "upstream `nydus-image create` → ours",
        ("our `image check`/`inspect`/reader/`unpack` agree with upstream's "
         "`check -v`/`inspect -R`/`unpack`; pynydusd (FUSE, localfs) serves "
         "the source tree byte for byte with its metadata")),
    "test_ours_to_upstream": (
        "2", "ours → upstream `nydus-image check` and `nydusd`",
        ("upstream's check accepts the image and lists it as our reader "
         "does; upstream nydusd (FUSE, localfs) serves the source tree")),
    "test_merge_crossed": (
        "3", "merges crossed",
        ("layers built by one side, merged by the other, served by a daemon; "
         "the mount equals the OCI layer application computed on its own")),
    "test_snapshotters_crossed": (
        "4", "snapshotters crossed with daemons, through containerd 2.x",
        ("upstream `containerd-nydus-grpc` (v0.16.1) with pynydusd as its "
         "`daemon.nydusd_path`, our snapshotter with upstream `nydusd`, each in dedicated "
         "and shared mode: `crictl` pulls a Nydus image from `pynydus convert` lazily "
         "(no file data leaves the registry at pull), a pod's container checks its files "
         "(content, sha256, modes, links, whiteouts) served by the crossed daemon (its "
         "command line as `ps` shows it), and after a snapshotter restart the container "
         "keeps reading and a new one starts")),
    "test_daemon_api": (
        "5", "the nydusd HTTP API across implementations",
        ("upstream `nydusctl` against pynydusd, our manager against upstream `nydusd`")),
    "test_dropin_cli": (
        "6", "drop-in `nydus-image` against upstream's",
        ("our `nydus-image` and upstream's on the same inputs: `-J` documents, check "
         "reports, `inspect -R` answers, unpacked tars, exit codes")),
    "test_zran": (
        "7", "ZRAN (`targz-ref`, `--oci-ref`) images both ways",
        ("upstream's `create -t targz-ref` (separate meta blob) and its registry form "
         "(`--blob-inline-meta --features blob-toc` + `merge --blob-digests`) read by our "
         "reader and served by pynydusd; ours (`image build --type targz-ref`, with and "
         "without `--blob-inline-meta`, our merge) pass upstream's `check` and are served "
         "by upstream `nydusd`; merges crossed; text beside incompressible data so that "
         "contexts start mid-byte before stored blocks; two-member gzip layers")),
}

NOT_APPLICABLE = [
    ("1", "`--batch-size` (batch chunks)",
     ("nydus-image 2.2 has no `--batch-size`; our reader and pynydusd decode batch chunks "
      "(unit-tested against the format, tests/unit/rafs/test_rafs_spans_inline.py and "
      "tests/unit/daemon/test_blobcache.py)")),
    ("1", "`--type tar-tarfs`", "nydus-image 2.2 has no tarfs conversion type"),
    ("1", "multi-blob `nydus-image unpack`",
     ("2.2's unpack reads a blob given with `-b` or, with `--backend-config`, the blob "
      "named `unpacker` only (a hard-coded id), so the unpack comparison runs on "
      "single-blob images")),
    ("3", "hardlink to a lower layer, our layers merged by upstream",
     ("upstream has no form for it (its builder refuses such a layer, see the xfail "
      "above); our per-layer bootstrap marks the link for our merge to bind "
      "(docs/decisions.md), which upstream's merge does not know")),
    ("issue 11's 6", ("converters crossed (nydusify's output through our snapshotter, "
                      "`nydusify check` of ours)"),
     ("cannot run here: nydusify is not installable by name, the Go module proxy answers "
      "403 for its module under either path (`scripts/peers.sh nydusify` reports it; "
      "docs/decisions.md \"nydusify by name\" has the answers and dates)")),
]


@dataclass
class Row:
    cell: str
    name: str
    outcome: str  # pass | FAIL | upstream bug | skipped
    seconds: float
    note: str


def _label(name: str) -> str:
    m = re.match(r"test_(\w+?)(?:\[(.*)\])?$", name)
    if not m:
        return name
    base, param = m.group(1).replace("_", " "), m.group(2)
    return f"{param} ({base})" if param else base


def parse(xml_path: Path) -> tuple[list[Row], float]:
    root = ET.parse(xml_path).getroot()
    rows: list[Row] = []
    for tc in root.iter("testcase"):
        module = (tc.get("classname") or "").rsplit(".", 1)[-1]
        if module not in CELLS:
            continue
        name = tc.get("name", "")
        failure = tc.find("failure")
        error = tc.find("error")
        skipped = tc.find("skipped")
        if failure is not None or error is not None:
            el = failure if failure is not None else error
            assert el is not None
            msg = (el.get("message") or "").strip().splitlines()
            outcome, note = "FAIL", (msg[0] if msg else "")[:300]
        elif skipped is not None and skipped.get("type") == "pytest.xfail":
            note = (skipped.get("message") or "").strip()
            # A feature the pinned upstream predates fails the same way as a bug there.
            outcome = "not in upstream 2.2" if "predate" in note else "upstream bug"
        elif skipped is not None:
            outcome, note = "skipped", (skipped.get("message") or "").strip()
        else:
            outcome, note = "pass", ""
        rows.append(Row(CELLS[module][0], _label(name), outcome, float(tc.get("time", 0)), note))
    # The cells' own time (the report may hold other tests too); fixture set-up is in it.
    return rows, sum(r.seconds for r in rows)


def render(rows: list[Row], total: float, when: str, source: str) -> str:
    out = [
        "# Compatibility with upstream Nydus",
        "",
        ("Written by `scripts/compat-report.py` from the last run of `tests/compat` "
         f"({when}; {source}). Do not edit by hand: run the script (it keeps the "
         f"hand-written section \"{HAND_WRITTEN[3:]}\" at the end as it is)."),
        "",
        ("Referee: upstream nydus-rs **2.2.0** (`nydus-image`, `nydusd`, `nydusctl`) and "
         "nydus-snapshotter **v0.16.1** (`containerd-nydus-grpc`), the versions pinned in "
         "`scripts/peers.lock` and installed by `scripts/peers.sh` (the newest releases on "
         "crates.io and the Go module proxy). \"upstream bug\" is a strict xfail: the cell "
         "fails because upstream does, with the output quoted; it turns red when upstream "
         "stops failing."),
        "",
    ]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    out += [f"**{len(rows)} cells: {summary}; {total:.0f} s for tests/compat.**", ""]
    for cell, title, what in CELLS.values():
        mine = [r for r in rows if r.cell == cell]
        out += [f"## Cell {cell}: {title}", "", what + ".", "",
                "| case | result | s |", "|---|---|---|"]
        for r in mine:
            out.append(f"| {r.name} | {r.outcome} | {r.seconds:.1f} |")
        notes = [r for r in mine if r.note]
        if notes:
            out += ["", "Why (failures and upstream bugs):", ""]
            for r in notes:
                out.append(f"- **{r.name}** ({r.outcome}): {r.note}")
        out.append("")
    out += ["## Not applicable with upstream 2.2, or not runnable here", "",
            "| cell | case | why |", "|---|---|---|"]
    for cell, case, why in NOT_APPLICABLE:
        out.append(f"| {cell} | {case} | {why} |")
    out.append("")
    return "\n".join(out)


def hand_written(old: str) -> str:
    """The hand-written section of an earlier report (from its heading on), or ""."""
    at = old.find("\n" + HAND_WRITTEN + "\n")
    return old[at + 1:] if at >= 0 else ""


def write(path: Path, matrix: str) -> None:
    """``matrix`` to ``path``, followed by the hand-written section ``path`` had."""
    tail = hand_written(path.read_text()) if path.exists() else ""
    path.write_text(matrix + ("\n" + tail if tail else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("junit", nargs="?", help="pytest --junitxml report of tests/compat "
                    "(default: run tests/compat now)")
    ap.add_argument("-o", "--output", default=str(REPO / "docs" / "compat.md"))
    args = ap.parse_args()
    if args.junit:
        xml = Path(args.junit)
        source = f"report {xml.name}"
    else:
        xml = Path(tempfile.mkstemp(prefix="compat-", suffix=".xml")[1])
        py = REPO / ".venv" / "bin" / "python"
        subprocess.run([str(py if py.exists() else sys.executable), "-m", "pytest",
                        "tests/compat", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"],
                       cwd=REPO, check=False)
        source = "run by the script"
    rows, total = parse(xml)
    if not rows:
        print(f"compat-report: no tests/compat results in {xml}", file=sys.stderr)
        return 1
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(os.path.getmtime(xml)))
    write(Path(args.output), render(rows, total, when, source))
    print(f"wrote {args.output}: {len(rows)} cells")
    return 1 if any(r.outcome == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
