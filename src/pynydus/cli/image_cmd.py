"""``pynydus image build|merge|inspect|check|unpack``: nydus-image's jobs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _int(text: str) -> int:
    return int(text, 0)  # 0x100000 as nydus-image writes it


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(text: str) -> int:
    """Bytes: a number, optionally with K/M/G/T (binary units, ``i``/``iB`` allowed)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        return int(t[: len(t) - len(unit)], 0) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected e.g. 64G") from None


def add_image(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("image", help="build, merge, inspect, check and unpack RAFS images (nydus-image)")
    isub = p.add_subparsers(dest="image_command", required=True, metavar="ACTION")

    b = isub.add_parser("build", help="build a RAFS v6 bootstrap and data blob from a directory or layer tar")
    b.add_argument("source", help="directory, or OCI layer tar (plain, gzip or zstd)")
    b.add_argument("--bootstrap", required=True, help="bootstrap file to write")
    b.add_argument("--blob-dir", required=True, help="directory for the data blob (named by its sha256)")
    b.add_argument("--type", default=None, choices=["dir-rafs", "tar-rafs", "targz-rafs", "tar-tarfs",
                                                          "targz-ref"],
                   help="default: dir-rafs for a directory, tar-rafs for a file; targz-ref "
                        "(zran) leaves the data in the gzip layer and writes only a meta "
                        "blob of inflate contexts to --blob-dir")
    b.add_argument("--fs-version", type=int, default=6, choices=[6])
    b.add_argument("--compressor", default="lz4_block", choices=["none", "lz4_block", "zstd"])
    b.add_argument("--digester", default="blake3", choices=["blake3", "sha256"])
    b.add_argument("--chunk-size", type=_int, default=0x100000)
    b.add_argument("--chunk-dict", help="bootstrap whose chunks are reused instead of stored again")
    b.add_argument("--parent-bootstrap", help="build this layer on top of a parent image")
    b.add_argument("--prefetch-files", help="file with one absolute path per line")
    b.add_argument("--whiteout-spec", default="overlayfs", choices=["overlayfs", "oci", "none"],
                   help="what a layer's OCI whiteouts become: overlayfs whiteouts (default), "
                        "applied to the layer itself (oci), or kept as files for a later "
                        "merge (none, as converters build layers)")
    b.add_argument("--blob-inline-meta", action="store_true",
                   help="targz-ref: the meta blob carries the layer's bootstrap and a TOC "
                        "(what convert --oci-ref pushes); --bootstrap is then the layer's "
                        "bootstrap as a merge names that blob")
    b.add_argument("--lean-meta", action="store_true",
                   help="targz-ref with --blob-inline-meta: leave the layer's bootstrap and "
                        "the chunk digests out of the meta blob (the merged bootstrap has "
                        "them; what convert --oci-ref pushes by default)")
    b.add_argument("--output-json", help="write the build report here")
    b.add_argument("--max-sparse-size", type=_size, default=None, metavar="SIZE",
                   help="largest real size of a sparse tar member, and of the holes of "
                        "all of a tar's sparse members together (default 64G); holes are "
                        "read as zeros, so a bigger claim is refused")
    b.add_argument("--progress", default="auto", choices=["auto", "line", "plain", "quiet"],
                   help="on stderr: line (one line rewritten), plain (a line every 5 s), "
                        "quiet; auto: line at a terminal, else plain")
    b.set_defaults(func=_build)

    m = isub.add_parser("merge", help="merge per-layer bootstraps (lowest first) into an image bootstrap")
    m.add_argument("bootstraps", nargs="+")
    m.add_argument("--bootstrap", required=True)
    m.add_argument("--prefetch-files")
    m.add_argument("--output-json")
    m.set_defaults(func=_merge)

    i = isub.add_parser("inspect", help="describe a bootstrap")
    i.add_argument("bootstrap")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_inspect)

    c = isub.add_parser("check", help="validate a bootstrap; with --blob-dir verify every chunk")
    c.add_argument("bootstrap")
    c.add_argument("--blob-dir")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_check)

    u = isub.add_parser("unpack", help="write the image as a tar")
    u.add_argument("bootstrap")
    u.add_argument("--blob-dir", required=True)
    u.add_argument("--output", required=True, help="tar file to write")
    u.set_defaults(func=_unpack)


def _lines(path: str | None) -> list[str] | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _print(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _build(args: argparse.Namespace) -> int:
    import os

    from pynydus.host.libc import keep_freed_buffers
    from pynydus.rafs.builder import SourceType, build

    keep_freed_buffers()  # this process is the build: chunk buffers are reused, not refaulted
    kind: SourceType = args.type or ("dir-rafs" if os.path.isdir(args.source) else "tar-rafs")
    mode = args.progress
    if mode == "auto":
        mode = "line" if sys.stderr.isatty() else "plain"
    show = None if mode == "quiet" else _BuildProgressLine(rewrite=mode == "line")
    try:
        result = build(
            args.source, args.bootstrap, args.blob_dir, type=kind, fs_version=args.fs_version,
            compressor=args.compressor, digester=args.digester, chunk_size=args.chunk_size,
            chunk_dict=args.chunk_dict, parent_bootstrap=args.parent_bootstrap,
            prefetch_files=_lines(args.prefetch_files), output_json=args.output_json,
            whiteout_spec=args.whiteout_spec, blob_inline_meta=args.blob_inline_meta,
            lean_meta=args.lean_meta,
            progress=show, progress_interval=0.5 if mode == "line" else 5.0,
            **({} if args.max_sparse_size is None else {"max_sparse_size": args.max_sparse_size}),
        )
    finally:
        if show is not None:
            show.close()
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    blobs = ", ".join(f"{b.blob_id} ({b.compressed_size} bytes)" for b in result.blobs) or "none"
    print(f"built {args.bootstrap}: {result.inodes} inodes, {result.chunk_count} chunks, blobs: {blobs}, "
          f"{result.bytes_in / max(result.elapsed_seconds, 1e-9) / 1e6:.1f} MB/s", file=sys.stderr)
    return 0


class _BuildProgressLine:
    """Prints :class:`~pynydus.rafs.builder.create.BuildProgress` to stderr: one rewritten line
    at a terminal, or a line per report (phases included) in a log."""

    def __init__(self, *, rewrite: bool) -> None:
        self._rewrite = rewrite
        self._shown = False

    def __call__(self, p: Any) -> None:
        if p.phase == "data":
            rate = p.bytes_in / p.elapsed / 1e6 if p.elapsed else 0.0
            text = f"{p.entries:,} entries, {p.bytes_in / 1e6:,.1f} MB of file data ({rate:.1f} MB/s)"
        elif p.phase == "bootstrap":
            text = f"{p.entries:,} entries, {p.bytes_in / 1e6:,.1f} MB read; writing the bootstrap"
        else:  # done: end a rewritten line
            self.close()
            return
        line = f"[build {p.elapsed:6.1f}s] {text}"
        if self._rewrite:
            sys.stderr.write(f"\r\x1b[K{line}")
            self._shown = True
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        """End a rewritten line (also when the build failed)."""
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._shown = False


def _merge(args: argparse.Namespace) -> int:
    from pynydus.rafs.merge import merge

    result = merge(args.bootstraps, args.bootstrap, prefetch_files=_lines(args.prefetch_files),
                   output_json=args.output_json)
    _print(result.to_json())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pynydus.rafs.read import inspect_bootstrap

    info = inspect_bootstrap(args.bootstrap)
    if args.json:
        _print(info)
    else:
        for key, value in info.items():
            if isinstance(value, (dict, list)):
                print(f"{key}:")
                items = value.items() if isinstance(value, dict) else enumerate(value)
                for k, v in items:
                    print(f"  {k}: {v}")
            else:
                print(f"{key}: {value}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from pynydus.rafs.read import check_image

    rep = check_image(args.bootstrap, args.blob_dir)
    if args.json:
        _print(rep.__dict__)
    else:
        what = f", {rep.chunks_verified} chunks ({rep.bytes_verified} bytes) verified" if args.blob_dir else ""
        print(f"{args.bootstrap}: ok: {rep.inodes} inodes, {rep.files} files, {rep.chunks} chunk refs{what}")
    return 0


def _unpack(args: argparse.Namespace) -> int:
    from pynydus.rafs.read import unpack_image

    n = unpack_image(args.bootstrap, args.blob_dir, args.output)
    print(f"wrote {n} entries to {args.output}", file=sys.stderr)
    return 0
