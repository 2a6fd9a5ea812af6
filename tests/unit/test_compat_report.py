"""scripts/compat-report.py rewrites the matrix of docs/compat.md from a run and keeps the
hand-written "Issue 11 checklist" section after it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compat_report",
                                                  REPO / "scripts" / "compat-report.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_rewrite_replaces_the_matrix_and_keeps_the_checklist(tmp_path: Path) -> None:
    cr = _script()
    out = tmp_path / "compat.md"
    out.write_text("# old matrix\n\n| old | pass |\n\n## Issue 11 checklist\n\n- [x] kept\n")
    cr.write(out, "# new matrix\n")
    assert out.read_text() == "# new matrix\n\n## Issue 11 checklist\n\n- [x] kept\n"


def test_a_report_without_a_checklist_is_the_matrix_alone(tmp_path: Path) -> None:
    cr = _script()
    out = tmp_path / "compat.md"
    cr.write(out, "# matrix\n")  # no earlier file
    assert out.read_text() == "# matrix\n"
    out.write_text("# old\n\nmentions ## Issue 11 checklist inline only\n")
    cr.write(out, "# matrix\n")
    assert out.read_text() == "# matrix\n"


def test_the_checklist_heading_is_the_one_docs_compat_uses() -> None:
    cr = _script()
    assert cr.hand_written((REPO / "docs" / "compat.md").read_text()).startswith(
        cr.HAND_WRITTEN + "\n")
