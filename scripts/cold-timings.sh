#!/usr/bin/env bash
# Measures what a new user waits for, as the README reports it: in a fresh
# clone with an empty Go build cache (GOCACHE) and an empty model cache,
#   1. make serve, until the server logs that it listens and that it is ready;
#   2. then make test, on the build cache that make serve left;
# The module cache (downloaded Go modules) is kept: it is the network, not
# the build. With --test-cold it also times make test alone on another empty
# build cache, in another fresh clone.
#
# Usage: scripts/cold-timings.sh [--test-cold]
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/kvgate-cold-XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
port=50097

fresh() { # fresh DIR: a clone of the committed tree in DIR
  git clone --quiet --no-hardlinks "$src" "$1"
}

echo "machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $(go version)"
fresh "$work/a"
export GOCACHE="$work/gocache-a" KVGATE_CACHE_DIR="$work/models-a"
cd "$work/a"
start=$(date +%s)
make serve ARGS="--listen 127.0.0.1:$port" >"$work/serve.log" 2>&1 &
pid=$!
listening="" ready=""
while kill -0 "$pid" 2>/dev/null; do
  now=$(( $(date +%s) - start ))
  if [ -z "$listening" ] && grep -q 'msg="kvgate listening"' "$work/serve.log"; then listening=$now; fi
  if grep -q 'msg="kvgate ready"' "$work/serve.log"; then ready=$now; break; fi
  sleep 1
done
pkill -TERM -f "kvgate serve --listen 127.0.0.1:$port" || true
wait "$pid" || true
[ -n "$ready" ] || { cat "$work/serve.log"; echo "make serve did not get ready" >&2; exit 1; }
echo "cold make serve: listening after ${listening} s, ready after ${ready} s (load $(cut -d' ' -f1-3 /proc/loadavg))"

start=$(date +%s)
make test >"$work/test-a.log" 2>&1 || { tail -50 "$work/test-a.log"; exit 1; }
echo "make test after it: $(( $(date +%s) - start )) s (load $(cut -d' ' -f1-3 /proc/loadavg))"

if [ "${1:-}" = "--test-cold" ]; then
  fresh "$work/b"
  export GOCACHE="$work/gocache-b" KVGATE_CACHE_DIR="$work/models-b"
  cd "$work/b"
  start=$(date +%s)
  make test >"$work/test-b.log" 2>&1 || { tail -50 "$work/test-b.log"; exit 1; }
  echo "cold make test alone: $(( $(date +%s) - start )) s (load $(cut -d' ' -f1-3 /proc/loadavg))"
fi
