#!/usr/bin/env bash
# Regenerate the CRI test client (needs grpcio-tools: pip install -e '.[dev]').
set -euo pipefail
cd "$(dirname "$0")/../../.."
python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. tests/harness/criapi/cri.proto
