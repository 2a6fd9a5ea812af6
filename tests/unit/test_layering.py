"""Imports between pynydus's packages run one way, as docs/architecture.md draws them.

Every ``import pynydus.X`` / ``from pynydus.X import`` in a module of package P (at any
depth: lazy imports inside functions count too) must name a package ranked below P. A
new package gets a rank here and a row in docs/architecture.md; an upward import is a
design change to discuss, not a line to add to ALLOWED.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "pynydus"

# bottom to top; packages of equal rank may not import each other
RANK = {
    "errors": 0,
    "labels": 1, "logs": 1, "confschema": 1, "signature": 1,
    "api": 1,  # generated protobuf code (containerd's Snapshots API)
    "config": 2, "host": 2,
    "rafs": 3, "registry": 3, "grpcwire": 3, "system": 3,
    "daemon": 4,
    "manager": 5, "convert": 5,
    "tarfs": 6,  # the kernel's EROFS over OCI layer tars: shares the blob cache, parses manifests
    "snapshot": 7,
    "cli": 8,
}
ALLOWED = {
    # pynydusd's entry point shares the quiet-on-closed-pipe wrapper of the other programs
    ("daemon/main.py", "cli"),
}


def _package(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _imported_packages(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n.split(".")[1] for n in names if n.startswith("pynydus.") and n.count(".") >= 1}


def test_every_package_has_a_rank() -> None:
    found = {_package(p) for p in SRC.rglob("*.py")} - {"__init__"}
    assert found <= RANK.keys(), f"give these a rank (and a row in docs/architecture.md): {found - RANK.keys()}"


def test_imports_only_run_downward() -> None:
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        pkg = _package(path)
        if pkg in ("__init__", "api"):
            continue
        rel = path.relative_to(SRC).as_posix()
        for dep in _imported_packages(ast.parse(path.read_text(), str(path))):
            if dep == pkg or (rel, dep) in ALLOWED:
                continue
            if RANK.get(dep, 99) >= RANK[pkg]:
                upward.append(f"{rel} imports pynydus.{dep}")
    assert not upward, "imports that run up or sideways:\n" + "\n".join(upward)
