package allocator

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// TestPropertyConcurrent drives one Allocator from many goroutines with
// random admits (various sizes, priorities and tenants, some never fitting,
// some with deadlines, cancellations or queue timeouts), charges and
// releases, and
// checks the invariants after every step. It runs in a synctest bubble, so
// timeouts use the bubble's fake clock, and a lost wake-up shows up as a
// deadlock that fails the test.
func TestPropertyConcurrent(t *testing.T) {
	for seed := range uint64(12) {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) { runProperty(t, seed) })
		})
	}
}

type propTally struct {
	mu       sync.Mutex
	calls    uint64
	admitted uint64
	rejected map[string]uint64
	seqs     map[int]*Lease // live leases by sequence id
}

func runProperty(t *testing.T, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 0x6b76))
	cfg := Config{
		Cells:        16 + r.IntN(113),
		MaxSequences: 1 + r.IntN(8),
		MaxQueue:     r.IntN(13),
		Tenants:      propLimits,
	}
	if seed%2 == 1 {
		// Schedule-based estimates, with a step rate the clock could
		// plausibly keep.
		cfg.StepRate = func() float64 { return 200 }
	}
	if r.IntN(2) == 0 {
		cfg.MaxSequenceTokens = cfg.Cells/2 + r.IntN(cfg.Cells)
	}
	a := mustNew(t, cfg)
	const workers, ops = 12, 60
	tally := &propTally{rejected: map[string]uint64{}, seqs: map[int]*Lease{}}

	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() { propWorker(t, a, cfg, rand.New(rand.NewPCG(seed, uint64(w)+1)), ops, tally) })
	}
	if seed%3 == 2 {
		time.Sleep(time.Duration(300+r.IntN(300)) * time.Millisecond)
		a.Drain()
	}
	wg.Wait()

	s := a.Stats()
	if err := checkStats(s, a.cfg); err != nil {
		t.Fatal(err)
	}
	if s.CellsUsed != 0 || s.CellsReserved != 0 || s.Running != 0 || s.Queued != 0 {
		t.Errorf("after every release: %+v", s)
	}
	if s.Admitted != tally.admitted || s.Admitted+sumRejected(s) != tally.calls {
		t.Errorf("admitted %d (callers saw %d) + rejected %d != %d Admit calls", s.Admitted, tally.admitted, sumRejected(s), tally.calls)
	}
	for _, reason := range reasons {
		if s.Rejected[reason] != tally.rejected[reason] {
			t.Errorf("Rejected[%s] = %d, callers saw %d", reason, s.Rejected[reason], tally.rejected[reason])
		}
	}
	select {
	case <-a.Idle():
	default:
		t.Error("not idle at the end")
	}
	t.Logf("cfg %+v: %d calls, %d admitted, rejected %v", cfg, tally.calls, s.Admitted, s.Rejected)
}

// propTenants are the tenants of the property test's requests.
var propTenants = [...]string{"", "light", "heavy", "capped"}

func propLimits(name string) TenantLimits {
	switch name {
	case "light":
		return TenantLimits{Weight: 3}
	case "heavy":
		return TenantLimits{Weight: 0.5, MaxQueued: 3}
	case "capped":
		return TenantLimits{MaxShare: 0.25, MaxQueued: 2}
	}
	return TenantLimits{}
}

func propWorker(t *testing.T, a *Allocator, cfg Config, r *rand.Rand, ops int, tally *propTally) {
	step := func(what string) {
		if err := invariants(a); err != nil {
			t.Errorf("after %s: %v", what, err)
		}
	}
	limit := a.limit
	for range ops {
		req := Request{
			PromptTokens: 1 + r.IntN(max(1, limit/3)),
			MaxTokens:    1 + r.IntN(max(1, limit/3)),
			Priority:     int32(r.IntN(4)),
			Tenant:       propTenants[r.IntN(len(propTenants))],
		}
		if r.IntN(20) == 0 {
			req.MaxTokens = limit // never fits
		}
		if r.IntN(3) == 0 {
			req.QueueTimeout = time.Duration(1+r.IntN(50)) * time.Millisecond
		}
		if r.IntN(5) == 0 {
			req.N = 2 + r.IntN(3) // a sample group, which may exceed MaxSequences
		}
		ctx, cancel := context.Background(), context.CancelFunc(func() {})
		var stop func() bool
		switch r.IntN(6) {
		case 0:
			ctx, cancel = context.WithTimeout(ctx, time.Duration(1+r.IntN(80))*time.Millisecond)
		case 1:
			ctx, cancel = context.WithCancel(ctx)
			stop = time.AfterFunc(time.Duration(r.IntN(40))*time.Millisecond, cancel).Stop
		case 2:
			if r.IntN(4) == 0 {
				ctx, cancel = context.WithCancel(ctx)
				cancel()
			}
		}
		l, err := a.Admit(ctx, req)
		if stop != nil {
			stop()
		}
		cancel()
		tally.mu.Lock()
		tally.calls++
		if err != nil {
			var re *RejectError
			switch {
			case req.N > cfg.MaxSequences:
				if !errors.Is(err, ErrInvalidRequest) {
					t.Errorf("Admit(%+v) of more samples than sequences: %v, want ErrInvalidRequest", req, err)
				}
				tally.calls-- // refused before the ledger: not counted
			case !errors.As(err, &re):
				t.Errorf("Admit(%+v): %v is not a RejectError", req, err)
			default:
				tally.rejected[re.Reason]++
				if fits := req.PromptTokens+max(req.N, 1)*req.MaxTokens <= cfg.Cells && req.PromptTokens+req.MaxTokens <= limit; fits == (re.Reason == ReasonNeverFits) && re.Reason != ReasonDraining {
					t.Errorf("Admit(%+v) refused with %s, limit %d", req, re.Reason, re.Limit)
				}
			}
			if l != nil {
				t.Errorf("Admit returned both a lease and %v", err)
			}
		} else {
			tally.admitted++
			if l.Tenant() != req.Tenant {
				t.Errorf("lease of tenant %q for a request of %q", l.Tenant(), req.Tenant)
			}
			if load := l.Load(); !(load > 0) {
				t.Errorf("running lease's tenant has load %v", load)
			}
			if got := len(l.Samples()) + 1; got != max(req.N, 1) {
				t.Errorf("a lease of %d samples for a request of %d", got, req.N)
			}
			for _, m := range append([]*Lease{l}, l.Samples()...) {
				if other, ok := tally.seqs[m.SeqID()]; ok {
					t.Errorf("sequence %d held by two live leases (%p, %p)", m.SeqID(), other, m)
				}
				if m.SeqID() < 0 || m.SeqID() >= cfg.MaxSequences {
					t.Errorf("sequence id %d out of range", m.SeqID())
				}
				tally.seqs[m.SeqID()] = m
			}
		}
		tally.mu.Unlock()
		step("admit")
		if err != nil {
			if r.IntN(2) == 0 {
				time.Sleep(time.Duration(r.IntN(10)) * time.Millisecond)
			}
			continue
		}

		group := append([]*Lease{l}, l.Samples()...)
		need, reserved := req.PromptTokens+len(group)*req.MaxTokens, 0
		for _, m := range group {
			reserved += m.Reserved()
		}
		if reserved != need || l.Reserved() != req.PromptTokens+req.MaxTokens {
			t.Errorf("group of %d reserves %d (leader %d), want %d", len(group), reserved, l.Reserved(), need)
		}
		for range r.IntN(5) {
			time.Sleep(time.Duration(r.IntN(10)) * time.Millisecond)
			m := group[r.IntN(len(group))]
			left := m.Reserved()
			n := r.IntN(left + 2)
			err := m.Charge(n)
			if n > left && !errors.Is(err, ErrOverCharge) || n <= left && err != nil {
				t.Errorf("Charge(%d) with %d left: %v", n, left, err)
			}
			step("charge")
		}
		tally.mu.Lock()
		for _, m := range group {
			delete(tally.seqs, m.SeqID())
		}
		tally.mu.Unlock()
		// Followers end before their leader, in any order, except now and
		// then, when the leader's end takes them with it.
		if r.IntN(4) > 0 {
			for _, k := range r.Perm(len(group) - 1) {
				group[k+1].Release()
				step("release of a sample")
			}
		}
		if r.IntN(4) == 0 {
			var rw sync.WaitGroup
			rw.Go(l.Release)
			rw.Go(l.Release)
			rw.Wait()
		} else {
			l.Release()
		}
		step("release")
	}
}
