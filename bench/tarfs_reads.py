#!/usr/bin/env python3
"""Reads of a tarfs image through its mounts against the same layers unpacked on overlayfs,
outside containerd: where the large-file read time of ``fs_driver = "blockdev"`` goes.

The image's layers (an OCI layout from ``bench/lazy_images.py``, default ``large``) are
converted once as the tarfs driver converts them (``tar-tarfs`` bootstraps over the layer
tars) and unpacked once with ``tar -x`` (what containerd's overlayfs unpack leaves). Each
mode then mounts them as the container would see them (an overlay whose lower dirs are the
per-layer EROFS mounts, or the unpacked directories, with an empty upper dir as a
container's rootfs has; read-only, without one, before 8 Dec 2026) and times, inside one
process:

  walk first / warm   lstat of every entry below the mount, twice;
  read first / warm   every file below ``--read-dir`` (default ``/opt``) read whole with a
                      1 MiB buffer, twice.

Before each mode's first pass the sources are made as the pull leaves them: with
``--source hot`` (default) the tars (tarfs) or the unpacked files (overlayfs) are read
once so that their pages are cached, as right after a pull; with ``--source cold`` their
pages are evicted (``POSIX_FADV_DONTNEED`` on each file: the rest of the machine's page
cache is left alone). A new mount starts with an empty EROFS page cache.

Modes (``--modes``): ``overlayfs`` (the baseline), ``file`` (EROFS file-backed mounts, the
driver's default), ``file-dio`` (the same with EROFS's ``directio`` option: the tar is read
with direct I/O, not through its page cache), ``file-dio-warm`` (``file-dio`` with each
layer's tree looked up once before the overlay is mounted, as the driver does after a
conversion: ``tarfs/warm.py``), ``image-dio`` (the layer bootstraps merged into one, mounted
once with every tar, as ``mount_mode = "image"``: one lower dir for the overlay),
``loop`` (auto-clearing loop devices), ``loop-dio`` (loop devices with
``LO_FLAGS_DIRECT_IO``).

``--meta cold`` also empties the kernel's metadata caches of both sides before each pass,
without dropping the machine's: the unpacked trees live in an ext4 file system of their
own (a loop-mounted image under the work directory) that is unmounted, its image's pages
dropped, and mounted again; the bootstraps' pages are dropped (a new EROFS mount caches
nothing yet). The remount drops the unpacked files' pages too: use it with ``--source
cold``. ``--meta hot`` (default) leaves the unpacked trees' dentries and inodes as
the unpack (or the last pass) left them, as after containerd's overlayfs unpack. ``--ra-kb N`` sets the read-ahead
of every EROFS mount's bdi (file-backed) or loop device to N KiB (0: the kernel's 128).
Modes alternate, each going first in turn; medians of ``-n`` repetitions; wall seconds and
the reader's CPU seconds (user + system; a loop device's worker threads are not in it).

    bench/tarfs_reads.py -n 3
    bench/tarfs_reads.py -n 3 --modes overlayfs,file,file-dio --source cold --ra-kb 1024
    bench/tarfs_reads.py -n 5 --image many-files --read-dir /data \
        --modes overlayfs,file-dio,file-dio-warm --source cold --meta cold
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from pynydus.host import erofs
from pynydus.rafs.builder import build
from pynydus.tarfs.warm import cache_tree

BENCH_DIR = Path(os.environ.get("PYNYDUS_BENCH_DIR", "/var/tmp/pynydus-bench"))
WORK = Path("/var/tmp/pyn-tarfs-reads")
MiB = 1 << 20
MODES = ("overlayfs", "file", "file-dio", "file-dio-warm", "image-dio", "loop", "loop-dio")


def layers_of(layout: Path) -> list[Path]:
    """The layer blobs of an OCI layout's ``latest`` manifest, bottom first."""
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs/sha256" / digest).read_text())
    return [layout / "blobs/sha256" / layer["digest"].split(":", 1)[1]
            for layer in manifest["layers"]]


def prepare(image: str, unpack_root: Path | None = None) -> list[tuple[Path, Path, Path]]:
    """(bootstrap, tar, unpacked dir) of each layer, bottom first; made once. The trees
    are unpacked below ``unpack_root`` if given (else beside the bootstraps)."""
    out = []
    for i, blob in enumerate(layers_of(BENCH_DIR / "oci" / image)):
        d = WORK / image / f"{i}-{blob.name[:12]}"
        boot = d / "layer.boot"
        unpacked = (unpack_root / d.name if unpack_root else d) / "rootfs"
        if not boot.exists():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            r = build(str(blob), str(d / "boot.tmp"), str(d), type="tar-tarfs")
            (d / "boot.tmp").rename(boot)
            Path(r.blobs[0].path or "").rename(d / "layer.tar")
        done = unpacked.parent / "unpacked.done"
        if not done.exists():
            shutil.rmtree(unpacked, ignore_errors=True)
            unpacked.mkdir(parents=True)
            subprocess.run(["tar", "-xf", str(blob), "-C", str(unpacked), "--numeric-owner"],
                           check=True)
            done.touch()
        out.append((boot, d / "layer.tar", unpacked))
    return out


class UnpackFs:
    """An ext4 file system of the benchmark's own for the unpacked trees (``--meta cold``):
    remounting it empties its dentries, inodes and pages and nobody else's."""

    def __init__(self, image: str) -> None:
        self.img = WORK / f"{image}.ext4"
        self.mnt = WORK / f"{image}.ext4.d"

    def __enter__(self) -> Self:
        if not self.img.exists():
            size = sum(p.stat().st_size for p in layers_of(BENCH_DIR / "oci" / self.img.stem))
            with open(self.img, "wb") as f:
                f.truncate(4 * size + (1 << 30))  # gzip layers unpack to ~3x
            # an inode per 4 KiB: many-files' 50,000 small files
            subprocess.run(["mkfs.ext4", "-q", "-F", "-i", "4096", str(self.img)], check=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "loop", str(self.img), str(self.mnt)], check=True)
        return self

    def remount(self) -> None:
        subprocess.run(["umount", str(self.mnt)], check=True)
        drop_pages([self.img])
        subprocess.run(["mount", "-o", "loop", str(self.img), str(self.mnt)], check=True)

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", str(self.mnt)], check=False)


def drop_pages(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_below(root: Path) -> Iterator[str]:
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                yield p


def set_source(paths: list[Path], hot: bool) -> None:
    """Cache (read) or evict (DONTNEED) every file of ``paths`` (files or trees)."""
    for p in paths:
        for f in ([str(p)] if p.is_file() else files_below(p)):
            fd = os.open(f, os.O_RDONLY)
            try:
                if hot:
                    while os.read(fd, 4 * MiB):
                        pass
                else:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@contextmanager
def mounted(mode: str, layers: list[tuple[Path, Path, Path]], base: Path,
            ra_kb: int) -> Iterator[Path]:
    base.mkdir(parents=True, exist_ok=True)
    mnt = base / "mnt"
    mnt.mkdir(exist_ok=True)
    with ExitStack() as stack:
        if mode == "overlayfs":
            lowers = [str(u) for _, _, u in reversed(layers)]
        elif mode == "image-dio":
            boot, tars = merged(layers)
            m = base / "image"
            m.mkdir(exist_ok=True)
            erofs.mount_erofs(str(boot), tars, str(m), "file", direct_io=True,
                              read_ahead_kb=ra_kb or None)
            stack.callback(erofs.umount_erofs, str(m))
            lowers = [str(m)]
        else:
            lowers = []
            for i, (boot, tar, _) in enumerate(layers):
                m = base / f"l{i}"
                m.mkdir(exist_ok=True)
                backing: erofs.Backing = "loop" if mode.startswith("loop") else "file"
                erofs.mount_erofs(str(boot), [str(tar)], str(m), backing,
                                  direct_io="-dio" in mode, read_ahead_kb=ra_kb or None)
                stack.callback(erofs.umount_erofs, str(m))
                if mode.endswith("-warm"):
                    cache_tree(str(m))
                lowers.insert(0, str(m))
        # an empty upper dir, as a container's rootfs (and one lower is then enough)
        upper, work = base / "upper", base / "work"
        upper.mkdir(exist_ok=True)
        work.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}",
                        str(mnt)], check=True)
        stack.callback(subprocess.run, ["umount", str(mnt)], check=False)
        yield mnt


def merged(layers: list[tuple[Path, Path, Path]]) -> tuple[Path, list[str]]:
    """The layers' bootstraps merged (made once) and its tars in its device order."""
    from pynydus.rafs.merge import merge
    from pynydus.rafs.read import open_bootstrap

    out = layers[0][0].parent.parent / "image.boot"
    if not out.exists():
        merge([str(b) for b, _, _ in layers], str(out) + ".tmp")
        os.rename(str(out) + ".tmp", out)
    tars = {}
    for boot, tar, _ in layers:
        with open_bootstrap(str(boot)) as bs:
            tars[bs.blobs[0].blob_id] = str(tar)
    with open_bootstrap(str(out)) as bs:
        return out, [tars[b.blob_id] for b in bs.blobs]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn: Callable[[], int]) -> tuple[float, float, int]:
    c0, t0 = cpu(), time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, cpu() - c0, n


def walk(root: Path) -> int:
    n = 0
    for dirpath, dirnames, names in os.walk(root):
        for name in dirnames + names:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def read_all(root: Path) -> int:
    buf = bytearray(MiB)
    n = 0
    for f in sorted(files_below(root)):
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(buf):
                n += k
    return n


def one(mode: str, layers: list[tuple[Path, Path, Path]], args: argparse.Namespace,
        rep: int, unpack_fs: UnpackFs | None) -> dict[str, tuple[float, float]]:
    sources = [u for _, _, u in layers] if mode == "overlayfs" else [t for _, t, _ in layers]
    set_source(sources, args.source == "hot")
    if unpack_fs is not None:  # --meta cold, after set_source's walk of the sources
        if mode == "overlayfs":
            unpack_fs.remount()
        else:
            drop_pages([b for b, _, _ in layers])
    out = {}
    with mounted(mode, layers, WORK / f"m{os.getpid()}-{mode}-{rep}", args.ra_kb) as mnt:
        for phase in ("first", "warm"):
            wall, c, _ = timed(lambda: walk(mnt))
            out[f"walk {phase}"] = (wall, c)
        target = mnt / args.read_dir.lstrip("/")
        for phase in ("first", "warm"):
            wall, c, n = timed(lambda: read_all(target))
            out[f"read {phase}"] = (wall, c)
        out["bytes"] = (float(n), 0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image", default="large")
    p.add_argument("--read-dir", default="/opt")
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--modes", default="overlayfs,file,file-dio")
    p.add_argument("--source", choices=["hot", "cold"], default="hot")
    p.add_argument("--ra-kb", type=int, default=0)
    p.add_argument("--meta", choices=["hot", "cold"], default="hot")
    p.add_argument("--json")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            p.error(f"mode {m!r}: expected some of {', '.join(MODES)}")
    with ExitStack() as stack:
        unpack_fs = stack.enter_context(UnpackFs(args.image)) if args.meta == "cold" else None
        layers = prepare(args.image, unpack_fs.mnt if unpack_fs else None)
        runs: dict[str, list[dict[str, tuple[float, float]]]] = {m: [] for m in modes}
        for rep in range(args.n):
            k = rep % len(modes)
            for m in modes[k:] + modes[:k]:
                runs[m].append(one(m, layers, args, rep, unpack_fs))
                shutil.rmtree(WORK / f"m{os.getpid()}-{m}-{rep}", ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"# {args.image}, source {args.source}, metadata {args.meta}, read-ahead "
          f"{args.ra_kb or 'default'} KiB, n={args.n}, load1 {load:.1f}")
    phases = ["walk first", "walk warm", "read first", "read warm"]
    print("| mode | " + " | ".join(f"{ph} s [min] (cpu)" for ph in phases) + " |")
    print("|---|" + "---:|" * len(phases))
    base = modes[0]
    med: dict[str, dict[str, tuple[float, float]]] = {}
    for m in modes:
        med[m] = {ph: (statistics.median(r[ph][0] for r in runs[m]),
                       statistics.median(r[ph][1] for r in runs[m])) for ph in phases}
        cells = []
        for ph in phases:
            w, c = med[m][ph]
            ratio = f" {w / med[base][ph][0]:.2f}x" if m != base and med[base][ph][0] else ""
            low = min(r[ph][0] for r in runs[m])
            cells.append(f"{w:.3f}{ratio} [{low:.3f}] ({c:.2f})")
        print(f"| {m} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
