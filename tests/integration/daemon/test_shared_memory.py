"""The shared daemon gives back what removed images held (issue 19, "Churn and scale").

Contract: images mounted through the API and unmounted leave nothing of theirs in the
daemon (no mapping of their bootstrap, no thread), and its RSS after any number of
mount/remove cycles stays within a bound of its warm figure that depends on how many
images were mounted at once, not on how many were ever mounted. What stays is the
allocator's free memory from that peak (pymalloc's emptied pools in arenas that still
hold a live object; glibc's the same under PYTHONMALLOC=malloc): about 27 KB per image
of the peak measured with registry images (docs/benchmarks.md). A leak of the images
themselves (each holds ~30 KB of objects, its mappings and threads) grows with every
cycle and crosses the bound by the third.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.harness.pynydusd import Pynydusd
from tests.harness.util import wait_until

from .conftest import Image, StartFn, localfs_config

PEAK = 40  # images mounted at once in each cycle
CYCLES = 4
# per image of the peak: twice what stays measured, plus 1 MiB for what settles late
BOUND_PER_IMAGE_KIB = 64
SLACK_KIB = 1024
# growth from the first cycle's figure to the last's: none expected (measured flat); a
# leak of the closed images' objects alone adds ~1.1 MB a cycle
CREEP_KIB = 2048
_TRIMMED = re.compile(r"memory trimmed after unmounts: RSS (\d+) KiB")


def _cycle(d: Pynydusd, image: Image, cache: Path, tag: str, n: int) -> str:
    body = {"source": str(image.bootstrap), "fs_type": "rafs",
            "config": json.dumps(localfs_config(image.blob_dir, cache))}
    names = [f"{tag}{i}" for i in range(n)]
    for name in names:
        assert d.api("POST", f"/api/v1/mount?mountpoint=/{name}", body) == (204, None)
        assert (d.mountpoint / name / "files/tiny").read_bytes()
    for name in names:
        assert d.api("DELETE", f"/api/v1/mount?mountpoint=/{name}") == (204, None)
    return names[-1]


def _rss_after_trim(d: Pynydusd, last: str) -> int:
    """The RSS (KiB) the daemon logged with the trim that followed its unmount of
    ``last`` (the trim runs a second after an unmount, later under load)."""
    found: list[int] = []

    def trimmed() -> bool:
        text = d.log_text()
        at = text.rfind(f"unmounted /{last}\n")
        found[:] = [int(n) for n in _TRIMMED.findall(text, at if at >= 0 else len(text))]
        return bool(found)

    wait_until(trimmed, 60, f"the trim after the unmount of /{last}")
    return found[-1]


def _threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def test_shared_daemon_memory_after_removal_is_bounded_by_the_peak(
        full_image: Image, start_daemon: StartFn, workdir: Path) -> None:
    d = start_daemon()  # shared mode: images come through the API
    cache = workdir / "cache"
    warm = _rss_after_trim(d, _cycle(d, full_image, cache, "warm", 5))
    threads = _threads(d.pid)
    bound = warm + PEAK * BOUND_PER_IMAGE_KIB + SLACK_KIB
    seen = []
    for c in range(CYCLES):
        seen.append(_rss_after_trim(d, _cycle(d, full_image, cache, f"c{c}i", PEAK)))
        maps = Path(f"/proc/{d.pid}/maps").read_text()
        assert str(full_image.bootstrap) not in maps, f"cycle {c}: a bootstrap is still mapped"
        wait_until(lambda: _threads(d.pid) <= threads, 30, "the images' threads to end")
    print(f"shared daemon RSS: warm {warm} KiB, after each cycle of {PEAK} images {seen}")
    assert max(seen) <= bound, (f"RSS after removal {seen} KiB over warm {warm} KiB + "
                                f"{PEAK} x {BOUND_PER_IMAGE_KIB} + {SLACK_KIB} KiB")
    assert seen[-1] - seen[0] <= CREEP_KIB, f"RSS grows with every cycle: {seen} KiB"
