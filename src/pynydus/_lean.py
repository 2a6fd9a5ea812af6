"""Standard modules imported without what they would bring for nothing: ``dataclasses``
without ``inspect``, ``argparse`` without ``gettext`` (for pynydusd).

``dataclasses`` imports ``inspect`` (with ast, dis, tokenize: 1.1 MB of every process's
resident memory, a twentieth of an idle daemon's) only to call ``inspect.signature`` for
a class that has no docstring of its own. The package imports this module first, so
``dataclasses`` is imported here with a stand-in ``inspect`` that imports the real one
at its first use (a dataclass without a docstring, or anything else asking for it).
Every dataclass of what a daemon imports has a docstring
(tests/unit/test_lean_imports.py), so an idle daemon never loads it.

``argparse`` looks each of its messages up with ``gettext``, whose first lookup imports
``locale`` (0.3 MB of an idle daemon's resident memory: its tables of locale aliases).
No catalog of argparse's messages is installed (Python ships none), so the lookups are
identities; the daemon package imports argparse with those (``import_argparse``).
"""

from __future__ import annotations

import sys
import types


class _ImportedOnUse(types.ModuleType):
    """A module's stand-in, out of ``sys.modules``: an attribute of it imports the
    module itself and answers from it."""

    def __getattr__(self, attr: str) -> object:
        return getattr(__import__(self.__name__), attr)


def _import_dataclasses() -> None:
    if "dataclasses" in sys.modules or "inspect" in sys.modules:
        return
    sys.modules["inspect"] = _ImportedOnUse("inspect")
    try:
        import dataclasses  # noqa: F401
    finally:
        if isinstance(sys.modules.get("inspect"), _ImportedOnUse):
            del sys.modules["inspect"]


def _same(message: str) -> str:
    return message


def _plural(singular: str, plural: str, n: int) -> str:
    return singular if n == 1 else plural


def import_argparse() -> None:
    """Import ``argparse`` with ``gettext``'s two lookups as the identities they are
    without a catalog, not ``gettext`` itself; a later import of gettext gets the real
    module. Nothing to do once argparse or gettext is imported."""
    if "argparse" in sys.modules or "gettext" in sys.modules:
        return
    untranslated = types.ModuleType("gettext")
    vars(untranslated).update(gettext=_same, ngettext=_plural)
    sys.modules["gettext"] = untranslated
    try:
        import argparse  # noqa: F401
    finally:
        if sys.modules.get("gettext") is untranslated:
            del sys.modules["gettext"]


_import_dataclasses()
