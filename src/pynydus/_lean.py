"""``dataclasses`` imported without ``inspect``, which it needs only to write a docstring.

``dataclasses`` imports ``inspect`` (with ast, dis, tokenize: 1.1 MB of every process's
resident memory, a twentieth of an idle daemon's) only to call ``inspect.signature`` for
a class that has no docstring of its own. The package imports this module first, so
``dataclasses`` is imported here with a stand-in ``inspect`` that imports the real one
at its first use (a dataclass without a docstring, or anything else asking for it).
Every dataclass of what a daemon imports has a docstring
(tests/unit/test_lean_imports.py), so an idle daemon never loads it.
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


_import_dataclasses()
