#!/usr/bin/env bash
# Set up (scripts/setup.sh, with every upstream peer: tests/compat judges our images with
# upstream's nydus-image and nydusd) and run the whole test suite: unit, integration (real
# mounts, real registry), compat (upstream as referee) and e2e (real containerd + runc).
# Needs root.
# Extra arguments go to pytest, e.g. scripts/test.sh -m 'not slow'.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --peers
exec .venv/bin/python -m pytest "$@"
