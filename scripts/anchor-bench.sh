#!/usr/bin/env bash
# Runs kvgate side by side with llama.cpp's own tools, built from the same
# engine sources kvgate links (ollama v0.17.4's llama.cpp, upstream commit
# ec98e2002), on the same model files, threads and shapes, interleaved, and
# prints the markdown tables of BENCHMARKS.md's "Side by side with llama.cpp"
# section on stdout. Progress goes to stderr.
#
# Sections (ANCHOR_SECTIONS, default "engine e2e busy"):
#   engine  in-process decode tok/s, 128 prompt + 128 generated tokens per
#           stream: llama-batched-bench default (a KV stream per sequence)
#           and -kvu (one unified pool) against kvgate's
#           BenchmarkEngineDecode with --kv-layout streams and unified.
#   e2e     output tok/s and TTFT through the servers: kvgate serve (gRPC,
#           driven by kvgate bench) against llama-server -np N and -np N
#           -kvu (HTTP /completion, driven by kvgate bench --llama-server,
#           so the same load generator, prompts and report); and a
#           shared-prefix workload, kvgate's prefix cache against
#           llama-server's prompt cache.
#   busy    throughput with one busy-loop process per CPU beside it, over
#           the same run without them: kvgate's default configuration (no
#           --threads) and llama-batched-bench.
#
# Every row runs ANCHOR_ROUNDS rounds (default 3); a round runs each
# contender once, in an order that rotates between rounds, and ratios are
# taken within a round (min, median, max over the rounds), so that the
# machine's noise hits both sides of a ratio alike.
#
# Environment (defaults in brackets):
#   LLAMA_TOOLS_BIN  the folder with llama-batched-bench and llama-server
#                    [$LLAMA_TOOLS_DIR/build-noomp/bin, else
#                    $LLAMA_TOOLS_DIR/build-omp/bin]. Build them with
#                    build-llama-tools.sh from the workplace's anchors (see
#                    BENCHMARKS.md); LLAMA_TOOLS_OPENMP=OFF gives the
#                    build-noomp variant, which uses ggml's own threadpool
#                    as kvgate's cgo build does.
#   ANCHOR_PRESETS   model presets for the engine rows ["15m 110m"]
#   ANCHOR_STREAMS   stream counts for the engine rows ["1 4 16 32"]
#   ANCHOR_E2E_PRESET model preset of the e2e rows [110m]
#   ANCHOR_BUSY_PRESET model preset of the busy rows [15m]
#   ANCHOR_ROUNDS    rounds per row [3]
#   ANCHOR_THREADS   llama.cpp threads where a thread count is given [nproc]
#   ANCHOR_MODELS    folder for the preset models [a scratch folder]
#   ANCHOR_RESULTS   if set, a folder to keep every raw output in
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
export CGO_CFLAGS="${CGO_CFLAGS:--O3 -march=native}"
export CGO_CXXFLAGS="${CGO_CXXFLAGS:--O3 -march=native}"
sections=${ANCHOR_SECTIONS:-engine e2e busy}
presets=${ANCHOR_PRESETS:-15m 110m}
streams=${ANCHOR_STREAMS:-1 4 16 32}
rounds=${ANCHOR_ROUNDS:-3}
threads=${ANCHOR_THREADS:-$(nproc)}
e2e_preset=${ANCHOR_E2E_PRESET:-110m}
busy_preset=${ANCHOR_BUSY_PRESET:-15m}
kvgate=$root/.bin/kvgate

log() { echo "anchor-bench: $*" >&2; }
die() { log "$*"; exit 1; }
command -v jq >/dev/null || die "jq is required (apt-get install jq)"

bin=${LLAMA_TOOLS_BIN:-}
if [[ -z $bin && -n ${LLAMA_TOOLS_DIR:-} ]]; then
	for v in build-noomp build-omp; do
		if [[ -x $LLAMA_TOOLS_DIR/$v/bin/llama-batched-bench ]]; then
			bin=$LLAMA_TOOLS_DIR/$v/bin
			break
		fi
	done
fi
[[ -n $bin && -x $bin/llama-batched-bench && -x $bin/llama-server ]] ||
	die "set LLAMA_TOOLS_BIN (or LLAMA_TOOLS_DIR) to llama.cpp's tools built by build-llama-tools.sh"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/kvgate-anchor.XXXXXX")
models=${ANCHOR_MODELS:-$scratch/models}
mkdir -p "$models"
pids=()
busy_pids=()
stop_busy() {
	for p in "${busy_pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${busy_pids[@]}"; do wait "$p" 2>/dev/null || true; done
	busy_pids=()
}
stop_servers() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	pids=()
}
cleanup() {
	trap '' INT TERM
	stop_busy
	stop_servers
	if [[ -n ${ANCHOR_RESULTS:-} ]]; then
		mkdir -p "$ANCHOR_RESULTS"
		cp -r "$scratch"/out "$ANCHOR_RESULTS"/ 2>/dev/null || true
	fi
	rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
out=$scratch/out
mkdir -p "$out"
start=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

log "building kvgate and the engine benchmark"
make -s build >&2
go test -c -o "$scratch/native.test" ./native

model() { # model PRESET: the path of the preset's model, written once
	local f=$models/$1.gguf
	[[ -f $f ]] || "$kvgate" mkmodel --preset "$1" --type f16 -o "$f" >&2
	echo "$f"
}

# stats V...: "min median max" of the values.
stats() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%s %s %s", v[1], m, v[NR] }'; }
# fmt0 "MIN MED MAX": "MED (MIN–MAX)" rounded to integers.
fmt0() { awk -v s="$1" 'BEGIN { split(s, v, " "); printf "%.0f (%.0f–%.0f)", v[2], v[1], v[3] }'; }
# fmt2 "MIN MED MAX": "MED (MIN–MAX)" to two decimals, in bold.
fmt2() { awk -v s="$1" 'BEGIN { split(s, v, " "); printf "**%.2f** (%.2f–%.2f)", v[2], v[1], v[3] }'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", (b > 0) ? a / b : 0 }'; }
maxf() { awk -v a="$1" -v b="$2" 'BEGIN { print (a > b) ? a : b }'; }
# rotate I WORDS...: the words rotated left by I.
rotate() { local i=$1; shift; local a=("$@") n=$#; for ((k = 0; k < n; k++)); do printf '%s ' "${a[$(((k + i) % n))]}"; done; }

# bb MODEL N EXTRA...: llama-batched-bench's decode (S_TG) tok/s for N
# streams of 128+128 tokens.
bb() {
	local m=$1 n=$2 f
	shift 2
	f=$out/bb-$(basename "$m" .gguf)-$n-$RANDOM.txt
	"$bin/llama-batched-bench" -m "$m" -c 8192 -b 512 -ub 512 -npp 128 -ntg 128 -npl "$n" -t "$threads" "$@" >"$f" 2>&1 ||
		{ cat "$f" >&2; die "llama-batched-bench failed"; }
	awk -F'|' '$2 ~ /^ *128 *$/ && $3 ~ /^ *128 *$/ { gsub(/ /, "", $9); v = $9 } END { print v }' "$f"
}

# kv MODEL N LAYOUT [THREADS]: kvgate's in-process decode tok/s for N
# streams of 128+128 tokens (THREADS: KVGATE_BENCH_THREADS, "" for the
# default).
kv() {
	local m=$1 n=$2 layout=$3 th=${4-$threads} f
	f=$out/kv-$(basename "$m" .gguf)-$n-$layout-$RANDOM.txt
	(cd native && KVGATE_BENCH_MODEL=$m KVGATE_BENCH_THREADS=$th KVGATE_BENCH_LAYOUT=$layout "$scratch/native.test" \
		-test.run '^$' -test.bench "BenchmarkEngineDecode/streams=$n\$" -test.benchtime 1x) >"$f" 2>&1 ||
		{ cat "$f" >&2; die "BenchmarkEngineDecode failed"; }
	awk '/^BenchmarkEngineDecode/ { for (i = 2; i < NF; i++) if ($(i + 1) == "decode-tok/s") v = $i } END { print v }' "$f"
}

engine_rows=()
if [[ $sections == *engine* ]]; then
	for preset in $presets; do
		m=$(model "$preset")
		for n in $streams; do
			declare -A v=()
			for r in $(seq 1 "$rounds"); do
				for who in $(rotate "$r" bbdef bbkvu kvstreams kvunified); do
					case $who in
					bbdef) v[$who,$r]=$(bb "$m" "$n") ;;
					bbkvu) v[$who,$r]=$(bb "$m" "$n" -kvu) ;;
					kvstreams) v[$who,$r]=$(kv "$m" "$n" streams) ;;
					kvunified) v[$who,$r]=$(kv "$m" "$n" unified) ;;
					esac
				done
				log "engine $preset streams=$n round $r: bb default ${v[bbdef,$r]}, bb -kvu ${v[bbkvu,$r]}, kvgate streams ${v[kvstreams,$r]}, kvgate unified ${v[kvunified,$r]}"
			done
			col() { local w=$1 r; for r in $(seq 1 "$rounds"); do echo "${v[$w,$r]}"; done; }
			ratio() { local w=$1 r; for r in $(seq 1 "$rounds"); do div "${v[$w,$r]}" "$(maxf "${v[bbdef,$r]}" "${v[bbkvu,$r]}")"; echo; done; }
			engine_rows+=("| $preset | $n | $(fmt0 "$(stats $(col bbdef))") | $(fmt0 "$(stats $(col bbkvu))") | $(fmt0 "$(stats $(col kvstreams))") | $(fmt2 "$(stats $(ratio kvstreams))") | $(fmt0 "$(stats $(col kvunified))") | $(fmt2 "$(stats $(ratio kvunified))") |")
			unset v
		done
	done
fi

# wait_http URL: waits until URL answers 200.
wait_http() {
	for _ in $(seq 1 600); do
		curl -fs "$1" >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	die "$1 did not come up"
}

# serve_kvgate LOG ARGS...: starts kvgate serve; sets addr.
serve_kvgate() {
	local lg=$1
	shift
	"$kvgate" serve --listen 127.0.0.1:0 --log-level info "$@" 2>"$lg" &
	pids+=($!)
	addr=""
	for _ in $(seq 1 600); do
		addr=$(sed -n 's/.*msg="kvgate ready" addr=\([^ ]*\).*/\1/p' "$lg" | head -n1)
		[[ -n $addr ]] && return 0
		sleep 0.2
	done
	cat "$lg" >&2
	die "kvgate serve did not become ready"
}

# serve_llama LOG ARGS...: starts llama-server on a free port; sets url.
serve_llama() {
	local lg=$1 port
	shift
	port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
	"$bin/llama-server" --host 127.0.0.1 --port "$port" "$@" >"$lg" 2>&1 &
	pids+=($!)
	url=http://127.0.0.1:$port
	wait_http "$url/health"
}

# drive NAME TARGET ARGS...: kvgate bench --json against TARGET ("grpc
# ADDR" or "http URL"); prints "output_tok/s ttft_p50_ms".
drive() {
	local name=$1 kind=$2 where=$3 f
	shift 3
	f=$out/e2e-$name-$RANDOM.json
	if [[ $kind == grpc ]]; then
		"$kvgate" bench --addr "$where" --json "$@" >"$f"
	else
		"$kvgate" bench --llama-server "$where" --json "$@" >"$f"
	fi
	jq -r '"\(.throughput.output_tokens_per_s) \(.latency_ms.ttft.p50)"' "$f"
}

e2e_rows=()
prefix_rows=()
if [[ $sections == *e2e* ]]; then
	m=$(model "$e2e_preset")
	for n in 16 1; do
		fixed=(--workload fixed --input-tokens 128 --output-tokens 128 --concurrency 16 --requests 32 --warmup 4 --no-prefix-cache)
		if [[ $n == 1 ]]; then
			fixed=(--workload fixed --input-tokens 128 --output-tokens 128 --concurrency 1 --requests 4 --warmup 1 --no-prefix-cache)
		fi
		declare -A v=()
		for r in $(seq 1 "$rounds"); do
			for who in $(rotate "$r" kv lsdef lskvu); do
				case $who in
				kv) serve_kvgate "$out/kvgate-$n-$r.log" --model "$m" --ctx 4096 --max-seqs 16 --batch 512 --threads "$threads" \
					--kv-layout streams --prefix-cache=false
					v[$who,$r]=$(drive "kv-$n-$r" grpc "$addr" "${fixed[@]}") ;;
				lsdef) serve_llama "$out/llama-server-$n-$r.log" -m "$m" -c 4096 -np 16 -b 512 -ub 512 -t "$threads"
					v[$who,$r]=$(drive "lsdef-$n-$r" http "$url" "${fixed[@]}") ;;
				lskvu) serve_llama "$out/llama-server-kvu-$n-$r.log" -m "$m" -c 4096 -np 16 -b 512 -ub 512 -t "$threads" -kvu
					v[$who,$r]=$(drive "lskvu-$n-$r" http "$url" "${fixed[@]}") ;;
				esac
				stop_servers
			done
			log "e2e streams=$n round $r: kvgate ${v[kv,$r]}, llama-server ${v[lsdef,$r]}, llama-server -kvu ${v[lskvu,$r]} (tok/s, TTFT p50 ms)"
		done
		tps() { local w=$1 r; for r in $(seq 1 "$rounds"); do echo "${v[$w,$r]% *}"; done; }
		ttft() { local w=$1 r; for r in $(seq 1 "$rounds"); do echo "${v[$w,$r]#* }"; done; }
		rat() { local a=$1 b=$2 f=$3 r x y; for r in $(seq 1 "$rounds"); do
			if [[ $f == tps ]]; then x=${v[$a,$r]% *} y=${v[$b,$r]% *}; else x=${v[$a,$r]#* } y=${v[$b,$r]#* }; fi
			div "$x" "$y"; echo; done; }
		e2e_rows+=("| $n | $(fmt0 "$(stats $(tps kv))") | $(fmt0 "$(stats $(tps lsdef))") | $(fmt0 "$(stats $(tps lskvu))") | $(fmt2 "$(stats $(rat kv lsdef tps))") | $(fmt2 "$(stats $(rat kv lskvu tps))") | $(fmt0 "$(stats $(ttft kv))") / $(fmt0 "$(stats $(ttft lsdef))") / $(fmt0 "$(stats $(ttft lskvu))") | $(fmt2 "$(stats $(rat kv lsdef ttft))") | $(fmt2 "$(stats $(rat kv lskvu ttft))") |")
		unset v
	done

	# Shared prefix: 16 clients whose prompts share their first 256
	# tokens, each with its own 32-token tail and 32 generated tokens.
	# kvgate: its default configuration (the unified layout, zero-copy
	# prefix sharing), and the streams layout with its prefix cache
	# (prefixes copied between streams; 16 running + 16 cache streams of
	# 512 cells); llama-server: its default prompt cache, -np 16 with 512
	# cells per slot.
	shared=(--workload shared-prefix --prefix-tokens 256 --input-tokens 288 --output-tokens 32 --concurrency 16 --requests 64 --warmup 16)
	declare -A v=()
	for r in $(seq 1 "$rounds"); do
		for who in $(rotate "$r" kv kvs ls); do
			case $who in
			kv) serve_kvgate "$out/kvgate-prefix-$r.log" --model "$m" --ctx 8192 --max-seqs 16 --batch 512 --threads "$threads"
				v[$who,$r]=$(drive "kv-prefix-$r" grpc "$addr" "${shared[@]}") ;;
			kvs) serve_kvgate "$out/kvgate-streams-prefix-$r.log" --model "$m" --ctx 16384 --max-seqs 16 --batch 512 --threads "$threads" \
					--kv-layout streams
				v[$who,$r]=$(drive "kvs-prefix-$r" grpc "$addr" "${shared[@]}") ;;
			ls) serve_llama "$out/llama-server-prefix-$r.log" -m "$m" -c 8192 -np 16 -b 512 -ub 512 -t "$threads"
				v[$who,$r]=$(drive "ls-prefix-$r" http "$url" "${shared[@]}") ;;
			esac
			stop_servers
		done
		log "shared prefix round $r: kvgate unified ${v[kv,$r]}, kvgate streams ${v[kvs,$r]}, llama-server ${v[ls,$r]}"
	done
	tps() { local w=$1 r; for r in $(seq 1 "$rounds"); do echo "${v[$w,$r]% *}"; done; }
	ttft() { local w=$1 r; for r in $(seq 1 "$rounds"); do echo "${v[$w,$r]#* }"; done; }
	rt() { local w=$1 r; for r in $(seq 1 "$rounds"); do div "${v[$w,$r]% *}" "${v[ls,$r]% *}"; echo; done; }
	prefix_rows+=("| shared prefix 256 + 32 / 32, 16 streams | $(fmt0 "$(stats $(tps kv))") | $(fmt0 "$(stats $(tps kvs))") | $(fmt0 "$(stats $(tps ls))") | $(fmt2 "$(stats $(rt kv))") | $(fmt2 "$(stats $(rt kvs))") | $(fmt0 "$(stats $(ttft kv))") / $(fmt0 "$(stats $(ttft kvs))") / $(fmt0 "$(stats $(ttft ls))") |")
	unset v
fi

busy_rows=()
if [[ $sections == *busy* ]]; then
	m=$(model "$busy_preset")
	burn() { for _ in $(seq 1 "$(nproc)"); do sh -c 'while :; do :; done' & busy_pids+=($!); done; }
	for n in 1 16; do
		declare -A v=()
		for r in $(seq 1 "$rounds"); do
			for who in $(rotate "$r" kv bb); do
				case $who in
				kv) v[kv_quiet,$r]=$(kv "$m" "$n" unified "")
					burn
					v[kv_busy,$r]=$(kv "$m" "$n" unified "")
					stop_busy ;;
				bb) v[bb_quiet,$r]=$(bb "$m" "$n")
					burn
					v[bb_busy,$r]=$(bb "$m" "$n")
					stop_busy ;;
				esac
			done
			log "busy streams=$n round $r: kvgate ${v[kv_quiet,$r]} -> ${v[kv_busy,$r]}, llama-batched-bench -t $threads ${v[bb_quiet,$r]} -> ${v[bb_busy,$r]}"
		done
		col() { local w=$1 r; for r in $(seq 1 "$rounds"); do echo "${v[$w,$r]}"; done; }
		rb() { local w=$1 r; for r in $(seq 1 "$rounds"); do div "${v[${w}_busy,$r]}" "${v[${w}_quiet,$r]}"; echo; done; }
		busy_rows+=("| $n | $(fmt0 "$(stats $(col kv_quiet))") | $(fmt0 "$(stats $(col kv_busy))") | $(fmt2 "$(stats $(rb kv))") | $(fmt0 "$(stats $(col bb_quiet))") | $(fmt0 "$(stats $(col bb_busy))") | $(fmt2 "$(stats $(rb bb))") |")
		unset v
	done
fi

elapsed=$(($(date +%s) - start))
commit=$(cd "$bin/../.." 2>/dev/null && git -C ../llama.cpp log -1 --format=%h 2>/dev/null || true)
cat <<EOF
- Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); $(go version | cut -d' ' -f3); kvgate $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo '+dirty'); $(date -u +%Y-%m-%d).
- llama.cpp tools: \`$bin\` ($(basename "$(dirname "$bin")"); tree ${commit:-unknown}); $("$bin/llama-batched-bench" --version 2>&1 | grep -m1 -i 'version' || true).
- Threads: $threads. Rounds: $rounds, interleaved; each cell is the median (min–max) over the rounds, and each ratio is taken within a round.
- Load average at start: $load_start; at end: $(cut -d' ' -f1-3 /proc/loadavg). The script ran for ${elapsed}s.
EOF
if ((${#engine_rows[@]} > 0)); then
	cat <<'EOF'

**Engine, in process.** Decode tok/s (pure decode steps), 128 prompt + 128 generated tokens per stream, `-c 8192 -b 512 -ub 512`. kvgate: `BenchmarkEngineDecode` (8192 cells, 32 sequences; streams: 32 streams of 256 cells). Ratio: kvgate over the better of the two llama-batched-bench configurations in the same round.

| model | streams | llama-batched-bench default (stream per sequence) | llama-batched-bench `-kvu` | kvgate `--kv-layout streams` | ratio | kvgate `unified` | ratio |
|---|---|---|---|---|---|---|---|
EOF
	printf '%s\n' "${engine_rows[@]}"
fi
if ((${#e2e_rows[@]} > 0)); then
	cat <<EOF

**End to end.** Model $e2e_preset. Output tok/s and TTFT p50 (ms) measured by \`kvgate bench\` (the same load generator against both servers: gRPC Generate for kvgate, HTTP \`/completion\` streaming for llama-server), 128/128 tokens, prompt cache off on both. kvgate: \`serve --kv-layout streams --prefix-cache=false --ctx 4096 --max-seqs 16\`; llama-server: \`-c 4096 -np 16\`, with and without \`-kvu\`.

| streams | kvgate tok/s | llama-server tok/s | llama-server -kvu tok/s | tok/s ratio vs default | vs -kvu | TTFT p50 ms (kvgate / default / -kvu) | TTFT ratio vs default | vs -kvu |
|---|---|---|---|---|---|---|---|---|
EOF
	printf '%s\n' "${e2e_rows[@]}"
	cat <<EOF

Shared prefix, 64 requests after 16 warm-up ones: kvgate's default configuration (unified layout, prefix cache on, \`--ctx 8192 --max-seqs 16\`) and its streams layout with the prefix cache (\`--kv-layout streams --ctx 16384 --max-seqs 16\`: 16 running and 16 cache streams of 512 cells) against llama-server's prompt cache (\`-c 8192 -np 16\`, \`cache_prompt\` on):

| workload | kvgate unified tok/s | kvgate streams tok/s | llama-server tok/s | ratio unified | ratio streams | TTFT p50 ms (unified / streams / llama-server) |
|---|---|---|---|---|---|---|
EOF
	printf '%s\n' "${prefix_rows[@]}"
fi
if ((${#busy_rows[@]} > 0)); then
	cat <<EOF

**Busy CPU.** Model $busy_preset, decode tok/s, 128/128 tokens per stream, quiet and then with $(nproc) busy loops (\`sh -c 'while :; do :; done'\`, one per CPU) beside it. kvgate: its default configuration (no thread count given: the default threads and their adaptation); llama-batched-bench: \`-t $threads\`.

| streams | kvgate quiet | kvgate busy | kvgate busy/quiet | llama-batched-bench quiet | busy | busy/quiet |
|---|---|---|---|---|---|---|
EOF
	printf '%s\n' "${busy_rows[@]}"
fi
