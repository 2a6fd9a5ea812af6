"""Property: merging per-layer images equals applying the OCI layers to a directory.

Random layers over a tiny name space (so paths collide across layers) mix files,
directories, ``.wh.NAME`` and ``.wh..wh..opq``, including a whiteout and a new entry
for the same name in one layer. Each layer is built on its own — with the default
overlayfs whiteout form and with ``whiteout_spec="none"`` (OCI names kept) — then
merged, and also chained with ``parent_bootstrap``. The reader's view of the
result must equal a plain model of OCI layer application: a layer's whiteouts hide
only what lower layers hold, then its entries are added (a directory over a
directory merges, anything else replaces).
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynydus.rafs.builder import build
from pynydus.rafs.merge import merge
from pynydus.rafs.read import open_bootstrap

Op = tuple[str, str, int]  # (kind: dir|file|wh|opq, path, content id)

NAMES = ["a", "b", "c"]


@st.composite
def layer(draw: st.DrawFn) -> list[Op]:
    ops: list[Op] = []
    used: dict[str, str] = {}
    for _ in range(draw(st.integers(1, 8))):
        depth = draw(st.integers(1, 3))
        parts = [draw(st.sampled_from(NAMES)) for _ in range(depth)]
        path = "/".join(parts)
        # no entry below a non-directory of this same layer, and one entry per path
        prefixes = ["/".join(parts[:i]) for i in range(1, depth)]
        if any(used.get(p) == "file" for p in prefixes) or path in used:
            continue
        kind = draw(st.sampled_from(["dir", "file", "file", "wh", "opq"]))
        if kind == "file" and any(k.startswith(path + "/") for k in used):
            continue
        if kind == "wh":
            wh_path = "/".join([*parts[:-1], ".wh." + parts[-1]])
            if wh_path in used:
                continue
            used[wh_path] = "wh"
            ops.append(("wh", wh_path, 0))
            continue
        if kind == "opq":
            opq = "/".join([*parts[:-1], ".wh..wh..opq"])
            if opq in used:
                continue
            used[opq] = "opq"
            ops.append(("opq", opq, 0))
            continue
        for p in prefixes:
            if p not in used:
                used[p] = "dir"
        used[path] = kind
        ops.append((kind, path, draw(st.integers(0, 3))))
    return ops


def _tar(ops: list[Op]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, path, cid in ops:
            t = tarfile.TarInfo(path)
            t.mtime = 1_000 + cid
            if kind == "dir":
                t.type, t.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(t)
            else:
                data = b"content %d" % cid if kind == "file" else b""
                t.size = len(data)
                tf.addfile(t, io.BytesIO(data))
    return buf.getvalue()


def _model(layers: list[list[Op]]) -> dict[str, tuple[str, int]]:
    state: dict[str, tuple[str, int]] = {}

    def drop_below(prefix: str) -> None:
        for p in [p for p in state if p.startswith(prefix + "/")]:
            del state[p]

    for ops in layers:
        lower = dict(state)
        for kind, path, _ in ops:  # whiteouts first: they only see lower layers
            parent, _, name = path.rpartition("/")
            if kind == "opq":
                for p in [p for p in lower if parent == "" or p.startswith(parent + "/")]:
                    if p != parent:
                        state.pop(p, None)
            elif kind == "wh":
                target = (parent + "/" if parent else "") + name[len(".wh.") :]
                state.pop(target, None)
                drop_below(target)
        for kind, path, cid in ops:
            parts = path.split("/")
            for i in range(1, len(parts)):
                p = "/".join(parts[:i])
                if state.get(p, ("dir", 0))[0] != "dir":
                    drop_below(p)
                state.setdefault(p, ("dir", -1))
                if state[p][0] != "dir":
                    state[p] = ("dir", -1)
            if kind in ("wh", "opq"):
                continue  # a whiteout implies its directory, nothing else
            old = state.get(path)
            if kind == "dir":
                if old is None or old[0] != "dir":
                    drop_below(path)
                state[path] = ("dir", cid)
            else:
                drop_below(path)
                state[path] = ("file", cid)
    return state


def _view(boot: Path) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    with open_bootstrap(boot) as bs:
        for path, ino in bs.walk():
            if path == b"/":
                continue
            st_ = bs.stat(ino)
            if st_.is_dir:
                out[path[1:].decode()] = ("dir", -2)
            else:
                assert st_.is_reg, path
                out[path[1:].decode()] = ("file", st_.mtime - 1_000)
    return out


def _kinds(d: dict[str, tuple[str, int]]) -> dict[str, tuple[str, int]]:
    return {p: (k, c if k == "file" else -2) for p, (k, c) in d.items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(layer(), min_size=1, max_size=4), spec=st.sampled_from(["overlayfs", "none"]))
def test_merge_equals_oci_layer_application(layers: list[list[Op]], spec: str) -> None:
    expected = _kinds(_model(layers))
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        boots = []
        for i, ops in enumerate(layers):
            boot = work / f"l{i}.boot"
            build(io.BytesIO(_tar(ops)), boot, work / "blobs", type="tar-rafs", whiteout_spec=spec)
            boots.append(boot)
        merge(boots, work / "merged")
        assert _view(work / "merged") == expected
        # chaining with parent bootstraps gives the same tree; the bottom layer has
        # nothing below it, so it is built with whiteouts dropped ("oci")
        prev = None
        for i, ops in enumerate(layers):
            boot = work / f"c{i}.boot"
            build(io.BytesIO(_tar(ops)), boot, work / "blobs", type="tar-rafs",
                  whiteout_spec=spec if prev else "oci", parent_bootstrap=prev)
            prev = boot
        assert _view(prev) == expected  # type: ignore[arg-type]
