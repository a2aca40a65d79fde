#!/usr/bin/env bash
# ab-bench.sh compares the allocator's BenchmarkAdmitRelease and the
# in-process BenchmarkEngineDecode of two checkouts, interleaved (A, B, A,
# B, ...) so that a shared, noisy machine shifts both alike; compare the
# ratios of one run, not absolute numbers.
#
#   scripts/ab-bench.sh OLD_CHECKOUT NEW_CHECKOUT [ROUNDS] [STREAMS_REGEXP]
#
# Environment: KVGATE_BENCH_THREADS (llama.cpp threads, default 1 so that
# other load on the machine stalls it less), KVGATE_BENCH_PRESET (default
# 15m), as for the benchmarks themselves.
set -euo pipefail
old=$(cd "$1" && pwd); new=$(cd "$2" && pwd)
rounds=${3:-3}
streams=${4:-'(1|16|32)'}
export CGO_CFLAGS="${CGO_CFLAGS:--O3 -march=native}" CGO_CXXFLAGS="${CGO_CXXFLAGS:--O3 -march=native}"
export KVGATE_BENCH_THREADS="${KVGATE_BENCH_THREADS:-1}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for side in old new; do
	dir=${!side}
	(cd "$dir" && go test -c -o "$tmp/$side-alloc.test" ./allocator && go test -c -o "$tmp/$side-native.test" ./native)
done
for r in $(seq "$rounds"); do
	for side in old new; do
		dir=${!side}
		echo "== round $r $side: allocator"
		(cd "$dir/allocator" && "$tmp/$side-alloc.test" -test.run '^$' -test.bench '^BenchmarkAdmitRelease$' -test.benchtime 300000x -test.benchmem) | grep '^Benchmark'
		echo "== round $r $side: engine decode"
		(cd "$dir/native" && "$tmp/$side-native.test" -test.run '^$' -test.bench "^BenchmarkEngineDecode/streams=$streams\$" -test.benchtime 1x) | grep '^Benchmark'
	done
done
