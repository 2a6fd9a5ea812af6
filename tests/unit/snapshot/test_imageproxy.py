"""The CRI image service proxy in-process: our HTTP/2 server in front of a fake containerd
(grpcio) that, like containerd during a pull, calls back into the same server.

The snapshotter's server here has one worker thread. The fake containerd's PullImage
calls the server's other service and answers only when that call returns: a proxied call
holding the only worker would deadlock; detached calls must not.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from pynydus.grpcwire import server as h2server
from pynydus.grpcwire.rpc import Method
from pynydus.registry.credentials import Credentials
from pynydus.registry.crikeychain import CriKeychain
from pynydus.registry.reference import parse_reference
from pynydus.snapshot.imageproxy import ImageServiceProxy
from tests.harness.criapi import cri_pb2, cri_pb2_grpc
from tests.harness.util import make_workdir

ECHO = "/test.Callback/Echo"


class _Echo:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


class FakeContainerd(cri_pb2_grpc.ImageServiceServicer):
    def __init__(self, callback: Path) -> None:
        self.callback = callback
        self.pulls: list[Any] = []

    def PullImage(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.pulls.append(request)
        with grpc.insecure_channel(f"unix://{self.callback}") as ch:
            echoed = ch.unary_unary(ECHO)(b"unpack " + request.image.image.encode(), timeout=20)
        return cri_pb2.PullImageResponse(image_ref=echoed.decode())

    def RemoveImage(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.NOT_FOUND, f"image {request.image.image} not found")

    def ListImages(self, request: Any, context: grpc.ServicerContext) -> Any:
        return cri_pb2.ListImagesResponse(images=[cri_pb2.Image(id="sha256:1",
                                                                repo_tags=["r.io/a:1"])])


@pytest.fixture
def scratch() -> Iterator[tuple[contextlib.ExitStack, Path]]:
    """A private directory and a stack of clean-ups: whatever a test starts is stopped
    (in reverse order, then the directory removed) however the test or its set-up ends."""
    with contextlib.ExitStack() as stack:
        d = make_workdir("criproxy")
        stack.callback(shutil.rmtree, d, ignore_errors=True)
        yield stack, d


def _started(stack: contextlib.ExitStack, server: grpc.Server) -> grpc.Server:
    stack.callback(lambda: server.stop(0).wait(10))
    server.start()
    return server


def _containerd(stack: contextlib.ExitStack, fake: FakeContainerd, sock: Path,
                workers: int) -> grpc.Server:
    """``fake`` served on ``sock``, started, stopped with ``stack``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    cri_pb2_grpc.add_ImageServiceServicer_to_server(fake, server)
    server.add_insecure_port(f"unix://{sock}")
    return _started(stack, server)


def _proxy(stack: contextlib.ExitStack, containerd: Path) -> ImageServiceProxy:
    proxy = ImageServiceProxy(str(containerd), CriKeychain())
    stack.callback(proxy.close)
    return proxy


def _channel(stack: contextlib.ExitStack, sock: Path) -> grpc.Channel:
    channel = grpc.insecure_channel(f"unix://{sock}")
    stack.callback(channel.close)
    return channel


@pytest.fixture
def node(scratch: tuple[contextlib.ExitStack, Path]) -> dict[str, Any]:
    stack, d = scratch
    ours, theirs = d / "snap.sock", d / "ctrd.sock"
    fake = FakeContainerd(ours)
    _containerd(stack, fake, theirs, workers=4)
    proxy = _proxy(stack, theirs)
    methods = {ECHO: Method("Echo", bytes, lambda req: _Echo(req)), **proxy.methods()}
    server = h2server.serve(methods, ours, workers=1)
    stack.callback(lambda: server.stop(0).wait(10))
    channel = _channel(stack, ours)
    return {"stub": cri_pb2_grpc.ImageServiceStub(channel), "fake": fake,
            "keychain": proxy.keychain, "channel": channel}


def test_pull_is_forwarded_and_its_credentials_kept(node: dict[str, Any]) -> None:
    req = cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image="r.io/app:1"),
                                   auth=cri_pb2.AuthConfig(username="u", password="pw"))
    answer = node["stub"].PullImage(req, timeout=30)
    assert answer.image_ref == "unpack r.io/app:1"  # containerd's call back was served
    assert node["fake"].pulls[0].auth.password == "pw"  # forwarded unchanged
    found = node["keychain"].find(parse_reference("r.io/app:1"), {})
    assert found is not None and found.credentials == Credentials("u", "pw")


def test_concurrent_pulls_do_not_starve_the_callbacks(node: dict[str, Any]) -> None:
    results: list[str] = []

    def one(i: int) -> None:
        req = cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=f"r.io/app:{i}"))
        results.append(node["stub"].PullImage(req, timeout=30).image_ref)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert sorted(results) == [f"unpack r.io/app:{i}" for i in range(4)]


def test_containerd_errors_and_answers_pass_through(node: dict[str, Any]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        node["stub"].RemoveImage(cri_pb2.RemoveImageRequest(
            image=cri_pb2.ImageSpec(image="r.io/gone:1")), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "image r.io/gone:1 not found" in err.value.details()
    images = node["stub"].ListImages(cri_pb2.ListImagesRequest(), timeout=30).images
    assert [list(i.repo_tags) for i in images] == [["r.io/a:1"]]
    # a method containerd does not implement: its UNIMPLEMENTED comes back
    with pytest.raises(grpc.RpcError) as err:
        node["channel"].unary_unary("/runtime.v1.ImageService/ImageFsInfo")(b"", timeout=30)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_malformed_pull_is_refused_not_forwarded(node: dict[str, Any]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        node["channel"].unary_unary("/runtime.v1.ImageService/PullImage")(b"\x0a\x09ab",
                                                                          timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not node["fake"].pulls


def test_containerd_away_is_unavailable_naming_it(tmp_path: Path) -> None:
    proxy = ImageServiceProxy(str(tmp_path / "none.sock"), CriKeychain())
    try:
        with pytest.raises(Exception) as err:
            proxy.forward("/runtime.v1.ImageService/ListImages", b"", 5)
        assert getattr(err.value, "code", "") == "UNAVAILABLE"
        assert str(tmp_path / "none.sock") in str(err.value)
    finally:
        proxy.close()


def test_grpcio_server_serves_the_same_proxy(scratch: tuple[contextlib.ExitStack, Path]
                                             ) -> None:
    """PYNYDUS_SNAPSHOTS_SERVER=grpcio: the proxy as grpcio generic handlers."""
    stack, d = scratch
    _containerd(stack, FakeContainerd(d / "unused.sock"), d / "ctrd.sock", workers=2)
    proxy = _proxy(stack, d / "ctrd.sock")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(tuple(proxy.grpcio_handlers()))
    server.add_insecure_port(f"unix://{d}/p.sock")
    _started(stack, server)
    stub = cri_pb2_grpc.ImageServiceStub(_channel(stack, d / "p.sock"))
    assert [i.id for i in stub.ListImages(cri_pb2.ListImagesRequest(), timeout=30).images] \
        == ["sha256:1"]
    with pytest.raises(grpc.RpcError) as err:
        stub.RemoveImage(cri_pb2.RemoveImageRequest(image=cri_pb2.ImageSpec(image="a")),
                         timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
