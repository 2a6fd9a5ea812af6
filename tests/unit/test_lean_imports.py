"""What a daemon's modules import, in a fresh interpreter each (imports are process-wide).

Contract (issue 11's idle RSS): importing the daemon's modules and building its command
line loads neither ``inspect`` (with ast, dis, tokenize: ``dataclasses`` wants it only to
write a missing docstring), nor ``shutil`` (with bz2, lzma: argparse's terminal width),
nor ``urllib.parse`` (with ipaddress: the API's query strings); ``inspect`` still works
and a dataclass without a docstring still gets dataclasses' own.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pynydus.daemon.api import parse_query

_DAEMON = """
import sys
import pynydus.daemon.main, pynydus.daemon.daemon
pynydus.daemon.main.build_parser().parse_args(["--mountpoint", "/m"])
print(" ".join(sorted(sys.modules)))
"""


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout


def test_daemon_modules_and_command_line_import_no_inspect_shutil_or_urllib() -> None:
    loaded = set(_fresh(_DAEMON).split())
    assert "pynydus.daemon.fuseloop" in loaded and "dataclasses" in loaded
    assert not loaded & {"inspect", "ast", "dis",
                         "shutil", "bz2", "lzma", "urllib.parse", "ipaddress"}


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
