#!/usr/bin/env python3
"""What a ZRAN meta blob is made of, layer by layer, for a given pynydus build.

For each gzip layer of a lab image's OCI layout (``bench/lazy_images.py``, under
``$PYNYDUS_BENCH_DIR/oci/<name>``, read only): ``image build --type targz-ref
--blob-inline-meta`` (plus ``--build-args``) by the pynydus of ``--python`` (default: this
checkout's; another checkout's venv python measures that version), then the meta blob's
parts as ``bench/zran_size.py`` splits them (TOC sections; framed chunk info into its
head and windows). No registry: what the builder writes, not what a conversion pushes.

    bench/zran_meta_parts.py --image many-files
    bench/zran_meta_parts.py --image large --python /work/main/.venv/bin/python
    bench/zran_meta_parts.py --image many-files --build-args=--lean-meta
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

from bench.zran_size import WORK, meta_parts


def layers(layout: Path) -> list[Path]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs/sha256" / digest).read_text())
    return [layout / "blobs/sha256" / d["digest"].split(":", 1)[1] for d in manifest["layers"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="many-files")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--build-args", default="")
    a = ap.parse_args()
    total: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="pyn-zmp-") as tmp:
        for i, layer in enumerate(layers(WORK / "oci" / a.image)):
            blobs = Path(tmp) / f"b{i}"
            t0 = time.monotonic()
            subprocess.run([a.python, "-m", "pynydus.cli.main", "image", "build", "--type",
                            "targz-ref", "--blob-inline-meta", *a.build_args.split(),
                            "--bootstrap", f"{tmp}/l{i}.boot", "--blob-dir", str(blobs),
                            "--progress", "quiet", str(layer)], check=True,
                           env={**os.environ, "PYTHONPATH": ""})
            took = time.monotonic() - t0
            for meta in blobs.iterdir():
                parts = meta_parts(meta)
                print(f"layer {i} ({layer.stat().st_size:,} B gz, built in {took:.1f} s): "
                      + ", ".join(f"{k.strip()} {v:,}" for k, v in parts.items()))
                for k, v in parts.items():
                    total[k] = total.get(k, 0) + v
    print("| part | bytes |")
    print("|---|---:|")
    for k, v in total.items():
        print(f"| {k.strip()} | {v:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
