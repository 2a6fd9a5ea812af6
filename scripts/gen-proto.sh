#!/usr/bin/env bash
# Regenerate the Python gRPC code for containerd's Snapshots API from proto/.
# The output is committed (src/pynydus/api/*_pb2*.py) so installs need no protoc.
# Requires grpcio-tools (pip install -e '.[dev]').
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iproto --python_out=src --grpc_python_out=src --pyi_out=src \
  proto/pynydus/api/mount.proto proto/pynydus/api/snapshots.proto
