"""``pynydus convert`` and ``pynydus check-image`` (upstream: ``nydusify convert/check``).

Registry credentials stay off the command line, where every local user reads them
in /proc/PID/cmdline: each side's ``user:password`` (or its base64) comes from
``--source-auth-file``/``--target-auth-file``, from stdin (``--source-auth-stdin``,
one line per side, source first), from ``PYNYDUS_SOURCE_AUTH``/``PYNYDUS_TARGET_AUTH``
or, by default, from the docker config. ``--source-auth``/``--target-auth`` still
work, with a warning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, TextIO

from pynydus.errors import InvalidArgument

__all__ = ["_add_convert", "resolve_auth"]

AUTH_ENV = {"source": "PYNYDUS_SOURCE_AUTH", "target": "PYNYDUS_TARGET_AUTH"}


def _int(text: str) -> int:
    return int(text, 0)


def _add_auth(p: argparse.ArgumentParser) -> None:
    for side in ("source", "target"):
        g = p.add_mutually_exclusive_group()
        g.add_argument(f"--{side}-auth-file", metavar="FILE",
                       help=f"file whose first line is the {side} registry's user:password (or "
                            f"its base64); also ${AUTH_ENV[side]}; default: docker config.json")
        g.add_argument(f"--{side}-auth-stdin", action="store_true",
                       help=f"read the {side} user:password from a line of stdin (source first)")
        g.add_argument(f"--{side}-auth", metavar="USER:PASSWORD",
                       help="discouraged: every local user can read it in /proc; use "
                            f"--{side}-auth-file, --{side}-auth-stdin or ${AUTH_ENV[side]}")


def resolve_auth(args: argparse.Namespace, side: str, stdin: TextIO | None = None,
                 warn: TextIO | None = None) -> str | None:
    """The ``user:password`` (or base64) for ``side`` ("source"/"target"), from the first
    of: the command-line value (with a warning), the file, a line of ``stdin``, the
    environment; None leaves it to the docker config. InvalidArgument for an empty or
    unreadable one."""
    flag = f"--{side}-auth"
    value: str | None = getattr(args, f"{side}_auth")
    if value is not None:
        print(f"warning: {flag} puts the password on the command line, where every local "
              f"user can read it (/proc/PID/cmdline); use {flag}-file, {flag}-stdin or "
              f"${AUTH_ENV[side]}", file=warn or sys.stderr)
        return value
    path: str | None = getattr(args, f"{side}_auth_file")
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.readline().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidArgument(f"{flag}-file {path}: cannot read: {err}") from err
        if not value:
            raise InvalidArgument(f"{flag}-file {path}: empty")
        return value
    if getattr(args, f"{side}_auth_stdin"):
        value = (stdin or sys.stdin).readline().strip()
        if not value:
            raise InvalidArgument(f"{flag}-stdin: no credentials on stdin")
        return value
    return os.environ.get(AUTH_ENV[side]) or None


def _add_convert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "convert", help="convert an OCI image in a registry to a Nydus image (nydusify convert)",
        description="Pull an OCI/Docker image, convert every layer to a Nydus blob (in "
                    "parallel, cached by layer digest), push blobs, bootstrap layer, config "
                    "and manifest; the target tag is written last.")
    p.add_argument("--source", required=True, help="source image reference")
    p.add_argument("--target", required=True, help="target image reference (a tag)")
    p.add_argument("--source-insecure", action="store_true", help="skip TLS verification, fall back to plain HTTP")
    p.add_argument("--target-insecure", action="store_true", help="skip TLS verification, fall back to plain HTTP")
    _add_auth(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--platform", help="os/arch[/variant] to convert (default linux/amd64)")
    g.add_argument("--all-platforms", action="store_true", help="convert every platform")
    p.add_argument("--fs-version", type=int, default=6, choices=[6])
    p.add_argument("--compressor", default="zstd", choices=["zstd", "lz4_block", "none"])
    p.add_argument("--chunk-size", type=_int, default=0x100000, help="power of two (0x100000)")
    p.add_argument("--chunk-dict-bootstrap", help="bootstrap whose chunks new blobs reuse")
    p.add_argument("--prefetch-files", help="file with absolute paths to prefetch, one a line")
    p.add_argument("--merge-platform", action="store_true",
                   help="add the Nydus manifest to the source's index")
    p.add_argument("--with-referrer", action="store_true",
                   help="set subject to the source manifest (OCI referrers)")
    p.add_argument("--oci", action="store_true", help="OCI manifest even for a Docker source")
    p.add_argument("--oci-ref", action="store_true",
                   help="zran: push only metadata (inflate contexts into the source's gzip "
                        "layers, and the bootstrap); the runtime reads the source layers in "
                        "place, from the target repository (they are mounted or copied "
                        "there when it is another one)")
    p.add_argument("--oci-ref-full-meta", action="store_true",
                   help="--oci-ref: each pushed meta blob also carries its layer's bootstrap "
                        "and chunk digests, as nydusify's do (for tools that open a meta blob "
                        "as a bootstrap); by default only the merged bootstrap has them")
    p.add_argument("--oci-ref-context-size", type=_int, metavar="BYTES",
                   help="--oci-ref: compressed bytes an inflate context spans (nydusify's: "
                        "0x80000; ours is smaller, docs/decisions.md): smaller contexts make "
                        "a random read fetch less, at 40 bytes and a window each")
    p.add_argument("--cache-dir", help="converted-layer cache (~/.cache/pynydus/convert)")
    p.add_argument("--workers", type=int, default=0, help="parallel layers (default: CPUs)")
    p.add_argument("--output-json", help="write a JSON summary here")
    p.add_argument("--sign-key", metavar="FILE",
                   help="PEM RSA private key: sign each bootstrap for nodes with "
                        "[image] validate_signature (annotation nydus-signature)")
    p.add_argument("--progress", default="auto", choices=["auto", "rich", "plain", "quiet"])
    p.set_defaults(func=_run_convert)

    c = sub.add_parser(
        "check-image", help="compare a Nydus image with its source image (nydusify check)",
        description="Read the Nydus image through the RAFS reader (chunks fetched from the "
                    "registry) and compare every path with the source layers flattened.")
    c.add_argument("--source", required=True)
    c.add_argument("--target", required=True)
    c.add_argument("--source-insecure", action="store_true")
    c.add_argument("--target-insecure", action="store_true")
    _add_auth(c)
    c.add_argument("--platform", help="os/arch[/variant] (default linux/amd64)")
    c.add_argument("--output-json")
    c.set_defaults(func=_run_check)


def _run_convert(args: argparse.Namespace) -> int:
    from pynydus.convert.converter import ConvertOptions, convert, default_cache_dir
    from pynydus.convert.layer import BuildOptions
    from pynydus.convert.progress import make_reporter

    dict_digest = ""
    if args.chunk_dict_bootstrap:
        with open(args.chunk_dict_bootstrap, "rb") as f:
            dict_digest = hashlib.sha256(f.read()).hexdigest()
    prefetch: tuple[str, ...] = ("/",)
    if args.prefetch_files:
        with open(args.prefetch_files) as f:
            prefetch = tuple(line.strip() for line in f if line.strip()) or ("/",)
    opts = ConvertOptions(
        source=args.source, target=args.target, source_insecure=args.source_insecure,
        target_insecure=args.target_insecure, source_auth=resolve_auth(args, "source"),
        target_auth=resolve_auth(args, "target"), platform=args.platform,
        all_platforms=args.all_platforms,
        build=BuildOptions(fs_version=args.fs_version, compressor=args.compressor,
                           chunk_size=args.chunk_size, chunk_dict=args.chunk_dict_bootstrap,
                           chunk_dict_digest=dict_digest, prefetch_files=prefetch,
                           oci_ref=args.oci_ref, oci_ref_full_meta=args.oci_ref_full_meta,
                           **({"oci_ref_context_size": args.oci_ref_context_size}
                              if args.oci_ref_context_size else {})),
        merge_platform=args.merge_platform, with_referrer=args.with_referrer, oci=args.oci,
        cache_dir=args.cache_dir or default_cache_dir(), workers=args.workers,
        output_json=args.output_json, sign_key=args.sign_key)
    report = convert(opts, make_reporter(args.progress))
    print(f"{report.target}@{report.target_digest}")
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from pynydus.convert.check import CheckOptions, check_image

    result = check_image(CheckOptions(
        source=args.source, target=args.target, source_insecure=args.source_insecure,
        target_insecure=args.target_insecure, source_auth=resolve_auth(args, "source"),
        target_auth=resolve_auth(args, "target"), platform=args.platform))
    doc: dict[str, Any] = result.to_json()
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(doc, f, indent=2)
    if result.ok:
        print(f"check-image: OK, {result.paths} paths, {result.files} files "
              f"({result.bytes_compared} bytes) identical")
        return 0
    print(f"check-image: FAILED: {result.first_difference}", file=sys.stderr)
    return 1
