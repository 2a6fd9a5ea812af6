#!/usr/bin/env python3
"""What ZRAN adds to a registry: ``pynydus convert --oci-ref`` beside ``pynydus convert``.

For each lab image (OCI layouts written by ``bench/lazy_images.py`` under
``$PYNYDUS_BENCH_DIR/oci/<name>``, read only), in a private registry: push the OCI
image, convert it both ways, and report the bytes each conversion pushed (for ZRAN:
the meta blobs, the bootstrap layer, config and manifest; the data layers are the OCI
ones) as a fraction of the image's compressed layers, and the conversion times.
Target (issue 16): ZRAN metadata <= 5% of the image's compressed size.

A second table splits what the meta blobs hold (their TOC sections; the chunk info
into its head, entries and contexts, and its window frames) and what the bootstrap
layer's merged bootstrap is made of.

    bench/zran_size.py                          # large, many-files, small
    bench/zran_size.py --images small --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pynydus.convert.pack import bootstrap_from_layer, read_toc
from pynydus.rafs.format import layout as L
from pynydus.rafs.format.zran import framed_index_size, parse_framed_ci
from tests.harness.registry import Registry

WORK = Path(os.environ.get("PYNYDUS_BENCH_DIR", "/var/tmp/pynydus-bench"))
TARGET = 0.05


def convert(src: str, dst: str, cache: str, *extra: str) -> tuple[dict, float]:
    out = Path(cache) / f"summary-{time.monotonic_ns()}.json"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "pynydus.cli.main", "convert", "--source", src,
                    "--target", dst, "--source-insecure", "--target-insecure",
                    "--cache-dir", cache, "--output-json", str(out), *extra],
                   check=True, capture_output=True, timeout=3600)
    return json.loads(out.read_text())["images"][0], time.monotonic() - t0


def fetch_blob(reg: Registry, repo: str, digest: str) -> bytes:
    from pynydus.registry import RegistryClient

    with RegistryClient(reg.host, scheme="http") as c:
        return b"".join(c.get_blob(repo, digest))


def meta_parts(path: Path) -> dict[str, int]:
    """Bytes of each part of a ZRAN meta blob: its TOC sections, the chunk info split into
    index, head and windows when framed, and the rest (tar headers, the TOC)."""
    size = path.stat().st_size
    out: dict[str, int] = {}
    with open(path, "rb") as f:
        _, entries = read_toc(f, size)
        for e in entries:
            if e.entry_name == "image.blob":
                continue  # the gzip layer: not in the meta blob
            out[e.entry_name] = e.compressed_size
            if e.entry_name == "blob.meta":
                f.seek(e.compressed_offset)
                raw = f.read(e.compressed_size)
                n = framed_index_size(raw)
                if n is not None:
                    fr = parse_framed_ci(raw[:n], len(raw))
                    out["  ci index"] = n
                    out["  ci head (entries, contexts)"] = fr.head_size
                    out["  ci windows"] = sum(s for _, s in fr.windows)
                    out["  windows (count)"] = sum(1 for _, s in fr.windows if s)
    out["tar headers, TOC"] = size - sum(v for k, v in out.items() if not k.startswith(" "))
    out["meta blob total"] = size
    return out


def bootstrap_parts(layer: bytes) -> dict[str, int]:
    """Uncompressed bytes of a merged bootstrap's areas (v6): chunk table, blob table,
    the rest (inodes, dirents, names, chunk indexes), and the layer's gzip'ed size."""
    boot = bootstrap_from_layer(layer)
    ext = L.RafsV6SuperBlockExt.unpack(boot, L.RAFS_V6_EXT_SUPER_OFFSET)
    return {"bootstrap": len(boot), "chunk table": ext.chunk_table_size,
            "blob table": ext.blob_table_size,
            "inodes, dirents, names": len(boot) - ext.chunk_table_size - ext.blob_table_size,
            "layer (tar.gz)": len(layer)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="large,many-files,small")
    ap.add_argument("--oci-ref-args", default="",
                    help="more convert arguments for the ZRAN conversion, e.g. "
                         "--oci-ref-full-meta (nydusify's meta blobs)")
    ap.add_argument("--no-nydus", action="store_true", help="skip the plain conversion")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    with Registry(tag="zsz") as reg, tempfile.TemporaryDirectory(dir="/var/tmp",
                                                                  prefix="pyn-zsz-") as tmp:
        for name in a.images.split(","):
            layout = WORK / "oci" / name
            if not (layout / "index.json").exists():
                print(f"{name}: no layout at {layout} (run bench/lazy_images.py first)")
                return 2
            src = reg.ref(f"bench/{name}", "oci")
            subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet",
                            "--dest-tls-verify=false", "--preserve-digests",
                            f"oci:{layout}:latest", f"docker://{src}"], check=True, timeout=1800)
            zran, zs = convert(src, reg.ref(f"bench/{name}", "zran"), f"{tmp}/c-{name}-z",
                               "--oci-ref", *a.oci_ref_args.split())
            parts: dict[str, int] = {}
            for x in zran["layers"]:
                p = Path(f"{tmp}/c-{name}-z/blobs") / x["blob_digest"].split(":", 1)[1]
                for k, v in meta_parts(p).items():
                    parts[k] = parts.get(k, 0) + v
            parts.update(bootstrap_parts(fetch_blob(reg, f"bench/{name}",
                                                    zran["bootstrap"]["digest"])))
            nydus, ns = ({"layers": []}, 0.0) if a.no_nydus else convert(
                src, reg.ref(f"bench/{name}", "nydus"), f"{tmp}/c-{name}-n")
            oref = zran["oci_ref"]
            nydus_bytes = sum(x.get("blob_size", 0) for x in nydus["layers"])
            rows.append({"image": name, "oci_compressed": oref["source_layer_bytes"],
                         "zran_pushed": oref["pushed_bytes"],
                         "zran_meta_blobs": sum(x.get("blob_size", 0) for x in zran["layers"]),
                         "zran_bootstrap_layer": zran["bootstrap"]["size"],
                         "zran_fraction": oref["fraction_of_source"],
                         "nydus_blobs": nydus_bytes, "zran_convert_s": round(zs, 1),
                         "nydus_convert_s": round(ns, 1), "parts": parts})
    print("| image | OCI layers (gz) | ZRAN pushed | of which meta blobs / bootstrap layer | "
          "ZRAN / OCI | target | Nydus blobs | convert --oci-ref | convert |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        ok = "PASS" if r["zran_fraction"] <= TARGET else "FAIL"
        print(f"| {r['image']} | {r['oci_compressed'] / 1e6:.1f} MB | "
              f"{r['zran_pushed'] / 1e6:.2f} MB | {r['zran_meta_blobs'] / 1e6:.2f} / "
              f"{r['zran_bootstrap_layer'] / 1e6:.2f} MB | {100 * r['zran_fraction']:.2f}% | "
              f"{ok} <= {100 * TARGET:.0f}% | {r['nydus_blobs'] / 1e6:.1f} MB | "
              f"{r['zran_convert_s']:.1f} s | {r['nydus_convert_s']:.1f} s |")
    print()
    print("| image | part | bytes | of OCI |")
    print("|---|---|---:|---:|")
    for r in rows:
        for k, v in r["parts"].items():
            frac = "" if "count" in k else f"{100 * v / r['oci_compressed']:.2f}%"
            print(f"| {r['image']} | {k} | {v:,} | {frac} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
