#!/usr/bin/env bash
# The long soak: TestSoak with 10,000 requests (CI runs it with 2,000) at
# ten times the server's capacity, against a real server process. Extra
# arguments go to go test (for example -v).
#
#   scripts/soak.sh [N] [go test flags]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}
shift || true
export CGO_CFLAGS="${CGO_CFLAGS:--O3 -march=native}" CGO_CXXFLAGS="${CGO_CXXFLAGS:--O3 -march=native}"
KVGATE_SOAK_REQUESTS=$n go test -count=1 -timeout 60m -run '^TestSoak$' -v "$@" ./cmd/kvgate/ 2>&1 | grep -vE '^=== (RUN|PAUSE|CONT)'
