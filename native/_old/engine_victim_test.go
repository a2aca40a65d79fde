package native

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/kvgate/kvgate/allocator"
)

// loadLedger is a GrowLedger of a tenant whose load is fixed; only victim
// calls it here.
type loadLedger struct {
	testLedger
	load float64
}

func (l *loadLedger) Grow(int) (bool, error) { return true, nil }
func (l *loadLedger) Requeue([]int32) (bool, <-chan struct{}, error) {
	return false, nil, errors.New("not requeued in this test")
}
func (l *loadLedger) SeqID() int    { return 0 }
func (l *loadLedger) Load() float64 { return l.load }

// TestEngineVictim checks the preemption order: the most loaded tenant
// first, then the lowest priority, then the most recently started; never a
// sequence that cannot be requeued.
func TestEngineVictim(t *testing.T) {
	type seq struct {
		load     float64 // NaN too; -1: a plain Ledger, not a GrowLedger
		priority int32
	}
	tests := []struct {
		name string
		seqs []seq // in start order
		want int   // index of the victim
	}{
		{"one tenant: the most recent", []seq{{0, 0}, {0, 0}, {0, 0}}, 2},
		{"one tenant: the lowest priority", []seq{{0, 1}, {0, -3}, {0, 2}}, 1},
		{"one tenant: the most recent of the lowest priority", []seq{{0, 1}, {0, 0}, {0, 0}, {0, 5}}, 2},
		{"two tenants: the loaded one, despite a higher priority", []seq{{2.5, 9}, {0.5, -9}, {2.5, 9}, {0.5, -9}}, 2},
		{"two tenants: priority orders within the loaded one", []seq{{3, 1}, {3, 0}, {1, -5}, {3, 2}}, 1},
		{"three tenants", []seq{{1, 0}, {1.5, 0}, {0.2, 0}, {1.5, 1}, {1, 0}}, 1},
		{"a NaN load goes first", []seq{{5, 0}, {math.NaN(), 3}, {5, 0}}, 1},
		{"+inf beats any finite load", []seq{{math.Inf(1), 2}, {1e300, 0}}, 0},
		{"plain ledgers are never chosen", []seq{{0, 0}, {-1, -100}, {-1, -100}}, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := &Engine{}
			for _, s := range tc.seqs {
				var l Ledger = &loadLedger{load: s.load}
				if s.load == -1 {
					l = &testLedger{}
				}
				e.active = append(e.active, &sequence{req: Request{Priority: s.priority, Ledger: l}})
			}
			if got := position(e.active, e.victim()); got != tc.want {
				t.Fatalf("victim is sequence %d, want %d", got, tc.want)
			}
			if allocs := testing.AllocsPerRun(100, func() { e.victim() }); allocs != 0 {
				t.Errorf("victim allocates %v times", allocs)
			}
		})
	}
}

func TestEngineStepRate(t *testing.T) {
	t.Run("moving average", func(t *testing.T) {
		e := &Engine{}
		if r := e.StepRate(); r != 0 {
			t.Fatalf("rate before any step = %v, want 0", r)
		}
		steps := []struct {
			d    time.Duration
			want float64 // steps per second after it
		}{
			{10 * time.Millisecond, 100},
			{10 * time.Millisecond, 100},
			{110 * time.Millisecond, 1e9 / (10e6 + StepRateWeight*100e6)},
			{0, 1e9 / (20e6 + StepRateWeight*(1-20e6))},
		}
		for i, s := range steps {
			e.recordStep(s.d)
			if got := e.StepRate(); math.Abs(got-s.want) > 1e-9*s.want {
				t.Errorf("after step %d (%v): rate %v, want %v", i, s.d, got, s.want)
			}
		}
		if allocs := testing.AllocsPerRun(100, func() { e.recordStep(time.Millisecond); e.StepRate() }); allocs != 0 {
			t.Errorf("recordStep and StepRate allocate %v times", allocs)
		}
	})
	// The engine's rate is an average of the durations of its real steps,
	// each of which lies between the decodes of its neighbours (timed by
	// OnStep, on the worker): so its mean step time is at most the longest
	// such bracket. That holds however the machine's load stretches single
	// steps, where a bound against the whole run's wall time did not (the
	// average weighs the last steps most).
	t.Run("engine", func(t *testing.T) {
		m := stories(t)
		var decoded []time.Time // written by the worker; read after the stream ends
		e := newEngine(t, EngineConfig{Cells: 512, Batch: 64, MaxSequences: 2,
			OnStep: func(int, int) { decoded = append(decoded, time.Now()) }})
		if r := e.StepRate(); r != 0 {
			t.Fatalf("rate before any step = %v, want 0", r)
		}
		prompt, _ := m.Tokenize("Once upon a time", true, false)
		start := time.Now()
		s, err := e.Start(Request{Ctx: context.Background(), SeqID: 0, Prompt: prompt, MaxTokens: 24, IgnoreEOS: true,
			Ledger: &testLedger{reserved: len(prompt) + 24}})
		if err != nil {
			t.Fatal(err)
		}
		collect(s)
		rate := e.StepRate()
		end := time.Now() // after the last step's duration was folded in, if it was
		steps := e.Stats().Steps
		if !(rate > 0) || math.IsInf(rate, 0) {
			t.Fatalf("rate %v after %d steps", rate, steps)
		}
		if len(decoded) != int(steps) {
			t.Fatalf("OnStep ran %d times for %d steps", len(decoded), steps)
		}
		// Step k starts after step k-1's decode (or the Start call) and
		// ends before step k+1's (or the read above).
		marks := append(append([]time.Time{start}, decoded...), end)
		var longest time.Duration
		for k := 1; k+1 < len(marks); k++ {
			longest = max(longest, marks[k+1].Sub(marks[k-1]))
		}
		t.Logf("%d steps in %v: %.0f steps/s busy; the longest step bracket is %v", steps, end.Sub(start), rate, longest)
		if mean := time.Duration(1e9 / rate); mean > longest {
			t.Errorf("mean step time %v (rate %.0f/s) is longer than any step could have taken (%v)", mean, rate, longest)
		}
	})
}

// TestEngineNoValidToken runs a sequence whose sampling parameters leave
// no token to draw beside a greedy one: only the first ends, with
// ErrNoValidToken, and the other runs as it would alone.
func TestEngineNoValidToken(t *testing.T) {
	m := stories(t)
	e := newEngine(t, EngineConfig{Cells: 512, Batch: 64, MaxSequences: 2})
	prompt, _ := m.Tokenize("Once upon a time", true, false)
	want, err := GreedyReference(context.Background(), m, prompt, 24)
	if err != nil {
		t.Fatal(err)
	}
	bad := &testLedger{reserved: len(prompt) + 24}
	sBad, err := e.Start(Request{Ctx: context.Background(), SeqID: 1, Prompt: prompt, MaxTokens: 24,
		Sampling: SamplingParams{Temperature: float32(math.NaN())}, Ledger: bad})
	if err != nil {
		t.Fatal(err)
	}
	good := &testLedger{reserved: len(prompt) + 24}
	sGood, err := e.Start(Request{Ctx: context.Background(), SeqID: 0, Prompt: prompt, MaxTokens: len(want), Ledger: good})
	if err != nil {
		t.Fatal(err)
	}
	gotBad, gotGood := collect(sBad), collect(sGood)
	if !errors.Is(gotBad.result.Err, ErrNoValidToken) || len(gotBad.ids) != 0 || !sBad.Failed() {
		t.Errorf("NaN temperature: err %v, %d tokens; want ErrNoValidToken and none", gotBad.result.Err, len(gotBad.ids))
	}
	if gotGood.result.Err != nil || !equal(gotGood.ids, want) {
		t.Errorf("the greedy sequence beside it: err %v, ids %v; want %v", gotGood.result.Err, gotGood.ids, want)
	}
	if bad.released.Load() != 1 || good.released.Load() != 1 {
		t.Errorf("ledgers finished %d and %d times, want 1 each", bad.released.Load(), good.released.Load())
	}
}

// TestEngineTenantPreemption runs, under optimistic admission with the real
// allocator, one short low-priority request beside three long
// high-priority ones on a pool too small for them. When the light request
// is its own tenant, within its share, it is never preempted: the
// preemptions fall on the loaded tenant, despite its higher priority. When
// all four share a tenant, priority alone decides and the light request is
// the one preempted.
func TestEngineTenantPreemption(t *testing.T) {
	m := stories(t)
	tests := []struct {
		name              string
		lightTenant       string
		wantLightPreempts bool
	}{
		{"two tenants", "light", false},
		{"one tenant", "heavy", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEngine(t, EngineConfig{Cells: 256, Batch: 64, MaxSequences: 8})
			a, err := allocator.New(allocator.Config{Cells: e.Cells(), MaxSequences: 8, MaxQueue: 32,
				Policy: allocator.PolicyOptimistic, Watermark: 8})
			if err != nil {
				t.Fatal(err)
			}
			r := rand.New(rand.NewPCG(5, 6))
			prompt := func(n int) []int32 {
				p := make([]int32, n)
				p[0] = 1 // BOS
				for i := 1; i < n; i++ {
					p[i] = int32(3 + r.IntN(m.Info().VocabSize-3))
				}
				return p
			}
			// The light request holds at most 10 + 40 = 50 cells, fewer than
			// any running heavy lease (a heavy one is admitted, and
			// resumed, with its 50-token prompt plus the watermark of 8):
			// whenever a heavy sequence runs, the heavy tenant is the more
			// loaded. The pool first runs out after about 24 tokens each
			// (3 x (50 + t) + 10 + t = 256), while the light request still
			// runs.
			type job struct {
				req    allocator.Request
				stream *Stream
			}
			jobs := []*job{{req: allocator.Request{Prompt: prompt(10), MaxTokens: 40, Priority: -10, Tenant: tc.lightTenant}}}
			for range 3 {
				jobs = append(jobs, &job{req: allocator.Request{Prompt: prompt(50), MaxTokens: 120, Priority: 10, Tenant: "heavy"}})
			}
			leases := make([]*allocator.Lease, len(jobs))
			for i, j := range jobs {
				if leases[i], err = a.Admit(context.Background(), j.req); err != nil {
					t.Fatal(err)
				}
			}
			for i, j := range jobs {
				j.stream, err = e.Start(Request{Ctx: context.Background(), SeqID: leases[i].SeqID(), Prompt: j.req.Prompt,
					MaxTokens: j.req.MaxTokens, Priority: j.req.Priority, IgnoreEOS: true, Ledger: growLease{leases[i]}})
				if err != nil {
					t.Fatal(err)
				}
			}
			preempted := make([]int, len(jobs))
			for i, j := range jobs {
				got := collect(j.stream)
				if got.result.Err != nil || len(got.ids) != j.req.MaxTokens {
					t.Fatalf("request %d: err %v, %d tokens of %d", i, got.result.Err, len(got.ids), j.req.MaxTokens)
				}
				preempted[i] = got.result.Preempted
			}
			t.Logf("preemptions: light %d, heavy %v", preempted[0], preempted[1:])
			if heavy := preempted[1] + preempted[2] + preempted[3]; heavy == 0 && !tc.wantLightPreempts {
				t.Fatal("no preemption: the pool is too big for the test")
			}
			if got := preempted[0] > 0; got != tc.wantLightPreempts {
				t.Errorf("light request preempted %d times; want preemptions: %v", preempted[0], tc.wantLightPreempts)
			}
			if a.Stats().CellsUsed != 0 {
				t.Errorf("%d cells still used after the run", a.Stats().CellsUsed)
			}
		})
	}
}
