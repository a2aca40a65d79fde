#!/usr/bin/env bash
# Regenerates the results table of BENCHMARKS.md.
#
# For each model preset it writes a random-weight model with `kvgate
# mkmodel` into a scratch directory, serves it on loopback, drives it with
# `kvgate bench --json` (1, 4, 16, 32 streams at 128/128 tokens; a mixed
# workload; a shared-prefix workload with the prefix cache on and off), runs
# the in-process engine benchmark (native/bench_ext_test.go) on the same
# file, and prints a markdown table with the gRPC / in-process ratio on
# stdout. Progress goes to stderr.
#
# Environment (defaults in brackets):
#   BENCH_PRESETS  model presets to run ["15m 110m"]
#   BENCH_ROUNDS   measured requests per row, in multiples of the stream count [1]
#   BENCH_REPEAT   runs of every row and in-process benchmark; the best is kept [2]
#   BENCH_THREADS  llama.cpp threads for server and in-process runs [nproc]
#   BENCH_PROFILE  0 skips the CPU profiles of the first preset [1]
#   BENCH_RESULTS  if set, a directory to keep the JSON reports, logs and
#                  profiles in
#
# Needs: make, go, jq. Runtime on 2 cores: about 8 minutes (462 s measured;
# 570 s with BENCH_REPEAT=3), most of it the 110m model; 15m alone takes
# about 2 minutes.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
export CGO_CFLAGS="${CGO_CFLAGS:--O3 -march=native}"
export CGO_CXXFLAGS="${CGO_CXXFLAGS:--O3 -march=native}"
presets=${BENCH_PRESETS:-15m 110m}
rounds=${BENCH_ROUNDS:-1}
repeat=${BENCH_REPEAT:-2}
threads=${BENCH_THREADS:-$(nproc)}
kvgate=$root/.bin/kvgate

command -v jq >/dev/null || { echo "bench.sh: jq is required (apt-get install jq)" >&2; exit 1; }

scratch=$(mktemp -d "${TMPDIR:-/tmp}/kvgate-bench.XXXXXX")
server_pid=""
stop_server() {
	if [[ -n $server_pid ]]; then
		kill -TERM "$server_pid" 2>/dev/null || true
		wait "$server_pid" 2>/dev/null || true
		server_pid=""
	fi
}
cleanup() {
	trap '' INT TERM
	stop_server
	if [[ -n ${BENCH_RESULTS:-} ]]; then
		mkdir -p "$BENCH_RESULTS"
		cp "$scratch"/*.json "$scratch"/*.log "$scratch"/*.txt "$scratch"/*.pprof "$BENCH_RESULTS"/ 2>/dev/null || true
	fi
	rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "bench.sh: $*" >&2; }
start=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

log "building kvgate"
make -s build >&2

# start_server MODEL LOG: serves MODEL on a free loopback port; sets addr.
start_server() {
	"$kvgate" serve --listen 127.0.0.1:0 --model "$1" --ctx 8192 --max-seqs 32 --batch 512 \
		--threads "$threads" --log-level info 2>"$2" &
	server_pid=$!
	addr=""
	for _ in $(seq 1 600); do
		addr=$(sed -n 's/.*msg="kvgate ready" addr=\([^ ]*\).*/\1/p' "$2" | head -n1)
		[[ -n $addr ]] && return 0
		kill -0 "$server_pid" 2>/dev/null || { cat "$2" >&2; log "server exited"; exit 1; }
		sleep 0.2
	done
	log "server did not listen within 120s"
	exit 1
}

# bench NAME ARGS...: runs kvgate bench --json against the server $repeat
# times and keeps the run with the highest output throughput as NAME.json.
# Taking the best of several runs filters out the slowdowns other processes
# on the machine cause; they never make a run faster.
bench() {
	local name=$1 i
	shift
	log "  $name: kvgate bench $* (x$repeat)"
	for i in $(seq 1 "$repeat"); do
		"$kvgate" bench --addr "$addr" --json --slo-ttft 2s --slo-itl 200ms "$@" >"$scratch/$name.run$i.json"
	done
	jq -s 'max_by(.throughput.output_tokens_per_s)' "$scratch/$name".run*.json >"$scratch/$name.json"
}

# metric FILE BENCH UNIT: the best (highest) value of UNIT on the lines of
# BENCH in go test -bench output.
metric() {
	awk -v b="$2" -v u="$3" '$1 ~ "^"b"(-[0-9]+)?$" { for (i = 2; i < NF; i++) if ($(i+1) == u && (best == "" || $i + 0 > best + 0)) best = $i }
		END { print best }' "$1"
}

rows=()
machine_info=""
for preset in $presets; do
	model=$scratch/$preset.gguf
	log "model $preset: kvgate mkmodel --preset $preset"
	"$kvgate" mkmodel --preset "$preset" -o "$model" >&2
	start_server "$model" "$scratch/serve-$preset.log"
	log "model $preset served at $addr"

	fixed=(--workload fixed --input-tokens 128 --output-tokens 128 --no-prefix-cache)
	for n in 1 4 16 32; do
		bench "$preset-fixed-$n" "${fixed[@]}" --concurrency "$n" --requests $((n * rounds)) --warmup 2
	done
	bench "$preset-mixed" --workload mixed --dist lognormal --input-min 32 --input-max 512 \
		--output-min 16 --output-max 256 --concurrency 16 --requests $((16 * rounds)) --warmup 2 --no-prefix-cache
	shared=(--workload shared-prefix --prefix-tokens 256 --input-tokens 288 --output-tokens 32 --concurrency 16
		--requests $((16 * rounds)) --warmup 2)
	# Cache off first, so that its run does not pay for the cells the
	# cache-on run leaves cached.
	bench "$preset-prefix-off" "${shared[@]}" --no-prefix-cache
	bench "$preset-prefix-on" "${shared[@]}"
	stop_server

	log "model $preset: in-process go test -bench BenchmarkEngine"
	KVGATE_BENCH_MODEL=$model KVGATE_BENCH_THREADS=$threads \
		go test ./native -run '^$' -bench 'BenchmarkEngine' -benchtime "${rounds}x" -count "$repeat" \
		>"$scratch/$preset-inprocess.txt" 2>&1 || { cat "$scratch/$preset-inprocess.txt" >&2; exit 1; }

	inproc=$scratch/$preset-inprocess.txt
	prefill=$(metric "$inproc" BenchmarkEnginePrefill prefill-tok/s)

	if [[ -z $machine_info ]]; then
		machine_info=$(jq -r '.model.system_info' "$scratch/$preset-fixed-1.json")
	fi
	desc=$(jq -r '"\(.model.description), \((.model.parameter_count / 1e6 * 10 | round) / 10)M params"' "$scratch/$preset-fixed-1.json")
	rows+=("| **$preset** ($desc) | | | | | | | | | | |")
	for name in fixed-1 fixed-4 fixed-16 fixed-32 mixed prefix-on prefix-off; do
		f=$scratch/$preset-$name.json
		streams=$(jq -r '.config.concurrency' "$f")
		ip="" ratio=""
		case $name in
		fixed-*)
			label="fixed 128/128"
			ip=$(metric "$inproc" "BenchmarkEngineDecode/streams=$streams" out-tok/s)
			ratio=$(jq -rn --argjson g "$(jq '.throughput.output_tokens_per_s' "$f")" --argjson i "$ip" '($g / $i * 100 | round) / 100')
			ip=$(printf '%.0f' "$ip")
			;;
		mixed) label="mixed lognormal in 32..512 / out 16..256" ;;
		prefix-on) label="shared prefix 256+32 / 32, cache on" ;;
		prefix-off) label="shared prefix 256+32 / 32, cache off" ;;
		esac
		rows+=("$(jq -r --arg wl "$label" --arg ip "$ip" --arg ratio "$ratio" '
			def r0: . * 1 | round;
			def r1: (. * 10 | round) / 10;
			"| \($wl) | \(.config.concurrency) | \(.requests.ok)/\(.requests.sent) | \(.throughput.output_tokens_per_s | r1) | \(.throughput.total_tokens_per_s | r1) | \(.goodput.requests_per_s * 100 | round / 100) | \(.latency_ms.ttft.p50 | r0) / \(.latency_ms.ttft.p99 | r0) | \(.latency_ms.itl.p50 | r1) / \(.latency_ms.itl.p99 | r1) | \(.latency_ms.e2e.p50 | r0) | \(.server.prefill_tokens) / \(.tokens.prompt_sent) (hits \(.server.prefix_hit_tokens)) | \(if $ip == "" then "" else "\($ip) (\($ratio))" end) |"
		' "$f")")
	done
	rows+=("| in-process prefill, one 512-token prompt | 1 | | | **$(printf '%.0f' "$prefill") prefill tok/s** | | | | | | |")
done

# Where the time of a decode step goes: CPU profiles of the in-process
# engine benchmark and of the whole path over in-memory gRPC, 16 streams, on
# the first preset's model.
profile_rows=()
if [[ ${BENCH_PROFILE:-1} != 0 ]]; then
	preset=${presets%% *}
	model=$scratch/$preset.gguf
	log "profiles on $preset: go test -bench ... -cpuprofile"
	go test ./native -c -o "$scratch/native.test"
	go test ./cmd/kvgate -c -o "$scratch/kvgate.test"
	(cd native && KVGATE_BENCH_MODEL=$model KVGATE_BENCH_THREADS=$threads "$scratch/native.test" -test.run '^$' \
		-test.bench 'BenchmarkEngineDecode/streams=16$' -test.benchtime "$((rounds + 1))x" \
		-test.cpuprofile "$scratch/engine.pprof" >"$scratch/profile-engine.txt" 2>&1)
	(cd cmd/kvgate && KVGATE_BENCH_MODEL=$model "$scratch/kvgate.test" -test.run '^$' \
		-test.bench 'BenchmarkGRPCInProcess/streams=16$' -test.benchtime "$((rounds + 1))x" \
		-test.cpuprofile "$scratch/grpc.pprof" >"$scratch/profile-grpc.txt" 2>&1)
	# share BIN PROFILE REGEXP: the percentage of samples whose stack has a
	# function matching REGEXP.
	share() {
		go tool pprof -top -nodefraction=0 -edgefraction=0 -focus="$3" "$1" "$2" 2>/dev/null |
			sed -n 's/.*Showing nodes accounting for [^,]*, \([0-9.]*\)% of.*/\1/p' | head -n1 |
			awk '{ printf "%.1f%%", $1 } END { if (NR == 0) printf "0%%" }'
	}
	while IFS=';' read -r what re grpc_only; do
		e="–"
		[[ $grpc_only == 1 ]] || e=$(share "$scratch/native.test" "$scratch/engine.pprof" "$re")
		g=$(share "$scratch/kvgate.test" "$scratch/grpc.pprof" "$re")
		profile_rows+=("| $what | $e | $g |")
	done <<'EOT'
llama_decode, on the worker's thread (`_Cfunc_llama_decode`);_Cfunc_llama_decode;0
llama_decode, on ggml's own threads (`runtime._ExternalCode`);runtime\._ExternalCode;0
sampling (`_Cfunc_kv_sample`);_Cfunc_kv_sample;0
detokenization (`Model.AppendPiece`, `llama_token_to_piece`);AppendPiece;0
allocator (`allocator.*`: Lease.Commit / Charge, Finish);kvgate/allocator\.;0
streaming to the handler (`Engine.emit`, channel send);native\.\(\*Engine\)\.emit;0
gRPC server send (`serverStream.SendMsg`, server transport);serverStream\)\.SendMsg|NewServerTransport|http2Server;1
the load generator's client (`internal/bench`, `Recv`);internal/bench\.;1
Go garbage collector (`gcBgMarkWorker`);gcBgMarkWorker;0
EOT
fi

elapsed=$(($(date +%s) - start))
cat <<EOF
- Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); $(go version | cut -d' ' -f3); kvgate $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo '+dirty'); $(date -u +%Y-%m-%d)
- llama.cpp: $machine_info
- Server: --ctx 8192 --max-seqs 32 --batch 512 --threads $threads. Each row: $rounds x streams requests after 2 warm-up requests, best of $repeat runs (in-process: best of $repeat x $rounds rounds). Goodput SLOs: TTFT <= 2s, ITL <= 200ms.

| workload | streams | ok/sent | out tok/s | total tok/s | goodput req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | E2E p50 ms | prefill computed / prompt sent | in-process out tok/s (gRPC / in-process) |
|---|---|---|---|---|---|---|---|---|---|---|
EOF
printf '%s\n' "${rows[@]}"
echo
if ((${#profile_rows[@]} > 0)); then
	echo "CPU profile shares, 16 streams of 128/128 tokens on ${presets%% *} (share of all samples whose stack has the function):"
	echo
	echo "| where | in-process engine | whole path over in-memory gRPC |"
	echo "|---|---|---|"
	printf '%s\n' "${profile_rows[@]}"
	echo
fi
echo "- Load average at start: $load_start; at end: $(cut -d' ' -f1-3 /proc/loadavg)."
echo "- bench.sh ran for ${elapsed}s."
