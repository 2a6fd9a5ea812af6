#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: unit, integration (real
# mounts, real registry) and e2e (real containerd + runc). Needs root.
# Extra arguments go to pytest, e.g. scripts/test.sh -m 'not slow'.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
