package allocator

import (
	"context"
	"errors"
	"math"
	"testing"
	"time"
)

// estimateFor returns the estimate begin would compute for req now.
func estimateFor(a *Allocator, ctx context.Context, req Request) waitEstimate {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.now()
	return a.estimateLocked(a.newWaiter(ctx, req, req.PromptTokens+req.MaxTokens, now), now)
}

// within reports whether d is within a microsecond of want.
func within(d, want time.Duration) bool { return (d - want).Abs() <= time.Microsecond }

// engineStep does one decode step for every lease, as an engine under the
// reserve policy would: the first step charges the whole prompt, each later
// one a generated token; a lease whose reservation is spent finishes. It
// returns the leases still running.
func engineStep(t *testing.T, running []*Lease, prompt int) []*Lease {
	t.Helper()
	live := running[:0]
	for _, l := range running {
		n := 1
		if l.Charged() == 0 {
			n = prompt
		}
		if err := l.Charge(n); err != nil {
			t.Fatal(err)
		}
		if l.Reserved() == 0 {
			l.Finish()
		} else {
			live = append(live, l)
		}
	}
	return live
}

// TestScheduleBurstAfterIdle is the burst that the drain-rate estimate got
// wrong: after three idle seconds, 300 small requests with 60s deadlines
// arrive at once. Their total work fits well within the deadline, and with
// a step rate no request is refused; each is admitted no later than its
// estimate said. The drain rate, low after the idle time, refuses many.
func TestScheduleBurstAfterIdle(t *testing.T) {
	const (
		requests = 300
		prompt   = 100
		maxTok   = 100
		rate     = 50.0 // steps per second
	)
	tests := []struct {
		name        string
		stepRate    func() float64
		wantRefused bool
	}{
		{"step rate", func() float64 { return rate }, false},
		{"drain rate", nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newFakeClock()
			a := mustNew(t, Config{Cells: 4096, MaxSequences: 16, MaxQueue: 400, StepRate: tt.stepRate, Now: clk.Now})
			// Some earlier traffic, which generated all it might, then idle.
			early := mustAdmit(t, a, cells(200))
			if err := early.Charge(200); err != nil {
				t.Fatal(err)
			}
			early.Release()
			clk.Advance(3 * time.Second)
			deadline := clk.Now().Add(60 * time.Second)
			ctx := deadlineCtx{context.Background(), deadline}
			req := Request{PromptTokens: prompt, MaxTokens: maxTok}

			var running []*Lease
			type queued struct {
				w        *waiter
				estSteps float64
			}
			var waiting []queued
			refused := 0
			for range requests {
				est := estimateFor(a, ctx, req)
				l, w, err := a.begin(ctx, req)
				switch {
				case l != nil:
					running = append(running, l)
				case w != nil:
					waiting = append(waiting, queued{w, est.wait.Seconds() * rate})
				default:
					if re := asReject(t, err); re.Reason != ReasonKVCellsExhausted {
						t.Fatalf("refused with %v", err)
					}
					refused++
				}
			}
			mustInvariants(t, a)
			if tt.wantRefused {
				if refused == 0 {
					t.Fatal("the drain-rate estimate refused nothing: the scenario does not reproduce the problem")
				}
				t.Logf("the drain rate refused %d of %d", refused, requests)
				return
			}
			if refused > 0 {
				t.Fatalf("%d of %d refused", refused, requests)
			}
			for step := 1; len(running) > 0; step++ {
				running = engineStep(t, running, prompt)
				clk.Advance(time.Second / rate)
				kept := waiting[:0]
				for _, q := range waiting {
					l := granted(q.w)
					if l == nil {
						kept = append(kept, q)
						continue
					}
					if float64(step) > q.estSteps+1e-6 {
						t.Errorf("admitted at step %d, estimated %.3f", step, q.estSteps)
					}
					if clk.Now().After(deadline) {
						t.Errorf("admitted at step %d, past the deadline", step)
					}
					running = append(running, l)
				}
				waiting = kept
				if step > 10000 {
					t.Fatal("the burst does not drain")
				}
			}
			if len(waiting) > 0 {
				t.Fatalf("%d never admitted", len(waiting))
			}
			s := a.Stats()
			if s.Admitted != requests+1 || s.Running != 0 || sumRejected(s) != 0 {
				t.Fatalf("at the end: %+v", s)
			}
			if math.Abs(a.usedFrac-1) > 1e-9 {
				t.Errorf("every lease used all of its max tokens, yet the used fraction is %v", a.usedFrac)
			}
			mustInvariants(t, a)
		})
	}
}

func TestScheduleRefusal(t *testing.T) {
	const rate = 10.0
	// long holds 100 cells and, its prompt charged, generates for up to 99
	// steps: 9.9s.
	long := Request{PromptTokens: 1, MaxTokens: 99}
	of := func(r Request, tenant string) Request { r.Tenant = tenant; return r }
	type ahead struct {
		req      Request
		deadline time.Duration // 0: none
	}
	tests := []struct {
		name       string
		cells      int
		usedTenth  int // leases that used a tenth of their max tokens, finished first
		running    []Request
		ahead      []ahead
		req        Request
		deadline   time.Duration
		wantRefuse bool
		wantRetry  time.Duration // of the refusal
	}{
		{name: "hopeless", running: []Request{long}, req: cells(50), deadline: 2 * time.Second, wantRefuse: true, wantRetry: 9900 * time.Millisecond},
		{name: "within the deadline", running: []Request{long}, req: cells(50), deadline: 11 * time.Second},
		{name: "no deadline", running: []Request{long}, req: cells(50)},
		{name: "queue timeout", running: []Request{long}, req: Request{PromptTokens: 1, MaxTokens: 49, QueueTimeout: 2 * time.Second}, wantRefuse: true, wantRetry: 9900 * time.Millisecond},
		{
			// The waiter ahead runs 1+99 steps after long ends.
			name: "waiter ahead", running: []Request{long}, ahead: []ahead{{req: cells(100)}},
			req: cells(50), deadline: 15 * time.Second, wantRefuse: true, wantRetry: 19900 * time.Millisecond,
		},
		{name: "waiter ahead, deadline later", running: []Request{long}, ahead: []ahead{{req: cells(100)}}, req: cells(50), deadline: 25 * time.Second},
		{
			// The waiter ahead gives up at 5s, before long ends.
			name: "waiter ahead leaves first", running: []Request{long}, ahead: []ahead{{req: cells(100), deadline: 5 * time.Second}},
			req: cells(50), deadline: 12 * time.Second,
		},
		{
			// When the first of B's leases ends, A holds less than B: A's
			// request goes ahead of B's waiter.
			name: "another tenant's waiter goes after", cells: 200,
			running: []Request{of(long, "B"), of(long, "B")}, ahead: []ahead{{req: of(cells(150), "B")}},
			req: of(cells(60), "A"), deadline: 12 * time.Second,
		},
		{
			// The same request of B waits for B's waiter to run 1+149 steps.
			name: "own tenant's waiter goes first", cells: 200,
			running: []Request{of(long, "B"), of(long, "B")}, ahead: []ahead{{req: of(cells(150), "B")}},
			req: of(cells(60), "B"), deadline: 12 * time.Second, wantRefuse: true, wantRetry: 24900 * time.Millisecond,
		},
		{
			// Finished leases generated a tenth of their max tokens, so the
			// optimistic schedule has long end after about 2s, not 9.9s.
			name: "learned usage", usedTenth: 20, running: []Request{long},
			req: cells(50), deadline: 4 * time.Second,
		},
		{name: "learned usage, hopeless", usedTenth: 20, running: []Request{long}, req: cells(50), deadline: time.Second, wantRefuse: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newFakeClock()
			// The waiters ahead queue while the rate is unknown, so that
			// none is refused.
			stepRate := 0.0
			cfg := Config{Cells: 100, MaxSequences: 8, MaxQueue: 8, MaxRetryDelay: time.Minute, Now: clk.Now,
				StepRate: func() float64 { return stepRate }}
			if tt.cells > 0 {
				cfg.Cells = tt.cells
			}
			a := mustNew(t, cfg)
			for range tt.usedTenth {
				l := mustAdmit(t, a, Request{PromptTokens: 1, MaxTokens: 99})
				if err := l.Charge(1 + 10); err != nil {
					t.Fatal(err)
				}
				l.Finish()
			}
			for _, r := range tt.running {
				l := mustAdmit(t, a, r)
				if err := l.Charge(r.PromptTokens); err != nil {
					t.Fatal(err)
				}
			}
			for _, w := range tt.ahead {
				var ctx context.Context = context.Background()
				if w.deadline > 0 {
					ctx = deadlineCtx{ctx, clk.Now().Add(w.deadline)}
				}
				if _, q, err := a.begin(ctx, w.req); q == nil {
					t.Fatalf("waiter ahead not queued: %v", err)
				}
			}
			stepRate = rate
			var ctx context.Context = context.Background()
			if tt.deadline > 0 {
				ctx = deadlineCtx{ctx, clk.Now().Add(tt.deadline)}
			}
			before := a.Stats()
			l, w, err := a.begin(ctx, tt.req)
			if l != nil {
				t.Fatal("admitted at once")
			}
			if !tt.wantRefuse {
				if w == nil {
					t.Fatalf("refused: %v", err)
				}
				mustInvariants(t, a)
				return
			}
			re := asReject(t, err)
			if re.Reason != ReasonKVCellsExhausted || !errors.Is(err, ErrKVCellsExhausted) {
				t.Fatalf("got %v, want KV_CELLS_EXHAUSTED", err)
			}
			if tt.wantRetry > 0 && !within(re.RetryAfter, tt.wantRetry) {
				t.Errorf("RetryAfter %v, want %v", re.RetryAfter, tt.wantRetry)
			}
			if after := a.Stats(); after.Queued != before.Queued || after.CellsQueued != before.CellsQueued {
				t.Errorf("the refusal disturbed the queue: %+v, was %+v", after, before)
			}
			mustInvariants(t, a)
		})
	}
}

// TestScheduleUnknownRateNeverRefuses checks that with a StepRate that does
// not know the rate, or under the optimistic policy, no estimate refuses a
// request, although the drain rate is known and would.
func TestScheduleUnknownRateNeverRefuses(t *testing.T) {
	tests := []struct {
		name   string
		rate   float64
		policy Policy
	}{
		{"zero", 0, PolicyReserve},
		{"negative", -5, PolicyReserve},
		{"NaN", math.NaN(), PolicyReserve},
		{"infinite", math.Inf(1), PolicyReserve},
		{"optimistic policy", 100, PolicyOptimistic},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newFakeClock()
			a := mustNew(t, Config{Cells: 100, MaxSequences: 4, MaxQueue: 4, Policy: tt.policy, Now: clk.Now,
				StepRate: func() float64 { return tt.rate }})
			clk.Advance(2 * time.Second)
			drainNow(t, a, 40) // 20 cells/s
			// The prompt fills the pool under either policy.
			mustAdmit(t, a, Request{PromptTokens: 99, MaxTokens: 1})
			// 60 cells at 20 cells/s is 3s, past the deadline.
			req := Request{PromptTokens: 60, MaxTokens: 1}
			ctx := deadlineCtx{context.Background(), clk.Now().Add(time.Millisecond)}
			if e := estimateFor(a, ctx, req); e.confident || !e.known || e.wait < 3*time.Second {
				t.Errorf("estimate %+v, want at least 3s from the drain rate, not confident", e)
			}
			if _, w, err := a.begin(ctx, req); w == nil {
				t.Fatalf("refused: %v", err)
			}
			mustInvariants(t, a)
		})
	}
}

// TestScheduleRetryAfter checks that QUEUE_FULL and QUEUE_TIMEOUT report
// the schedule's estimate, prefill counted in steps of Config.Batch.
func TestScheduleRetryAfter(t *testing.T) {
	tests := []struct {
		name   string
		batch  int
		reason string
		want   time.Duration
	}{
		// The running lease prefills 100 tokens, then generates 50, at 10
		// steps per second.
		{"queue full, prefill one step", 0, ReasonQueueFull, 5100 * time.Millisecond},
		{"queue full, batch 10", 10, ReasonQueueFull, 6 * time.Second},
		{"queue full, batch 1000", 1000, ReasonQueueFull, 5100 * time.Millisecond},
		{"queue timeout, batch 10", 10, ReasonQueueTimeout, 6 * time.Second},
		{"queue timeout, batch 30", 30, ReasonQueueTimeout, 5400 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newFakeClock()
			cfg := Config{Cells: 150, MaxSequences: 4, Batch: tt.batch, Now: clk.Now, StepRate: func() float64 { return 10 }}
			if tt.reason == ReasonQueueTimeout {
				cfg.MaxQueue = 1
			}
			a := mustNew(t, cfg)
			mustAdmit(t, a, Request{PromptTokens: 100, MaxTokens: 50})
			var err error
			if tt.reason == ReasonQueueTimeout {
				_, w, qerr := a.begin(context.Background(), Request{PromptTokens: 1, MaxTokens: 9, QueueTimeout: time.Minute})
				if w == nil {
					t.Fatalf("not queued: %v", qerr)
				}
				_, err = a.abandon(w, ReasonQueueTimeout, ErrQueueTimeout)
			} else {
				_, err = a.Admit(context.Background(), cells(10))
			}
			re := asReject(t, err)
			if re.Reason != tt.reason || !within(re.RetryAfter, tt.want) {
				t.Fatalf("got %v (retry %v), want %s retry %v", err, re.RetryAfter, tt.reason, tt.want)
			}
			mustInvariants(t, a)
		})
	}
	if _, err := New(Config{Cells: 10, MaxSequences: 1, Batch: -1}); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("negative batch: %v", err)
	}
}

// TestScheduleSpecialCells checks two parts of the simulation the other
// tests do not reach: cells held by a shared prefix, which no lease owns,
// come back once every lease has ended; and preempted sequences waiting to
// resume are admitted first.
func TestScheduleSpecialCells(t *testing.T) {
	const rate = 10.0
	t.Run("shared prefix", func(t *testing.T) {
		clk := newFakeClock()
		a := mustNew(t, Config{Cells: 20, MaxSequences: 4, MaxQueue: 4, PrefixCache: true, Now: clk.Now,
			StepRate: func() float64 { return rate }})
		p := []int32{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
		cacheOne(t, a, p, "", "")
		// B shares 9 cached cells and holds 1 + 9 of its own, for 10 steps.
		b, err := a.Admit(context.Background(), Request{Prompt: p, MaxTokens: 9})
		if err != nil {
			t.Fatal(err)
		}
		b.Copied()
		if s := a.Stats(); s.CellsFree+s.CellsEvictable != 1 {
			t.Fatalf("setup: %+v", s)
		}
		// The whole pool is needed: B's 10 cells and the 9 shared ones
		// (10 with the evictable one) come back when B ends: after 1
		// prefill step and 9 generation steps, scaled by 0.9 since the
		// cached sequence generated none of its one max token.
		ctx := deadlineCtx{context.Background(), clk.Now().Add(2 * time.Second)}
		if e := estimateFor(a, ctx, cells(20)); !e.confident || !within(e.wait, 910*time.Millisecond) {
			t.Fatalf("estimate %+v, want 0.91s", e)
		}
		if _, w, err := a.begin(ctx, cells(20)); w == nil {
			t.Fatalf("refused: %v", err)
		}
		mustCheck(t, a)
	})
	t.Run("resume", func(t *testing.T) {
		clk := newFakeClock()
		a := mustNew(t, Config{Cells: 20, MaxSequences: 4, MaxQueue: 4, Now: clk.Now, StepRate: func() float64 { return rate }})
		mustAdmit(t, a, Request{PromptTokens: 5, MaxTokens: 5, Tenant: "A"}) // 1+5 steps
		l := mustAdmit(t, a, Request{PromptTokens: 5, MaxTokens: 5, Tenant: "B"})
		// B resumes with 12 tokens: more than the 10 free cells.
		if _, _, err := l.Requeue(make([]int32, 12)); err != nil {
			t.Fatal(err)
		}
		// A less loaded tenant's request that fits waits behind the
		// resume, which runs when A ends after 0.6s.
		ctx := deadlineCtx{context.Background(), clk.Now().Add(time.Second)}
		if e := estimateFor(a, ctx, tenantReq("C", 5)); !e.confident || !within(e.wait, 600*time.Millisecond) {
			t.Fatalf("estimate %+v, want 0.6s", e)
		}
		if _, w, err := a.begin(ctx, tenantReq("C", 5)); w == nil {
			t.Fatalf("refused: %v", err)
		}
		mustInvariants(t, a)
		l.Release()
	})
}
