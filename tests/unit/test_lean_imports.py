"""What a daemon's modules import, in a fresh interpreter each (imports are process-wide).

Contract (issue 11's idle RSS): importing the daemon's modules and building its command
line loads neither ``inspect`` (with ast, dis, tokenize: ``dataclasses`` wants it only to
write a missing docstring), nor ``shutil`` (with bz2, lzma: argparse's terminal width),
nor ``urllib.parse`` (with ipaddress: the API's query strings), nor ``gettext`` (with
locale: argparse's message lookups); ``inspect`` still works and a dataclass without a
docstring still gets dataclasses' own, argparse still says what is wrong. Nor does it, or reading
a JSON daemon config, ever call ``compile()`` (the first call builds the ast module's node
classes): the config's annotations are resolved as ``typing.get_type_hints`` resolves
them, without its ForwardRefs. (tomllib's own NamedTuple compiles: a TOML config does.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pynydus import confschema
from pynydus.daemon.api import parse_query

_DAEMON = """
import gc, sys
import pynydus.daemon.main, pynydus.daemon.daemon
from pynydus.daemon.config import parse_daemon_config
pynydus.daemon.main.build_parser().parse_args(["--mountpoint", "/m"])
parse_daemon_config('{"device": {"backend": {"type": "localfs", "config": {"dir": "/b"}}, '
                    '"cache": {"type": "blobcache", "config": {"work_dir": "/c"}}}, '
                    '"mode": "direct", "fs_prefetch": {"enable": true}}', "v1")
parse_daemon_config('{"version": 2, "backend": {"type": "registry", "registry": '
                    '{"host": "h", "repo": "r"}}, "cache": {"type": "blobcache"}}', "v2")
print(" ".join(sorted(sys.modules)))
# the ast module's node classes, which the first compile() builds
print(any(isinstance(o, type) and o.__module__ == "ast" and o.__name__ == "Expression"
          for o in gc.get_objects()))
"""


def _fresh(code: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True, env=env).stdout


def _compiled(code: str, pycache: Path) -> str:
    """``code``'s output in an interpreter that imports every module from its bytecode
    cache (``pycache``, filled by a first run): a module imported from its source is
    compiled with ``compile()``, as an installed package's never is."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    _fresh(code, env)
    return _fresh(code, env)


def test_daemon_modules_command_line_and_config_import_no_inspect_shutil_or_urllib(
        tmp_path: Path) -> None:
    modules, ast_built = _compiled(_DAEMON, tmp_path).splitlines()
    loaded = set(modules.split())
    assert "pynydus.daemon.fuseloop" in loaded and "dataclasses" in loaded
    assert not loaded & {"inspect", "ast", "dis", "shutil", "bz2", "lzma", "urllib.parse",
                         "ipaddress", "gettext", "locale"}
    assert ast_built == "False"


def test_the_daemons_command_line_errors_read_as_argparse_writes_them() -> None:
    r = subprocess.run([sys.executable, "-m", "pynydus.daemon.main", "--bogus", "--thread-num"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == "pynydusd: error: argument --thread-num/--fuse-threads: " \
        "expected one argument", r.stderr


@pytest.mark.parametrize("module", ["pynydus.config", "pynydus.daemon.config"])
def test_config_sections_resolve_their_annotations_as_get_type_hints(module: str) -> None:
    import dataclasses
    import importlib
    import typing

    sections = [v for v in vars(importlib.import_module(module)).values()
                if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == module]
    assert len(sections) >= 10
    for cls in sections:
        assert confschema.type_hints(cls) == typing.get_type_hints(cls), cls


def test_dataclass_without_docstring_gets_dataclasses_own_and_inspect_works() -> None:
    out = _fresh("""
import sys
import pynydus
from dataclasses import dataclass
assert "inspect" not in sys.modules
@dataclass
class Point:
    x: int
    y: str = ""
import inspect
print(Point.__doc__, "inspect" in sys.modules, inspect.signature(len))
""")
    assert out.split("\n")[0] == "Point(x: int, y: str = '') True (obj, /)"


@pytest.mark.parametrize("query", [
    "", "mountpoint=/a", "mountpoint=/a&mountpoint=/b", "a=1&&b=2&c", "a=&b=x",
    "m=%2Fpath%20with%2bplus+space", "m=%C3%A9t%C3%A9", "m=%ZZ%4", "m=%FF", "%6D=1",
    "m=a=b", "=x", "m=\u00e9", "m=%C3\u00a9",
])
def test_parse_query_reads_a_query_string_as_parse_qs_does(query: str) -> None:
    from urllib.parse import parse_qs

    assert parse_query(query) == {k: v[-1] for k, v in parse_qs(query).items()}
