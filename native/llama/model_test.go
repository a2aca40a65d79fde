package llama

import (
	"errors"
	"github.com/kvgate/kvgate/native"
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
	text, err := m.Detokenize(ids[1:], native.DetokenizeOptions{StripLeadingSpace: true})
	if err != nil || text != "Once upon a time" {
		t.Fatalf("Detokenize = %q, %v", text, err)
	}
	if _, err := m.Detokenize([]int32{1, 512}, native.DetokenizeOptions{}); !errors.Is(err, native.ErrTokenOutOfRange) {
		t.Fatalf("out of range error = %v", err)
	}
	if _, err := m.Detokenize([]int32{-1}, native.DetokenizeOptions{}); !errors.Is(err, native.ErrTokenOutOfRange) {
		t.Fatalf("negative id error = %v", err)
	}
}
