"""The CRI keychain: kubelet's pull credentials reach the snapshotter through its image
service proxy (``[remote.auth] enable_cri_keychain``).

A node as upstream documents it: crictl's image endpoint (kubelet's
``--image-service-endpoint``) is the snapshotter's socket, its runtime endpoint
containerd's; the snapshotter forwards every ImageService call to containerd
(``image_service_address``) and keeps the credentials of each PullImage. The snapshotter
has no docker config: the private image's lazy reads can only work with what crictl sent.
The password reaches no log, command line or file others can read.

Against containerd 1.6 and 2.x (``containerd_version``).
"""

from __future__ import annotations

import base64
import secrets

from tests.harness import images, oci
from tests.harness.containerd import Containerd
from tests.harness.cri import Crictl
from tests.harness.leaks import find_leaks
from tests.harness.registry import Registry
from tests.harness.snapshotter import Snapshotter
from tests.harness.util import make_workdir, remove_tree

NS = "k8s.io"


def test_private_image_runs_with_the_credentials_of_its_cri_pull(
        registry: Registry, pause_ref: str, layered_image: tuple[str, oci.BuiltImage],
        containerd_version: str) -> None:
    user, password = "kube", "cri-" + secrets.token_hex(12)
    needles = {password.encode(): "password",
               base64.b64encode(f"{user}:{password}".encode()): "base64(user:password)"}
    work = make_workdir("crikc")
    try:
        no_docker = work / "docker"
        no_docker.mkdir()
        with images.private_nydus_copy(work, layered_image[0], user, password) as (private, ref):
            config = work / "config.toml"
            snap = Snapshotter(config=config, env={"DOCKER_CONFIG": str(no_docker)})
            ctrd = Containerd(snap.socket, registry_hosts=[registry.host, private.host],
                              cri=True, namespace=NS, sandbox_image=pause_ref,
                              version=containerd_version)
            config.write_text('version = 1\n[remote.auth]\nenable_cri_keychain = true\n'
                              f'image_service_address = "{ctrd.socket}"\n')
            with snap, ctrd:
                crictl = Crictl(ctrd, image_endpoint=snap.socket)
                try:
                    # through the proxy: containerd's refusal comes back as it is
                    anon = crictl.run("pull", ref, check=False)
                    assert anon.returncode != 0, "an anonymous pull of a private image worked"
                    assert "authoriz" in anon.stderr.lower(), anon.stderr
                    crictl.pull(ref, creds=f"{user}:{password}")
                    assert f"CRI PullImage {ref}" in snap.log.read_text(errors="replace")
                    # the other ImageService calls pass through too
                    tags = [t for i in crictl.json_out("images")["images"]
                            for t in i.get("repoTags") or []]
                    assert ref in tags, tags
                    cid = crictl.start_sleeper(crictl.runp("private"), "private", "app", ref)
                    images.assert_quick_check(crictl.exec(cid, "sh", "-c", images.QUICK_CHECK))
                    leaks = find_leaks(needles, [snap.workdir, ctrd.workdir, work])
                    assert not leaks, "the registry secret leaked:\n" + "\n".join(leaks)
                finally:
                    crictl.remove_pods()
    finally:
        remove_tree(work)
