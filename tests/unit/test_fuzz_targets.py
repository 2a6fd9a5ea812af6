"""Every fuzz target reads its seeds, and every input the campaign found and we fixed
(fuzz/regressions/TARGET/) now ends in one of pynydus's own errors, quickly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fuzz.__main__ import CORPUS, REGRESSIONS
from fuzz.targets import SPECS, run_one


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_seeds_and_regressions_end_in_our_errors(spec: object) -> None:
    files = sorted((CORPUS / spec.name).iterdir())  # type: ignore[attr-defined]
    assert files, f"no seeds for {spec.name}"  # type: ignore[attr-defined]
    reg = REGRESSIONS / spec.name  # type: ignore[attr-defined]
    files += sorted(reg.iterdir()) if reg.is_dir() else []
    for f in files:
        t0 = time.perf_counter()
        run_one(spec, f.read_bytes())  # type: ignore[arg-type]
        assert time.perf_counter() - t0 < 5.0, f"{f} is slow"  # 1 s instrumented, busy CI


def test_the_corpus_stays_small() -> None:
    total = sum(f.stat().st_size for f in Path(CORPUS).rglob("*") if f.is_file())
    total += sum(f.stat().st_size for f in Path(REGRESSIONS).rglob("*") if f.is_file())
    assert total < 1 << 20
