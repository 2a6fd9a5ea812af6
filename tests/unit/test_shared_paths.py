"""The shared reference data is found beside the checkout, wherever that is.

Fixture tests parametrize over what they find there; without this check a
missing ../shared would quietly turn them into zero tests.
"""

from __future__ import annotations

from tests.harness.paths import FIXTURES, REPO


def test_shared_fixtures_are_beside_the_checkout() -> None:
    assert (REPO / "pyproject.toml").is_file()
    tars = sorted((FIXTURES / "tar").glob("*.tar"))
    assert len(tars) >= 3, f"no fixture tars under {FIXTURES / 'tar'}: is ../shared there?"
    assert (FIXTURES / "snapshotter-testdata").is_dir()
