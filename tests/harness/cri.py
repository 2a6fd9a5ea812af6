"""CRI clients: pull and run images through containerd as kubelet does.

``CriImages`` is a small ImageService client over gRPC; ``Crictl`` drives
Kubernetes' own ``crictl`` (images, pods, containers, stats).

The CRI plugin pulls with its configured snapshotter and passes the
``containerd.io/snapshot/cri.*`` labels (image ref, manifest and layer digests)
to it, which a remote snapshotter needs to know where to fetch from.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import grpc

from tests.harness.containerd import Containerd
from tests.harness.criapi import cri_pb2, cri_pb2_grpc
from tests.harness.util import run


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


class Crictl:
    """Kubernetes' own CRI client, ``crictl`` (the ``crictl`` peer of ``scripts/peers.sh``),
    pointed at one private containerd, as kubelet would drive it.

    Its configuration file lives in the containerd's work directory (``crictl.yaml``: no
    host ``/etc/crictl.yaml`` is read). Pods run with the host network (no CNI here) and
    their cgroups under ``/<ctrd.namespace>``-like names the containerd harness cleans
    (``cgroup_parent``); logs go below the work directory.
    """

    def __init__(self, ctrd: Containerd, timeout_s: int = 300,
                 image_endpoint: Path | None = None) -> None:
        """``image_endpoint``: the ImageService's socket when it is not containerd's
        (kubelet's ``--image-service-endpoint``: the snapshotter's CRI keychain proxy)."""
        from .peers import peer_bin

        self.bin = str(peer_bin("crictl", "crictl"))
        self.ctrd = ctrd
        self.timeout_s = timeout_s
        self.config = ctrd.workdir / "crictl.yaml"
        endpoint = f"unix://{ctrd.socket}"
        images = f"unix://{image_endpoint}" if image_endpoint else endpoint
        self.config.write_text(f"runtime-endpoint: {endpoint}\nimage-endpoint: {images}\n"
                               f"timeout: {timeout_s}\ndebug: false\npull-image-on-create: false\n")
        self.log_dir = ctrd.workdir / "pod-logs"
        self.log_dir.mkdir(exist_ok=True)
        self.cgroup_parent = f"/{ctrd.cgroup_name}"

    def run(self, *args: str, check: bool = True, timeout: float | None = None
            ) -> subprocess.CompletedProcess[str]:
        return run([self.bin, "--config", str(self.config), *args], check=check,
                   timeout=timeout or self.timeout_s + 30)

    def out(self, *args: str) -> str:
        return self.run(*args).stdout.strip()

    def json_out(self, command: str, *args: str) -> Any:
        """``crictl COMMAND -o json ARGS`` decoded (flags go before the arguments)."""
        return json.loads(self.out(command, "-o", "json", *args))

    # ------------------------------------------------------------------ images
    def pull(self, ref: str, creds: str = "") -> str:
        """``crictl pull [--creds user:password] ref``; returns the image id."""
        out = self.out("pull", *(["--creds", creds] if creds else []), ref)
        # "Image is up to date for sha256:..."
        return out.split()[-1]

    def rmi(self, *refs: str) -> subprocess.CompletedProcess[str]:
        return self.run("rmi", *refs)

    def images(self) -> list[dict[str, Any]]:
        return list(self.json_out("images").get("images") or [])

    def imagefsinfo(self) -> dict[str, Any]:
        return dict(self.json_out("imagefsinfo")["status"])

    # ------------------------------------------------------------------ pods
    def runp(self, name: str) -> str:
        """Run a pod sandbox ``name`` (host network); returns its id."""
        cfg = self.ctrd.workdir / f"pod-{name}.json"
        cfg.write_text(json.dumps(self.pod_config(name)))
        return self.out("runp", str(cfg))

    def pod_config(self, name: str) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "namespace": "pyn", "uid": f"uid-{name}", "attempt": 0},
            "log_directory": str(self.log_dir / name),
            "linux": {"cgroup_parent": self.cgroup_parent,
                      "security_context": {"namespace_options": {"network": 2}}},  # NODE
        }

    def create(self, pod_id: str, pod: str, name: str, image: str, command: list[str]) -> str:
        """Create container ``name`` running ``command`` from ``image`` in pod ``pod_id``
        (``pod``: the name given to ``runp``); returns its id."""
        cfg = self.ctrd.workdir / f"ctr-{pod}-{name}.json"
        cfg.write_text(json.dumps({"metadata": {"name": name}, "image": {"image": image},
                                   "command": command, "log_path": f"{name}.log",
                                   "linux": {}}))
        return self.out("create", pod_id, str(cfg), str(self.ctrd.workdir / f"pod-{pod}.json"))

    def start(self, cid: str) -> None:
        self.run("start", cid)

    def start_sleeper(self, pod_id: str, pod: str, name: str, image: str) -> str:
        """Create and start container ``name`` from ``image`` in pod ``pod_id`` running
        ``sleep inf``, for the test to exec into; returns its id."""
        cid = self.create(pod_id, pod, name, image, ["/bin/sleep", "inf"])
        self.start(cid)
        return cid

    def exec(self, cid: str, *argv: str) -> str:
        """ExecSync: ``argv`` in container ``cid``; its stdout."""
        return self.run("exec", "--sync", cid, *argv).stdout

    def logs(self, cid: str) -> str:
        r = self.run("logs", cid)
        return r.stdout + r.stderr

    def inspect(self, cid: str) -> dict[str, Any]:
        return dict(self.json_out("inspect", cid))

    def stats(self) -> list[dict[str, Any]]:
        return list(self.json_out("stats").get("stats") or [])

    def remove_pods(self) -> None:
        """Stop and remove every pod (and its containers); best effort."""
        for pod in self.run("pods", "-q", check=False).stdout.split():
            self.run("stopp", pod, check=False)
            self.run("rmp", "-f", pod, check=False)
