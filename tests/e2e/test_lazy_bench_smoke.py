"""The lazy-pull benchmark must keep running: ``bench/lazy_pull.py --quick``.

Small image only, one repetition, loopback and the 100 Mbit/s proxy, overlayfs, nydus
in both daemon modes and the upstream peer (containerd-nydus-grpc + nydusd) in both
(stargz too when its peer binary is already built: the smoke never compiles Go).
Checks the shape of the report, not the figures: every mode produced a row with a
ratio against overlayfs measured in the same run, each nydus mode a ratio against
upstream's in the same daemon mode, and every Nydus mode fetched its data at run time,
not at pull time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import tools

REPO = Path(__file__).resolve().parents[2]


def test_lazy_pull_quick_prints_ratios(tmp_path: Path) -> None:
    tools.require("/usr/bin/ctr-remote", "skopeo", "pigz")
    out_json = tmp_path / "lazy.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "lazy_pull.py"), "--quick",
                        "--no-build-stargz", "--json", str(out_json)],
                       capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    data = json.loads(out_json.read_text())
    rows = {(row["network"], row["mode"]): row for row in data["rows"]}
    for net in ("loopback", "100mbit"):
        for mode in ("overlayfs", "nydus", "nydus-shared", "upstream", "upstream-shared"):
            row = rows[(net, mode)]
            assert row["image"] == "small" and row["n"] == 1
            assert row["total_s"] > 0 and row["x_vs_overlayfs"] > 0
        assert rows[(net, "overlayfs")]["fetched_pull"] > 1e6  # the whole image at pull
        for mode in ("nydus", "nydus-shared", "upstream", "upstream-shared"):
            nydus = rows[(net, mode)]
            # bootstrap only, then lazily
            assert nydus["fetched_pull"] < 0.2e6 < nydus["fetched_run"], (mode, nydus)
    assert "| loopback | small | nydus |" in r.stdout
    assert "vs overlayfs" in r.stdout
    # every printed figure and ratio is the JSON's: the quotient of its figures
    printed = {(c[0], c[1], c[2]): c for c in
               ([x.strip() for x in ln.split("|")[1:-1]] for ln in r.stdout.splitlines()
                if ln.startswith("| ") and ln.count("|") == 12)}
    for (net, mode), row in rows.items():
        cells = printed[(net, "small", mode)]
        base = rows[(net, "overlayfs")]["total_s"]
        assert cells[5] == f"**{row['total_s']:.2f}**", cells
        want = "1.00x (base)" if mode == "overlayfs" else f"{base / row['total_s']:.2f}x"
        assert cells[7] == want, cells
        assert row["x_vs_overlayfs"] == base / row["total_s"]
        fetched = row["fetched_pull"] + row["fetched_run"]
        assert row["fetched"] == fetched
        assert cells[10] == f"{fetched / row['workload_read']:.2f}", cells
    # ours against upstream's snapshotter + nydusd in the same daemon mode
    vs = {(c[0], c[2]): c for c in
          ([x.strip() for x in ln.split("|")[1:-1]] for ln in r.stdout.splitlines()
           if ln.startswith("| ") and ln.count("|") == 9)}
    for net in ("loopback", "100mbit"):
        for mode, peer in (("nydus", "upstream"), ("nydus-shared", "upstream-shared")):
            cells, row = vs[(net, mode)], rows[(net, mode)]
            assert cells[4] == peer
            assert row["vs_upstream"] == row["total_s"] / rows[(net, peer)]["total_s"]
            assert cells[6] == f"{row['vs_upstream']:.2f}x", cells
            assert f"{mode} pull+run {row['vs_upstream']:.2f}x upstream's {peer}" in r.stdout


def test_lazy_pull_tarfs_walk_quick(tmp_path: Path) -> None:
    """The tarfs modes (docs/tarfs.md; ``tarfs-nowarm``: ``warm_metadata = false``)
    against overlayfs, with ``--walk``: the layers come once (the snapshotter fetches
    them in the background from the layer's Prepare: within the pull's window or after
    it, as the machine's load decides), and the walk figures of every mode come back
    with their ratio to overlayfs's."""
    tools.require("/usr/bin/ctr-remote", "skopeo", "pigz")
    out_json = tmp_path / "tarfs.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "lazy_pull.py"), "--quick",
                        "--modes", "overlayfs,tarfs,tarfs-nowarm", "--networks", "loopback", "--walk",
                        "--json", str(out_json)],
                       capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    data = json.loads(out_json.read_text())
    rows = {row["mode"]: row for row in data["rows"]}
    once = rows["overlayfs"]["fetched_pull"]  # containerd's pull: every layer, once
    tarfs = rows["tarfs"]["fetched_pull"] + rows["tarfs"]["fetched_run"]
    assert 0.9 * once <= tarfs <= 1.1 * once + 0.2e6, (tarfs, once)
    for mode in ("tarfs", "tarfs-nowarm"):
        assert rows[mode]["x_vs_overlayfs"] > 0
    samples = {s["mode"]: s for s in data["samples"]}
    for mode in ("overlayfs", "tarfs", "tarfs-nowarm"):
        assert set(samples[mode]["extra"]) == {"walk_first", "walk_warm", "read_first",
                                               "read_warm"}, samples[mode]
    assert "| loopback | small | tarfs | " in r.stdout
    assert "| loopback | small | tarfs-nowarm | " in r.stdout
    assert "walk_first s (vs overlayfs)" in r.stdout
