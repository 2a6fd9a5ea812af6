#!/usr/bin/env bash
# The fuzzing campaign: every target one at a time at nice 10, 1,000,000 executions
# each (or --max-time seconds), 1 s per input, 256 MB RSS; summary in
# /var/tmp/pyn-fuzz/campaign-*/summary.json. Extra arguments go to `python -m fuzz
# campaign` (target names, --runs N, --max-time S, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import atheris, pynydus' 2>/dev/null; then
  .venv/bin/pip install -q -e '.[test,fuzz]'
fi
exec .venv/bin/python -m fuzz campaign "$@"
