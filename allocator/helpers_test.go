package allocator

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"testing"
	"time"
)

// fakeClock is a manually advanced clock for Config.Now.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

// newFakeClock returns a clock at a whole second, so that drain-rate
// buckets line up with the test's arithmetic.
func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// deadlineCtx has a deadline but never ends by itself, so estimate checks
// can use a fake clock without real timers.
type deadlineCtx struct {
	context.Context
	deadline time.Time
}

func (c deadlineCtx) Deadline() (time.Time, bool) { return c.deadline, true }

// evictions returns the sequences a evicted since the last Apply, as the
// KV cache's owner learns of them.
func evictions(a *Allocator) []int {
	var s Step
	a.Apply(&s)
	return s.Evicted
}

func mustNew(t testing.TB, cfg Config) *Allocator {
	t.Helper()
	a, err := New(cfg)
	if err != nil {
		t.Fatalf("New(%+v): %v", cfg, err)
	}
	return a
}

// invariants checks the Allocator's internal invariants and the
// consistency of a Stats snapshot.
func invariants(a *Allocator) error {
	a.mu.Lock()
	err := a.checkLocked()
	a.mu.Unlock()
	if err != nil {
		return err
	}
	return checkStats(a.Stats(), a.cfg)
}

func checkStats(s Stats, cfg Config) error {
	switch {
	case s.CellsTotal != cfg.Cells:
		return fmt.Errorf("CellsTotal %d, want %d", s.CellsTotal, cfg.Cells)
	case s.CellsUsed < 0 || s.CellsReserved < 0 || s.CellsFree < 0:
		return fmt.Errorf("negative cells: %+v", s)
	case s.CellsUsed+s.CellsReserved > s.CellsTotal:
		return fmt.Errorf("used %d + reserved %d > total %d", s.CellsUsed, s.CellsReserved, s.CellsTotal)
	case s.CellsFree != s.CellsTotal-s.CellsUsed-s.CellsReserved:
		return fmt.Errorf("free %d != total %d - used %d - reserved %d", s.CellsFree, s.CellsTotal, s.CellsUsed, s.CellsReserved)
	case s.Queued < 0 || s.Queued > cfg.MaxQueue:
		return fmt.Errorf("queued %d outside 0..%d", s.Queued, cfg.MaxQueue)
	case s.Running < 0 || s.Running > cfg.MaxSequences:
		return fmt.Errorf("running %d outside 0..%d", s.Running, cfg.MaxSequences)
	case s.DrainCellsPerSecond < 0:
		return fmt.Errorf("negative drain rate %v", s.DrainCellsPerSecond)
	case len(s.Rejected) != len(reasons):
		return fmt.Errorf("Rejected has %d keys, want %d", len(s.Rejected), len(reasons))
	}
	var running, queued, held int
	for name, ts := range s.Tenants {
		if ts.Running < 0 || ts.Queued < 0 || ts.CellsHeld < 0 || ts.Running == 0 && ts.Queued == 0 {
			return fmt.Errorf("tenant %q: %+v", name, ts)
		}
		running += ts.Running
		queued += ts.Queued
		held += ts.CellsHeld
	}
	switch {
	case running != s.Running || queued != s.Queued:
		return fmt.Errorf("tenants run %d and queue %d, stats say %d and %d", running, queued, s.Running, s.Queued)
	case held > s.CellsUsed+s.CellsReserved:
		return fmt.Errorf("tenants hold %d cells, more than used %d + reserved %d", held, s.CellsUsed, s.CellsReserved)
	case s.CellsCached == 0 && s.CellsShared == 0 && held != s.CellsUsed+s.CellsReserved:
		return fmt.Errorf("without cache tenants hold %d cells, used %d + reserved %d", held, s.CellsUsed, s.CellsReserved)
	}
	return nil
}

func mustInvariants(t testing.TB, a *Allocator) {
	t.Helper()
	if err := invariants(a); err != nil {
		t.Fatal(err)
	}
}

func sumRejected(s Stats) uint64 {
	var n uint64
	for _, v := range s.Rejected {
		n += v
	}
	return n
}

// asReject returns err as a *RejectError or fails the test.
func asReject(t testing.TB, err error) *RejectError {
	t.Helper()
	var re *RejectError
	if !errors.As(err, &re) {
		t.Fatalf("error %v (%T) is not a *RejectError", err, err)
	}
	return re
}

// mustAdmit admits req at once or fails the test.
func mustAdmit(t testing.TB, a *Allocator, req Request) *Lease {
	t.Helper()
	l, err := a.Admit(context.Background(), req)
	if err != nil {
		t.Fatalf("Admit(%+v): %v", req, err)
	}
	return l
}

// cells returns a Request needing n cells (n >= 2).
func cells(n int) Request { return Request{PromptTokens: 1, MaxTokens: n - 1} }

// result is the outcome of an Admit run in a goroutine.
type result struct {
	lease *Lease
	err   error
}

// admitAsync runs Admit in a goroutine and returns where its result goes.
func admitAsync(ctx context.Context, a *Allocator, req Request) <-chan result {
	c := make(chan result, 1)
	go func() {
		l, err := a.Admit(ctx, req)
		c <- result{l, err}
	}()
	return c
}

// recv returns the result if one is ready, or fails the test.
func recv(t testing.TB, c <-chan result) result {
	t.Helper()
	select {
	case r := <-c:
		return r
	default:
		t.Fatal("Admit has not returned")
		return result{}
	}
}

// pending fails the test if c already has a result.
func pending(t testing.TB, c <-chan result) {
	t.Helper()
	select {
	case r := <-c:
		t.Fatalf("Admit returned early: lease %v, err %v", r.lease, r.err)
	default:
	}
}

// checkLocked verifies the Allocator's invariants; tests call it.
func (a *Allocator) checkLocked() error {
	queuedNormal := 0
	for _, t := range a.tenants {
		queuedNormal += len(t.queue)
	}
	switch {
	case a.used < 0 || a.reserved < 0:
		return fmt.Errorf("negative ledger: used %d reserved %d", a.used, a.reserved)
	case a.used+a.reserved > a.cfg.Cells:
		return fmt.Errorf("overcommitted: used %d + reserved %d > %d", a.used, a.reserved, a.cfg.Cells)
	case a.running < 0 || a.running > a.cfg.MaxSequences:
		return fmt.Errorf("running %d outside 0..%d", a.running, a.cfg.MaxSequences)
	case a.queued != queuedNormal+len(a.resumes):
		return fmt.Errorf("queued %d, tenant queues hold %d and resumes %d", a.queued, queuedNormal, len(a.resumes))
	case a.queued > a.cfg.MaxQueue:
		return fmt.Errorf("queued %d > max %d", a.queued, a.cfg.MaxQueue)
	case a.draining && queuedNormal > 0:
		return fmt.Errorf("draining with %d queued", queuedNormal)
	case a.idle != nil && a.running == 0 && a.queued == 0:
		return errors.New("idle but Idle channel open")
	case !(a.usedFrac >= 0 && a.usedFrac <= 1):
		return fmt.Errorf("used fraction %v outside [0, 1]", a.usedFrac)
	}
	held := 0
	for i := range a.seqUsed {
		if a.seqUsed[i]&^a.seqValid[i] != 0 {
			return fmt.Errorf("invalid sequence id in use: word %d %#x", i, a.seqUsed[i])
		}
		held += bits.OnesCount64(a.seqUsed[i])
	}
	if held != a.running+a.lru.Len() {
		return fmt.Errorf("%d sequence ids held, %d running, %d cached", held, a.running, a.lru.Len())
	}
	if a.used != a.tree.cells {
		return fmt.Errorf("used %d, tree holds %d cells", a.used, a.tree.cells)
	}

	// Tenants: their counts match the running leases, and no state lingers.
	type tally struct{ held, running int }
	want := map[string]tally{}
	for _, e := range a.entries {
		if l := e.lease; l != nil {
			t := want[l.tenant]
			t.held += l.cells
			t.running++
			want[l.tenant] = t
		}
	}
	for name, t := range a.tenants {
		w := want[name]
		switch {
		case t.name != name:
			return fmt.Errorf("tenant %q filed under %q", t.name, name)
		case t.held != w.held || t.running != w.running:
			return fmt.Errorf("tenant %q: held %d running %d, leases hold %d running %d", name, t.held, t.running, w.held, w.running)
		case t.running == 0 && len(t.queue) == 0:
			return fmt.Errorf("tenant %q has neither leases nor waiters but lingers", name)
		}
		delete(want, name)
		for i, w := range t.queue {
			if w.resolved || w.resume != nil || w.tenant != name {
				return fmt.Errorf("tenant %q: waiter %d resolved %v resume %v tenant %q", name, i, w.resolved, w.resume != nil, w.tenant)
			}
			if i > 0 {
				p := t.queue[i-1]
				if p.priority < w.priority || (p.priority == w.priority && p.arrival >= w.arrival) {
					return fmt.Errorf("tenant %q: queue out of order at %d: (%d,#%d) before (%d,#%d)", name, i, p.priority, p.arrival, w.priority, w.arrival)
				}
			}
		}
	}
	for name := range want {
		return fmt.Errorf("tenant %q has running leases but no state", name)
	}
	for i, w := range a.resumes {
		if w.resolved || w.resume == nil {
			return fmt.Errorf("resume %d: resolved %v, lease %v", i, w.resolved, w.resume)
		}
		if i > 0 && a.resumes[i-1].arrival >= w.arrival {
			return fmt.Errorf("resumes out of order at %d", i)
		}
	}

	// Pumping has run to its end: the waiter it would admit next does not
	// fit. The next waiter is picked here independently of pickLocked.
	// A sequence the last Apply preempted may wait until the next one.
	if next := a.nextWaiterForTest(); next != nil && a.fitsLocked(next.need, next.samples()) && (next.resume == nil || next.resume.mark != a.applies) {
		return fmt.Errorf("next waiter (tenant %q) needs %d cells and fits (%d free, %d running) but waits", next.tenant, next.need, a.freeLocked(), a.running)
	}
	return nil
}

// nextWaiterForTest returns the waiter pumping admits next, computed
// independently of nextLocked: of the tenants below their cap (cells and
// running sequences) that have a preempted sequence or a queued request,
// the least loaded; ties to a preempted sequence, then to the earliest
// head. Within the tenant, its first preempted sequence, else its queue's
// head. nil if none.
func (a *Allocator) nextWaiterForTest() *waiter {
	heads := map[string]*waiter{}
	for _, w := range a.resumes {
		if heads[w.tenant] == nil {
			heads[w.tenant] = w
		}
	}
	for name, t := range a.tenants {
		if heads[name] == nil && len(t.queue) > 0 {
			heads[name] = t.queue[0]
		}
	}
	var best *waiter
	bestLoad := 0.0
	for name, w := range heads {
		lim := a.limitsLocked(name)
		held, running := 0, 0
		if t := a.tenants[name]; t != nil {
			held, running = t.held, t.running
		}
		if lim.MaxShare < 1 && (float64(held) >= lim.MaxShare*float64(a.cfg.Cells) || float64(running) >= lim.MaxShare*float64(a.cfg.MaxRunning)) {
			continue
		}
		load := float64(held) / lim.Weight
		switch {
		case best == nil, load < bestLoad:
		case load > bestLoad:
			continue
		case (w.resume != nil) != (best.resume != nil):
			if w.resume == nil {
				continue
			}
		case w.arrival > best.arrival:
			continue
		}
		best, bestLoad = w, load
	}
	return best
}

// fitsLocked reports whether need cells and n sequence ids (and running
// slots) could be had now, evicting cache if necessary: the queue's next
// waiter must not wait if it does.
func (a *Allocator) fitsLocked(need, n int) bool {
	return need <= a.availLocked() && a.running+n <= a.cfg.MaxRunning && a.idsAvailableLocked(n)
}
