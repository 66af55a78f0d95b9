#!/usr/bin/env bash
# Regenerate mixserve_pb2.py, its type stub mixserve_pb2.pyi and mixserve_pb2_grpc.py from mixserve.proto
# (needs grpcio-tools, a test extra).
# Run from anywhere; imports in the stubs are package-absolute (cluster.serve.proto).
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "$root"
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. cluster/serve/proto/mixserve.proto
