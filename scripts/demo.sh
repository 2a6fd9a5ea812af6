#!/usr/bin/env bash
# The main job, end to end on a fresh Debian 12 machine (as root, offline):
# set the machine up (scripts/setup.sh), then start a local registry, a private containerd
# with `pynydus snapshotter` as proxy plugin "nydus", build and push a multi-layer OCI image
# offline, pull and run it through --snapshotter nydus, print what happened, and tear
# everything down. Idempotent; leaves nothing running. Exit status 0 on success.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "demo: run as root (containerd, runc and overlay mounts need it)" >&2
  exit 1
fi
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
