"""Fault injection: 5xx, truncated bodies, redirects, dead and silent registries,
mirrors and proxies — with a real docker-registry behind our fault proxy."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pynydus.errors import NotFound, Unavailable
from pynydus.registry import Mirror, RegistryClient, ShortRead, compute_digest
from tests.harness.registry import Registry
from tests.harness.util import free_port

from .conftest import backend_client
from .servers import FaultProxy

Make = Callable[..., RegistryClient]
MakeProxy = Callable[..., FaultProxy]
REPO = "fault/img"


@pytest.fixture(scope="module")
def stored(registry: Registry) -> tuple[bytes, str]:
    data = os.urandom(3 << 20)
    d = compute_digest(data)
    with RegistryClient(registry.host, scheme="http") as c:
        c.push_blob(REPO, data, d)
    return data, d


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A port that accepts TCP connections (kernel backlog) but never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield f"127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


def fast(**kw: object) -> dict[str, object]:
    return {"sleep": lambda _s: None, **kw}


# ------------------------------------------------------------------------- retries
def test_5xx_is_retried_then_succeeds(registry: Registry, stored: tuple[bytes, str],
                                      client: Make, fault_proxy: MakeProxy) -> None:
    data, d = stored
    fp = fault_proxy(registry.host)
    c = client(fp.host, retry_limit=3, **fast())
    fp.fail(2, 500)
    assert c.read_blob_range(REPO, d, 100, 1000) == data[100:1100]
    assert c.metrics.retries == 2
    fp.fail(1, 503)
    assert c.head_blob(REPO, d).size == len(data)


def test_5xx_beyond_the_retry_limit_is_unavailable_with_the_cause(
        registry: Registry, stored: tuple[bytes, str], client: Make,
        fault_proxy: MakeProxy) -> None:
    _, d = stored
    fp = fault_proxy(registry.host)
    c = client(fp.host, retry_limit=2, **fast())
    fp.fail(10, 502)
    with pytest.raises(Unavailable, match="HTTP 502") as ei:
        c.read_blob_range(REPO, d, 0, 10)
    assert "3 attempts" in str(ei.value)
    assert fp.count("GET", "/blobs/") == 3


def test_4xx_is_not_retried(registry: Registry, stored: tuple[bytes, str], client: Make,
                            fault_proxy: MakeProxy) -> None:
    _, d = stored
    fp = fault_proxy(registry.host)
    c = client(fp.host, retry_limit=3, **fast())
    fp.fail(1, 404)
    with pytest.raises(NotFound):
        c.read_blob_range(REPO, d, 0, 10)
    assert c.metrics.retries == 0 and fp.count("GET") == 1


def test_exponential_backoff_between_attempts(registry: Registry, stored: tuple[bytes, str],
                                              client: Make, fault_proxy: MakeProxy) -> None:
    _, d = stored
    fp = fault_proxy(registry.host)
    sleeps: list[float] = []
    c = client(fp.host, retry_limit=4, sleep=sleeps.append)
    fp.fail(4, 500)
    c.read_blob_range(REPO, d, 0, 10)
    assert len(sleeps) == 4
    # jittered in [d/2, d] of 0.1, 0.2, 0.4, 0.8 s
    for s, base in zip(sleeps, (0.1, 0.2, 0.4, 0.8), strict=True):
        assert base / 2 <= s <= base


def test_short_body_is_detected_and_retried(registry: Registry, stored: tuple[bytes, str],
                                            client: Make, fault_proxy: MakeProxy) -> None:
    data, d = stored
    fp = fault_proxy(registry.host, match="/blobs/")
    c = client(fp.host, retry_limit=2, **fast())
    fp.short(1, keep=100)
    assert c.read_blob_range(REPO, d, 0, 4096) == data[:4096]
    assert c.metrics.retries == 1
    fp.short(10, keep=100)
    with pytest.raises(ShortRead, match="got 100 of 4096"):
        c.read_blob_range(REPO, d, 0, 4096)


def test_body_cut_mid_way_is_retried(registry: Registry, stored: tuple[bytes, str],
                                     client: Make, fault_proxy: MakeProxy) -> None:
    data, d = stored
    fp = fault_proxy(registry.host, match="/blobs/")
    c = client(fp.host, retry_limit=2, **fast())
    fp.cut(1, keep=1000)
    assert c.read_blob_range(REPO, d, 5, 1 << 20) == data[5:5 + (1 << 20)]
    assert c.metrics.retries == 1


def test_full_blob_stream_resumes_after_a_cut(registry: Registry, stored: tuple[bytes, str],
                                              client: Make, fault_proxy: MakeProxy) -> None:
    data, d = stored
    fp = fault_proxy(registry.host, match="/blobs/")
    c = client(fp.host, retry_limit=2, **fast())
    fp.cut(1, keep=1 << 20)
    assert b"".join(c.get_blob(REPO, d)) == data
    ranges = [h.get("Range") for m, p, h in fp.log if m == "GET"]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")


def test_200_full_body_answer_is_sliced(registry: Registry, stored: tuple[bytes, str],
                                        client: Make, fault_proxy: MakeProxy) -> None:
    data, d = stored
    fp = fault_proxy(registry.host, ignore_range=True)
    c = client(fp.host)
    assert c.read_blob_range(REPO, d, 2 << 20, 4096) == data[2 << 20:(2 << 20) + 4096]
    assert c.metrics.status_counts.get(200, 0) >= 1


# ----------------------------------------------------------------------- redirects
def test_redirect_is_followed_and_cached_per_blob(registry: Registry, stored: tuple[bytes, str],
                                                  client: Make, fault_proxy: MakeProxy) -> None:
    data, d = stored
    fp = fault_proxy(registry.host, redirect=True)
    c = client(fp.host)
    for off in (0, 4096, 8192, 1 << 20):
        assert c.read_blob_range(REPO, d, off, 4096) == data[off:off + 4096]
    assert fp.count("GET", "/blobs/") == 1  # later ranges went straight to storage
    m = c.metrics.snapshot()
    assert m["redirects"] == 1 and m["redirect_cache_hits"] == 3
    assert c.head_blob(REPO, d).size == len(data)  # HEAD follows the redirect too


def test_failing_cached_redirect_falls_back_to_the_registry(
        registry: Registry, stored: tuple[bytes, str], client: Make,
        fault_proxy: MakeProxy) -> None:
    data, d = stored
    storage = fault_proxy(registry.host)                 # "blob storage"
    front = fault_proxy(registry.host, redirect=True)    # "registry" redirecting to it
    front.upstream = storage.host
    c = client(front.host, **fast())
    assert c.read_blob_range(REPO, d, 0, 10) == data[:10]
    storage.fail(1, 403)                                 # presigned URL expired
    assert c.read_blob_range(REPO, d, 10, 10) == data[10:20]
    assert front.count("GET", "/blobs/") == 2            # asked the registry again
    assert c.metrics.retries == 0


# ----------------------------------------------------------------- dead registries
def test_stopped_registry_is_unavailable_quickly(make_registry: Callable[..., Registry],
                                                 client: Make) -> None:
    reg = make_registry()
    data = os.urandom(1000)
    d = compute_digest(data)
    c = client(reg.host, retry_limit=2, connect_timeout=1.0, timeout=2.0)
    c.push_blob("dead/img", data, d)
    reg.stop()
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="3 attempts") as ei:
        c.read_blob_range("dead/img", d, 0, 10)
    assert time.monotonic() - t0 < 3.0
    assert "ConnectError" in str(ei.value)
    assert c.metrics.errors >= 3


def test_silent_registry_times_out_without_hanging(blackhole: str, client: Make) -> None:
    c = client(blackhole, retry_limit=1, timeout=0.5, connect_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="Timeout"):
        c.read_blob_range("x/y", "sha256:" + "0" * 64, 0, 10)
    assert time.monotonic() - t0 < 3.0


# ------------------------------------------------------------------ mirrors, proxy
def test_mirror_serves_reads_before_the_origin(registry: Registry, stored: tuple[bytes, str],
                                               client: Make, fault_proxy: MakeProxy) -> None:
    data, d = stored
    origin = fault_proxy(registry.host)
    mirror = fault_proxy(registry.host)
    c = client(origin.host, mirrors=[Mirror(f"http://{mirror.host}",
                                            {"X-Dragonfly-Registry": "http://o"})])
    assert c.read_blob_range(REPO, d, 0, 100) == data[:100]
    assert mirror.count("GET", "/blobs/") == 1 and origin.count("GET") == 0
    assert mirror.log[-1][2].get("X-Dragonfly-Registry") == "http://o"
    # Whether a push is needed is a question for the origin, never a mirror.
    assert c.push_blob("fault/pushed", data, d) == "uploaded"
    assert origin.count("PUT") == 1 and mirror.count("PUT") == 0  # pushes skip mirrors
    assert origin.count("HEAD", "fault/pushed") == 1 and mirror.count("HEAD") == 0


def test_failing_mirrors_fall_back_in_order_then_origin(
        registry: Registry, stored: tuple[bytes, str], client: Make,
        fault_proxy: MakeProxy) -> None:
    data, d = stored
    origin = fault_proxy(registry.host)
    sick = fault_proxy(registry.host)
    dead = f"127.0.0.1:{free_port()}"
    c = client(origin.host, mirrors=[dead, f"http://{sick.host}"], retry_limit=0)
    sick.fail(1, 500)
    assert c.read_blob_range(REPO, d, 0, 100) == data[:100]
    assert sick.count("GET") == 1 and origin.count("GET") == 1
    assert c.read_blob_range(REPO, d, 0, 100) == data[:100]  # sick mirror healthy again
    assert sick.count("GET") == 2 and origin.count("GET") == 1
    assert c.metrics.mirror_fallbacks == 3  # dead twice, sick once


def test_forward_proxy_and_fallback_when_it_is_down(
        registry: Registry, stored: tuple[bytes, str], client: Make,
        fault_proxy: MakeProxy) -> None:
    data, d = stored
    proxy = fault_proxy(registry.host)
    c = client(registry.host, proxy=f"http://{proxy.host}")
    assert c.read_blob_range(REPO, d, 0, 100) == data[:100]
    assert proxy.count("GET", "/blobs/") == 1
    down = client(registry.host, proxy=f"http://127.0.0.1:{free_port()}", retry_limit=0)
    assert down.read_blob_range(REPO, d, 0, 100) == data[:100]
    strict = client(registry.host, proxy=f"http://127.0.0.1:{free_port()}",
                    proxy_fallback=False, retry_limit=0)
    with pytest.raises(Unavailable):
        strict.read_blob_range(REPO, d, 0, 100)


def test_https_with_skip_verify_falls_back_to_http(registry: Registry,
                                                   stored: tuple[bytes, str],
                                                   client: Make) -> None:
    data, d = stored
    c = client(registry.host, scheme="https", skip_verify=True)
    assert c.read_blob_range(REPO, d, 0, 10) == data[:10]
    strict = client(registry.host, scheme="https", retry_limit=0)
    with pytest.raises(Unavailable):
        strict.read_blob_range(REPO, d, 0, 10)


def test_redirect_target_host_can_be_rewritten(registry: Registry, stored: tuple[bytes, str],
                                               client: Make, fault_proxy: MakeProxy) -> None:
    data, d = stored
    internal = fault_proxy(registry.host)            # what blob_redirected_host names
    front = fault_proxy(registry.host, redirect=True)
    c = client(front.host, blob_redirected_host=internal.host)
    assert c.read_blob_range(REPO, d, 0, 10) == data[:10]
    assert internal.count("GET", "/blobs/") == 1


def test_connections_are_kept_alive_and_reused(registry: Registry, stored: tuple[bytes, str],
                                               client: Make, fault_proxy: MakeProxy) -> None:
    data, d = stored
    fp = fault_proxy(registry.host)
    c = client(fp.host)
    for i in range(20):
        assert c.read_blob_range(REPO, d, i * 4096, 4096) == data[i * 4096:(i + 1) * 4096]
    c.head_blob(REPO, d)
    assert fp.connections == 1
    assert c.metrics.requests == 21


def test_unavailable_chains_the_last_cause(registry: Registry, stored: tuple[bytes, str],
                                           client: Make, fault_proxy: MakeProxy) -> None:
    _, d = stored
    fp = fault_proxy(registry.host)
    c = client(fp.host, retry_limit=1, **fast())
    fp.fail(5, 500)
    with pytest.raises(Unavailable) as ei:
        c.read_blob_range(REPO, d, 0, 10)
    assert getattr(ei.value.__cause__, "status", None) == 500


def test_retry_after_is_honoured_up_to_a_cap(registry: Registry, stored: tuple[bytes, str],
                                             client: Make, fault_proxy: MakeProxy) -> None:
    _, d = stored
    fp = fault_proxy(registry.host)
    sleeps: list[float] = []
    c = client(fp.host, retry_limit=2, sleep=sleeps.append)
    fp.fail(1, 429, {"Retry-After": "3"})
    c.head_blob(REPO, d)
    assert sleeps == [3.0]
    fp.fail(1, 503, {"Retry-After": "3600"})
    c.head_blob(REPO, d)
    assert sleeps[-1] == 5.0


def test_referrers_api_is_used_when_the_registry_has_it(
        registry: Registry, stored: tuple[bytes, str], client: Make,
        fault_proxy: MakeProxy) -> None:
    fp = fault_proxy(registry.host)
    subject = "sha256:" + "1" * 64
    entries = [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + "2" * 64, "size": 10, "artifactType": "a/x"},
               {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + "3" * 64, "size": 10, "artifactType": "a/y"}]
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": entries}).encode()
    fp.routes[f"/referrers/{subject}"] = (
        200, {"Content-Type": "application/vnd.oci.image.index.v1+json"}, body)
    c = client(fp.host)
    assert len(c.get_referrers("fault/img", subject)["manifests"]) == 2
    # The registry did not filter (no OCI-Filters-Applied): the client does.
    assert [m["artifactType"] for m in
            c.get_referrers("fault/img", subject, artifact_type="a/y")["manifests"]] == ["a/y"]
    assert fp.count("GET", "/manifests/sha256-") == 0  # no fallback-tag lookup


def test_failed_chunk_upload_restarts_the_session(registry: Registry, client: Make,
                                                  fault_proxy: MakeProxy) -> None:
    fp = fault_proxy(registry.host, match="/blobs/uploads/", match_method="PATCH")
    c = client(fp.host, **fast())
    data = os.urandom(700_000)
    d = compute_digest(data)
    f = io.BytesIO(data)
    fp.fail(1, 500)  # the first PATCH fails; the retry seeks the file back
    assert c.push_blob("fault/upload", f, d, chunk_size=256 * 1024) == "uploaded"
    assert c.metrics.retries == 1
    assert fp.count("POST", "/blobs/uploads/") == 2
    assert b"".join(c.get_blob("fault/upload", d)) == data


def test_many_threads_through_intermittent_faults(registry: Registry,
                                                  stored: tuple[bytes, str], client: Make,
                                                  fault_proxy: MakeProxy) -> None:
    data, d = stored
    fp = fault_proxy(registry.host, match="/blobs/")
    c = client(fp.host, retry_limit=5, **fast())
    fp.fail(6, 503)
    fp.short(4, keep=10)
    fp.cut(4, keep=100)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(10):
                off = ((k * 10 + i) * 65536) % (len(data) - 65536)
                assert c.read_blob_range(REPO, d, off, 65536) == data[off:off + 65536]
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert c.metrics.retries == 14


def test_nydusd_backend_config_keys_reach_the_client(registry: Registry,
                                                     stored: tuple[bytes, str],
                                                     fault_proxy: MakeProxy) -> None:
    data, d = stored
    mirror = fault_proxy(registry.host)
    internal = fault_proxy(registry.host)
    front = fault_proxy(registry.host, redirect=True)
    cfg = {"scheme": "http", "host": front.host, "repo": REPO, "timeout": 2,
           "connect_timeout": 2, "retry_limit": 0, "blob_redirected_host": internal.host,
           "proxy": {"url": "", "fallback": True},
           "mirrors": [{"host": f"http://{mirror.host}", "headers": {"X-M": "1"}}]}
    with backend_client(cfg) as c:
        assert c.read_blob_range(REPO, d, 0, 10) == data[:10]
        assert mirror.count("GET", "/blobs/") == 1 and mirror.log[-1][2].get("X-M") == "1"
    cfg["mirrors"] = []
    with backend_client(cfg) as c:
        assert c.read_blob_range(REPO, d, 0, 10) == data[:10]
        assert internal.count("GET", "/blobs/") == 1  # redirect rewritten to it
