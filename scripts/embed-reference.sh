#!/usr/bin/env bash
# embed-reference.sh writes native/llama/testdata/minilm-embeddings.json:
# the vectors that llama.cpp's own llama-embedding tool computes for a few
# texts with all-MiniLM-L6-v2 (mean pooling, L2-normalized), which
# native/llama's TestEmbedMatchesLlamaEmbedding and cmd/kvgate's
# TestEmbedEndToEnd compare kvgate's vectors with (within 1e-4 per
# component). The tests read the file; they do not need the tool.
#
# Usage: scripts/embed-reference.sh [LLAMA_BIN_DIR]
#   LLAMA_BIN_DIR holds llama-embedding, built from the llama.cpp that kvgate
#   links (scripts in /work/shared/anchors/build-llama-tools.sh build it;
#   LLAMA_TOOLS_OPENMP=OFF). Default: /work/anchors/tools/build-noomp/bin.
#   MODEL overrides the model path (default: internal/testmodels' copy).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-/work/anchors/tools/build-noomp/bin}
MODEL=${MODEL:-/work/shared/models/all-MiniLM-L6-v2-Q4_K_M.gguf}
if [ ! -f "$MODEL" ]; then # the route for users outside this workplace
  MODEL="$(go mod download -json github.com/mutablelogic/go-llama@v0.0.11 | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')/testdata/all-MiniLM-L6-v2-Q4_K_M.gguf"
fi
OUT=native/llama/testdata/minilm-embeddings.json
TEXTS=(
  "A cat sits on the mat"
  "A kitten is sitting on a rug"
  "Stock markets fell sharply today"
  "hello"
  "The quick brown fox jumps over the lazy dog, again and again."
  "Embeddings map text to vectors; similar texts land close together."
  "Ünïcödé, emoji 🙂 and numbers 12345 are tokenized too."
)
PROMPT=$(printf '%s\n' "${TEXTS[@]}")
PROMPT=${PROMPT%$'\n'}
# One batch of 512 tokens as kvgate's default --embedding-batch; the
# model's mean pooling; L2 normalization (2); two threads; -nr (no weight
# repacking), since kvgate's cgo build of ggml has no CPU_REPACK buffer.
CMD=("$BIN/llama-embedding" -m "$MODEL" --pooling mean --embd-normalize 2 -t 2 -c 512 -b 512 -ub 512
     -nr ${EXTRA_FLAGS:-} --embd-output-format json --embd-separator $'\n' -p "$PROMPT")
mkdir -p "$(dirname "$OUT")"
"${CMD[@]}" >/tmp/embed-reference.out 2>/tmp/embed-reference.err || { cat /tmp/embed-reference.err >&2; exit 1; }
SHOWN="llama-embedding -m all-MiniLM-L6-v2-Q4_K_M.gguf --pooling mean --embd-normalize 2 -t 2 -c 512 -b 512 -ub 512 -nr --embd-output-format json --embd-separator '\\n' -p \"\$(printf '%s\\n' TEXTS...)\""
python3 - "$OUT" "$SHOWN" "$BIN" "${TEXTS[@]}" <<'PY'
import json, sys, subprocess
out, shown, bindir, texts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
raw = open('/tmp/embed-reference.out').read()
doc = json.loads(raw[raw.index('{'):raw.rindex('}') + 1])
data = [{"index": d["index"], "embedding": d["embedding"]} for d in doc["data"]]
assert len(data) == len(texts), (len(data), len(texts))
json.dump({"command": shown, "tool": bindir + "/llama-embedding", "texts": texts, "normalize": 2, "data": data},
          open(out, "w"), indent=1)
print(f"wrote {out}: {len(data)} vectors of {len(data[0]['embedding'])} dimensions")
PY
