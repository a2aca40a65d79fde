package native

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kvgate/kvgate/internal/testmodels"
)

func TestLoadModelErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good, err := os.ReadFile(testModel(t, testmodels.Stories260K))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		path string
		want error
	}{
		{"missing", filepath.Join(dir, "nope.gguf"), ErrModelNotFound},
		{"directory", dir, ErrModelNotFound},
		{"empty", write("empty.gguf", nil), ErrModelInvalid},
		{"not gguf", write("text.gguf", []byte("hello, this is not a model at all")), ErrModelInvalid},
		{"header only", write("header.gguf", good[:64]), ErrModelInvalid},
		{"truncated", write("trunc.gguf", good[:len(good)/2]), ErrModelInvalid},
		{"vocab only", vocabOnlyModelPath(t), ErrModelInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := LoadModel(tt.path, LoadOptions{})
			if err == nil {
				m.Close()
				t.Fatalf("LoadModel(%s) succeeded", tt.path)
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("LoadModel error = %v, want %v", err, tt.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
		})
	}
}

func TestModelInfo(t *testing.T) {
	m := stories(t)
	info := m.Info()
	if info.Architecture != "llama" || info.VocabSize != 512 || info.TrainingContext != 2048 || info.Layers != 5 {
		t.Fatalf("info = %+v", info)
	}
	if info.ParameterCount == 0 || info.SizeBytes == 0 {
		t.Fatalf("info = %+v", info)
	}
}

func TestTokenizeDetokenize(t *testing.T) {
	m := stories(t)
	ids, err := m.Tokenize("Once upon a time", true, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) < 3 || ids[0] != m.Info().BOS {
		t.Fatalf("ids = %v", ids)
	}
	text, err := m.Detokenize(ids[1:], DetokenizeOptions{StripLeadingSpace: true})
	if err != nil || text != "Once upon a time" {
		t.Fatalf("Detokenize = %q, %v", text, err)
	}
	if _, err := m.Detokenize([]int32{1, 512}, DetokenizeOptions{}); !errors.Is(err, ErrTokenOutOfRange) {
		t.Fatalf("out of range error = %v", err)
	}
	if _, err := m.Detokenize([]int32{-1}, DetokenizeOptions{}); !errors.Is(err, ErrTokenOutOfRange) {
		t.Fatalf("negative id error = %v", err)
	}
}

func TestGreedyReferenceDeterministic(t *testing.T) {
	m := stories(t)
	ids, _ := m.Tokenize("Once upon a time", true, false)
	a, err := GreedyReference(context.Background(), m, ids, 32)
	if err != nil {
		t.Fatal(err)
	}
	b, err := GreedyReference(context.Background(), m, ids, 32)
	if err != nil {
		t.Fatal(err)
	}
	if len(a) == 0 || !equal(a, b) {
		t.Fatalf("greedy runs differ or empty: %v vs %v", a, b)
	}
	text, _ := m.Detokenize(a, DetokenizeOptions{})
	t.Logf("greedy continuation: %q", text)
}

func equal(a, b []int32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestGreedyDeficits checks the reference's scoring of a given continuation:
// its own greedy output scores 0 everywhere, and a token swapped for the
// runner-up scores exactly the margin GreedyMargins reported there.
func TestGreedyDeficits(t *testing.T) {
	m := stories(t)
	ctx := context.Background()
	prompt, err := m.Tokenize("Once upon a time", true, false)
	if err != nil {
		t.Fatal(err)
	}
	toks, margins, err := GreedyMargins(ctx, m, prompt, 24)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		tokens func() []int32
		want   func(i int) float32 // the deficit expected at step i, -1: only > 0
	}{
		{"greedy output", func() []int32 { return toks }, func(int) float32 { return 0 }},
		{"a different token at step 5", func() []int32 {
			alt := append([]int32(nil), toks...)
			alt[5] = (alt[5] + 1) % int32(m.Info().VocabSize)
			return alt
		}, func(i int) float32 {
			if i == 5 {
				return -1
			}
			return 0
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := tc.tokens()
			d, err := GreedyDeficits(ctx, m, prompt, in[:6]) // after step 5 the greedy path is no longer known
			if err != nil {
				t.Fatal(err)
			}
			for i, got := range d {
				switch want := tc.want(i); {
				case want < 0 && !(got > 0):
					t.Errorf("step %d: deficit %g, want > 0", i, got)
				case want < 0 && got < margins[i]:
					t.Errorf("step %d: deficit %g is below the margin %g to the runner-up", i, got, margins[i])
				case want >= 0 && got != want:
					t.Errorf("step %d: deficit %g, want %g", i, got, want)
				}
			}
		})
	}
	if _, err := GreedyDeficits(ctx, m, prompt, []int32{-1}); err == nil {
		t.Error("an out-of-range token was scored")
	}
}
