package native

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"
)

// busyCost is the time of a step (or encode) of tokens tokens on a busy
// 2-CPU machine, where two threads stall at ggml's spinning barriers.
func busyCost(threads, tokens int) time.Duration {
	if threads == 2 {
		return 300 * time.Millisecond
	}
	return time.Duration(3+tokens/8) * time.Millisecond
}

// quietCost is the same on a quiet machine, where two threads are faster.
func quietCost(threads, tokens int) time.Duration {
	return time.Duration(2+tokens/4) * time.Millisecond / time.Duration(threads) * 3 / 2
}

// TestWorkerTunesThreads runs the worker with TuneThreads on a fake backend
// whose decodes take, on a clock only they move, what a busy or a quiet
// 2-CPU machine would: the worker must move to the faster count and stay
// there, with the thread changes counted, whatever the wall clock does.
// Counts, not times, are checked.
func TestWorkerTunesThreads(t *testing.T) {
	tests := []struct {
		name string
		cost func(threads, tokens int) time.Duration
		want int64
		// maxOff bounds the decodes at the slower count: under load, the
		// steps before the first probe and one per probe back up.
		maxOff int
	}{
		{"busy: two threads stall at their barriers", busyCost, 1, 8},
		{"quiet: two threads are faster", quietCost, 2, 12},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fb := newFakeBackend(1024, 64)
			fb.threads, fb.clock, fb.decodeCost = 2, &fakeClock{}, tc.cost
			e := startEngine(t, fb, EngineConfig{Admission: admission(4), TuneThreads: true, clock: fb.clock.now})
			r := rand.New(rand.NewPCG(3, 4))
			s, err := e.Submit(context.Background(), request(prompt(r, 8), 400))
			if err != nil {
				t.Fatal(err)
			}
			for range s.Events() {
			}
			if err := s.Result().Err; err != nil {
				t.Fatal(err)
			}
			st := e.Stats()
			slower := 3 - tc.want // the other count
			t.Logf("threads %d after %d changes; decodes by threads %v", st.Threads, st.ThreadChanges, fb.byThreads)
			if st.Threads != tc.want {
				t.Errorf("threads %d at the end, want %d", st.Threads, tc.want)
			}
			if off := fb.byThreads[int(slower)]; off > tc.maxOff {
				t.Errorf("%d decodes at %d threads, want at most %d", off, slower, tc.maxOff)
			}
			if tc.want == 1 && st.ThreadChanges == 0 {
				t.Error("no thread change counted")
			}
		})
	}
	t.Run("off", func(t *testing.T) {
		fb := newFakeBackend(1024, 64)
		fb.threads, fb.clock, fb.decodeCost = 2, &fakeClock{}, tests[0].cost
		e := startEngine(t, fb, EngineConfig{Admission: admission(4), clock: fb.clock.now})
		s, err := e.Submit(context.Background(), request([]int32{1, 2, 3}, 50))
		if err != nil {
			t.Fatal(err)
		}
		for range s.Events() {
		}
		if st := e.Stats(); st.Threads != 2 || st.ThreadChanges != 0 || fb.byThreads[1] != 0 {
			t.Errorf("without TuneThreads: threads %d, %d changes, %d decodes at 1 thread", st.Threads, st.ThreadChanges, fb.byThreads[1])
		}
	})
}
