#!/usr/bin/env bash
# Runs make test N times (default 5) with two CPU-burning busy loops beside
# it, to show that no test depends on timing or machine load. Prints one
# line per run and exits non-zero if any run failed; each run's output is
# kept in $TMPDIR/kvgate-busy-RUN.log.
#
# Usage: scripts/busy-suite.sh [N]
set -uo pipefail
cd "$(dirname "$0")/.."
n=${1:-5}
burn() { while :; do :; done; }
burn & b1=$!
burn & b2=$!
trap 'kill $b1 $b2 2>/dev/null' EXIT
echo "$(nproc) CPUs, two busy loops (pids $b1 $b2)"
failed=0
for i in $(seq 1 "$n"); do
  log="${TMPDIR:-/tmp}/kvgate-busy-$i.log"
  start=$(date +%s)
  if make test >"$log" 2>&1; then r=pass; else r=FAIL; failed=$((failed + 1)); fi
  echo "run $i/$n: $r in $(( $(date +%s) - start )) s, load $(cut -d' ' -f1-3 /proc/loadavg), $(grep -c '^ok' "$log") packages ok, $(grep -m1 '^skipped tests' "$log")"
done
echo "$((n - failed)) of $n runs passed"
[ "$failed" -eq 0 ]
