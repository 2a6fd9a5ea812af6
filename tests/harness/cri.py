"""A small CRI ImageService client: pull images through containerd as kubelet does.

The CRI plugin pulls with its configured snapshotter and passes the
``containerd.io/snapshot/cri.*`` labels (image ref, manifest and layer digests)
to it, which a remote snapshotter needs to know where to fetch from.
"""

from __future__ import annotations

import grpc

from tests.harness.criapi import cri_pb2, cri_pb2_grpc


class CriImages:
    def __init__(self, socket: str, timeout: float = 300) -> None:
        self.channel = grpc.insecure_channel("unix:" + socket)
        self.stub = cri_pb2_grpc.ImageServiceStub(self.channel)
        self.timeout = timeout

    def pull(self, ref: str, username: str = "", password: str = "") -> str:
        auth = cri_pb2.AuthConfig(username=username, password=password) if username else None
        req = cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=ref), auth=auth)
        return self.stub.PullImage(req, timeout=self.timeout).image_ref

    def remove(self, ref: str) -> None:
        self.stub.RemoveImage(cri_pb2.RemoveImageRequest(image=cri_pb2.ImageSpec(image=ref)), timeout=60)

    def list(self) -> list[cri_pb2.Image]:
        return list(self.stub.ListImages(cri_pb2.ListImagesRequest(), timeout=60).images)

    def close(self) -> None:
        self.channel.close()
