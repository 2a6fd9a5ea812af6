"""Imports between pynydus's packages run one way, as docs/architecture.md draws them.

Every ``import pynydus.X`` / ``from pynydus.X import`` in a module of package P (at any
depth: lazy imports inside functions count too) must name a package ranked below P. A
new package gets a rank here and a row in docs/architecture.md; an upward import is a
design change to discuss, not a line to add to ALLOWED.

Inside ``rafs/`` the same holds for its six packages (``RAFS_ORDER``, as
``pynydus/rafs/__init__.py`` lists them), and code outside ``rafs/`` imports a rafs
package's names from its ``__init__`` (``pynydus.rafs.P``), not from its modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "pynydus"

# bottom to top; packages of equal rank may not import each other
RANK = {
    "errors": 0,
    "_lean": 0,  # the package's first import: dataclasses without inspect
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


# rafs/'s packages, bottom to top: each imports only those before it
RAFS_ORDER = ("format", "decoder", "read", "source", "builder", "merge")


def _package(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("pynydus.")}


def _imported_packages(tree: ast.AST) -> set[str]:
    return {n.split(".")[1] for n in _imported_modules(tree) if n.count(".") >= 1}


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


def test_every_rafs_package_has_a_place_in_the_order() -> None:
    found = {p.name for p in (SRC / "rafs").iterdir() if (p / "__init__.py").is_file()}
    assert found == set(RAFS_ORDER), f"place these in RAFS_ORDER (and pynydus/rafs/__init__.py): {found ^ set(RAFS_ORDER)}"


def test_rafs_packages_import_only_the_ones_below() -> None:
    upward = []
    for path in sorted((SRC / "rafs").rglob("*.py")):
        parts = path.relative_to(SRC / "rafs").parts
        if len(parts) < 2:
            continue  # rafs/__init__.py: a docstring
        own = RAFS_ORDER.index(parts[0])
        for mod in _imported_modules(ast.parse(path.read_text(), str(path))):
            sub = mod.split(".")
            if sub[1] == "rafs" and len(sub) > 2 and RAFS_ORDER.index(sub[2]) > own:
                upward.append(f"rafs/{'/'.join(parts)} imports {mod}")
    assert not upward, "rafs imports that run up:\n" + "\n".join(upward)


def test_code_outside_rafs_imports_its_packages_not_their_modules() -> None:
    # ``from pynydus.rafs.format import layout`` (a module used as a namespace of records)
    # names the package and passes; ``from pynydus.rafs.format.layout import X`` does not.
    deep = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("rafs/"):
            continue
        for mod in _imported_modules(ast.parse(path.read_text(), str(path))):
            if mod.startswith("pynydus.rafs.") and mod.count(".") > 2:
                deep.append(f"{rel} imports {mod}")
    assert not deep, "import these from the rafs package's __init__:\n" + "\n".join(sorted(deep))
