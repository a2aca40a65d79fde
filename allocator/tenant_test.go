package allocator

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

// limitsOf returns a Config.Tenants function serving limits from m, and
// the defaults for tenants not in it.
func limitsOf(m map[string]TenantLimits) func(string) TenantLimits {
	return func(name string) TenantLimits { return m[name] }
}

// enqueue queues req through begin, the way Admit does, and fails the test
// if it is refused or admitted at once.
func enqueue(t testing.TB, a *Allocator, req Request) *waiter {
	t.Helper()
	l, w, err := a.begin(context.Background(), req)
	if w == nil {
		t.Fatalf("%+v not queued: lease %v, err %v", req, l, err)
	}
	return w
}

// granted returns w's lease once the Allocator granted it, nil while it
// waits.
func granted(w *waiter) *Lease {
	select {
	case <-w.ready:
		return w.lease
	default:
		return nil
	}
}

// tenantReq returns a request of tenant needing n cells (n >= 2).
func tenantReq(tenant string, n int) Request {
	r := cells(n)
	r.Tenant = tenant
	return r
}

func TestTenantLimitsNormalized(t *testing.T) {
	def := TenantLimits{Weight: 1, MaxShare: 1}
	tests := []struct {
		in, want TenantLimits
	}{
		{TenantLimits{}, def},
		{TenantLimits{Weight: 2.5, MaxShare: 0.25, MaxQueued: 7}, TenantLimits{Weight: 2.5, MaxShare: 0.25, MaxQueued: 7}},
		{TenantLimits{Weight: math.NaN(), MaxShare: math.NaN()}, def},
		{TenantLimits{Weight: -1, MaxShare: -0.5, MaxQueued: -3}, def},
		{TenantLimits{Weight: math.Inf(1), MaxShare: math.Inf(1)}, def},
		{TenantLimits{Weight: math.Inf(-1), MaxShare: math.Inf(-1)}, def},
		{TenantLimits{Weight: 1e-300, MaxShare: 2}, TenantLimits{Weight: 1e-300, MaxShare: 1}},
	}
	for _, tt := range tests {
		if got := tt.in.normalized(); got != tt.want {
			t.Errorf("%+v normalized = %+v, want %+v", tt.in, got, tt.want)
		}
	}
	if got := DefaultTenantLimits("anyone"); got != def {
		t.Errorf("DefaultTenantLimits = %+v", got)
	}

	// Invalid limits from Config.Tenants act as the defaults.
	a := mustNew(t, Config{Cells: 10, MaxSequences: 4, MaxQueue: 4, Tenants: func(string) TenantLimits {
		return TenantLimits{Weight: math.NaN(), MaxShare: -1, MaxQueued: -1}
	}})
	l := mustAdmit(t, a, tenantReq("x", 10))
	if load := l.Load(); load != 10 {
		t.Errorf("Load() = %v with an invalid weight, want 10", load)
	}
	w := enqueue(t, a, tenantReq("x", 5))
	l.Release()
	if granted(w) == nil {
		t.Fatal("waiter of a tenant with invalid limits not admitted")
	}
	mustInvariants(t, a)
}

// TestFairSmallTenantNotStarved has tenant A queue 200 large requests
// before tenant B queues 20 small ones: as A's running leases end, B's
// requests go first, since B holds fewer cells.
func TestFairSmallTenantNotStarved(t *testing.T) {
	a := mustNew(t, Config{Cells: 100, MaxSequences: 16, MaxQueue: 300})
	running := []*Lease{mustAdmit(t, a, tenantReq("A", 50)), mustAdmit(t, a, tenantReq("A", 50))}
	var waiting []*waiter
	for range 200 {
		waiting = append(waiting, enqueue(t, a, tenantReq("A", 50)))
	}
	for range 20 {
		waiting = append(waiting, enqueue(t, a, tenantReq("B", 10)))
	}
	if s := a.Stats(); s.Queued != 220 || s.Tenants["A"].Queued != 200 || s.Tenants["B"].Queued != 20 || s.CellsQueued != 200*50+20*10 {
		t.Fatalf("stats with everyone queued: %+v", s)
	}
	// Release the oldest running lease, one at a time, and note the order
	// of grants.
	var order []string
	for len(running) > 0 && len(order) < 40 {
		running[0].Release()
		running = running[1:]
		mustInvariants(t, a)
		kept := waiting[:0]
		for _, w := range waiting {
			if l := granted(w); l != nil {
				order = append(order, l.Tenant())
				running = append(running, l)
			} else {
				kept = append(kept, w)
			}
		}
		waiting = kept
	}
	// Each release of A's 50 cells lets in B's 10-cell requests until B
	// holds as much as A; at equal loads A's head, which arrived first,
	// goes next. B's 20 requests are all in after A's third.
	got := strings.Join(order, "")
	if want := "BBBBBABBBBBABBBBBABBBBBA"; !strings.HasPrefix(got, want) {
		t.Fatalf("admission order %s, want %s first", got, want)
	}
	if n := strings.Count(got, "B"); n != 20 {
		t.Fatalf("%d of B's requests admitted in %s", n, got)
	}
	for _, l := range running {
		l.Release()
	}
}

// TestFairWeights runs two tenants with deep queues of fixed-length
// requests through a simulated decode loop and checks that the cells they
// hold over time follow their weights.
func TestFairWeights(t *testing.T) {
	tests := []struct {
		name             string
		weightA, weightB float64
		sizeA, sizeB     int
		want             float64 // held A / held B
	}{
		{"2:1 equal sizes", 2, 1, 10, 10, 2},
		{"2:1 A larger", 2, 1, 20, 10, 2},
		{"2:1 B larger", 2, 1, 10, 20, 2},
		{"1:1", 1, 1, 10, 15, 1},
		{"1:3", 1, 3, 12, 12, 1.0 / 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := mustNew(t, Config{Cells: 240, MaxSequences: 64, MaxQueue: 3000, Tenants: limitsOf(map[string]TenantLimits{
				"A": {Weight: tt.weightA}, "B": {Weight: tt.weightB},
			})})
			var waiting []*waiter
			for range 1200 {
				waiting = append(waiting, enqueueOrAdmit(t, a, tenantReq("A", tt.sizeA)), enqueueOrAdmit(t, a, tenantReq("B", tt.sizeB)))
			}
			// Each step every running lease charges a cell; a lease ends
			// when its reservation is spent.
			var running []*Lease
			var sumA, sumB float64
			for step := range 300 {
				kept := waiting[:0]
				for _, w := range waiting {
					if l := granted(w); l != nil {
						running = append(running, l)
					} else {
						kept = append(kept, w)
					}
				}
				waiting = kept
				if step >= 30 {
					s := a.Stats()
					if s.Tenants["A"].Queued == 0 || s.Tenants["B"].Queued == 0 {
						t.Fatalf("step %d: a queue ran dry: %+v", step, s.Tenants)
					}
					sumA += float64(s.Tenants["A"].CellsHeld)
					sumB += float64(s.Tenants["B"].CellsHeld)
				}
				live := running[:0]
				for _, l := range running {
					if err := l.Charge(1); err != nil {
						t.Fatal(err)
					}
					if l.Reserved() == 0 {
						l.Release()
					} else {
						live = append(live, l)
					}
				}
				running = live
			}
			mustInvariants(t, a)
			got := sumA / sumB
			t.Logf("held A / held B = %.3f", got)
			if math.Abs(got-tt.want)/tt.want > 0.05 {
				t.Errorf("held A / held B = %.3f, want %.3f ± 5%%", got, tt.want)
			}
			for _, l := range running {
				l.Release()
			}
		})
	}
}

func TestMaxShareCap(t *testing.T) {
	tests := []struct {
		name        string
		size        int
		wantRunning int
		wantHeld    int
	}{
		// 0, 10, 20 are below the cap of 30 cells; 30 is not.
		{"small requests stop at the cap", 10, 3, 30},
		// 25 is below the cap: the second request takes A above it.
		{"a request may cross the cap", 25, 2, 50},
		// A tenant can always run one request that fits the pool.
		{"one request of the whole pool", 100, 1, 100},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := mustNew(t, Config{Cells: 100, MaxSequences: 16, MaxQueue: 16, Tenants: limitsOf(map[string]TenantLimits{
				"A": {MaxShare: 0.3},
			})})
			var ws []*waiter
			for range 5 {
				ws = append(ws, enqueueOrAdmit(t, a, tenantReq("A", tt.size)))
			}
			s := a.Stats()
			if got := s.Tenants["A"]; got.Running != tt.wantRunning || got.CellsHeld != tt.wantHeld || got.Queued != 5-tt.wantRunning {
				t.Fatalf("A: %+v; want %d running holding %d", got, tt.wantRunning, tt.wantHeld)
			}
			mustInvariants(t, a)
			// A capped tenant does not block another: B is admitted at
			// once if it fits.
			if free := s.CellsFree; free >= 2 {
				l, err := a.Admit(context.Background(), tenantReq("B", free))
				if err != nil {
					t.Fatalf("B blocked by a capped tenant: %v", err)
				}
				l.Release()
			}
			// When one of A's leases ends, A falls below its cap and its
			// next request runs.
			var first *Lease
			for _, w := range ws {
				if l := granted(w); l != nil {
					first = l
					break
				}
			}
			first.Release()
			if got := a.Stats().Tenants["A"]; got.Running != tt.wantRunning {
				t.Fatalf("after a release A runs %d, want %d", got.Running, tt.wantRunning)
			}
			mustInvariants(t, a)
		})
	}
}

// enqueueOrAdmit submits req through begin and returns its waiter, resolved
// at once if it was admitted at once.
func enqueueOrAdmit(t testing.TB, a *Allocator, req Request) *waiter {
	t.Helper()
	l, w, err := a.begin(context.Background(), req)
	switch {
	case err != nil:
		t.Fatalf("%+v refused: %v", req, err)
	case l != nil:
		w = &waiter{ready: make(chan struct{}), lease: l, resolved: true}
		close(w.ready)
	}
	return w
}

func TestTenantMaxQueued(t *testing.T) {
	tests := []struct {
		name      string
		maxQueued int
		wantRoom  int // requests of A that queue
	}{
		{"bounded", 2, 2},
		{"unbounded up to MaxQueue", 0, 5},
		{"bound above MaxQueue", 9, 5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := mustNew(t, Config{Cells: 10, MaxSequences: 4, MaxQueue: 5, MinRetryDelay: time.Millisecond, Tenants: limitsOf(map[string]TenantLimits{
				"A": {MaxQueued: tt.maxQueued},
			})})
			hold := mustAdmit(t, a, tenantReq("B", 10))
			for range tt.wantRoom {
				enqueue(t, a, tenantReq("A", 4))
			}
			before := a.Stats()
			_, w, err := a.begin(context.Background(), Request{PromptTokens: 1, MaxTokens: 1, Tenant: "A", Priority: 9})
			if w != nil {
				t.Fatal("queued past the bound")
			}
			re := asReject(t, err)
			if re.Reason != ReasonQueueFull || !errors.Is(err, ErrQueueFull) || re.QueueDepth != tt.wantRoom || re.CellsNeeded != 2 {
				t.Fatalf("refusal %+v", re)
			}
			if re.RetryAfter < time.Millisecond || re.RetryAfter > defaultMaxRetryDelay {
				t.Fatalf("RetryAfter %v outside the clamps", re.RetryAfter)
			}
			after := a.Stats()
			if after.Rejected[ReasonQueueFull] != 1 || after.Queued != before.Queued || after.CellsQueued != before.CellsQueued {
				t.Fatalf("refusal disturbed the queue: before %+v after %+v", before, after)
			}
			if tt.wantRoom < 5 {
				// Another tenant still queues.
				enqueue(t, a, tenantReq("C", 4))
			}
			mustInvariants(t, a)
			hold.Release()
			mustInvariants(t, a)
		})
	}
}

// TestPriorityWithinTenantOnly queues requests of two tenants with mixed
// priorities into a full pool and checks the admission order as the pool
// frees one request at a time: priority orders each tenant's requests, the
// fair pick (equal loads here, so the earlier head) orders the tenants.
func TestPriorityWithinTenantOnly(t *testing.T) {
	a := mustNew(t, Config{Cells: 10, MaxSequences: 4, MaxQueue: 16})
	hold := mustAdmit(t, a, cells(10))
	type sub struct {
		tenant   string
		priority int32
	}
	subs := []sub{{"A", 0}, {"B", 9}, {"A", 5}, {"B", 1}, {"A", 7}, {"B", 1}}
	var ws []*waiter
	for _, s := range subs {
		r := tenantReq(s.tenant, 10)
		r.Priority = s.priority
		ws = append(ws, enqueue(t, a, r))
	}
	var order []int
	last := hold
	for len(order) < len(subs) {
		last.Release()
		mustInvariants(t, a)
		last = nil
		for i, w := range ws {
			if l := granted(w); l != nil && !slices.Contains(order, i) {
				order = append(order, i)
				last = l
			}
		}
		if last == nil {
			t.Fatalf("nothing admitted after %v", order)
		}
	}
	last.Release()
	// The loads are equal at every pick, so the earlier head wins: B's
	// head (9, #1) before A's (7, #4); then B's (1, #3) before A's (7, #4)
	// although its priority is lower; then A's heads (7, #4), (5, #2) and
	// (0, #0) before B's last (1, #5).
	want := []int{1, 3, 4, 2, 0, 5}
	if !slices.Equal(order, want) {
		t.Fatalf("admission order %v, want %v", order, want)
	}
}

// TestFairAdmitAtOnce checks when a new request is admitted at once: only
// if pumping would pick it next.
func TestFairAdmitAtOnce(t *testing.T) {
	tests := []struct {
		name    string
		limits  map[string]TenantLimits
		bHolds  int // cells B holds before its request
		wantNow bool
	}{
		// A waits for 8 cells holding 2; B holding less goes ahead.
		{"less loaded tenant", nil, 0, true},
		// Equal loads: A's head arrived first.
		{"equally loaded tenant", nil, 2, false},
		{"more loaded tenant", nil, 3, false},
		// Weight 2 halves B's load: 3/2 < 2.
		{"weighted tenant", map[string]TenantLimits{"B": {Weight: 2}}, 3, true},
		// A capped at 20% (2 cells) cannot be picked: it blocks nobody.
		{"waiting tenant at its cap", map[string]TenantLimits{"A": {MaxShare: 0.2}}, 3, true},
		// B itself at its cap waits, although it fits.
		{"tenant at its cap", map[string]TenantLimits{"A": {MaxShare: 0.2}, "B": {MaxShare: 0.2}}, 3, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := mustNew(t, Config{Cells: 10, MaxSequences: 8, MaxQueue: 8, Tenants: limitsOf(tt.limits)})
			mustAdmit(t, a, tenantReq("A", 2))
			if tt.bHolds > 0 {
				mustAdmit(t, a, tenantReq("B", tt.bHolds))
			}
			enqueue(t, a, tenantReq("A", 9)) // does not fit
			l, w, err := a.begin(context.Background(), tenantReq("B", 2))
			if err != nil {
				t.Fatal(err)
			}
			if (l != nil) != tt.wantNow {
				t.Fatalf("admitted at once %v, want %v (waiter %v)", l != nil, tt.wantNow, w)
			}
			mustInvariants(t, a)
		})
	}
}

// TestResumeGoesFirst checks that a preempted sequence waiting to resume
// goes ahead of every tenant's queue, even a less loaded tenant's request
// that would fit.
func TestResumeGoesFirst(t *testing.T) {
	a := mustNew(t, Config{Cells: 20, MaxSequences: 4, MaxQueue: 4, Policy: PolicyOptimistic})
	ctx := context.Background()
	toks := func(n int) []int32 { return make([]int32, n) }
	l1, err := a.Admit(ctx, Request{PromptTokens: 10, MaxTokens: 10, Tenant: "A"})
	if err != nil {
		t.Fatal(err)
	}
	l2, err := a.Admit(ctx, Request{PromptTokens: 5, MaxTokens: 10, Tenant: "B"})
	if err != nil {
		t.Fatal(err)
	}
	if err := l2.Grow(10); err != nil {
		t.Fatal(err)
	}
	_ = l1.Charge(10)
	_ = l2.Charge(10)
	c := enqueue(t, a, Request{PromptTokens: 3, MaxTokens: 3, Tenant: "C"})
	// B is preempted with 12 tokens to recompute; 10 cells come back, too
	// few for it but enough for C, which must still wait behind it.
	_, resumed, err := l2.Requeue(toks(12))
	if err != nil {
		t.Fatal(err)
	}
	s := a.Stats()
	if s.CellsFree != 10 || s.Queued != 2 || s.Tenants["B"].Queued != 1 || s.Tenants["B"].Running != 0 || s.Tenants["C"].Queued != 1 {
		t.Fatalf("after the preemption: %+v", s)
	}
	if granted(c) != nil {
		t.Fatal("a queued request went ahead of a preempted sequence")
	}
	mustInvariants(t, a)
	l1.Release()
	select {
	case <-resumed:
	default:
		t.Fatal("not resumed when the pool emptied")
	}
	lc := granted(c)
	if lc == nil {
		t.Fatal("C not admitted after the resume")
	}
	if l2.Tenant() != "B" || a.Stats().Tenants["B"].CellsHeld != 12 {
		t.Fatalf("resumed lease: tenant %q, stats %+v", l2.Tenant(), a.Stats().Tenants)
	}
	lc.Release()
	l2.Release()
	mustInvariants(t, a)
}

func TestLeaseLoad(t *testing.T) {
	a := mustNew(t, Config{Cells: 100, MaxSequences: 8, Policy: PolicyOptimistic, Tenants: limitsOf(map[string]TenantLimits{
		"A": {Weight: 2}, "B": {Weight: 0.5},
	})})
	ctx := context.Background()
	admit := func(tenant string, prompt int) *Lease {
		l, err := a.Admit(ctx, Request{PromptTokens: prompt, MaxTokens: 50, Tenant: tenant})
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	a1, a2, b1, d1 := admit("A", 10), admit("A", 6), admit("B", 4), admit("", 3)
	check := func(what string, want map[*Lease]float64) {
		t.Helper()
		for l, w := range want {
			if got := l.Load(); got != w {
				t.Errorf("%s: tenant %q Load() = %v, want %v", what, l.Tenant(), got, w)
			}
		}
	}
	check("admitted", map[*Lease]float64{a1: 8, a2: 8, b1: 8, d1: 3})
	// Grow counts: B holds 4+6 cells.
	if err := b1.Grow(10); err != nil {
		t.Fatal(err)
	}
	check("grown", map[*Lease]float64{b1: 20, a1: 8})
	a2.Release()
	check("released", map[*Lease]float64{a1: 5, a2: 5})
	s := a.Stats()
	want := map[string]TenantStats{"A": {1, 10, 0}, "B": {1, 10, 0}, "": {1, 3, 0}}
	if fmt.Sprint(s.Tenants) != fmt.Sprint(want) {
		t.Errorf("Stats.Tenants = %v, want %v", s.Tenants, want)
	}
	// The map is a fresh copy.
	s.Tenants["A"] = TenantStats{}
	delete(s.Tenants, "B")
	if got := a.Stats().Tenants; got["A"].CellsHeld != 10 || got["B"].CellsHeld != 10 {
		t.Errorf("Stats shares its Tenants map: %v", got)
	}
	a1.Release()
	b1.Release()
	d1.Release()
	if got := a.Stats().Tenants; len(got) != 0 {
		t.Errorf("tenants left after every release: %v", got)
	}
	mustInvariants(t, a)
}

// TestResumeYieldsToLessLoadedTenant checks, under optimistic admission,
// that a preempted sequence does not resume ahead of a less loaded
// tenant's waiter, and that a loaded tenant's growth yields the cells
// that waiter needs (Grow reports ErrNoCells, so the engine preempts).
func TestResumeYieldsToLessLoadedTenant(t *testing.T) {
	a := mustNew(t, Config{Cells: 36, MaxSequences: 8, MaxQueue: 8, Policy: PolicyOptimistic, Watermark: 2})
	ctx := context.Background()
	var as []*Lease
	for range 3 {
		l, err := a.Admit(ctx, Request{PromptTokens: 10, MaxTokens: 20, Tenant: "A"})
		if err != nil {
			t.Fatal(err)
		}
		_ = l.Charge(10)
		as = append(as, l)
	}
	// A holds 30 of 36 cells; B's request needs 8 + 2 and must wait. One
	// more cell for A would fit, but leave B's waiter out.
	b := enqueue(t, a, Request{PromptTokens: 8, MaxTokens: 4, Tenant: "B"})
	if err := as[0].Grow(1); !errors.Is(err, ErrNoCells) {
		t.Fatalf("A grew into the cells B's waiter needs: %v", err)
	}
	// A preempts its own sequence: 16 cells are free, enough for B (10)
	// or for A's resume (12), not both. They go to B, the less loaded.
	_, resumed, err := as[2].Requeue(make([]int32, 10))
	if err != nil {
		t.Fatal(err)
	}
	if granted(b) == nil {
		t.Fatal("B not admitted when A's preemption freed its cells")
	}
	select {
	case <-resumed:
		t.Fatal("A's preempted sequence resumed ahead of B")
	default:
	}
	mustInvariants(t, a)
	// With B admitted and nobody less loaded waiting, A grows again.
	if err := as[0].Grow(1); err != nil {
		t.Fatalf("A cannot grow with no fairer waiter: %v", err)
	}
	mustInvariants(t, a)
}
