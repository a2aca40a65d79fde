//go:build cgo

package native_test

import (
	"context"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"github.com/kvgate/kvgate/allocator"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/native/llama"
)

// TestEngineDeterministic runs greedy streams on a pool far too small for
// them, on engines with and without EngineConfig.Deterministic, and compares
// every stream with its solo run on the same engine. The deterministic
// engine must reproduce every solo run token for token, with preemptions
// happening under optimistic admission (and finished sequences leaving
// holes under reserve admission), and no sequence let out of order. The default
// engine is run for contrast and only logged: there, some streams part
// from their solo run at near-ties (see TestLogitDrift in native/llama).
func TestEngineDeterministic(t *testing.T) {
	m := stories(t)
	tests := []struct {
		name          string
		deterministic bool
		kvType        string
		policy        allocator.Policy
	}{
		{"deterministic, f16 cells", true, "", allocator.PolicyOptimistic},
		{"deterministic, f32 cells", true, "f32", allocator.PolicyOptimistic},
		// Reserve admission never preempts, but finished sequences leave
		// holes below running ones.
		{"deterministic, reserve admission", true, "", allocator.PolicyReserve},
		{"default", false, "f32", allocator.PolicyOptimistic},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// newEngine runs llama.cpp on one thread: the suite runs
			// packages in parallel on 2 cores.
			e := newEngine(t, llama.ContextParams{Cells: 256, Batch: 64, MaxSequences: 8, KVType: tc.kvType},
				native.EngineConfig{Deterministic: tc.deterministic,
					Admission: allocator.Config{MaxQueue: 32, Policy: tc.policy, Watermark: 8}})
			r := rand.New(rand.NewPCG(3, 4))
			const n = 10
			prompts := make([][]int32, n)
			maxTokens := make([]int, n)
			for i := range prompts {
				// The same streams as cmd/kvgate's TestPreemptionStress.
				prompts[i] = make([]int32, 10+r.IntN(20))
				prompts[i][0] = 1 // BOS
				for j := 1; j < len(prompts[i]); j++ {
					prompts[i][j] = int32(3 + r.IntN(m.Info().VocabSize-3))
				}
				maxTokens[i] = 80 + r.IntN(60)
				if tc.policy == allocator.PolicyReserve {
					maxTokens[i] /= 2 // so that several fit at once
				}
			}
			run := func(i int) collected {
				s, err := e.Submit(context.Background(), native.Request{Prompt: prompts[i], MaxTokens: maxTokens[i],
					IgnoreEOS: true, Priority: int32(i % 3)})
				if err != nil {
					t.Error(err)
					return collected{}
				}
				return collect(s)
			}
			solo := make([]collected, n)
			for i := range solo {
				solo[i] = run(i)
			}
			before := e.Stats()
			const rounds = 3
			equal := 0
			for round := range rounds {
				got := make([]collected, n)
				var wg sync.WaitGroup
				for i := range got {
					wg.Go(func() { got[i] = run(i) })
				}
				wg.Wait()
				for i := range got {
					if err := got[i].result.Err; err != nil {
						t.Fatalf("round %d, stream %d: %v", round, i, err)
					}
					if len(got[i].ids) != maxTokens[i] {
						t.Errorf("round %d, stream %d: %d tokens, want %d", round, i, len(got[i].ids), maxTokens[i])
					}
					if slices.Equal(got[i].ids, solo[i].ids) {
						equal++
						continue
					}
					j := firstDiff(got[i].ids, solo[i].ids)
					if tc.deterministic {
						t.Errorf("round %d, stream %d differs from its solo run at token %d", round, i, j)
					} else {
						t.Logf("round %d, stream %d differs from its solo run at token %d", round, i, j)
					}
				}
			}
			st := e.Stats()
			t.Logf("%d of %d streams equal their solo run; preempted %d, held %d, relocated %d, padded %d, disordered %d",
				equal, rounds*n, st.Preempted-before.Preempted, st.Held-before.Held, st.Relocated-before.Relocated,
				st.Padded-before.Padded, st.Disordered-before.Disordered)
			if tc.policy == allocator.PolicyOptimistic && st.Preempted == before.Preempted {
				t.Fatal("no preemption: the pool is too big for the test")
			}
			if tc.deterministic && st.Disordered != before.Disordered {
				t.Errorf("%d sequences ran out of cell order", st.Disordered-before.Disordered)
			}
			if used := e.Allocator().Stats().CellsUsed; used != 0 {
				t.Errorf("%d cells still used after the run", used)
			}
		})
	}
}
