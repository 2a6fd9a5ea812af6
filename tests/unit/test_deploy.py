"""The node deployment files (docs/deploy.md): the DaemonSet manifest, its installer and
image, checked against the snapshotter they deploy. The installer runs for real with the
node's paths moved into a temporary directory and systemctl recorded."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pynydus.cli.main import build_parser
from pynydus.config import load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "misc" / "kubernetes"
UNIT = REPO / "misc" / "systemd" / "pynydus-snapshotter.service"


def manifest() -> dict[str, Any]:
    return {d["kind"]: d for d in yaml.safe_load_all((K8S / "pynydus-snapshotter.yaml").read_text())}


def test_the_configmap_is_a_config_the_snapshotter_loads(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(manifest()["ConfigMap"]["data"]["config.toml"])
    cfg, warnings = load_config(config)
    assert warnings == []
    assert cfg.system.enable and cfg.daemon.log_rotation_size > 0
    # pynydusd beside the snapshotter, in its version's venv: not the /usr/local/bin link,
    # which names every version alike (the upgrade path tells versions by command)
    assert cfg.daemon.nydusd_path in ("", "nydusd")


def test_the_readiness_probe_is_pynydus_ctl_health_on_the_configured_socket(tmp_path: Path) -> None:
    m = manifest()
    config = tmp_path / "config.toml"
    config.write_text(m["ConfigMap"]["data"]["config.toml"])
    cfg, _ = load_config(config)
    pod = m["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container["readinessProbe"]["exec"]["command"]
    assert argv[0] == "pynydus"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.ctl_command, args.address) == ("ctl", "health", cfg.address)
    mounts = {v["name"]: v["mountPath"] for v in container["volumeMounts"]}
    host = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    assert host["run"] == mounts["run"] == os.path.dirname(cfg.address)
    home = {e["name"]: e["value"] for e in container["env"]}["PYNYDUS_HOME"]
    assert host["pynydus-home"] == mounts["pynydus-home"] == home  # same path both sides
    assert pod["hostPID"] is True and container["securityContext"]["privileged"] is True


def test_the_image_carries_the_unit_and_the_installer() -> None:
    text = (K8S / "Dockerfile").read_text()
    assert "misc/systemd/pynydus-snapshotter.service" in text
    assert "misc/kubernetes/install.sh" in text and 'ENTRYPOINT ["/pynydus/install.sh"]' in text
    unit_exec = shlex.split(next(line for line in UNIT.read_text().splitlines()
                                 if line.startswith("ExecStart=")).removeprefix("ExecStart="))
    installer = (K8S / "install.sh").read_text()
    assert unit_exec[0] == "/usr/local/bin/pynydus" and 'BIN_DIR:=/usr/local/bin' in installer
    assert unit_exec[unit_exec.index("--config") + 1] == "/etc/nydus/config.toml"
    assert "NODE_CONFIG:=/etc/nydus/config.toml" in installer


class Node:
    """install.sh's node in a directory: an image with VERSION, the unit and a prebuilt
    venv (pip is not run: .installed is there), systemctl recorded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "opt"
        self.image = root / "image"
        self.calls = root / "systemctl.log"
        bin_dir = root / "stubs"
        bin_dir.mkdir(parents=True)
        (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {self.calls}\n')
        (bin_dir / "systemctl").chmod(0o755)
        (self.image / "wheels").mkdir(parents=True)
        (self.image / "pynydus-snapshotter.service").write_text(UNIT.read_text())
        self.config = root / "config.toml"
        self.config.write_text(manifest()["ConfigMap"]["data"]["config.toml"])
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOST_EXEC": "",
                    "STAY": "0", "PYNYDUS_HOME": str(self.home), "IMAGE_DIR": str(self.image),
                    "CONFIG_FILE": str(self.config), "BIN_DIR": str(root / "usr/local/bin"),
                    "UNIT_DIR": str(root / "etc/systemd/system"),
                    "NODE_CONFIG": str(root / "etc/nydus/config.toml")}

    def release(self, version: str) -> None:
        (self.image / "VERSION").write_text(version + "\n")
        venv = self.home / version / "venv" / "bin"
        venv.mkdir(parents=True)
        (self.home / version / ".installed").touch()

    def install(self) -> list[str]:
        self.calls.write_text("")
        r = subprocess.run(["sh", str(K8S / "install.sh")], env=self.env, capture_output=True,
                           text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        return self.calls.read_text().splitlines()


def test_install_sh_installs_then_restarts_only_on_a_change(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.release("0.1.0-aaaa")
    enable = ["daemon-reload", "enable pynydus-snapshotter.service"]
    assert node.install() == [*enable, "restart pynydus-snapshotter.service"]
    unit = tmp_path / "etc/systemd/system/pynydus-snapshotter.service"
    assert unit.read_text() == UNIT.read_text()
    assert (tmp_path / "etc/nydus/config.toml").read_text() == node.config.read_text()
    assert os.readlink(node.home / "current") == str(node.home / "0.1.0-aaaa")
    for prog in ("pynydus", "pynydusd", "nydus-overlayfs"):
        assert os.readlink(tmp_path / "usr/local/bin" / prog) == \
            str(node.home / "current/venv/bin" / prog)

    assert node.install() == [*enable, "start pynydus-snapshotter.service"]  # nothing changed

    node.config.write_text(node.config.read_text().replace('level = "info"', 'level = "debug"'))
    assert node.install()[-1] == "restart pynydus-snapshotter.service"

    node.release("0.2.0-bbbb")  # an upgrade: the new venv becomes current, the service restarts
    assert node.install()[-1] == "restart pynydus-snapshotter.service"
    assert os.readlink(node.home / "current") == str(node.home / "0.2.0-bbbb")
    assert (node.home / "0.1.0-aaaa").is_dir()  # the old daemons still run from it
