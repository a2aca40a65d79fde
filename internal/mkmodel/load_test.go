package mkmodel_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/kvgate/kvgate/internal/llamatest"
	"github.com/kvgate/kvgate/internal/mkmodel"
	"github.com/kvgate/kvgate/internal/testmodels"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/native/llama"
)

// Tokenizers of the TestLoadInLlamaCPP cases.
const (
	spmBuiltin = ""            // the built-in SentencePiece vocabulary
	bpeBuiltin = "bpe"         // the built-in byte-level BPE vocabulary
	spmFile    = "spm-file"    // copied from a vocabulary-only file of a 32000-token built-in SentencePiece vocabulary
	bpeFile    = "bpe-file"    // copied from a vocabulary-only file of a 50257-token (GPT-2's size) built-in BPE vocabulary
	stories    = "stories260K" // copied from the real stories260K model (SentencePiece, 512 tokens)
	miniLM     = "MiniLM"      // copied from the real all-MiniLM-L6-v2 model (BERT WordPiece, 30522 tokens)
)

// vocabFor returns the tokenizer of kind (one of the constants above) for a
// spec whose built-in size is size; nil means the spec's own built-in
// vocabulary. The vocabulary-only files are written into dir.
func vocabFor(t *testing.T, kind string, size int, dir string) *mkmodel.Vocab {
	t.Helper()
	var (
		v   *mkmodel.Vocab
		err error
	)
	fromFile := func(v *mkmodel.Vocab, err error) (*mkmodel.Vocab, error) {
		if err != nil {
			return nil, err
		}
		path := filepath.Join(dir, kind+".gguf")
		if _, err := mkmodel.WriteVocabFile(context.Background(), path, v); err != nil {
			return nil, err
		}
		return mkmodel.LoadVocab(path)
	}
	switch kind {
	case spmBuiltin:
		return nil
	case bpeBuiltin:
		v, err = mkmodel.BuiltinBPEVocab(size)
	case spmFile:
		v, err = fromFile(mkmodel.BuiltinVocab(32000))
	case bpeFile:
		v, err = fromFile(mkmodel.BuiltinBPEVocab(50257))
	case stories:
		v, err = mkmodel.LoadVocab(testmodels.Path(t, testmodels.Stories260K))
	case miniLM:
		// llama.cpp reads the tokenizer independently of the architecture,
		// so a llama model runs with BERT's WordPiece vocabulary (its BOS
		// is [CLS], and it adds [SEP] after the text).
		v, err = mkmodel.LoadVocab(testmodels.Path(t, testmodels.MiniLM))
	default:
		t.Fatalf("unknown tokenizer %q", kind)
	}
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// knownWords is text of words that the built-in vocabularies make single
// tokens, at the start of a text and after spaces.
const knownWords = "Once upon a time there was a big happy friend said Lily"

// TestLoadInLlamaCPP writes models of every preset, weight type and
// tokenizer kind and checks that llama.cpp loads them, reports their shape,
// tokenizes text (and, but for WordPiece, detokenizes it back exactly),
// merges the built-in vocabularies' words into single tokens, and decodes
// with finite logits.
func TestLoadInLlamaCPP(t *testing.T) {
	tests := []struct {
		preset  string
		typ     mkmodel.GGMLType
		vocab   string // a tokenizer kind above
		untied  bool
		kvHeads int
		long    bool // skipped under -short
	}{
		{preset: "tiny", typ: mkmodel.TypeF32},
		{preset: "tiny", typ: mkmodel.TypeF16},
		{preset: "tiny", typ: mkmodel.TypeQ8_0},
		{preset: "tiny", typ: mkmodel.TypeF16, untied: true, kvHeads: 2},
		{preset: "tiny", typ: mkmodel.TypeF16, vocab: bpeBuiltin},
		{preset: "tiny", typ: mkmodel.TypeQ8_0, vocab: bpeBuiltin, untied: true},
		{preset: "tiny", typ: mkmodel.TypeQ8_0, vocab: spmFile},
		{preset: "tiny", typ: mkmodel.TypeF16, vocab: bpeFile},
		{preset: "tiny", typ: mkmodel.TypeF16, vocab: stories},
		{preset: "tiny", typ: mkmodel.TypeF16, vocab: miniLM},
		{preset: "15m", typ: mkmodel.TypeF16},
		{preset: "15m", typ: mkmodel.TypeF16, vocab: bpeBuiltin},
		{preset: "15m", typ: mkmodel.TypeQ8_0, vocab: spmFile},
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
			spec.Vocab = vocabFor(t, tt.vocab, spec.VocabSize, dir)
			path := filepath.Join(dir, "model.gguf")
			start := time.Now()
			size, err := mkmodel.WriteFile(context.Background(), path, spec)
			if err != nil {
				t.Fatal(err)
			}
			written := time.Since(start)
			defer os.Remove(path)

			start = time.Now()
			m, err := llama.LoadModel(path, llama.LoadOptions{})
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
			// The built-in SentencePiece vocabulary adds BOS; GPT-2's
			// convention, which the built-in BPE one follows, does not.
			if bpe := tt.vocab == bpeBuiltin || tt.vocab == bpeFile; info.AddBOS == bpe {
				t.Errorf("AddBOS %v with tokenizer %q", info.AddBOS, tt.vocab)
			}

			text := "Once upon a time, the little girl said: \"héllo, 世界!\"\n\tüñï 🙂 <s> 42  end"
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
			t.Logf("%d tokens for %d bytes", len(toks), len(text))
			body := toks
			if info.AddBOS {
				body = toks[1:]
			}
			back, err := m.Detokenize(body, native.DetokenizeOptions{StripLeadingSpace: true})
			if err != nil {
				t.Fatal(err)
			}
			if tt.vocab == miniLM {
				// WordPiece lowercases, strips accents, and spells what it
				// has no piece for as [UNK]: no round trip, but the words
				// are there.
				if !strings.Contains(back, "once upon a time") {
					t.Errorf("Detokenize(Tokenize(%q)) = %q, without its words", text, back)
				}
			} else if back != text {
				t.Errorf("Detokenize(Tokenize(%q)) = %q", text, back)
			}
			if tt.vocab != stories && tt.vocab != miniLM {
				// The built-in vocabularies make each of their words one
				// token: the merges are real.
				words := strings.Fields(knownWords)
				got, err := m.Tokenize(knownWords, false, false)
				if err != nil || len(got) != len(words) {
					t.Errorf("Tokenize(%q) = %v, %v; want %d word tokens", knownWords, got, err, len(words))
				}
				for i := range min(len(got), len(words)) {
					piece, _ := m.Detokenize(got[i:i+1], native.DetokenizeOptions{StripLeadingSpace: i == 0})
					if strings.TrimPrefix(piece, " ") != words[i] || (i > 0) != strings.HasPrefix(piece, " ") {
						t.Errorf("token %d of %q is %q, want %q", i, knownWords, piece, words[i])
					}
				}
			}

			out, err := llamatest.GreedyReference(context.Background(), m, toks[:min(len(toks), 12)], 4)
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

// TestVocabOnlyRefused checks that kvgate refuses a vocabulary-only file,
// as written by WriteVocabFile, with ErrModelInvalid and a one-line
// error: it has a tokenizer but no weights.
func TestVocabOnlyRefused(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name  string
		vocab func() (*mkmodel.Vocab, error)
	}{
		{"spm", func() (*mkmodel.Vocab, error) { return mkmodel.BuiltinVocab(32000) }},
		{"bpe", func() (*mkmodel.Vocab, error) { return mkmodel.BuiltinBPEVocab(50257) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, err := tt.vocab()
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, tt.name+".gguf")
			if _, err := mkmodel.WriteVocabFile(context.Background(), path, v); err != nil {
				t.Fatal(err)
			}
			m, err := llama.LoadModel(path, llama.LoadOptions{})
			if err == nil {
				m.Close()
				t.Fatalf("LoadModel(%s) succeeded", path)
			}
			if !errors.Is(err, llama.ErrModelInvalid) {
				t.Errorf("LoadModel error = %v, want ErrModelInvalid", err)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
			t.Logf("LoadModel: %v", err)
		})
	}
}

// checkLogits decodes toks and checks that the logits of the last token are
// finite and spread: a model whose activations overflowed would give NaN,
// and GreedyReference's argmax would not notice.
func checkLogits(t *testing.T, m *llama.Model, toks []int32) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c, err := llama.NewContext(m, llama.ContextParams{Cells: len(toks), Batch: len(toks), MaxSequences: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b := native.NewBatch(len(toks))
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
