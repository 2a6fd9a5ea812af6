"""A private containerd with our snapshotter as proxy plugin: Debian's 1.6
(``/usr/bin/containerd``, config version 2) or 2.x (the ``containerd2`` peer of
``scripts/peers.sh``, config version 3), chosen by ``version`` ("1.6" or "2").

Layout of the work directory (short: unix sockets must fit in 108 bytes)::

    /var/tmp/pyn-ctrd-XXXX/
      config.toml  c.sock  c.sock.ttrpc  d.sock  containerd.log  owner.pid  pids/
      root/        containerd root (content store, metadata, overlayfs snapshots)
      state/       containerd state (task bundles: shim.pid, init.pid, rootfs mounts)
      certs.d/     hosts.toml per registry (plain HTTP) for ``ctr --hosts-dir``/CRI

``[proxy_plugins.<name>]`` points at the socket of the snapshotter under test; containerd
dials it lazily, so the snapshotter may start after containerd (and be restarted under
it). The CRI plugin is disabled by default; ``cri=True`` configures it like a nydus node
(the CRI image service's ``snapshotter`` and the runtime's per-runtime ``snapshotter`` are
the proxy, ``disable_snapshot_annotations = false``, ``discard_unpacked_layers = false``)
so the ``cri.*`` snapshot labels reach the proxy. ``restrict_oom_score_adj``: a pod
sandbox asks for oom_score_adj -998, which a process without CAP_SYS_RESOURCE (this
machine's sandbox, rootless nodes) may not set; restricted, the CRI keeps containerd's own. The two versions spell that differently:

- 1.6: ``[plugins."io.containerd.grpc.v1.cri".containerd]`` holds all of it.
- 2.x: ``io.containerd.cri.v1.images`` (snapshotter, annotations, registry, pinned
  sandbox image) and ``io.containerd.cri.v1.runtime`` (runtimes, CNI); the proxy
  exports ``enable_remote_snapshot_annotations = "true"`` so pulls through the transfer
  service (``ctr image pull``; the CRI with ``cri_transfer=True``) label layers too, and
  the transfer service is told to unpack into the proxy as well as into overlayfs.
  ``disable_snapshot_annotations = false`` makes 2.x's CRI pull with the client-side
  (``use_local_image_pull``) path, as a kubelet node configured for Nydus does;
  ``cri_transfer=True`` keeps annotations off in the CRI and so pulls through the
  transfer service, which is 2.1's default.

Every instance uses its own namespace (``pyn<hex>``): runc keeps state under
``/run/containerd/runc/<namespace>`` and cgroups under ``/<namespace>/<id>``, both shared
with any other containerd on the machine, so a unique namespace keeps us apart.

``stop()`` kills our tasks through containerd, stops containerd by PID, then kills any
shim or container process still recorded in our state directory, unmounts everything
below the work directory, removes leftover runc state and cgroups of our namespace, and
deletes the directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from .util import (
    HarnessError,
    Proc,
    Service,
    kill_pid,
    make_workdir,
    pid_alive,
    proc_cmdline,
    remove_tree,
    run,
    unmount_under,
    wait_until,
)

CONTAINERD_BIN = "/usr/bin/containerd"
CTR_BIN = "/usr/bin/ctr"
VERSIONS = ("1.6", "2")  # Debian's containerd and the containerd2 peer
RUNC_ROOT = Path("/run/containerd/runc")
TASK_DIR = "io.containerd.runtime.v2.task"
CGROUP_ROOT = Path("/sys/fs/cgroup")

# plugins that only log errors on this host (no btrfs/zfs/devmapper/aufs) or that we do
# not exercise
_ALWAYS_DISABLED = [
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
]
# 2.x only: snapshotters that need kernel features or tools we do not set up, and NRI,
# whose socket (/var/run/nri/nri.sock) would be shared with any other containerd here
_DISABLED_2 = [
    "io.containerd.snapshotter.v1.erofs",
    "io.containerd.snapshotter.v1.blockfile",
    "io.containerd.nri.v1.nri",
]


def binaries(version: str) -> tuple[str, str, str | None]:
    """(containerd, ctr, directory to put first in containerd's PATH for its shim) of
    containerd ``version``; raises PeerMissing when 2.x is not installed."""
    if version == "1.6":
        return CONTAINERD_BIN, CTR_BIN, None
    if version == "2":
        from .peers import peer_bin

        ctrd = peer_bin("containerd2", "containerd")
        peer_bin("containerd2", "containerd-shim-runc-v2")  # fail now, not at the first run
        return str(ctrd), str(peer_bin("containerd2", "ctr")), str(ctrd.parent)
    raise ValueError(f"containerd version {version!r}: expected one of {VERSIONS}")


class Containerd(Service):
    """Context manager around one private containerd process."""

    def __init__(self, proxy_socket: Path | None = None, *, proxy_name: str = "nydus",
                 namespace: str | None = None, cri: bool = False,
                 cri_snapshotter: str = "nydus", registry_hosts: Sequence[str] = (),
                 log_level: str = "info", extra_toml: str = "", keep: bool = False,
                 tag: str = "ctrd", version: str = "1.6", sandbox_image: str = "",
                 cri_transfer: bool = False, stats_period_s: int = 0) -> None:
        """``version``: "1.6" or "2". ``sandbox_image``: the CRI's pause image (there is
        no registry.k8s.io here). ``cri_transfer`` (2.x): the CRI pulls through the
        transfer service. ``stats_period_s``: how often the CRI collects snapshot usage
        (its default, 10 s, when 0)."""
        self.version = version
        self.containerd_bin, self.ctr_bin, self.shim_dir = binaries(version)
        if cri_transfer and version == "1.6":
            raise ValueError("cri_transfer: containerd 1.6 has no transfer service")
        self.sandbox_image = sandbox_image
        self.cri_transfer = cri_transfer
        self.stats_period_s = stats_period_s
        self.workdir = make_workdir(tag)
        self.proxy_socket = proxy_socket
        self.proxy_name = proxy_name
        self.namespace = namespace or f"pyn{secrets.token_hex(3)}"
        # the cgroup parent of CRI pods (``Crictl``): ours to clean, unlike "k8s.io"
        self.cgroup_name = (self.namespace if self.namespace.startswith("pyn")
                            else f"pyn{secrets.token_hex(3)}")
        self.cri = cri
        self.cri_snapshotter = cri_snapshotter
        self.registry_hosts = list(registry_hosts)
        self.log_level = log_level
        self.extra_toml = extra_toml
        self.keep = keep
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.socket = self.workdir / "c.sock"
        self.config = self.workdir / "config.toml"
        self.certs_d = self.workdir / "certs.d"
        self.log = self.workdir / "containerd.log"
        self.proc: Proc | None = None

    # ------------------------------------------------------------------ config
    def _config_text(self) -> str:
        disabled = list(_ALWAYS_DISABLED)
        if self.version != "1.6":
            disabled += _DISABLED_2
        if not self.cri:
            disabled.append("io.containerd.grpc.v1.cri")
        lines = [
            "# generated by tests/harness/containerd.py",
            "version = 2" if self.version == "1.6" else "version = 3",
            f'root = "{self.root}"',
            f'state = "{self.state}"',
            "oom_score = 0",
            "disabled_plugins = [" + ", ".join(f'"{p}"' for p in disabled) + "]",
            "",
            "[grpc]",
            f'  address = "{self.socket}"',
            "[ttrpc]",
            f'  address = "{self.socket}.ttrpc"',
            "[debug]",
            f'  address = "{self.workdir / "d.sock"}"',
            f'  level = "{self.log_level}"',
            "[metrics]",
            '  address = ""',
            "",
        ]
        if self.proxy_socket is not None:
            lines += [
                "[proxy_plugins]",
                f"  [proxy_plugins.{self.proxy_name}]",
                '    type = "snapshot"',
                f'    address = "{self.proxy_socket}"',
            ]
            if self.version != "1.6":
                lines += [
                    f"    [proxy_plugins.{self.proxy_name}.exports]",
                    '      enable_remote_snapshot_annotations = "true"',
                ]
            lines.append("")
        lines += [
            "[plugins]",
            '  [plugins."io.containerd.internal.v1.opt"]',
            f'    path = "{self.root / "opt"}"',
        ]
        if self.version != "1.6":
            lines += self._config_2x()
        elif self.cri:
            lines += [
                '  [plugins."io.containerd.grpc.v1.cri"]',
                "    disable_tcp_service = true",
                '    stream_server_address = "127.0.0.1"',
                '    stream_server_port = "0"',
                "    enable_selinux = false",
                "    restrict_oom_score_adj = true",
                *([f'    sandbox_image = "{self.sandbox_image}"'] if self.sandbox_image else []),
                *([f"    stats_collect_period = {self.stats_period_s}"]
                  if self.stats_period_s else []),
                '    [plugins."io.containerd.grpc.v1.cri".containerd]',
                f'      snapshotter = "{self.cri_snapshotter}"',
                "      disable_snapshot_annotations = false",
                "      discard_unpacked_layers = false",
                '      default_runtime_name = "runc"',
                '      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]',
                '        runtime_type = "io.containerd.runc.v2"',
                f'        snapshotter = "{self.cri_snapshotter}"',
                '    [plugins."io.containerd.grpc.v1.cri".cni]',
                '      bin_dir = "/usr/lib/cni"',
                f'      conf_dir = "{self.workdir / "cni"}"',
                '    [plugins."io.containerd.grpc.v1.cri".registry]',
                f'      config_path = "{self.certs_d}"',
            ]
        return "\n".join(lines) + "\n" + self.extra_toml

    def _config_2x(self) -> list[str]:
        """The ``[plugins]`` of config version 3 after ``opt`` (containerd 2.x)."""
        images = "'io.containerd.cri.v1.images'"
        runtime = "'io.containerd.cri.v1.runtime'"
        unpack = ['{ platform = "linux/amd64", snapshotter = "overlayfs" }']
        if self.proxy_socket is not None:
            unpack.append(f'{{ platform = "linux/amd64", snapshotter = "{self.proxy_name}" }}')
        lines = [
            "  [plugins.'io.containerd.transfer.v1.local']",
            f'    config_path = "{self.certs_d}"',
            f"    unpack_config = [{', '.join(unpack)}]",
        ]
        if not self.cri:
            return lines
        lines += [
            "  [plugins.'io.containerd.grpc.v1.cri']",
            "    disable_tcp_service = true",
            '    stream_server_address = "127.0.0.1"',
            '    stream_server_port = "0"',
            f"  [plugins.{images}]",
            f'    snapshotter = "{self.cri_snapshotter}"',
            # false: the cri.* labels go to the snapshotter, and the CRI pulls on the
            # client-side path; true with the proxy's exports: through the transfer service
            f"    disable_snapshot_annotations = {'true' if self.cri_transfer else 'false'}",
            "    discard_unpacked_layers = false",
        ]
        if self.stats_period_s:
            lines.append(f"    stats_collect_period = {self.stats_period_s}")
        if self.sandbox_image:
            lines += [f"    [plugins.{images}.pinned_images]",
                      f'      sandbox = "{self.sandbox_image}"']
        lines += [
            f"    [plugins.{images}.registry]",
            f'      config_path = "{self.certs_d}"',
            f"  [plugins.{runtime}]",
            "    enable_selinux = false",
            "    restrict_oom_score_adj = true",
            f"    [plugins.{runtime}.containerd]",
            '      default_runtime_name = "runc"',
            f"      [plugins.{runtime}.containerd.runtimes.runc]",
            '        runtime_type = "io.containerd.runc.v2"',
            f'        snapshotter = "{self.cri_snapshotter}"',
            f"    [plugins.{runtime}.cni]",
            '      bin_dirs = ["/usr/lib/cni"]',
            f'      conf_dir = "{self.workdir / "cni"}"',
        ]
        return lines

    def trust_plain_http(self, host: str) -> None:
        """Write ``certs.d/<host>/hosts.toml`` so CRI and ``ctr --hosts-dir`` use plain HTTP."""
        d = self.certs_d / host
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(
            f'server = "http://{host}"\n\n[host."http://{host}"]\n'
            '  capabilities = ["pull", "resolve", "push"]\n  skip_verify = true\n')

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        for d in (self.root, self.state, self.certs_d, self.workdir / "cni"):
            d.mkdir(parents=True, exist_ok=True)
        for host in self.registry_hosts:
            self.trust_plain_http(host)
        self.config.write_text(self._config_text())
        env = None
        if self.shim_dir is not None:  # containerd finds its shim through PATH first
            env = {**os.environ, "PATH": f"{self.shim_dir}:{os.environ.get('PATH', '')}"}
        self.proc = Proc("containerd", [self.containerd_bin, "--config", str(self.config)],
                         self.workdir, self.log, env=env)
        self.proc.start()

        def up() -> bool:
            if self.proc is not None and not self.proc.running():
                raise HarnessError(f"containerd exited:\n{self.proc.log_tail()}")
            return self.socket.exists() and run(
                [self.ctr_bin, "-a", str(self.socket), "version"], check=False,
                timeout=10).returncode == 0

        try:
            wait_until(up, 30, f"containerd on {self.socket}")
        except HarnessError as err:
            tail = self.proc.log_tail() if self.proc else ""
            raise HarnessError(f"{err}\n{tail}") from err
        self.ctr("namespaces", "create", self.namespace, check=False)
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise HarnessError("containerd not started")
        return self.proc.pid

    def ctr(self, *args: str, check: bool = True, timeout: float = 300,
            namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``ctr -a <our socket> -n <our namespace> ARGS``."""
        return run([self.ctr_bin, "-a", str(self.socket), "-n", namespace or self.namespace,
                    *args], check=check, timeout=timeout)

    def ctr_out(self, *args: str, timeout: float = 300) -> str:
        return self.ctr(*args, timeout=timeout).stdout

    def snapshotter_reachable(self, name: str = "nydus") -> bool:
        """True once containerd can call the (proxy) snapshotter ``name``: a scratch
        Prepare and Remove through containerd succeed. After the proxy restarts,
        containerd's client redials with a backoff of up to a few seconds, and calls in
        that window fail with Unavailable."""
        key = f"probe-{secrets.token_hex(4)}"
        r = self.ctr("snapshot", "--snapshotter", name, "prepare", key, check=False, timeout=30)
        if r.returncode != 0:
            return False
        self.ctr("snapshot", "--snapshotter", name, "rm", key, check=False, timeout=30)
        return True

    def wait_snapshotter(self, name: str = "nydus", timeout: float = 30.0) -> float:
        """Wait until ``snapshotter_reachable(name)``; returns the seconds it took."""
        t0 = time.monotonic()
        wait_until(lambda: self.snapshotter_reachable(name), timeout,
                   f"containerd to reach snapshotter {name!r}", interval=0.2)
        return time.monotonic() - t0

    def collect_garbage(self) -> None:
        """Run containerd's garbage collector now and wait for it. containerd removes a
        deleted snapshot from the backend only in its next collection, which it schedules
        on its own; deleting a lease with ``--sync`` runs one synchronously."""
        lease = self.ctr_out("leases", "create", timeout=30).split()[0]
        self.ctr("leases", "rm", "--sync", lease, timeout=120)

    def remove_all_containers(self) -> None:
        """Kill every task and delete every container in our namespaces (best effort)."""
        if self.proc is None or not self.proc.running():
            return
        nss = self.ctr("namespaces", "ls", "-q", check=False, timeout=30).stdout.split()
        for ns in nss or [self.namespace]:
            ids = self.ctr("containers", "ls", "-q", check=False, timeout=30,
                           namespace=ns).stdout.split()
            for cid in ids:
                self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30,
                         namespace=ns)
                self.ctr("tasks", "rm", "-f", cid, check=False, timeout=60, namespace=ns)
                self.ctr("containers", "rm", cid, check=False, timeout=60, namespace=ns)

    def stop(self) -> None:
        """Remove our containers, stop containerd by PID, clean up; idempotent."""
        try:
            with contextlib.suppress(Exception):
                self.remove_all_containers()
        finally:
            if self.proc is not None:
                self.proc.stop(timeout=20)
            cleanup_state_dir(self.workdir, [self.namespace, self.cgroup_name])
            if not self.keep:
                remove_tree(self.workdir)
            elif self.workdir.exists():
                (self.workdir / "keep").touch()


def _task_bundles(workdir: Path) -> list[tuple[str, str, Path]]:
    """(namespace, container id, bundle dir) for every task bundle under our state."""
    out = []
    base = workdir / "state" / TASK_DIR
    if base.is_dir():
        for nsdir in sorted(p for p in base.iterdir() if p.is_dir()):
            for b in sorted(p for p in nsdir.iterdir() if p.is_dir()):
                out.append((nsdir.name, b.name, b))
    return out


def _shims_in(bundle: Path) -> list[int]:
    """PIDs of containerd shims serving ``bundle``: containerd 1.6 starts each shim with
    the bundle as its working directory (and records no shim.pid there)."""
    found = []
    target = str(bundle)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/cwd") != target:
                continue
        except OSError:
            continue
        argv = proc_cmdline(int(entry.name))
        if argv and os.path.basename(argv[0]).startswith("containerd-shim"):
            found.append(int(entry.name))
    return found


def _read_pid(f: Path) -> int | None:
    try:
        return int(f.read_text().strip())
    except (OSError, ValueError):
        return None


def cleanup_state_dir(workdir: Path, namespaces: Sequence[str] = ()) -> None:
    """Kill shims and container processes recorded in our task bundles, remove their
    runc state and cgroups, unmount everything under ``workdir``. Only touches PIDs
    read from files in ``workdir`` (and checks a shim is a shim before killing it)."""
    bundles = _task_bundles(workdir)
    nss = set(namespaces) | {ns for ns, _, _ in bundles}
    for ns, cid, b in bundles:
        init_pid = _read_pid(b / "init.pid")
        if init_pid and pid_alive(init_pid):
            kill_pid(init_pid, timeout=2, sig=9)
        for shim_pid in _shims_in(b):
            kill_pid(shim_pid, timeout=5)
        runc_state = RUNC_ROOT / ns / cid
        if runc_state.exists():
            subprocess.run(["runc", "--root", str(RUNC_ROOT / ns), "delete", "--force", cid],
                           capture_output=True, timeout=30, check=False)
    unmount_under(workdir)
    for ns in nss:
        if not ns.startswith("pyn"):
            continue  # only namespaces this harness names are ours to clean outside workdir
        with contextlib.suppress(OSError):
            (RUNC_ROOT / ns).rmdir()
        if CGROUP_ROOT.is_dir():
            for ctl in CGROUP_ROOT.iterdir():
                nsdir = ctl / ns
                if nsdir.is_dir():
                    for child in sorted(nsdir.iterdir(), reverse=True):
                        if child.is_dir():
                            with contextlib.suppress(OSError):
                                child.rmdir()
                    with contextlib.suppress(OSError):
                        nsdir.rmdir()
