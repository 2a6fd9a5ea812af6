"""The transport knows nothing of the service it carries, and the service nothing of it."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
                         check=True, capture_output=True, text=True).stdout
    return {m for m in out.split() if m.startswith("pynydus")}


def test_the_transport_imports_no_snapshot_code() -> None:
    mods = _modules_after("import pynydus.grpcwire.server")
    assert not {m for m in mods if m.startswith(("pynydus.snapshot", "pynydus.manager"))}


def test_the_service_does_not_import_the_transports_server() -> None:
    mods = _modules_after("import pynydus.snapshot.service")
    assert "pynydus.grpcwire.server" not in mods
    assert "pynydus.snapshot.server" not in mods
