package allocator

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"testing"
	"time"
)

// Fuzz input layout: four header bytes, then three bytes per operation.
//
//	header: cells = 4 + b0%29; sequences = 1 + b1%4; queue = (b2&127)%5;
//	        b2 bit 7: Config.StepRate reports the model's step rate
//	        (initially 0, unknown);
//	        b3 odd: MaxSequenceTokens = 1 + (b3>>1)%(cells+4), else 0.
//	op byte % 8, then x, y; t = (op byte>>3)%4:
//	  0, 1 admit:   prompt 1+x%8, max 1+y%8, priority (x>>3)%3;
//	                tenant fuzzTenants[t]; N = 1+(op byte>>5)%4 samples;
//	                x bit 5: QueueTimeout (1+x>>6)*200ms;
//	                (y>>3)%4: 1 deadline now+(y>>5)*100ms, 2 cancelled ctx.
//	  2 charge:     lease x%n, n = y%(reserved+2) (over-charges included).
//	  3 release:    lease x%n; y odd: release twice.
//	  4 cancel:     waiter x%n leaves with CANCELLED (may race a grant).
//	  5 timeout:    waiter x%n leaves with QUEUE_TIMEOUT (may race a grant).
//	  6 collect:    every resolved waiter returns its lease or error.
//	  7 clock:      y%16 == 0: Drain; else t == 0: advance x*10ms;
//	                else the step rate becomes x*t steps/s.
const (
	opAdmit   = 0
	opCharge  = 2
	opRelease = 3
	opCancel  = 4
	opTimeout = 5
	opCollect = 6
	opClock   = 7
)

// fuzzTenants are the tenants of fuzzed requests; fuzzLimits gives their
// limits, "c" with invalid values that must act as the defaults.
var fuzzTenants = [4]string{"", "a", "b", "c"}

func fuzzLimits(name string) TenantLimits {
	switch name {
	case "a":
		return TenantLimits{Weight: 2}
	case "b":
		return TenantLimits{Weight: 1, MaxShare: 0.5, MaxQueued: 2}
	case "c":
		return TenantLimits{Weight: math.NaN(), MaxShare: -1, MaxQueued: -3}
	}
	return TenantLimits{}
}

// FuzzAllocator interprets the input as a sequence of operations on a small
// pool, driven single-threaded through the same internal steps Admit uses
// (begin, then a wake-up or abandon), with a fake clock, and checks the
// invariants and a model of the ledger after every operation.
func FuzzAllocator(f *testing.F) {
	admit := func(prompt, maxTok, prio int, timeout bool, ctxKind int) []byte {
		x := byte(prompt-1) | byte(prio)<<3
		if timeout {
			x |= 1 << 5
		}
		y := byte(maxTok-1) | byte(ctxKind)<<3 | 3<<5
		return []byte{opAdmit, x, y}
	}
	op := func(kind, x, y byte) []byte { return []byte{kind, x, y} }
	seq := func(header []byte, ops ...[]byte) []byte {
		out := append([]byte(nil), header...)
		for _, o := range ops {
			out = append(out, o...)
		}
		return out
	}
	hdr := []byte{12, 3, 4, 0} // 16 cells, 4 sequences, queue of 4

	// Fill, queue mixed priorities, release, collect.
	f.Add(seq(hdr,
		admit(8, 8, 0, false, 0),
		admit(4, 4, 0, false, 0), admit(2, 2, 2, false, 0), admit(3, 3, 1, false, 0),
		op(opRelease, 0, 0), op(opCollect, 0, 0),
		op(opRelease, 0, 0), op(opCollect, 0, 0), op(opRelease, 0, 0), op(opCollect, 0, 0)))
	// A waiter is granted, then cancelled before it collects: rollback.
	f.Add(seq(hdr,
		admit(8, 8, 0, false, 0), admit(5, 5, 1, false, 0), admit(8, 8, 0, false, 0), admit(1, 1, 0, false, 0),
		op(opCancel, 2, 0), op(opRelease, 0, 0), op(opCancel, 0, 0), op(opTimeout, 0, 0), op(opCollect, 0, 0)))
	// Waiters time out while still queued; the next one then fits.
	f.Add(seq(hdr,
		admit(6, 6, 0, false, 0), admit(4, 4, 2, true, 0), admit(1, 1, 1, true, 0),
		op(opTimeout, 0, 0), op(opCollect, 0, 0), op(opTimeout, 0, 0), op(opRelease, 0, 0)))
	// Charges, over-charges and double releases.
	f.Add(seq(hdr,
		admit(4, 4, 0, false, 0), op(opCharge, 0, 3), op(opCharge, 0, 6), op(opCharge, 0, 5),
		op(opRelease, 0, 1), op(opCharge, 0, 1)))
	// Drain with waiters, then admits after draining.
	f.Add(seq(hdr,
		admit(8, 8, 0, false, 0), admit(2, 2, 0, false, 0), admit(2, 2, 1, false, 0),
		op(opClock, 0, 0), op(opCancel, 0, 0), op(opCollect, 0, 0), admit(1, 1, 0, false, 0)))
	// Known drain rate, then deadlines too short: KV_CELLS_EXHAUSTED.
	f.Add(seq(hdr,
		op(opClock, 100, 1), admit(8, 8, 0, false, 0), op(opRelease, 0, 0),
		admit(8, 8, 0, false, 0), admit(4, 4, 0, false, 1), admit(4, 4, 0, true, 0),
		op(opTimeout, 0, 0), op(opClock, 255, 1), op(opCollect, 0, 0)))
	// Small pool, one sequence, no queue, a per-request limit, never-fits.
	f.Add(seq([]byte{0, 0, 0, 7},
		admit(2, 2, 0, false, 0), admit(1, 1, 0, false, 0), admit(8, 8, 0, false, 0),
		admit(1, 1, 0, false, 2), op(opRelease, 0, 0), admit(1, 1, 0, false, 2)))
	// Sequence ids run out before cells do.
	f.Add(seq([]byte{28, 1, 4, 0},
		admit(1, 1, 0, false, 0), admit(1, 1, 0, false, 0), admit(1, 1, 1, false, 0),
		admit(1, 1, 2, true, 0), op(opRelease, 1, 0), op(opCollect, 0, 0),
		op(opRelease, 0, 0), op(opClock, 50, 3), op(opCollect, 0, 0)))

	// A waiter that does not fit blocks those behind it (no bypass), but a
	// strictly higher priority goes first.
	f.Add(seq(hdr,
		admit(6, 6, 0, false, 0), admit(4, 4, 1, false, 0), admit(1, 1, 0, false, 0),
		admit(1, 1, 2, false, 0), op(opRelease, 1, 0), op(opCollect, 0, 0), op(opRelease, 0, 0)))
	// MaxSequenceTokens above Cells: the pool is the limit.
	f.Add(seq([]byte{8, 1, 2, 31},
		admit(7, 7, 0, false, 0), admit(6, 6, 0, false, 0), admit(6, 6, 0, false, 0)))

	// Tenants: a holds the pool, b and c queue; b is capped at half the
	// pool and may queue two; releases go to the least loaded tenant.
	tenant := func(o []byte, t byte) []byte { o[0] |= t << 3; return o }
	f.Add(seq(hdr,
		tenant(admit(8, 8, 0, false, 0), 1), tenant(admit(4, 4, 0, false, 0), 1),
		tenant(admit(3, 3, 0, false, 0), 2), tenant(admit(2, 2, 2, false, 0), 2), tenant(admit(1, 1, 0, false, 0), 2),
		tenant(admit(2, 2, 1, false, 0), 3), op(opRelease, 0, 0), op(opCollect, 0, 0),
		op(opRelease, 0, 0), op(opCollect, 0, 0), op(opRelease, 0, 0), op(opCollect, 0, 0)))
	// Step-rate mode: unknown rate queues, a known rate refuses a wait past
	// the deadline, and the pool drains in fair order.
	f.Add(seq([]byte{12, 3, 132, 0},
		admit(8, 8, 0, false, 0), tenant(admit(4, 4, 0, false, 1), 1),
		op(opClock|1<<3, 20, 1), tenant(admit(4, 4, 0, false, 1), 2), admit(4, 4, 1, true, 0),
		op(opRelease, 0, 0), op(opCollect, 0, 0), op(opClock, 30, 1), op(opCollect, 0, 0)))

	f.Fuzz(runOps)
}

// fuzzModel is the test's view of the Allocator during a fuzz run.
type fuzzModel struct {
	t        *testing.T
	a        *Allocator
	clk      *fakeClock
	limit    int
	live     []*Lease
	waiters  []*waiter
	calls    uint64 // valid Admit-equivalent calls
	draining bool
	// queued holds the waiters that were unresolved after the last
	// operation, to check that grants follow the queue order.
	queued []*waiter
	// stepRate is what Config.StepRate reports when scheduled is set.
	stepRate  float64
	scheduled bool
}

func runOps(t *testing.T, data []byte) {
	if len(data) < 4 {
		return
	}
	clk := newFakeClock()
	cfg := Config{
		Cells:        4 + int(data[0]%29),
		MaxSequences: 1 + int(data[1]%4),
		MaxQueue:     int(data[2]&127) % 5,
		Now:          clk.Now,
		Tenants:      fuzzLimits,
	}
	if data[3]%2 == 1 {
		cfg.MaxSequenceTokens = 1 + int(data[3]>>1)%(cfg.Cells+4)
	}
	m := &fuzzModel{t: t, clk: clk, limit: cfg.Cells, scheduled: data[2]&128 != 0}
	if m.scheduled {
		cfg.StepRate = func() float64 { return m.stepRate }
	}
	m.a = mustNew(t, cfg)
	if cfg.MaxSequenceTokens > 0 {
		m.limit = min(m.limit, cfg.MaxSequenceTokens)
	}
	ops := data[4:]
	for i := 0; i+3 <= len(ops); i += 3 {
		kind, x, y := ops[i]%8, ops[i+1], ops[i+2]
		what := m.step(kind, (ops[i]>>3)%4, x, y, 1+int(ops[i]>>5)%4)
		if err := m.verify(); err != nil {
			t.Fatalf("op %d (%s): %v", i/3, what, err)
		}
	}

	// Everyone leaves: waiters give up, leases are released.
	for len(m.waiters) > 0 {
		m.leave(0, ReasonCancelled)
	}
	for len(m.live) > 0 {
		m.live[0].Release()
		m.live = m.live[1:]
	}
	if err := m.verify(); err != nil {
		t.Fatalf("at the end: %v", err)
	}
	s := m.a.Stats()
	if s.CellsUsed != 0 || s.CellsReserved != 0 || s.Running != 0 || s.Queued != 0 {
		t.Fatalf("at the end: %+v", s)
	}
	if s.Admitted+sumRejected(s) != m.calls {
		t.Fatalf("admitted %d + rejected %d != %d calls", s.Admitted, sumRejected(s), m.calls)
	}
	select {
	case <-m.a.Idle():
	default:
		t.Fatal("not idle at the end")
	}
}

func (m *fuzzModel) step(kind, ten, x, y byte, samples int) string {
	switch kind {
	case 0, 1:
		return m.admit(fuzzTenants[ten], x, y, samples)
	case opCharge:
		if len(m.live) == 0 {
			return "charge: no lease"
		}
		l := m.live[int(x)%len(m.live)]
		left, charged := l.Reserved(), l.Charged()
		n := int(y) % (left + 2)
		err := l.Charge(n)
		switch {
		case n > left && !errors.Is(err, ErrOverCharge):
			m.t.Fatalf("Charge(%d) with %d left: %v, want ErrOverCharge", n, left, err)
		case n <= left && err != nil:
			m.t.Fatalf("Charge(%d) with %d left: %v", n, left, err)
		case err == nil && (l.Reserved() != left-n || l.Charged() != charged+n):
			m.t.Fatalf("Charge(%d): reserved %d charged %d, was %d %d", n, l.Reserved(), l.Charged(), left, charged)
		case err != nil && (l.Reserved() != left || l.Charged() != charged):
			m.t.Fatalf("failed Charge(%d) changed the lease", n)
		}
		return fmt.Sprintf("charge %d", n)
	case opRelease:
		if len(m.live) == 0 {
			return "release: no lease"
		}
		i := int(x) % len(m.live)
		l := m.live[i]
		m.live = append(m.live[:i], m.live[i+1:]...)
		// A leader's followers end with it.
		m.live = slices.DeleteFunc(m.live, func(f *Lease) bool { return slices.Contains(l.Samples(), f) })
		l.Release()
		if y%2 == 1 {
			l.Release()
		}
		if err := l.Charge(0); !errors.Is(err, ErrReleased) {
			m.t.Fatalf("Charge after Release: %v", err)
		}
		return fmt.Sprintf("release seq %d", l.SeqID())
	case opCancel, opTimeout:
		if len(m.waiters) == 0 {
			return "leave: no waiter"
		}
		reason := ReasonCancelled
		if kind == opTimeout {
			reason = ReasonQueueTimeout
		}
		m.leave(int(x)%len(m.waiters), reason)
		return "leave " + reason
	case opCollect:
		kept := m.waiters[:0]
		for _, w := range m.waiters {
			select {
			case <-w.ready:
				m.collect(w)
			default:
				kept = append(kept, w)
			}
		}
		clear(m.waiters[len(kept):])
		m.waiters = kept
		return "collect"
	case opClock:
		if y%16 == 0 {
			m.a.Drain()
			m.draining = true
			return "drain"
		}
		if ten != 0 {
			m.stepRate = float64(x) * float64(ten)
			return fmt.Sprintf("step rate %v", m.stepRate)
		}
		m.clk.Advance(time.Duration(x) * 10 * time.Millisecond)
		return "advance"
	}
	return "nop"
}

func (m *fuzzModel) admit(tenant string, x, y byte, samples int) string {
	req := Request{
		PromptTokens: 1 + int(x%8),
		MaxTokens:    1 + int(y%8),
		Priority:     int32((x >> 3) % 3),
		Tenant:       tenant,
	}
	if samples > 1 {
		req.N = samples
	}
	if x&(1<<5) != 0 {
		req.QueueTimeout = time.Duration(1+x>>6) * 200 * time.Millisecond
	}
	var ctx context.Context = context.Background()
	switch (y >> 3) % 4 {
	case 1:
		ctx = deadlineCtx{ctx, m.clk.Now().Add(time.Duration(y>>5) * 100 * time.Millisecond)}
	case 2:
		c, cancel := context.WithCancel(ctx)
		cancel()
		ctx = c
	}
	// A group needs its prompt once and every sample's budget, within the
	// pool, and each sample within the one-sequence limit.
	need, limit := req.PromptTokens+req.MaxTokens, m.limit
	if samples > 1 && need <= m.limit {
		need, limit = req.PromptTokens+samples*req.MaxTokens, m.a.cfg.Cells
	}
	if samples > m.a.cfg.MaxSequences {
		if _, _, err := m.a.begin(ctx, req); !errors.Is(err, ErrInvalidRequest) {
			m.t.Fatalf("admit %+v of more samples than sequences: %v, want ErrInvalidRequest", req, err)
		}
		return "admit: too many samples"
	}
	before := m.a.Stats()
	// behind: a queued waiter goes first, one of the same tenant and no
	// lower priority, or another tenant's pumping could pick: below its
	// cap with a load no higher than that of the request's tenant.
	behind := false
	for _, w := range m.queued {
		behind = behind || w.tenant == tenant && w.priority >= req.Priority
	}
	load := func(name string) float64 {
		return float64(before.Tenants[name].CellsHeld) / fuzzLimits(name).normalized().Weight
	}
	capped := func(name string) bool {
		lim := fuzzLimits(name).normalized()
		return !lim.belowCap(before.Tenants[name].CellsHeld, m.a.cfg.Cells, before.Tenants[name].Running, m.a.cfg.MaxRunning)
	}
	for name, ts := range before.Tenants {
		behind = behind || name != tenant && ts.Queued > 0 && !capped(name) && load(name) <= load(tenant)
	}
	behind = behind || capped(tenant)
	tenantFull := false
	if lim := fuzzLimits(tenant).normalized(); lim.MaxQueued > 0 {
		tenantFull = before.Tenants[tenant].Queued >= lim.MaxQueued
	}
	m.calls++
	l, w, err := m.a.begin(ctx, req)
	what := fmt.Sprintf("admit %+v", req)
	if n := btoi(l != nil) + btoi(w != nil) + btoi(err != nil); n != 1 {
		m.t.Fatalf("%s: lease %v waiter %v err %v: want exactly one", what, l, w, err)
	}
	switch {
	case l != nil:
		if m.draining || need > limit || ctx.Err() != nil || before.CellsFree < need || before.Running+samples > m.a.cfg.MaxSequences || behind {
			m.t.Fatalf("%s admitted (draining %v, limit %d, behind a waiter %v, before %+v)", what, m.draining, limit, behind, before)
		}
		m.checkGrant(what, l, samples, need)
	case w != nil:
		if m.draining || need > limit || before.Queued >= m.a.cfg.MaxQueue || tenantFull {
			m.t.Fatalf("%s queued (draining %v, limit %d, before %+v)", what, m.draining, limit, before)
		}
		m.waiters = append(m.waiters, w)
	default:
		re := asReject(m.t, err)
		want := ""
		switch {
		case m.draining:
			want = ReasonDraining
		case need > limit:
			want = ReasonNeverFits
		case ctx.Err() != nil:
			want = ReasonCancelled
		}
		if want != "" && re.Reason != want || want == "" && re.Reason != ReasonQueueFull && re.Reason != ReasonKVCellsExhausted {
			m.t.Fatalf("%s refused with %s, want %q", what, re.Reason, want)
		}
		if re.CellsNeeded != need || re.CellsFree != before.CellsFree || re.CellsTotal != before.CellsTotal || re.QueueDepth != before.Queued {
			m.t.Fatalf("%s: %+v, stats before %+v", what, re, before)
		}
		switch re.Reason {
		case ReasonNeverFits:
			if re.Limit != limit || re.RetryAfter != 0 {
				m.t.Fatalf("%s: %+v", what, re)
			}
		case ReasonQueueFull, ReasonKVCellsExhausted:
			if re.RetryAfter < m.a.cfg.MinRetryDelay || re.RetryAfter > m.a.cfg.MaxRetryDelay {
				m.t.Fatalf("%s: RetryAfter %v outside clamps", what, re.RetryAfter)
			}
			if re.Reason == ReasonQueueFull && before.Queued < m.a.cfg.MaxQueue && before.Running+samples <= m.a.cfg.MaxSequences && before.CellsFree >= need && before.Queued == 0 {
				m.t.Fatalf("%s: QUEUE_FULL though it fit", what)
			}
			if re.Reason == ReasonKVCellsExhausted && !m.scheduled && before.DrainCellsPerSecond <= 0 {
				m.t.Fatalf("%s: KV_CELLS_EXHAUSTED with unknown drain rate", what)
			}
			if re.Reason == ReasonKVCellsExhausted && m.scheduled && m.stepRate <= 0 {
				m.t.Fatalf("%s: KV_CELLS_EXHAUSTED with unknown step rate", what)
			}
			if re.Reason == ReasonQueueFull && before.Queued < m.a.cfg.MaxQueue && !tenantFull {
				m.t.Fatalf("%s: QUEUE_FULL with room in the queue and the tenant's share of it", what)
			}
		}
		what += " -> " + re.Reason
	}
	return what
}

// leave makes waiter i give up as Admit does when its context ends or its
// timeout passes.
func (m *fuzzModel) leave(i int, reason string) {
	w := m.waiters[i]
	m.waiters = append(m.waiters[:i], m.waiters[i+1:]...)
	before := m.a.Stats()
	wasGranted := w.resolved && w.err == nil
	cause := error(ErrQueueTimeout)
	if reason == ReasonCancelled {
		cause = context.Canceled
	}
	var unresolved []*waiter
	for _, o := range m.waiters {
		if !o.resolved {
			unresolved = append(unresolved, o)
		}
	}
	l, err := m.a.abandon(w, reason, cause)
	newlyGranted := uint64(0)
	for _, o := range unresolved {
		if o.resolved && o.lease != nil {
			newlyGranted++
		}
	}
	if l != nil || err == nil {
		m.t.Fatalf("abandon returned lease %v err %v", l, err)
	}
	re := asReject(m.t, err)
	after := m.a.Stats()
	if re.Reason == ReasonDraining {
		if !m.draining || sumRejected(after) != sumRejected(before) {
			m.t.Fatalf("abandon of a drained waiter: %v, counted %d -> %d", err, sumRejected(before), sumRejected(after))
		}
		return
	}
	if re.Reason != reason || after.Rejected[reason] != before.Rejected[reason]+1 {
		m.t.Fatalf("abandon: %v, Rejected[%s] %d -> %d", err, reason, before.Rejected[reason], after.Rejected[reason])
	}
	wantAdmitted := before.Admitted + newlyGranted
	if wasGranted {
		wantAdmitted-- // the rolled-back grant no longer counts
	}
	if after.Admitted != wantAdmitted {
		m.t.Fatalf("abandon: admitted %d -> %d, want %d (granted %v, %d woken)", before.Admitted, after.Admitted, wantAdmitted, wasGranted, newlyGranted)
	}
}

// collect takes the outcome of a resolved waiter as Admit would return it.
func (m *fuzzModel) collect(w *waiter) {
	switch {
	case w.lease != nil && w.err == nil:
		m.checkGrant("granted waiter", w.lease, w.samples(), w.need)
	case w.lease == nil && w.err != nil:
		if re := asReject(m.t, w.err); re.Reason != ReasonDraining {
			m.t.Fatalf("waiter woken with %v", w.err)
		}
	default:
		m.t.Fatalf("resolved waiter with lease %v and err %v", w.lease, w.err)
	}
}

// checkGrant checks a new lease of a request for samples sequences that
// needs need cells: a group of that many leases, reserving need cells
// between them and charged nothing; the model holds them all.
func (m *fuzzModel) checkGrant(what string, l *Lease, samples, need int) {
	group := append([]*Lease{l}, l.Samples()...)
	reserved, charged := 0, 0
	for _, g := range group {
		reserved += g.Reserved()
		charged += g.Charged()
	}
	if len(group) != samples || reserved != need || charged != 0 {
		m.t.Fatalf("%s: %d leases reserve %d charged %d, want %d leases reserving %d", what, len(group), reserved, charged, samples, need)
	}
	m.live = append(m.live, group...)
}

// verify checks the Allocator's invariants and that its ledger matches the
// leases the model holds.
func (m *fuzzModel) verify() error {
	if err := invariants(m.a); err != nil {
		return err
	}
	s := m.a.Stats()
	leases := append([]*Lease(nil), m.live...)
	queued := 0
	for _, w := range m.waiters {
		select {
		case <-w.ready:
			if w.lease != nil {
				leases = append(leases, w.lease)
				leases = append(leases, w.lease.Samples()...)
			}
		default:
			queued++
		}
	}
	used, reserved := 0, 0
	seqs := map[int]bool{}
	for _, l := range leases {
		used += l.Charged()
		reserved += l.Reserved()
		if seqs[l.SeqID()] {
			return fmt.Errorf("sequence %d held by two live leases", l.SeqID())
		}
		seqs[l.SeqID()] = true
	}
	switch {
	case used != s.CellsUsed || reserved != s.CellsReserved:
		return fmt.Errorf("leases hold used %d reserved %d, stats say %d %d", used, reserved, s.CellsUsed, s.CellsReserved)
	case len(leases) != s.Running:
		return fmt.Errorf("%d live leases, stats say %d running", len(leases), s.Running)
	case queued != s.Queued:
		return fmt.Errorf("%d unresolved waiters, stats say %d queued", queued, s.Queued)
	case s.Admitted+sumRejected(s)+uint64(queued) != m.calls:
		return fmt.Errorf("admitted %d + rejected %d + queued %d != %d calls", s.Admitted, sumRejected(s), queued, m.calls)
	}

	// Grants follow each tenant's queue order: no waiter still queued was
	// ahead of one of its tenant granted by this operation. (The order
	// across tenants is checked by checkLocked: the next waiter in the
	// fair order never fits while it waits.)
	var still []*waiter
	for _, w := range m.waiters {
		if !w.resolved {
			still = append(still, w)
		}
	}
	for _, g := range m.queued {
		if !g.resolved || g.lease == nil {
			continue
		}
		for _, u := range still {
			if u.tenant == g.tenant && (u.priority > g.priority || u.priority == g.priority && u.arrival < g.arrival) {
				return fmt.Errorf("waiter (priority %d, #%d) granted ahead of queued (priority %d, #%d)", g.priority, g.arrival, u.priority, u.arrival)
			}
		}
	}
	m.queued = still
	return nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
