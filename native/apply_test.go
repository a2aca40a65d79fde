package native

import (
	"context"
	"testing"
)

// TestOneApplyPerStep shows the one-way flow's count: a sequence running
// alone costs exactly one allocator Apply per decode step, plus the one
// that settles its end before its stream closes. The worker makes no other
// call into the allocator on its way.
func TestOneApplyPerStep(t *testing.T) {
	tests := []struct {
		name              string
		prompt, maxTokens int
	}{
		{"short", 10, 20},
		{"prompt over two steps", 100, 5}, // the batch takes 64 tokens a step
		{"one token", 3, 1},
	}
	fb := newFakeBackend(1024, 64)
	e := startEngine(t, fb, EngineConfig{Admission: admission(4)})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			steps0, applies0 := e.Stats().Steps, e.Allocator().Stats().Applies
			p := make([]int32, tt.prompt)
			for i := range p {
				p[i] = int32(1 + i%(fakeVocabSize-1))
			}
			s, err := e.Submit(context.Background(), request(p, tt.maxTokens))
			if err != nil {
				t.Fatal(err)
			}
			d := readAll(s)
			if d.res.Err != nil || len(d.toks) != tt.maxTokens {
				t.Fatalf("stream: %d tokens, %v", len(d.toks), d.res.Err)
			}
			steps := e.Stats().Steps - steps0
			applies := e.Allocator().Stats().Applies - applies0
			want := uint64((tt.prompt+63)/64 + tt.maxTokens - 1)
			if steps != want {
				t.Errorf("%d steps, want %d", steps, want)
			}
			if applies != steps+1 {
				t.Errorf("%d Applies for %d steps, want %d: one per step and one for the end", applies, steps, steps+1)
			}
		})
	}
}
