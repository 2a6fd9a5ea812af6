"""Worker processes: errors cross the process boundary as the pynydus error they are,
and the pool ends its own processes."""

from __future__ import annotations

import os

import pytest

from pynydus.convert.endpoints import RegistrySpec
from pynydus.convert.image import LayerDesc
from pynydus.convert.layer import BuildOptions, LayerJob
from pynydus.convert.workers import WorkerPool
from pynydus.errors import NydusError, Unavailable


def _job(tmp: str, index: int = 0) -> LayerJob:
    # port 9 on loopback: nothing listens, the connection is refused at once
    spec = RegistrySpec("127.0.0.1:9", "http", retry_limit=0, timeout=2.0)
    layer = LayerDesc("sha256:" + f"{index:064x}", 10, "application/vnd.oci.image.layer.v1.tar",
                      "none")
    return LayerJob(index, "x/y", layer, spec, BuildOptions(), tmp)


def test_worker_error_is_raised_in_the_parent_and_processes_end(tmp_path: object) -> None:
    pool = WorkerPool(2)
    pids = [p.pid for p in pool._procs]
    with pytest.raises(NydusError) as info:
        list(pool.run([_job(str(tmp_path), i) for i in range(3)]))
    assert isinstance(info.value, Unavailable)
    assert "127.0.0.1:9" in str(info.value) or "x/y" in str(info.value)
    pool.close()
    pool.close()  # idempotent
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped: not our child any more
