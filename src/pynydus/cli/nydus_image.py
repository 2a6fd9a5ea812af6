"""``nydus-image``: upstream's builder command line (nydus-rs 2.2), on pynydus's RAFS code.

Scripts written for upstream's ``nydus-image`` run unchanged: the subcommands
``create``, ``merge``, ``check``, ``inspect`` and ``unpack`` take upstream's flags and
write upstream's outputs where scripts read them (``--output-json`` documents, the
``check`` report, ``inspect -R`` answers), with upstream's exit codes (0, 2 for usage,
1 for failures). The work is done by :mod:`pynydus.rafs` (``build``, ``merge``,
``check_image``, ``unpack_image``); this module only translates.

An upstream flag or value pynydus does not implement (RAFS v5 output, eStargz/ref
conversion types, inline metadata, ``stat``, ``compact``, ...) stops the command with a
usage error naming it; none is accepted and ignored. ``docs/decisions.md`` lists them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import stat
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from pynydus import __version__
from pynydus.cli.pipes import quiet_on_closed_pipe
from pynydus.cli.upstream import (
    VERSION,
    ClapParser,
    UsageError,
    add_globals,
    hex_int,
    refuse,
    run,
    setup_logging,
    split_list,
)

log = logging.getLogger("nydus-image")

#: ``--type`` values upstream knows; the left ones we build (dir/tar/targz to RAFS)
TYPES_BUILT = {"directory": "dir-rafs", "dir-rafs": "dir-rafs", "tar-rafs": "tar-rafs",
               "targz-rafs": "targz-rafs"}
TYPES_REFUSED = ("estargz-rafs", "estargz-ref", "estargztoc-ref", "targz-ref", "stargz_index")
MAX_CHUNK_SIZE = 0x1000000


def _bti() -> str:
    return (f"\nVersion: \t{__version__}\nGit Commit: \tpynydus\nBuild Time: \t\n"
            f"Profile: \trelease\nRustc: \t\tpython {sys.version.split()[0]}\n")


def build_parser() -> ClapParser:
    p = ClapParser(prog="nydus-image", description="Build, analyze, inspect or validate RAFS "
                   "filesystems/Nydus accelerated container images (pynydus)")
    p.add_argument("-V", "--version", action="version", version=_bti())
    add_globals(p, defaults=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ClapParser)

    def cmd(name: str, help: str) -> ClapParser:
        c: ClapParser = sub.add_parser(name, help=help, description=help)
        add_globals(c, defaults=False)
        return c

    c = cmd("create", "Create RAFS filesystems from directories, tar files or OCI images")
    c.add_argument("SOURCE", help="source from which to build the RAFS filesystem")
    c.add_argument("-t", "--type", "--source-type", dest="type", default="dir-rafs",
                   choices=[*TYPES_BUILT, *TYPES_REFUSED], help="Conversion type:")
    c.add_argument("-B", "--bootstrap", help="File path to save the generated RAFS metadata blob")
    c.add_argument("-D", "--blob-dir", help="Directory path to save generated RAFS metadata and "
                   "data blobs")
    c.add_argument("-b", "--blob", help="File path to save the generated RAFS data blob")
    c.add_argument("--blob-inline-meta", "--inline-bootstrap", action="store_true",
                   help="(not supported) Inline RAFS metadata into the data blob")
    c.add_argument("--blob-id", help="(not supported) OSS object id for the data blob")
    c.add_argument("--blob-data-size", help="(not supported) data blob size for estargztoc-ref")
    c.add_argument("--blob-offset", default="0", help=argparse.SUPPRESS)
    c.add_argument("--chunk-size", help="Set the size of data chunks, must be power of two and "
                   "between 0x1000-0x1000000:")
    c.add_argument("--compressor", default="zstd", choices=["none", "lz4_block", "zstd"],
                   help="Algorithm to compress data chunks:")
    c.add_argument("--digester", default="blake3", choices=["blake3", "sha256"],
                   help="Algorithm to digest data chunks:")
    c.add_argument("-C", "--config", help="(not supported) Configuration file for storage backend")
    c.add_argument("-v", "--fs-version", default="6", choices=["5", "6"],
                   help="Set RAFS format version number (only 6 is built):")
    c.add_argument("--features", choices=["blob-toc"], help="(not supported) Enable features")
    c.add_argument("--chunk-dict", help="File path of chunk dictionary for data deduplication")
    c.add_argument("--parent-bootstrap", help="File path of the parent RAFS metadata blob")
    c.add_argument("--aligned-chunk", action="store_true",
                   help="Align uncompressed data chunks to 4K (RAFS v6 always is)")
    c.add_argument("--repeatable", action="store_true",
                   help="(not supported) Generate metadata without uid/gid")
    c.add_argument("--disable-check", action="store_true", help=argparse.SUPPRESS)
    c.add_argument("--whiteout-spec", default="oci", choices=["oci", "overlayfs", "none"],
                   help="Set the type of whiteout specification:")
    c.add_argument("--prefetch-policy", default="none", choices=["fs", "blob", "none"],
                   help="Set data prefetch policy (fs: paths read from stdin)")
    c.add_argument("-J", "--output-json", help="File path to save operation result in JSON format")
    c.set_defaults(func=_create)

    m = cmd("merge", "Merge multiple bootstraps into a overlaid bootstrap")
    m.add_argument("-B", "--bootstrap", help="output path of nydus overlaid bootstrap")
    m.add_argument("-D", "--blob-dir", help="Directory path to save the generated metadata blob")
    m.add_argument("--chunk-dict", help="File path of chunk dictionary for data deduplication")
    m.add_argument("--prefetch-policy", default="none", choices=["fs", "blob", "none"],
                   help="Set data prefetch policy (fs: paths read from stdin)")
    m.add_argument("-J", "--output-json", help="File path to save operation result in JSON format")
    m.add_argument("--blob-digests", help="RAFS blob digest list separated by comma")
    m.add_argument("--blob-sizes", help="RAFS blob size list separated by comma")
    m.add_argument("--blob-toc-digests", help="(not supported) RAFS blob toc digest list")
    m.add_argument("--blob-toc-sizes", help="(not supported) RAFS blob toc size list")
    m.add_argument("-C", "--config", help="(not supported) Configuration file for storage backend")
    m.add_argument("SOURCE", nargs="+", help="bootstrap paths (allow one or more)")
    m.set_defaults(func=_merge)

    def bootstrap_args(x: ClapParser) -> None:
        x.add_argument("BOOTSTRAP", nargs="?", help="File path of RAFS metadata")
        x.add_argument("-B", "--bootstrap", help="[Deprecated] File path of RAFS meta blob/bootstrap")
        x.add_argument("-D", "--blob-dir", help="Directory for localfs storage backend, hosting "
                       "data blobs and cache files")
        x.add_argument("-C", "--config", help="(not supported) Configuration file for storage "
                       "backend, cache and RAFS FUSE filesystem")

    k = cmd("check", "Validate RAFS filesystem metadata (with -D: every chunk too)")
    bootstrap_args(k)
    k.add_argument("-v", "--verbose", action="store_true", help="Output message in verbose mode")
    k.add_argument("-J", "--output-json", help="File path to save operation result in JSON format")
    k.set_defaults(func=_check)

    i = cmd("inspect", "Inspect RAFS filesystem metadata in interactive or request mode")
    bootstrap_args(i)
    i.add_argument("-R", "--request", help="Inspect RAFS filesystem metadata in request mode")
    i.set_defaults(func=_inspect)

    # stat and compact parse upstream's flags, then refuse: they are not implemented
    s = cmd("stat", "(not supported) Generate statistics information for RAFS filesystems")
    for short, long in (("-B", "--bootstrap"), ("-D", "--blob-dir"), ("-T", "--target"),
                        ("-C", "--config"), ("-J", "--output-json")):
        s.add_argument(short, long)
    s.add_argument("--digester", choices=["blake3", "sha256"])
    s.set_defaults(func=_not_implemented)
    o = cmd("compact", "(not supported) Compact specific nydus image")
    for flags in (("-B", "--bootstrap"), ("-C", "--config"), ("--backend-config",),
                  ("--chunk-dict",), ("-O", "--output-bootstrap"), ("-J", "--output-json")):
        o.add_argument(*flags)
    o.set_defaults(func=_not_implemented)

    u = cmd("unpack", "Unpack a RAFS filesystem to a tar file")
    bootstrap_args(u)
    u.add_argument("--backend-config", help="(not supported) config file of backend")
    u.add_argument("-b", "--blob", help="path to RAFS data blob file")
    u.add_argument("--output", required=True, help="path for output tar file")
    u.set_defaults(func=_unpack)
    return p


@quiet_on_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        print(f"Usage: {parser.format_usage().strip()[len('usage: '):]}")
        return 0
    setup_logging(args.log_level, args.log_file)
    return run("nydus-image", lambda: int(args.func(args)))


# --------------------------------------------------------------------------- helpers

def _bootstrap_arg(args: argparse.Namespace) -> str:
    if args.BOOTSTRAP and args.bootstrap:
        raise UsageError("the argument '--bootstrap <bootstrap>' cannot be used with '[BOOTSTRAP]'")
    path = args.bootstrap or args.BOOTSTRAP
    if not path:
        raise UsageError("the following required arguments were not provided: <BOOTSTRAP>")
    return str(path)


def _no_config(cmd: str, args: argparse.Namespace) -> None:
    if getattr(args, "config", None):
        refuse(cmd, "--config", "backend/cache configuration files are not read by the "
               "builder tools; use --blob-dir for blobs in a directory")


def _prefetch_files(cmd: str, policy: str) -> list[str] | None:
    """``--prefetch-policy fs``: upstream reads the paths from stdin, one per line."""
    if policy == "blob":
        refuse(cmd, "--prefetch-policy blob", "blob-level prefetch tables are not built; "
               "use --prefetch-policy fs")
    if policy != "fs":
        return None
    return [line.strip() for line in sys.stdin if line.strip()]


def _trace(seconds: float, **events: Any) -> dict[str, Any]:
    return {"consumed_time": {"total_build": seconds}, "registered_events": dict(events)}


def _dump(path: str | None, bootstrap: str, blobs: list[str], trace: dict[str, Any], *,
          pretty: bool) -> None:
    """upstream's ``OutputSerializer``: ``version``, ``bootstrap``, ``blobs``, ``trace``."""
    if not path:
        return
    doc = {"version": VERSION, "bootstrap": bootstrap, "blobs": blobs, "trace": trace}
    with open(path, "w") as f:
        if pretty:
            json.dump(doc, f, indent=2)
        else:
            json.dump(doc, f, separators=(",", ":"))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- create

def _create(args: argparse.Namespace) -> int:
    from pynydus.host.libc import keep_freed_buffers
    from pynydus.rafs.builder import build

    keep_freed_buffers()  # this process is the build: chunk buffers are reused, not refaulted

    cmd = "create"
    if args.type in TYPES_REFUSED:
        refuse(cmd, f"--type {args.type}", "only directory, dir-rafs, tar-rafs and targz-rafs "
               "sources are converted (eStargz and OCI-reference images are not built)")
    if args.fs_version != "6":
        refuse(cmd, "--fs-version 5", "only RAFS v6 images are built")
    for flag, value, why in (
        ("--blob-inline-meta", args.blob_inline_meta, "the bootstrap is always a separate file"),
        ("--blob-id", args.blob_id, "blobs are named by their sha256 digest"),
        ("--blob-data-size", args.blob_data_size, "only used by estargztoc-ref conversions"),
        ("--features", args.features, "blob ToC (tar-formatted blobs) is not written"),
        ("--repeatable", args.repeatable, ("pynydus builds are always reproducible and "
         "always record uid/gid (EXPLICIT_UID_GID); dropping them is not implemented")),
    ):
        if value:
            refuse(cmd, flag, why)
    if args.blob_offset not in ("0", ""):
        refuse(cmd, "--blob-offset", "blobs always start at offset 0")
    _no_config(cmd, args)
    kind = TYPES_BUILT[args.type]
    if args.whiteout_spec == "overlayfs" and kind == "dir-rafs":
        refuse(cmd, "--whiteout-spec overlayfs", "a directory build keeps overlayfs whiteouts "
               "(char 0/0 devices) as devices; use oci or none")
    # upstream: a directory build drops OCI whiteouts under "oci" (nothing below to hide);
    # tar builds keep .wh. entries as they are, for the merge to apply (ours: "none").
    whiteout = "oci" if (args.whiteout_spec == "oci" and kind == "dir-rafs") else "none"
    chunk_size = 0x100000
    if args.chunk_size is not None:
        chunk_size = hex_int(args.chunk_size, "chunk size")
        if not (0x1000 <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
            raise ValueError(f"invalid chunk size: {chunk_size}")
    if not args.blob and not args.blob_dir:
        raise UsageError("the following required arguments were not provided: --blob <blob>")
    if not args.bootstrap and not args.blob_dir:
        raise UsageError("the following required arguments were not provided: "
                         "--bootstrap <bootstrap>")
    src = args.SOURCE
    if kind == "dir-rafs" and not os.path.isdir(src):
        raise NotADirectoryError(f"specified path must be a directory: {src!r}")
    if kind != "dir-rafs" and not (os.path.exists(src) and (
            os.path.isfile(src) or stat.S_ISFIFO(os.stat(src).st_mode))):
        raise FileNotFoundError(f"specified path must be a regular/fifo file: {src!r}")
    if args.blob_dir and not os.path.isdir(args.blob_dir):
        raise FileNotFoundError("Directory to store blobs does not exist")
    prefetch = _prefetch_files(cmd, args.prefetch_policy)

    # Our builder writes the blob into a directory under its sha256: with --blob FILE it
    # builds beside FILE and renames; without --bootstrap the bootstrap goes into the
    # blob dir under its own sha256, as upstream's does.
    blob_dir = args.blob_dir
    staging = None
    if args.blob:
        staging = tempfile.mkdtemp(prefix=".nydus-image-", dir=os.path.dirname(
            os.path.abspath(args.blob)))
        blob_dir = staging
    boot_out = args.bootstrap or os.path.join(args.blob_dir, f".bootstrap-{os.getpid()}")
    try:
        res = build(src, boot_out, blob_dir, type=kind, compressor=args.compressor,  # type: ignore[arg-type]
                    digester=args.digester, chunk_size=chunk_size, chunk_dict=args.chunk_dict,
                    parent_bootstrap=args.parent_bootstrap, prefetch_files=prefetch,
                    whiteout_spec=whiteout)
        if staging is not None:
            new = [b for b in res.blobs if b.new and b.path]
            if new:
                os.replace(str(new[0].path), args.blob)
    finally:
        if staging is not None:
            for name in os.listdir(staging):
                os.unlink(os.path.join(staging, name))
            os.rmdir(staging)
    bootstrap = args.bootstrap
    if not bootstrap:
        bootstrap = os.path.join(args.blob_dir, _sha256_file(boot_out))
        os.replace(boot_out, bootstrap)
    for w in res.warnings:
        log.warning("%s", w)
    new_blob = next((b for b in res.blobs if b.new), None)
    log.info("successfully built RAFS filesystem: \nmeta blob path: %s\ndata blob size: 0x%x\n"
             "data blobs: %s", bootstrap, new_blob.compressed_size if new_blob else 0,
             res.blob_ids)
    events: dict[str, Any] = {}
    if new_blob is not None:
        events = {"blob_compressed_size": new_blob.compressed_size,
                  "blob_uncompressed_size": new_blob.uncompressed_size}
    events.update(euid=str(os.geteuid()), egid=str(os.getegid()))
    _dump(args.output_json, bootstrap, res.blob_ids, _trace(res.elapsed_seconds, **events),
          pretty=True)
    return 0


# --------------------------------------------------------------------------- merge

def _merge(args: argparse.Namespace) -> int:
    from pynydus.rafs.merge import merge
    from pynydus.rafs.read import open_bootstrap

    cmd = "merge"
    _no_config(cmd, args)
    for flag, value in (("--blob-toc-digests", args.blob_toc_digests),
                        ("--blob-toc-sizes", args.blob_toc_sizes)):
        if value:
            refuse(cmd, flag, "blob ToCs are not written or read")
    sources: list[str] = args.SOURCE
    digests = split_list(args.blob_digests) if args.blob_digests else None
    sizes = split_list(args.blob_sizes) if args.blob_sizes else None
    for what, values in (("blob digest", digests), ("blob size", sizes)):
        if values is not None and len(values) != len(sources):
            raise ValueError(f"number of {what} entries {len(values)} doesn't match number of "
                             f"sources {len(sources)}")
    dict_blobs: set[str] = set()
    if args.chunk_dict:
        path = args.chunk_dict.split("=", 1)[1] if args.chunk_dict.startswith("bootstrap=") \
            else args.chunk_dict
        with open_bootstrap(path) as d:
            dict_blobs = {b.blob_id for b in d.blobs}
    # upstream renames each layer's own blob to the digest (and size) given for it; our
    # blobs are named by their digest already, so the lists must agree with them.
    for k, src in enumerate(sources):
        with open_bootstrap(src) as bs:
            own = [b for b in bs.blobs if b.blob_id not in dict_blobs]
        if digests is not None or sizes is not None:
            if len(own) != 1:
                raise ValueError(f"invalid per layer bootstrap {src}: {len(own)} associated "
                                 "data blobs (one expected with --blob-digests/--blob-sizes)")
            if digests is not None:
                want = digests[k].removeprefix("sha256:")
                if want != own[0].blob_id:
                    refuse(cmd, "--blob-digests", f"layer {k} ({src}) has blob {own[0].blob_id}, "
                           f"not {want}; blobs are not renamed")
            if sizes is not None:
                if not sizes[k].isdigit():
                    raise ValueError(f"invalid number in --blob-sizes option: {sizes[k]!r}")
                if int(sizes[k]) != own[0].compressed_size:
                    refuse(cmd, "--blob-sizes", f"layer {k} ({src}) blob {own[0].blob_id} has "
                           f"{own[0].compressed_size} bytes, not {sizes[k]}; blob sizes are not "
                           "rewritten")
    if not args.bootstrap and not args.blob_dir:
        raise ValueError("both --bootstrap and --blob-dir are missing, please specify one to "
                         "store the generated metadata blob file")
    if args.blob_dir and not os.path.isdir(args.blob_dir):
        raise FileNotFoundError("Directory to store blobs does not exist")
    prefetch = _prefetch_files(cmd, args.prefetch_policy)
    out = args.bootstrap or os.path.join(args.blob_dir, f".bootstrap-{os.getpid()}")
    t0 = time.monotonic()
    res = merge(sources, out, prefetch_files=prefetch)
    bootstrap = args.bootstrap
    if not bootstrap:
        bootstrap = os.path.join(args.blob_dir, _sha256_file(out))
        os.replace(out, bootstrap)
    for w in res.warnings:
        log.warning("%s", w)
    _dump(args.output_json, bootstrap, res.blob_ids,
          {"consumed_time": {"dump_bootstrap": time.monotonic() - t0},
           "registered_events": {}}, pretty=True)
    return 0


# --------------------------------------------------------------------------- check

#: upstream's names of blob feature bits (by their ``BlobFeatures`` member), in the order
#: it prints them
BLOB_FEATURE_NAMES = (("ALIGNED", "aligned"), ("CAP_TAR_TOC", "cap_toc"),
                      ("INLINED_CHUNK_DIGEST", "chunk-digest"), ("CHUNK_INFO_V2", "chunk-v2"),
                      ("INLINED_FS_META", "fs-meta"), ("SEPARATE", "separate"),
                      ("HAS_TAR_HEADER", "tar-header"), ("HAS_TOC", "toc"), ("ZRAN", "zran"))


def blob_features(bits: int) -> str:
    from pynydus.rafs.format import BlobFeatures  # loaded already by the bootstrap's reader

    return " ".join(name for member, name in BLOB_FEATURE_NAMES if bits & BlobFeatures[member])


def _check(args: argparse.Namespace) -> int:
    from pynydus.rafs.read import check_image, open_bootstrap

    _no_config("check", args)
    path = _bootstrap_arg(args)
    t0 = time.monotonic()
    rep = check_image(path, args.blob_dir)
    if args.verbose:
        _print_tree(path)
    print("RAFS filesystem metadata is valid, referenced data blobs: ")
    with open_bootstrap(path) as bs:
        for idx, b in enumerate(bs.blobs):
            print(f"\t {idx}: {b.blob_id}, compressed data size 0x{b.compressed_data_size:x}, "
                  f"compressed file size 0x{b.compressed_size:x}, uncompressed file size "
                  f"0x{b.uncompressed_size:x}, chunks: 0x{b.chunk_count:x}, features: "
                  f"{blob_features(b.features)}")
    if args.blob_dir:
        log.info("%d chunks (%d bytes) read from %s and verified", rep.chunks_verified,
                 rep.bytes_verified, args.blob_dir)
    _dump(args.output_json, path, rep.blobs,
          {"consumed_time": {"load_tree_from_bootstrap": time.monotonic() - t0},
           "registered_events": {}}, pretty=False)
    return 0


def _print_tree(path: str) -> None:
    """``check -v``: one line per inode and chunk (upstream's fields where we have them)."""
    from pynydus.rafs.read import open_bootstrap

    kinds = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}
    with open_bootstrap(path) as bs:
        for raw, ino in bs.walk():
            s = bs.stat(ino)
            name = raw.decode("utf-8", "surrogateescape")
            link = f'Some("{bs.readlink(ino).decode("utf-8", "surrogateescape")}")' \
                if s.is_symlink else "None"
            print(f'inode: {kinds.get(stat.S_IFMT(s.mode), "special")} "{name}": ino {ino} '
                  f"i_nlink {s.nlink} i_size {s.size} i_blocks {s.blocks} "
                  f"has_xattr {str(bool(bs.xattrs(ino))).lower()} link {link} "
                  f"i_mtime {s.mtime} i_mtime_nsec {s.mtime_nsec}")
            for c in bs.chunks(ino) if s.is_reg else ():
                print(f"\t chunk: id {(c.digest or b'').hex()}, index {c.index}, blob_index "
                      f"{c.blob_index}, file_offset {c.file_offset}, compressed "
                      f"{c.compressed_offset}/{c.compressed_size}, uncompressed "
                      f"{c.uncompressed_offset}/{c.uncompressed_size}")


# --------------------------------------------------------------------------- inspect

def _inspect(args: argparse.Namespace) -> int:
    from pynydus.cli.nydus_inspect import Inspector, interactive

    _no_config("inspect", args)
    with Inspector(_bootstrap_arg(args), request_mode=args.request is not None) as insp:
        if args.request is not None:
            out = insp.execute(args.request)
            sys.stdout.write(json.dumps(out, separators=(",", ":"), sort_keys=True,
                                        ensure_ascii=False))
            sys.stdout.flush()
            return 0
        interactive(insp)
    return 0


# --------------------------------------------------------------------------- unpack

def _unpack(args: argparse.Namespace) -> int:
    from pynydus.rafs.read import open_bootstrap, unpack_image

    _no_config("unpack", args)
    if args.backend_config:
        refuse("unpack", "--backend-config", "blobs are read from --blob or --blob-dir only")
    path = _bootstrap_arg(args)
    if not args.output:
        raise ValueError("invalid empty --output option")
    if args.blob and args.blob_dir:
        raise UsageError("the argument '--blob <blob>' cannot be used with '--blob-dir'")
    if args.blob_dir:
        n = unpack_image(path, args.blob_dir, args.output)
    elif args.blob:
        # upstream's --blob serves every blob of the image from that one file
        with tempfile.TemporaryDirectory(prefix="nydus-image-unpack-") as d:
            with open_bootstrap(path) as bs:
                for b in bs.blobs:
                    os.symlink(os.path.abspath(args.blob), os.path.join(d, b.blob_id))
            n = unpack_image(path, d, args.output)
    else:
        raise ValueError("fail to unpack: both blob path or blob backend config are not "
                         "specified")
    log.info("unpacked %d entries to %s", n, args.output)
    return 0


def _not_implemented(args: argparse.Namespace) -> int:
    refuse(args.command, f"'nydus-image {args.command}'", "this subcommand is not implemented "
           "(see docs/decisions.md)")


if __name__ == "__main__":
    sys.exit(main())
