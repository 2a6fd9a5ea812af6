"""Registry credentials for convert and check-image come from a file, stdin, the
environment or the docker config; on the command line they still work, with a warning."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from pynydus.cli.convert_cmd import resolve_auth
from pynydus.cli.main import build_parser
from pynydus.errors import InvalidArgument

BASE = ["convert", "--source", "r/a:1", "--target", "r/b:1"]


def _args(*extra: str) -> object:
    return build_parser().parse_args([*BASE, *extra])


def test_nothing_given_leaves_it_to_the_docker_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYNYDUS_SOURCE_AUTH", raising=False)
    assert resolve_auth(_args(), "source") is None  # type: ignore[arg-type]


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYNYDUS_TARGET_AUTH", "u:p")
    assert resolve_auth(_args(), "target") == "u:p"  # type: ignore[arg-type]


def test_file_first_line(tmp_path: Path) -> None:
    f = tmp_path / "auth"
    f.write_text("u:p w\nignored\n")
    assert resolve_auth(_args("--source-auth-file", str(f)), "source") == "u:p w"  # type: ignore[arg-type]
    f.write_text("\n")
    with pytest.raises(InvalidArgument, match="--source-auth-file .*: empty"):
        resolve_auth(_args("--source-auth-file", str(f)), "source")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="cannot read"):
        resolve_auth(_args("--source-auth-file", str(tmp_path / "none")), "source")  # type: ignore[arg-type]


def test_stdin_gives_a_line_per_side_source_first() -> None:
    args = _args("--source-auth-stdin", "--target-auth-stdin")
    stdin = io.StringIO("s:1\nt:2\n")
    assert resolve_auth(args, "source", stdin) == "s:1"  # type: ignore[arg-type]
    assert resolve_auth(args, "target", stdin) == "t:2"  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="no credentials on stdin"):
        resolve_auth(args, "target", io.StringIO(""))  # type: ignore[arg-type]


def test_command_line_value_warns() -> None:
    warn = io.StringIO()
    assert resolve_auth(_args("--target-auth", "u:p"), "target", warn=warn) == "u:p"  # type: ignore[arg-type]
    assert "--target-auth puts the password on the command line" in warn.getvalue()
    assert "--target-auth-file" in warn.getvalue()


def test_one_source_per_side() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--source-auth", "u:p", "--source-auth-file", "f"])
    args = build_parser().parse_args(["check-image", "--source", "a", "--target", "b",
                                      "--source-auth-stdin", "--target-auth-file", os.devnull])
    assert args.source_auth_stdin and args.target_auth_file == os.devnull
