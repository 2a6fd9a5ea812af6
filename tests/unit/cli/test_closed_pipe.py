"""Every entry point exits quietly when its stdout's reader goes away
(``pynydus image inspect BOOT | head -1``): no traceback, status 141 as for SIGPIPE."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pynydus.cli.pipes import CLOSED_PIPE_EXIT
from tests.harness.paths import FIXTURES

BOOT = str(FIXTURES / "snapshotter-testdata" / "v5-bootstrap-file-size-736032" / "image"
           / "image.boot")

# (entry point module, argv): each writes to stdout
CASES = {
    "pynydus-inspect": ("pynydus.cli.main", ["image", "inspect", BOOT]),
    "pynydus-help": ("pynydus.cli.main", ["--help"]),
    "pynydusd-help": ("pynydus.daemon.main", ["--help"]),
    "nydus-image-inspect": ("pynydus.cli.nydus_image", ["inspect", BOOT]),
    "nydusctl-help": ("pynydus.cli.nydusctl", ["--help"]),
}


def _run_into_closed_pipe(module: str, argv: list[str]) -> tuple[int, str]:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte is written
    try:
        proc = subprocess.run(
            [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())",
             *argv],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=120, check=False,
        )
    finally:
        os.close(write)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_closed_stdout_pipe_ends_the_tool_quietly(case: tuple[str, list[str]]) -> None:
    module, argv = case
    rc, stderr = _run_into_closed_pipe(module, argv)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert rc in (CLOSED_PIPE_EXIT, 0), (rc, stderr)  # --help keeps argparse's status


def test_inspect_into_head_prints_its_first_line_only() -> None:
    proc = subprocess.run(
        f"{sys.executable} -m pynydus.cli.main image inspect {BOOT} | head -c 1",
        shell=True, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0 and len(proc.stdout) == 1
    assert "Traceback" not in proc.stderr, proc.stderr


def test_overlayfs_helper_is_wrapped_too() -> None:
    from pynydus.cli import overlayfs

    assert getattr(overlayfs.main, "__wrapped__", None) is not None
