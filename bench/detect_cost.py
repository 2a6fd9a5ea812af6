#!/usr/bin/env python3
"""What referrer/index detection adds to a plain OCI pull (issue 16: <= 50 ms per image).

For ``-n`` images without a Nydus form, pushed to two private registries, one open and
one wanting a token (distribution token auth, the tests' JWT token server): the time of
``Detector.find`` for each image's first layer (the one lookup an image costs; its other
layers are answered from the cache), the two registries alternating image by image, each
going first on every other image.
The first lookup of the process (imports, first connection) is reported apart.

    bench/detect_cost.py            # 20 images
    bench/detect_cost.py -n 50 --json out.json
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pynydus import labels as L
from pynydus.registry import Credentials, RegistryClient
from pynydus.snapshot import detect
from tests.harness import oci
from tests.harness.registry import Registry
from tests.integration.convert.conftest import layer_blob, push_layers
from tests.integration.registry.servers import TokenServer

USER, PASSWORD = "alice", "wonderland"
TARGET_MS = 50.0


def push(reg: Registry, n: int, auth: str | None) -> list[dict[str, str]]:
    out = []
    with RegistryClient(reg.host, scheme="http", auth=auth) as c:
        for i in range(n):
            digest, _, _ = push_layers(c, f"det/img{i}", "v1", [layer_blob(
                oci.Layer(f"l{i}").file(f"etc/img{i}", f"{i}\n"), "gzip")])
            out.append({L.CRI_IMAGE_REF: reg.ref(f"det/img{i}", "v1"),
                        L.CRI_MANIFEST_DIGEST: digest,
                        L.CRI_LAYER_DIGEST: "sha256:" + "0" * 64})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="pyn-detcost-") as tmp:
        ts = TokenServer(Path(tmp), users={USER: PASSWORD})
        try:
            with Registry(tag="detp") as open_reg, \
                    Registry(tag="dett", auth_yaml=ts.registry_auth_yaml()) as tok_reg:
                b64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                images = {"open": push(open_reg, a.n, None), "token": push(tok_reg, a.n, b64)}
                dets = {
                    "open": detect.Detector(referrer=True, index=True, client_factory=(
                        detect.client_factory(creds=lambda r, lb: None))),
                    "token": detect.Detector(referrer=True, index=True, client_factory=(
                        detect.client_factory(creds=lambda r, lb: Credentials(USER,
                                                                              PASSWORD)))),
                }
                ms: dict[str, list[float]] = {"open": [], "token": []}
                for i in range(a.n):  # alternating, each registry first on every other image
                    for kind in ("open", "token")[::1 if i % 2 == 0 else -1]:
                        t0 = time.perf_counter()
                        assert dets[kind].find(images[kind][i]) is None
                        ms[kind].append((time.perf_counter() - t0) * 1000)
                issued = ts.issued
        finally:
            ts.stop()
    rows = []
    print("| registry | lookups | first ms | median ms | min..max ms (after the first) | "
          "target |")
    print("|---|---:|---:|---:|---:|---|")
    for kind, v in ms.items():
        rest = v[1:]
        med = statistics.median(rest)
        rows.append({"registry": kind, "first_ms": round(v[0], 1), "median_ms": round(med, 1),
                     "min_ms": round(min(rest), 1), "max_ms": round(max(rest), 1)})
        ok = "PASS" if med <= TARGET_MS else "FAIL"
        print(f"| {kind} | {len(v)} | {v[0]:.1f} | **{med:.1f}** | {min(rest):.1f}.."
              f"{max(rest):.1f} | {ok} <= {TARGET_MS:.0f} ms |")
    print(f"tokens issued: {issued}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
