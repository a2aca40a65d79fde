package native

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/kvgate/kvgate/internal/mkmodel"
	"github.com/kvgate/kvgate/internal/testmodels"
)

// TestMain removes the random-weight models the tests wrote.
func TestMain(m *testing.M) {
	code := m.Run()
	testmodels.Cleanup()
	os.Exit(code)
}

// testModel returns the path of a real test model (testmodels.Stories260K
// or testmodels.MiniLM), fetched and verified on first use.
func testModel(t testing.TB, name string) string {
	t.Helper()
	return testmodels.Path(t, name)
}

// bigVocabModelPath returns the path of a random-weight llama with a
// 32000-token SentencePiece vocabulary (Llama-2's size) and one small
// layer, written by mkmodel.
func bigVocabModelPath(t testing.TB) string {
	t.Helper()
	spec, err := mkmodel.Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	spec.Layers = 1
	spec.VocabSize = 32000
	spec.ContextLength = 2048
	spec.Seed = 7
	return testmodels.Random(t, "bigvocab-32000", spec)
}

var (
	storiesOnce  sync.Once
	storiesModel *Model
	storiesErr   error
)

// stories loads stories260K once for the package's tests.
func stories(t testing.TB) *Model {
	t.Helper()
	path := testModel(t, testmodels.Stories260K)
	storiesOnce.Do(func() { storiesModel, storiesErr = LoadModel(path, LoadOptions{}) })
	if storiesErr != nil {
		t.Fatalf("load stories260K: %v", storiesErr)
	}
	return storiesModel
}

// vocabOnlyModelPath returns the path of a vocabulary-only GGUF file (the
// tokenizer and hyperparameters, no tensors), as llama.cpp's
// ggml-vocab-*.gguf files are, written by mkmodel.
func vocabOnlyModelPath(t testing.TB) string {
	t.Helper()
	v, err := mkmodel.BuiltinVocab(32000)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "vocab-only.gguf")
	if _, err := mkmodel.WriteVocabFile(context.Background(), p, v); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestLoadModelContext shows that a load is abandoned when its context is
// done: before it starts, and from within, at llama.cpp's next progress
// report.
func TestLoadModelContext(t *testing.T) {
	path := testModel(t, testmodels.Stories260K)
	done, cancel := context.WithCancel(context.Background())
	cancel()
	if m, err := LoadModelContext(done, path, LoadOptions{}); !errors.Is(err, context.Canceled) {
		if m != nil {
			m.Close()
		}
		t.Fatalf("load with a cancelled context: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	reports := 0
	m, err := LoadModelContext(ctx, path, LoadOptions{Progress: func(float32) { reports++; cancel() }})
	if !errors.Is(err, context.Canceled) {
		if m != nil {
			m.Close()
		}
		t.Fatalf("load cancelled at its first progress report: %v", err)
	}
	if reports != 1 {
		t.Errorf("%d progress reports after the cancel, want the load to stop at the first", reports)
	}
	// The process is still fine: a load with a live context succeeds.
	m, err = LoadModelContext(context.Background(), path, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
}
