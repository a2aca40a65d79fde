package allocator

import (
	"context"
	"errors"
	"math"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func TestNewValidates(t *testing.T) {
	ok := Config{Cells: 100, MaxSequences: 4, MaxQueue: 8}
	tests := []struct {
		name string
		edit func(*Config)
	}{
		{"zero cells", func(c *Config) { c.Cells = 0 }},
		{"negative cells", func(c *Config) { c.Cells = -1 }},
		{"zero sequences", func(c *Config) { c.MaxSequences = 0 }},
		{"too many sequences", func(c *Config) { c.MaxSequences = MaxSequencesLimit + 1 }},
		{"negative queue", func(c *Config) { c.MaxQueue = -1 }},
		{"negative max sequence tokens", func(c *Config) { c.MaxSequenceTokens = -1 }},
		{"negative min retry", func(c *Config) { c.MinRetryDelay = -time.Second }},
		{"negative max retry", func(c *Config) { c.MaxRetryDelay = -time.Second }},
		{"min above max retry", func(c *Config) { c.MinRetryDelay, c.MaxRetryDelay = 2*time.Second, time.Second }},
		{"min above default max retry", func(c *Config) { c.MinRetryDelay = time.Minute }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := ok
			tt.edit(&cfg)
			a, err := New(cfg)
			if !errors.Is(err, ErrInvalidConfig) || a != nil {
				t.Fatalf("New(%+v) = %v, %v; want nil, ErrInvalidConfig", cfg, a, err)
			}
		})
	}

	a := mustNew(t, ok)
	if a.cfg.MinRetryDelay != 50*time.Millisecond || a.cfg.MaxRetryDelay != 30*time.Second || a.limit != 100 {
		t.Errorf("defaults: min %v max %v limit %d", a.cfg.MinRetryDelay, a.cfg.MaxRetryDelay, a.limit)
	}
	mustNew(t, Config{Cells: 1, MaxSequences: MaxSequencesLimit}) // the edges are valid
}

func TestAdmitInvalidRequest(t *testing.T) {
	tests := []Request{
		{PromptTokens: 0, MaxTokens: 1},
		{PromptTokens: 1, MaxTokens: 0},
		{PromptTokens: -5, MaxTokens: 10},
		{PromptTokens: 1, MaxTokens: 1, QueueTimeout: -time.Second},
	}
	a := mustNew(t, Config{Cells: 100, MaxSequences: 4})
	for _, req := range tests {
		l, err := a.Admit(context.Background(), req)
		if l != nil || !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("Admit(%+v) = %v, %v; want ErrInvalidRequest", req, l, err)
		}
		var re *RejectError
		if errors.As(err, &re) {
			t.Errorf("Admit(%+v): invalid request is a RejectError", req)
		}
	}
	if s := a.Stats(); s.Admitted != 0 || sumRejected(s) != 0 || s.CellsFree != 100 {
		t.Errorf("invalid requests changed stats: %+v", s)
	}
}

func TestAdmitAtOnce(t *testing.T) {
	clk := newFakeClock()
	a := mustNew(t, Config{Cells: 100, MaxSequences: 4, Now: clk.Now})
	clk.Advance(3 * time.Second)
	l := mustAdmit(t, a, Request{PromptTokens: 30, MaxTokens: 20})
	if l.SeqID() != 0 || l.Reserved() != 50 || l.Charged() != 0 || l.Waited() != 0 || !l.Admitted().Equal(clk.Now()) {
		t.Errorf("lease: seq %d reserved %d charged %d waited %v admitted %v",
			l.SeqID(), l.Reserved(), l.Charged(), l.Waited(), l.Admitted())
	}
	s := a.Stats()
	if s.CellsReserved != 50 || s.CellsUsed != 0 || s.CellsFree != 50 || s.Running != 1 || s.Admitted != 1 {
		t.Errorf("stats after admit: %+v", s)
	}
	if err := l.Charge(30); err != nil {
		t.Fatal(err)
	}
	if s := a.Stats(); s.CellsReserved != 20 || s.CellsUsed != 30 || s.CellsFree != 50 {
		t.Errorf("stats after charge: %+v", s)
	}
	l.Release()
	if s := a.Stats(); s.CellsReserved != 0 || s.CellsUsed != 0 || s.CellsFree != 100 || s.Running != 0 {
		t.Errorf("stats after release: %+v", s)
	}
	if l.Reserved() != 0 || l.Charged() != 30 {
		t.Errorf("after release: reserved %d charged %d; want 0, 30", l.Reserved(), l.Charged())
	}
	mustInvariants(t, a)
}

func TestSeqIDsLowestFree(t *testing.T) {
	a := mustNew(t, Config{Cells: 1000, MaxSequences: 130})
	var ls []*Lease
	for i := range 130 {
		l := mustAdmit(t, a, cells(2))
		if l.SeqID() != i {
			t.Fatalf("lease %d got seq %d", i, l.SeqID())
		}
		ls = append(ls, l)
	}
	ls[129].Release()
	ls[65].Release()
	ls[2].Release()
	for _, want := range []int{2, 65, 129} {
		if got := mustAdmit(t, a, cells(2)).SeqID(); got != want {
			t.Errorf("got seq %d, want %d", got, want)
		}
	}
	mustInvariants(t, a)
}

func TestImmediateRefusals(t *testing.T) {
	type want struct {
		reason   string
		sentinel error
		free     int
		depth    int
		limit    int
		retry    time.Duration
	}
	cancelled := func() context.Context {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		return ctx
	}
	expired := func() context.Context {
		ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
		cancel()
		return ctx
	}
	tests := []struct {
		name  string
		cfg   Config
		setup func(t *testing.T, a *Allocator)
		ctx   func() context.Context
		req   Request
		want  want
	}{
		{
			name: "never fits cells",
			cfg:  Config{Cells: 100, MaxSequences: 4, MaxQueue: 4},
			req:  Request{PromptTokens: 60, MaxTokens: 41},
			want: want{ReasonNeverFits, ErrNeverFits, 100, 0, 100, 0},
		},
		{
			name: "never fits max sequence tokens",
			cfg:  Config{Cells: 100, MaxSequences: 4, MaxQueue: 4, MaxSequenceTokens: 50},
			req:  Request{PromptTokens: 50, MaxTokens: 1},
			want: want{ReasonNeverFits, ErrNeverFits, 100, 0, 50, 0},
		},
		{
			name: "never fits when max sequence tokens exceeds cells",
			cfg:  Config{Cells: 100, MaxSequences: 4, MaxQueue: 4, MaxSequenceTokens: 200},
			req:  Request{PromptTokens: 100, MaxTokens: 1},
			want: want{ReasonNeverFits, ErrNeverFits, 100, 0, 100, 0},
		},
		{
			name: "never fits before a tenant's full queue",
			cfg: Config{Cells: 100, MaxSequences: 4, MaxQueue: 4, Tenants: func(string) TenantLimits {
				return TenantLimits{MaxQueued: 1, MaxShare: 0.1}
			}},
			setup: func(t *testing.T, a *Allocator) {
				mustAdmit(t, a, tenantReq("acme", 100))
				enqueue(t, a, tenantReq("acme", 10))
			},
			req:  Request{PromptTokens: 90, MaxTokens: 11, Tenant: "acme"},
			want: want{ReasonNeverFits, ErrNeverFits, 0, 1, 100, 0},
		},
		{
			name: "never fits without overflow",
			cfg:  Config{Cells: 100, MaxSequences: 4, MaxQueue: 4},
			req:  Request{PromptTokens: math.MaxInt, MaxTokens: math.MaxInt},
			want: want{ReasonNeverFits, ErrNeverFits, 100, 0, 100, 0},
		},
		{
			name:  "draining before never fits",
			cfg:   Config{Cells: 100, MaxSequences: 4, MaxQueue: 4},
			setup: func(t *testing.T, a *Allocator) { a.Drain() },
			req:   Request{PromptTokens: 1000, MaxTokens: 1},
			want:  want{ReasonDraining, ErrDraining, 100, 0, 0, 0},
		},
		{
			name:  "queue full with no queue, rate unknown",
			cfg:   Config{Cells: 100, MaxSequences: 4},
			setup: func(t *testing.T, a *Allocator) { mustAdmit(t, a, cells(90)) },
			req:   cells(20),
			want:  want{ReasonQueueFull, ErrQueueFull, 10, 0, 0, time.Second},
		},
		{
			name:  "queue full clamps up to min retry",
			cfg:   Config{Cells: 100, MaxSequences: 4, MinRetryDelay: 3 * time.Second},
			setup: func(t *testing.T, a *Allocator) { mustAdmit(t, a, cells(90)) },
			req:   cells(20),
			want:  want{ReasonQueueFull, ErrQueueFull, 10, 0, 0, 3 * time.Second},
		},
		{
			name:  "queue full clamps down to max retry",
			cfg:   Config{Cells: 100, MaxSequences: 4, MinRetryDelay: time.Millisecond, MaxRetryDelay: 200 * time.Millisecond},
			setup: func(t *testing.T, a *Allocator) { mustAdmit(t, a, cells(90)) },
			req:   cells(20),
			want:  want{ReasonQueueFull, ErrQueueFull, 10, 0, 0, 200 * time.Millisecond},
		},
		{
			name: "queue full for want of a sequence id",
			cfg:  Config{Cells: 100, MaxSequences: 1},
			setup: func(t *testing.T, a *Allocator) {
				mustAdmit(t, a, cells(2))
			},
			req:  cells(2),
			want: want{ReasonQueueFull, ErrQueueFull, 98, 0, 0, time.Second},
		},
		{
			name: "queue full with waiters",
			cfg:  Config{Cells: 100, MaxSequences: 4, MaxQueue: 2},
			setup: func(t *testing.T, a *Allocator) {
				mustAdmit(t, a, cells(100))
				for range 2 {
					if _, w, err := a.begin(context.Background(), cells(10)); w == nil {
						t.Fatalf("not queued: %v", err)
					}
				}
			},
			req:  cells(10),
			want: want{ReasonQueueFull, ErrQueueFull, 0, 2, 0, time.Second},
		},
		{
			name: "cancelled on entry",
			cfg:  Config{Cells: 100, MaxSequences: 4, MaxQueue: 4},
			ctx:  cancelled,
			req:  cells(10),
			want: want{ReasonCancelled, context.Canceled, 100, 0, 0, 0},
		},
		{
			name: "deadline passed on entry",
			cfg:  Config{Cells: 100, MaxSequences: 4, MaxQueue: 4},
			ctx:  expired,
			req:  cells(10),
			want: want{ReasonDeadlineExceeded, context.DeadlineExceeded, 100, 0, 0, 0},
		},
	}
	for _, tt := range tests {
		// In a bubble, an Admit that wrongly queues deadlocks and fails at
		// once instead of hanging.
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				a := mustNew(t, tt.cfg)
				if tt.setup != nil {
					tt.setup(t, a)
				}
				ctx := context.Background()
				if tt.ctx != nil {
					ctx = tt.ctx()
				}
				before := a.Stats()
				l, err := a.Admit(ctx, tt.req)
				if l != nil {
					t.Fatalf("admitted seq %d", l.SeqID())
				}
				re := asReject(t, err)
				need := tt.req.PromptTokens + tt.req.MaxTokens
				if need < 0 {
					need = math.MaxInt
				}
				got := want{re.Reason, nil, re.CellsFree, re.QueueDepth, re.Limit, re.RetryAfter}
				w := tt.want
				w.sentinel = nil
				if got != w || re.CellsNeeded != need || re.CellsTotal != tt.cfg.Cells {
					t.Errorf("got %+v needed %d total %d\nwant %+v needed %d", got, re.CellsNeeded, re.CellsTotal, w, need)
				}
				if !errors.Is(err, tt.want.sentinel) {
					t.Errorf("errors.Is(%v, %v) = false", err, tt.want.sentinel)
				}
				for _, other := range []error{ErrQueueFull, ErrKVCellsExhausted, ErrNeverFits, ErrDraining, ErrQueueTimeout, context.Canceled, context.DeadlineExceeded} {
					if other != tt.want.sentinel && errors.Is(err, other) {
						t.Errorf("errors.Is(%v, %v) = true", err, other)
					}
				}
				if !strings.Contains(err.Error(), tt.want.reason) {
					t.Errorf("error %q lacks reason %s", err, tt.want.reason)
				}
				after := a.Stats()
				for _, r := range reasons {
					d := after.Rejected[r] - before.Rejected[r]
					var wantD uint64
					if r == tt.want.reason {
						wantD = 1
					}
					if d != wantD {
						t.Errorf("Rejected[%s] grew by %d, want %d", r, d, wantD)
					}
				}
				if after.Admitted != before.Admitted || after.CellsFree != before.CellsFree || after.Queued != before.Queued {
					t.Errorf("refusal changed state: before %+v after %+v", before, after)
				}
				mustInvariants(t, a)
			})
		})
	}
}

// drainNow admits and releases n cells at the clock's current time, so
// that the drain rate becomes known.
func drainNow(t *testing.T, a *Allocator, n int) {
	t.Helper()
	mustAdmit(t, a, cells(n)).Release()
}

func TestEstimate(t *testing.T) {
	// The pool is full; 40 cells were released over the 2s since New, a
	// drain rate of 20 cells/s.
	setup := func(t *testing.T, cfg Config) (*Allocator, *fakeClock) {
		clk := newFakeClock()
		cfg.Now = clk.Now
		a := mustNew(t, cfg)
		clk.Advance(2 * time.Second)
		drainNow(t, a, 40)
		mustAdmit(t, a, cells(100))
		if r := a.Stats().DrainCellsPerSecond; r != 20 {
			t.Fatalf("drain rate %v, want 20", r)
		}
		return a, clk
	}
	type ahead struct {
		need     int
		priority int32
	}
	tests := []struct {
		name      string
		cfg       Config
		ahead     []ahead
		req       Request
		deadline  time.Duration // 0: none
		wantQueue bool
		wantRetry time.Duration
		wantDepth int
	}{
		{name: "wait outlasts deadline", req: cells(60), deadline: 2 * time.Second, wantRetry: 3 * time.Second},
		{name: "wait within deadline", req: cells(60), deadline: 4 * time.Second, wantQueue: true},
		{name: "no deadline", req: cells(60), wantQueue: true},
		{name: "queue timeout outlasts", req: Request{PromptTokens: 1, MaxTokens: 59, QueueTimeout: 2 * time.Second}, wantRetry: 3 * time.Second},
		{name: "queue timeout shorter than deadline", req: Request{PromptTokens: 1, MaxTokens: 59, QueueTimeout: 2 * time.Second}, deadline: time.Hour, wantRetry: 3 * time.Second},
		{name: "deadline shorter than queue timeout", req: Request{PromptTokens: 1, MaxTokens: 59, QueueTimeout: time.Hour}, deadline: 2 * time.Second, wantRetry: 3 * time.Second},
		{
			name:  "waiters ahead count",
			ahead: []ahead{{40, 1}, {40, 0}},
			req:   cells(20), deadline: 4500 * time.Millisecond,
			// 20 + 40 + 40 cells at 20 cells/s.
			wantRetry: 5 * time.Second, wantDepth: 2,
		},
		{
			name:  "lower priority waiters do not count",
			ahead: []ahead{{40, 1}, {40, 0}},
			req:   Request{PromptTokens: 1, MaxTokens: 19, Priority: 1}, deadline: 4 * time.Second,
			wantQueue: true, // 20 + 40 cells: 3s
		},
		{
			name:  "higher priority jumps the queue",
			ahead: []ahead{{40, 1}, {40, 0}},
			req:   Request{PromptTokens: 1, MaxTokens: 19, Priority: 2}, deadline: 1500 * time.Millisecond,
			wantQueue: true, // 20 cells: 1s
		},
		{
			name: "retry clamped",
			cfg:  Config{MaxRetryDelay: time.Second},
			req:  cells(60), deadline: 2 * time.Second, wantRetry: time.Second,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			cfg.Cells, cfg.MaxSequences, cfg.MaxQueue = 100, 8, 8
			a, clk := setup(t, cfg)
			for _, w := range tt.ahead {
				req := cells(w.need)
				req.Priority = w.priority
				if _, q, err := a.begin(context.Background(), req); q == nil {
					t.Fatalf("waiter ahead not queued: %v", err)
				}
			}
			var ctx context.Context = context.Background()
			if tt.deadline > 0 {
				ctx = deadlineCtx{ctx, clk.Now().Add(tt.deadline)}
			}
			l, w, err := a.begin(ctx, tt.req)
			if l != nil {
				t.Fatal("admitted into a full pool")
			}
			if tt.wantQueue {
				if w == nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			re := asReject(t, err)
			if re.Reason != ReasonKVCellsExhausted || !errors.Is(err, ErrKVCellsExhausted) {
				t.Fatalf("got %v, want KV_CELLS_EXHAUSTED", err)
			}
			if re.RetryAfter != tt.wantRetry || re.QueueDepth != tt.wantDepth || re.CellsFree != 0 {
				t.Errorf("retry %v depth %d free %d; want %v %d 0", re.RetryAfter, re.QueueDepth, re.CellsFree, tt.wantRetry, tt.wantDepth)
			}
			mustInvariants(t, a)
		})
	}
}

func TestEstimateUnknownRateQueues(t *testing.T) {
	clk := newFakeClock()
	a := mustNew(t, Config{Cells: 100, MaxSequences: 4, MaxQueue: 4, Now: clk.Now})
	mustAdmit(t, a, cells(100))
	ctx := deadlineCtx{context.Background(), clk.Now().Add(time.Millisecond)}
	if _, w, err := a.begin(ctx, cells(50)); w == nil {
		t.Fatalf("refused with unknown drain rate: %v", err)
	}
}

func TestQueueFullRetryUsesRate(t *testing.T) {
	clk := newFakeClock()
	a := mustNew(t, Config{Cells: 100, MaxSequences: 4, Now: clk.Now})
	clk.Advance(2 * time.Second)
	drainNow(t, a, 40) // 20 cells/s
	mustAdmit(t, a, cells(90))
	_, err := a.Admit(context.Background(), cells(60))
	if re := asReject(t, err); re.Reason != ReasonQueueFull || re.RetryAfter != 2500*time.Millisecond {
		t.Errorf("got %v, want QUEUE_FULL retry after 2.5s (50 cells at 20/s)", err)
	}
}

func TestDrainRate(t *testing.T) {
	type release struct {
		at    time.Duration // since New
		cells int
	}
	tests := []struct {
		name     string
		releases []release
		at       time.Duration
		want     float64
	}{
		{"nothing released", nil, 5 * time.Second, 0},
		{"under a second counts as one", []release{{500 * time.Millisecond, 100}}, 500 * time.Millisecond, 100},
		{"since New", []release{{500 * time.Millisecond, 100}}, 4 * time.Second, 25},
		{"window slid past", []release{{500 * time.Millisecond, 100}}, 30 * time.Second, 0},
		{"full window", []release{{15 * time.Second, 50}}, 18500 * time.Millisecond, 50 / 9.5},
		{"old bucket excluded", []release{{2 * time.Second, 10}, {11 * time.Second, 19}}, 12500 * time.Millisecond, 19 / 9.5},
		{"ring slot reused", []release{{time.Second, 10}, {11 * time.Second, 7}, {12 * time.Second, 12}}, 12500 * time.Millisecond, 19 / 9.5},
		{"several in a second", []release{{3 * time.Second, 10}, {3900 * time.Millisecond, 20}}, 6 * time.Second, 5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newFakeClock()
			start := clk.Now()
			a := mustNew(t, Config{Cells: 1000, MaxSequences: 4, Now: clk.Now})
			for _, r := range tt.releases {
				clk.Advance(start.Add(r.at).Sub(clk.Now()))
				drainNow(t, a, r.cells)
			}
			clk.Advance(start.Add(tt.at).Sub(clk.Now()))
			if got := a.Stats().DrainCellsPerSecond; math.Abs(got-tt.want) > 1e-9 {
				t.Errorf("DrainCellsPerSecond = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestQueuedThenAdmitted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := mustNew(t, Config{Cells: 100, MaxSequences: 4, MaxQueue: 4})
		hold := mustAdmit(t, a, cells(80))
		c := admitAsync(context.Background(), a, cells(30))
		synctest.Wait()
		pending(t, c)
		if s := a.Stats(); s.Queued != 1 || s.CellsFree != 20 {
			t.Fatalf("stats while queued: %+v", s)
		}
		time.Sleep(3 * time.Second)
		hold.Release()
		synctest.Wait()
		r := recv(t, c)
		if r.err != nil {
			t.Fatal(r.err)
		}
		if r.lease.SeqID() != 0 || r.lease.Waited() != 3*time.Second || !r.lease.Admitted().Equal(time.Now()) {
			t.Errorf("seq %d waited %v admitted %v", r.lease.SeqID(), r.lease.Waited(), r.lease.Admitted())
		}
		if s := a.Stats(); s.Queued != 0 || s.Running != 1 || s.CellsReserved != 30 || s.Admitted != 2 {
			t.Errorf("stats after admission: %+v", s)
		}
		r.lease.Release()
		mustInvariants(t, a)
	})
}

func TestWaiterLeaves(t *testing.T) {
	cause := errors.New("client went away")
	tests := []struct {
		name    string
		timeout time.Duration
		ctx     func() (context.Context, func())
		reason  string
		is      []error
		retry   time.Duration
	}{
		{
			name:    "queue timeout",
			timeout: 5 * time.Second,
			ctx:     func() (context.Context, func()) { return context.Background(), func() {} },
			reason:  ReasonQueueTimeout,
			is:      []error{ErrQueueTimeout},
			retry:   time.Second,
		},
		{
			name: "deadline",
			ctx: func() (context.Context, func()) {
				return context.WithTimeout(context.Background(), 5*time.Second)
			},
			reason: ReasonDeadlineExceeded,
			is:     []error{context.DeadlineExceeded},
		},
		{
			name: "cancel",
			ctx: func() (context.Context, func()) {
				ctx, cancel := context.WithCancel(context.Background())
				time.AfterFunc(5*time.Second, cancel)
				return ctx, cancel
			},
			reason: ReasonCancelled,
			is:     []error{context.Canceled},
		},
		{
			name: "cancel with cause",
			ctx: func() (context.Context, func()) {
				ctx, cancel := context.WithCancelCause(context.Background())
				time.AfterFunc(5*time.Second, func() { cancel(cause) })
				return ctx, func() { cancel(nil) }
			},
			reason: ReasonCancelled,
			is:     []error{context.Canceled, cause},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				a := mustNew(t, Config{Cells: 100, MaxSequences: 4, MaxQueue: 4})
				hold := mustAdmit(t, a, cells(95))
				ctx, cancel := tt.ctx()
				defer cancel()
				req := cells(10)
				req.QueueTimeout = tt.timeout
				c := admitAsync(ctx, a, req)
				time.Sleep(5*time.Second - time.Nanosecond)
				synctest.Wait()
				pending(t, c)
				time.Sleep(time.Nanosecond)
				synctest.Wait()
				r := recv(t, c)
				if r.lease != nil {
					t.Fatal("got a lease")
				}
				re := asReject(t, r.err)
				if re.Reason != tt.reason || re.RetryAfter != tt.retry || re.CellsNeeded != 10 || re.CellsFree != 5 || re.QueueDepth != 0 {
					t.Errorf("got %+v", re)
				}
				for _, target := range tt.is {
					if !errors.Is(r.err, target) {
						t.Errorf("errors.Is(%v, %v) = false", r.err, target)
					}
				}
				s := a.Stats()
				if s.Rejected[tt.reason] != 1 || s.Queued != 0 || s.Admitted != 1 {
					t.Errorf("stats: %+v", s)
				}
				hold.Release()
				mustInvariants(t, a)
			})
		})
	}
}

func TestLeavingHeadAdmitsNext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := mustNew(t, Config{Cells: 10, MaxSequences: 4, MaxQueue: 4})
		hold := mustAdmit(t, a, cells(6))
		head := admitAsync(context.Background(), a, Request{PromptTokens: 4, MaxTokens: 4, Priority: 1, QueueTimeout: time.Second})
		synctest.Wait()
		next := admitAsync(context.Background(), a, cells(3))
		synctest.Wait()
		// 4 cells are free, but the head comes first.
		pending(t, head)
		pending(t, next)
		time.Sleep(time.Second)
		synctest.Wait()
		if r := recv(t, head); !errors.Is(r.err, ErrQueueTimeout) {
			t.Fatalf("head: %v", r.err)
		}
		r := recv(t, next)
		if r.err != nil {
			t.Fatalf("next: %v", r.err)
		}
		r.lease.Release()
		hold.Release()
		mustInvariants(t, a)
	})
}

func TestPriorityOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := mustNew(t, Config{Cells: 10, MaxSequences: 4, MaxQueue: 16})
		hold := mustAdmit(t, a, cells(10))
		priorities := []int32{1, 3, 1, 2, 3, 0, -1, 2, 3}
		var mu sync.Mutex
		var order []int
		var wg sync.WaitGroup
		for i, p := range priorities {
			wg.Go(func() {
				l, err := a.Admit(context.Background(), Request{PromptTokens: 5, MaxTokens: 5, Priority: p})
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				order = append(order, i)
				mu.Unlock()
				l.Release()
			})
			synctest.Wait() // queued before the next arrives
		}
		if s := a.Stats(); s.Queued != len(priorities) {
			t.Fatalf("queued %d, want %d", s.Queued, len(priorities))
		}
		hold.Release()
		wg.Wait()
		want := []int{1, 4, 8, 3, 7, 0, 2, 5, 6}
		if len(order) != len(want) {
			t.Fatalf("order %v, want %v", order, want)
		}
		for i := range want {
			if order[i] != want[i] {
				t.Fatalf("admission order %v, want %v", order, want)
			}
		}
		mustInvariants(t, a)
	})
}

func TestHeadOfLineNoBypass(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := mustNew(t, Config{Cells: 10, MaxSequences: 4, MaxQueue: 4})
		hold := mustAdmit(t, a, cells(6))
		big := admitAsync(context.Background(), a, Request{PromptTokens: 4, MaxTokens: 4, Priority: 5})
		synctest.Wait()
		small := admitAsync(context.Background(), a, Request{PromptTokens: 1, MaxTokens: 1, Priority: 1})
		synctest.Wait()
		pending(t, small)
		// An equal priority queues behind the head, too.
		same := admitAsync(context.Background(), a, Request{PromptTokens: 1, MaxTokens: 1, Priority: 5})
		synctest.Wait()
		pending(t, same)
		// A strictly higher priority goes first and fits: admitted at once.
		l, err := a.Admit(context.Background(), Request{PromptTokens: 1, MaxTokens: 1, Priority: 6})
		if err != nil {
			t.Fatal(err)
		}
		if s := a.Stats(); s.Queued != 3 || s.CellsFree != 2 {
			t.Fatalf("stats: %+v", s)
		}
		l.Release()
		hold.Release()
		synctest.Wait()
		// big (8 cells) then same (2 cells) fill the pool; small waits.
		rb, rs := recv(t, big), recv(t, same)
		if rb.err != nil || rs.err != nil {
			t.Fatal(rb.err, rs.err)
		}
		pending(t, small)
		rb.lease.Release()
		rs.lease.Release()
		synctest.Wait()
		if r := recv(t, small); r.err != nil {
			t.Fatal(r.err)
		} else {
			r.lease.Release()
		}
		mustInvariants(t, a)
	})
}

func TestDrain(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := mustNew(t, Config{Cells: 10, MaxSequences: 4, MaxQueue: 4})
		hold := mustAdmit(t, a, cells(10))
		w1 := admitAsync(context.Background(), a, cells(5))
		w2 := admitAsync(context.Background(), a, cells(6))
		synctest.Wait()
		idle := a.Idle()
		a.Drain()
		a.Drain()
		synctest.Wait()
		for _, c := range []<-chan result{w1, w2} {
			r := recv(t, c)
			if re := asReject(t, r.err); re.Reason != ReasonDraining || re.RetryAfter != 0 || !errors.Is(r.err, ErrDraining) {
				t.Errorf("waiter: %v", r.err)
			}
		}
		if _, err := a.Admit(context.Background(), cells(2)); !errors.Is(err, ErrDraining) {
			t.Errorf("Admit after Drain: %v", err)
		}
		select {
		case <-idle:
			t.Fatal("idle while a lease is held")
		default:
		}
		if err := hold.Charge(4); err != nil {
			t.Errorf("Charge after Drain: %v", err)
		}
		if s := a.Stats(); s.Rejected[ReasonDraining] != 3 || s.Running != 1 || s.CellsUsed != 4 || s.Queued != 0 {
			t.Errorf("stats: %+v", s)
		}
		hold.Release()
		select {
		case <-idle:
		default:
			t.Fatal("not idle after the last release")
		}
		mustInvariants(t, a)
	})
}

func TestIdle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := mustNew(t, Config{Cells: 10, MaxSequences: 4, MaxQueue: 4})
		isClosed := func(c <-chan struct{}) bool {
			select {
			case <-c:
				return true
			default:
				return false
			}
		}
		if !isClosed(a.Idle()) {
			t.Fatal("new allocator not idle")
		}
		l := mustAdmit(t, a, cells(10))
		idle := a.Idle()
		w := admitAsync(context.Background(), a, Request{PromptTokens: 1, MaxTokens: 1, QueueTimeout: time.Second})
		synctest.Wait()
		l.Release()
		synctest.Wait()
		if isClosed(idle) {
			t.Fatal("idle while the waiter holds a lease")
		}
		r := recv(t, w)
		r.lease.Release()
		if !isClosed(idle) || !isClosed(a.Idle()) {
			t.Fatal("not idle after every release")
		}
		mustInvariants(t, a)
	})
}

func TestCharge(t *testing.T) {
	tests := []struct {
		name    string
		charges []int
		release bool
		wantErr error
		charged int
	}{
		{"exact", []int{10}, false, nil, 10},
		{"in steps", []int{3, 0, 7}, false, nil, 10},
		{"over at once", []int{11}, false, ErrOverCharge, 0},
		{"over in steps", []int{6, 5}, false, ErrOverCharge, 6},
		{"negative", []int{-1}, false, ErrInvalidRequest, 0},
		{"after release", []int{1}, true, ErrReleased, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := mustNew(t, Config{Cells: 100, MaxSequences: 4})
			l := mustAdmit(t, a, cells(10))
			if tt.release {
				l.Release()
			}
			var err error
			for _, n := range tt.charges {
				if err = l.Charge(n); err != nil {
					break
				}
			}
			if !errors.Is(err, tt.wantErr) || (err == nil) != (tt.wantErr == nil) {
				t.Fatalf("Charge: %v, want %v", err, tt.wantErr)
			}
			if l.Charged() != tt.charged {
				t.Errorf("Charged %d, want %d", l.Charged(), tt.charged)
			}
			s := a.Stats()
			if !tt.release && (s.CellsUsed != tt.charged || s.CellsReserved != 10-tt.charged || l.Reserved() != 10-tt.charged) {
				t.Errorf("stats: %+v reserved %d", s, l.Reserved())
			}
			mustInvariants(t, a)
		})
	}
}

func TestReleaseConcurrent(t *testing.T) {
	clk := newFakeClock()
	a := mustNew(t, Config{Cells: 100, MaxSequences: 4, Now: clk.Now})
	l := mustAdmit(t, a, cells(40))
	if err := l.Charge(15); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			l.Release()
			_ = l.Charge(1)
			_ = l.Reserved()
			_ = a.Stats()
		})
	}
	wg.Wait()
	s := a.Stats()
	if s.CellsFree != 100 || s.Running != 0 || s.DrainCellsPerSecond != 40 {
		t.Errorf("stats after concurrent releases: %+v", s)
	}
	mustInvariants(t, a)
}

// TestGrantRacesAbandon covers the race where a waiter is granted a lease
// while its context ends: the grant is undone, the waiter is refused, and
// the cells go to the next waiter.
func TestGrantRacesAbandon(t *testing.T) {
	clk := newFakeClock()
	a := mustNew(t, Config{Cells: 10, MaxSequences: 4, MaxQueue: 4, Now: clk.Now})
	hold := mustAdmit(t, a, cells(10))
	_, w, _ := a.begin(context.Background(), Request{PromptTokens: 5, MaxTokens: 5, Priority: 1})
	_, w2, _ := a.begin(context.Background(), cells(10))
	if w == nil || w2 == nil {
		t.Fatal("not queued")
	}
	hold.Release()
	select {
	case <-w.ready:
	default:
		t.Fatal("head not granted")
	}
	if w.lease == nil {
		t.Fatal("head granted without a lease")
	}
	granted := w.lease
	l, err := a.abandon(w, ReasonCancelled, context.Canceled)
	if l != nil || !errors.Is(err, context.Canceled) || asReject(t, err).Reason != ReasonCancelled {
		t.Fatalf("abandon after grant = %v, %v", l, err)
	}
	if granted.Reserved() != 0 {
		t.Error("rolled-back lease still reserves cells")
	}
	granted.Release() // harmless
	select {
	case <-w2.ready:
	default:
		t.Fatal("next waiter not granted after the rollback")
	}
	s := a.Stats()
	if s.Admitted != 2 || s.Rejected[ReasonCancelled] != 1 || s.Running != 1 || s.CellsReserved != 10 || s.DrainCellsPerSecond != 10 {
		t.Errorf("stats: %+v", s)
	}
	// Abandoning again reports the same refusal without counting it twice.
	if _, err2 := a.abandon(w, ReasonCancelled, context.Canceled); err2 != err {
		t.Errorf("second abandon: %v", err2)
	}
	w2.lease.Release()
	if s := a.Stats(); s.Admitted+sumRejected(s) != 3 || s.Running != 0 {
		t.Errorf("final stats: %+v", s)
	}
	mustInvariants(t, a)
}

func TestAbandonAfterDrain(t *testing.T) {
	a := mustNew(t, Config{Cells: 10, MaxSequences: 4, MaxQueue: 4})
	hold := mustAdmit(t, a, cells(10))
	_, w, _ := a.begin(context.Background(), cells(5))
	a.Drain()
	_, err := a.abandon(w, ReasonQueueTimeout, ErrQueueTimeout)
	if !errors.Is(err, ErrDraining) {
		t.Fatalf("abandon after drain: %v", err)
	}
	if s := a.Stats(); s.Rejected[ReasonDraining] != 1 || s.Rejected[ReasonQueueTimeout] != 0 {
		t.Errorf("stats: %+v", s)
	}
	hold.Release()
	mustInvariants(t, a)
}

func TestRejectErrorMessage(t *testing.T) {
	tests := []struct {
		err  *RejectError
		want string
	}{
		{&RejectError{Reason: ReasonNeverFits, CellsNeeded: 200, Limit: 100}, "allocator: NEVER_FITS: need 200 cells, limit 100"},
		{&RejectError{Reason: ReasonQueueFull, CellsNeeded: 20, CellsFree: 10, CellsTotal: 100, QueueDepth: 3, RetryAfter: time.Second},
			"allocator: QUEUE_FULL: need 20 cells, 10 of 100 free, 3 queued, retry after 1s"},
		{&RejectError{Reason: ReasonCancelled, CellsNeeded: 20, CellsTotal: 100, errs: []error{context.Canceled}},
			"allocator: CANCELLED: need 20 cells, 0 of 100 free, 0 queued: context canceled"},
	}
	for _, tt := range tests {
		if got := tt.err.Error(); got != tt.want {
			t.Errorf("Error() = %q, want %q", got, tt.want)
		}
	}
}

func TestStatsRejectedIsCopy(t *testing.T) {
	a := mustNew(t, Config{Cells: 10, MaxSequences: 1})
	s := a.Stats()
	s.Rejected[ReasonQueueFull] = 99
	if a.Stats().Rejected[ReasonQueueFull] != 0 {
		t.Error("Stats shares its Rejected map")
	}
}

func BenchmarkAdmitRelease(b *testing.B) {
	a := mustNew(b, Config{Cells: 1 << 20, MaxSequences: MaxSequencesLimit, MaxQueue: 64})
	ctx := context.Background()
	req := Request{PromptTokens: 100, MaxTokens: 100}
	b.ReportAllocs()
	for b.Loop() {
		l, err := a.Admit(ctx, req)
		if err != nil {
			b.Fatal(err)
		}
		if err := l.Charge(150); err != nil {
			b.Fatal(err)
		}
		l.Release()
	}
}
