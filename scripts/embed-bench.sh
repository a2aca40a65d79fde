#!/usr/bin/env bash
# embed-bench.sh: kvgate's embeddings side by side with llama.cpp's
# llama-server --embeddings, on the same model, threads and batch size.
# Both servers stay up; in each round every client count runs against
# both, one after the other (the order alternates between rounds), and the
# ratio kvgate/llama-server is taken within the round, so that a noisy
# machine slows both sides of a ratio alike.
#
# Usage: scripts/embed-bench.sh [LLAMA_BIN_DIR]
# Environment: ROUNDS (3), DURATION (10s), WARMUP (2s), CLIENTS ("1 16"),
# THREADS (2), BATCH (512), SEQS (16), INPUTS (texts per call, 1), MODEL.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-/work/anchors/tools/build-noomp/bin}
MODEL=${MODEL:-/work/shared/models/all-MiniLM-L6-v2-Q4_K_M.gguf}
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10s} WARMUP=${WARMUP:-2s} CLIENTS=${CLIENTS:-"1 16"}
THREADS=${THREADS:-2} BATCH=${BATCH:-512} SEQS=${SEQS:-16} INPUTS=${INPUTS:-1}
KVPORT=${KVPORT:-18291} LSPORT=${LSPORT:-18292}
WORK=$(mktemp -d)
KV=$WORK/kvgate
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
go build -o "$KV" ./cmd/kvgate

"$KV" serve --listen 127.0.0.1:$KVPORT --model none --embedding-model "$MODEL" --threads "$THREADS" \
  --embedding-batch "$BATCH" --embedding-max-seqs "$SEQS" 2>"$WORK/kvgate.log" &
pids+=($!)
# -np SEQS slots of BATCH tokens each; -b/-ub BATCH; the model's pooling.
"$BIN/llama-server" -m "$MODEL" --embeddings --pooling mean -t "$THREADS" -tb "$THREADS" \
  -b "$BATCH" -ub "$BATCH" -c $((BATCH * SEQS)) -np "$SEQS" --host 127.0.0.1 --port $LSPORT 2>"$WORK/llama-server.log" >&2 &
pids+=($!)
for _ in $(seq 300); do
  grep -q 'msg="kvgate ready"' "$WORK/kvgate.log" && curl -sf http://127.0.0.1:$LSPORT/health >/dev/null && break
  sleep 0.2
done
grep -q 'msg="kvgate ready"' "$WORK/kvgate.log" || { cat "$WORK/kvgate.log" >&2; exit 1; }

run() { # target clients -> inputs/s
  local args=(--addr 127.0.0.1:$KVPORT)
  [ "$1" = llama-server ] && args=(--llama-server http://127.0.0.1:$LSPORT)
  "$KV" bench --embed "${args[@]}" --concurrency "$2" --duration "$DURATION" --warmup "$WARMUP" \
    --embed-inputs "$INPUTS" --seed 14 --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.1f %d" % (r["inputs_per_second"], r["errors"]))'
}

echo "| round | clients | kvgate inputs/s | llama-server inputs/s | ratio |"
echo "|---|---|---|---|---|"
for r in $(seq "$ROUNDS"); do
  for c in $CLIENTS; do
    if [ $((r % 2)) = 1 ]; then k=$(run kvgate "$c"); l=$(run llama-server "$c")
    else l=$(run llama-server "$c"); k=$(run kvgate "$c"); fi
    read -r kr ke <<<"$k"; read -r lr le <<<"$l"
    ratio=$(python3 -c "print('%.2f' % ($kr / $lr if $lr > 0 else float('nan')))")
    errs=""; [ "$ke$le" != "00" ] && errs=" (errors: kvgate $ke, llama-server $le)"
    echo "| $r | $c | $kr | $lr | ${ratio}×$errs |"
  done
done
