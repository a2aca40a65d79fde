package llamatest

import (
	"context"
	"sync"
	"testing"

	"github.com/kvgate/kvgate/internal/testmodels"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/native/llama"
)

var (
	storiesOnce  sync.Once
	storiesModel *llama.Model
	storiesErr   error
)

// stories loads stories260K once for the package's tests.
func stories(t testing.TB) *llama.Model {
	t.Helper()
	path := testmodels.Path(t, testmodels.Stories260K)
	storiesOnce.Do(func() { storiesModel, storiesErr = llama.LoadModel(path, llama.LoadOptions{}) })
	if storiesErr != nil {
		t.Fatalf("load stories260K: %v", storiesErr)
	}
	return storiesModel
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
	text, _ := m.Detokenize(a, native.DetokenizeOptions{})
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
