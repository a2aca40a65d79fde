package mkmodel_test

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/kvgate/kvgate/internal/mkmodel"
	"github.com/kvgate/kvgate/native"
)

// testModels returns the workplace's test-model folder, or "" when it is
// not there.
func testModels() string {
	for _, dir := range []string{os.Getenv("KVGATE_TEST_MODELS"), "../../../shared/models"} {
		if dir == "" {
			continue
		}
		if st, err := os.Stat(dir); err == nil && st.IsDir() {
			abs, _ := filepath.Abs(dir)
			return abs
		}
	}
	return ""
}

// TestLoadInLlamaCPP writes models of every preset, weight type and
// tokenizer kind and checks that llama.cpp loads them, reports their shape,
// tokenizes text and decodes with finite logits.
func TestLoadInLlamaCPP(t *testing.T) {
	tests := []struct {
		preset  string
		typ     mkmodel.GGMLType
		vocab   string // file in the shared models folder; "" = built-in
		untied  bool
		kvHeads int
		long    bool // skipped under -short
	}{
		{preset: "tiny", typ: mkmodel.TypeF32},
		{preset: "tiny", typ: mkmodel.TypeF16},
		{preset: "tiny", typ: mkmodel.TypeQ8_0},
		{preset: "tiny", typ: mkmodel.TypeF16, untied: true, kvHeads: 2},
		{preset: "tiny", typ: mkmodel.TypeQ8_0, vocab: "ggml-vocab-llama-spm.gguf"},
		{preset: "tiny", typ: mkmodel.TypeF16, vocab: "ggml-vocab-gpt-2.gguf"},
		{preset: "15m", typ: mkmodel.TypeF16},
		{preset: "15m", typ: mkmodel.TypeQ8_0, vocab: "ggml-vocab-llama-spm.gguf"},
		{preset: "110m", typ: mkmodel.TypeQ8_0, long: true},
	}
	dir := t.TempDir()
	for _, tt := range tests {
		name := tt.preset + "/" + tt.typ.String()
		if tt.vocab != "" {
			name += "/" + tt.vocab
		}
		if tt.untied {
			name += "/untied"
		}
		if tt.kvHeads > 0 {
			name += fmt.Sprintf("/kv%d", tt.kvHeads)
		}
		t.Run(name, func(t *testing.T) {
			if tt.long && testing.Short() {
				t.Skip("the 110m model is skipped under -short")
			}
			spec, err := mkmodel.Preset(tt.preset)
			if err != nil {
				t.Fatal(err)
			}
			spec.Type = tt.typ
			spec.TiedEmbeddings = !tt.untied
			spec.HeadsKV = tt.kvHeads
			wantKV := spec.Heads
			if tt.kvHeads > 0 {
				wantKV = tt.kvHeads
			}
			if tt.vocab != "" {
				models := testModels()
				if models == "" {
					t.Skip("shared models not found (set KVGATE_TEST_MODELS)")
				}
				if spec.Vocab, err = mkmodel.LoadVocab(filepath.Join(models, tt.vocab)); err != nil {
					t.Fatal(err)
				}
			}
			path := filepath.Join(dir, "model.gguf")
			start := time.Now()
			size, err := mkmodel.WriteFile(context.Background(), path, spec)
			if err != nil {
				t.Fatal(err)
			}
			written := time.Since(start)
			defer os.Remove(path)

			start = time.Now()
			m, err := native.LoadModel(path, native.LoadOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			loaded := time.Since(start)
			info := m.Info()
			t.Logf("%s: %d parameters, %d bytes, written in %v, loaded in %v (%q)",
				spec, spec.ParameterCount(), size, written.Round(time.Millisecond), loaded.Round(time.Millisecond), info.Description)
			if info.Architecture != "llama" {
				t.Errorf("architecture %q, want llama", info.Architecture)
			}
			if info.VocabSize != spec.NVocab() || info.Layers != spec.Layers || info.EmbeddingSize != spec.Embedding ||
				info.Heads != spec.Heads || info.HeadsKV != wantKV || info.TrainingContext != spec.ContextLength {
				t.Errorf("llama.cpp sees %+v; spec %s", info, spec)
			}
			if info.ParameterCount != uint64(spec.ParameterCount()) {
				t.Errorf("llama.cpp counts %d parameters, spec %d", info.ParameterCount, spec.ParameterCount())
			}

			text := "Once upon a time, the little girl said: \"héllo, 世界!\"\n\tüñï 🙂 <s> 42"
			toks, err := m.Tokenize(text, true, false)
			if err != nil {
				t.Fatal(err)
			}
			if len(toks) < 5 || m.ValidTokens(toks) >= 0 {
				t.Fatalf("Tokenize(%q) = %v", text, toks)
			}
			if info.AddBOS && toks[0] != info.BOS {
				t.Errorf("tokens start with %d, not BOS %d", toks[0], info.BOS)
			}
			body := toks
			if info.AddBOS {
				body = toks[1:]
			}
			back, err := m.Detokenize(body, native.DetokenizeOptions{StripLeadingSpace: true})
			if err != nil {
				t.Fatal(err)
			}
			if back != text {
				t.Errorf("Detokenize(Tokenize(%q)) = %q", text, back)
			}
			t.Logf("%d tokens for %d bytes", len(toks), len(text))
			if tt.vocab == "" {
				// The built-in vocabulary merges its common words.
				if toks, err := m.Tokenize("Once upon a time", false, false); err != nil || len(toks) != 4 {
					t.Errorf("Tokenize(Once upon a time) = %v, %v; want 4 word tokens", toks, err)
				}
			}

			out, err := native.GreedyReference(context.Background(), m, toks[:min(len(toks), 12)], 4)
			if err != nil {
				t.Fatal(err)
			}
			if len(out) == 0 || m.ValidTokens(out) >= 0 {
				t.Fatalf("GreedyReference = %v", out)
			}
			piece, _ := m.Detokenize(out, native.DetokenizeOptions{})
			t.Logf("greedy continuation %v %q", out, piece)
			checkLogits(t, m, toks)
		})
	}
}

// checkLogits decodes toks and checks that the logits of the last token are
// finite and spread: a model whose activations overflowed would give NaN,
// and GreedyReference's argmax would not notice.
func checkLogits(t *testing.T, m *native.Model, toks []int32) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c, err := native.NewContext(m, native.ContextParams{Cells: len(toks), Batch: len(toks), MaxSequences: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b := native.NewBatch(len(toks))
	defer b.Free()
	for i, tok := range toks {
		b.Add(tok, i, 0, i == len(toks)-1)
	}
	if err := c.Decode(b); err != nil {
		t.Fatal(err)
	}
	logits := c.Logits(len(toks) - 1)
	var sum, sum2 float64
	for i, x := range logits {
		if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
			t.Fatalf("logit %d is %g", i, x)
		}
		sum += float64(x)
		sum2 += float64(x) * float64(x)
	}
	n := float64(len(logits))
	std := math.Sqrt(sum2/n - (sum/n)*(sum/n))
	if std < 0.01 || std > 1000 {
		t.Errorf("logits have standard deviation %g", std)
	}
	t.Logf("logits: mean %.3g, std %.3g", sum/n, std)
}
