package allocator

import (
	"container/heap"
	"context"
	"math"
	"time"
)

// usedAlpha is the weight of the latest finished lease in the moving
// average of the fraction of MaxTokens that leases generate.
const usedAlpha = 0.1

// waitEstimate is an estimate of how long a request would wait in the
// queue before it is admitted.
type waitEstimate struct {
	wait  time.Duration // meaningful when known
	known bool
	// confident is set when a wait longer than the caller's budget is
	// reason enough to refuse the request now (KV_CELLS_EXHAUSTED).
	confident bool
}

// estimateLocked estimates how long w would wait if it were queued now, as
// the newest arrival of its priority in its tenant's queue. w itself need
// not be queued. See the package documentation, section Estimate:
//
//   - without Config.StepRate or Config.ReportsStepRate, the drain-rate estimate, confident once the
//     drain rate is known;
//   - with a StepRate that is known, under PolicyReserve, the schedule
//     simulation, confident;
//   - otherwise the drain-rate estimate, which only informs RetryAfter.
func (a *Allocator) stepRateLocked() float64 {
	if a.cfg.StepRate != nil {
		return a.cfg.StepRate()
	}
	return a.stepRate
}

func (a *Allocator) estimateLocked(w *waiter, now time.Time) waitEstimate {
	scheduled := a.cfg.StepRate != nil || a.cfg.ReportsStepRate
	if scheduled && a.cfg.Policy == PolicyReserve {
		if rate := a.stepRateLocked(); rate > 0 && !math.IsInf(rate, 1) {
			steps := a.scheduleLocked(w, now, rate)
			wait := secondsToDuration(steps / rate)
			return waitEstimate{wait: wait, known: true, confident: wait > 0}
		}
	}
	mustDrain := w.need + a.cellsAheadLocked(w) - a.availLocked()
	est, known := a.drainEstimateLocked(mustDrain, now)
	return waitEstimate{wait: est, known: known, confident: !scheduled && known && mustDrain > 0}
}

// cellsAheadLocked returns, for the drain-rate estimate, the cells the
// waiters admitted before w would take: every preempted sequence, the
// waiters of w's tenant ahead of it, and of every other tenant the waiters
// that, in the fair order, would be admitted while that tenant's load
// stays below the load of w's tenant when w reaches its head (lease ends
// are not foreseen).
func (a *Allocator) cellsAheadLocked(w *waiter) int {
	sum := 0
	for _, r := range a.resumes {
		sum += r.need
	}
	ownHeld := 0
	if t := a.tenants[w.tenant]; t != nil {
		for _, o := range t.queue[:t.insertIndex(w.priority)] {
			sum += o.need
			ownHeld += o.need
		}
		ownHeld += t.held
	}
	target := float64(ownHeld) / a.limitsLocked(w.tenant).Weight
	for _, t := range a.tenants {
		if t.name == w.tenant {
			continue
		}
		weight := a.limitsLocked(t.name).Weight
		held := t.held
		for _, o := range t.queue {
			if float64(held)/weight >= target {
				break
			}
			held += o.need
			sum += o.need
		}
	}
	return sum
}

// cellsQueuedLocked returns the cells every queued request needs at
// admission.
func (a *Allocator) cellsQueuedLocked() int {
	sum := 0
	for _, r := range a.resumes {
		sum += r.need
	}
	for _, t := range a.tenants {
		for _, o := range t.queue {
			sum += o.need
		}
	}
	return sum
}

// drainEstimateLocked returns how long it should take for mustDrain cells
// to be released at the current drain rate, and whether the rate is known.
func (a *Allocator) drainEstimateLocked(mustDrain int, now time.Time) (time.Duration, bool) {
	r := a.drained.rate(a.start, now)
	if r <= 0 {
		return 0, false
	}
	if mustDrain <= 0 {
		return 0, true
	}
	return secondsToDuration(float64(mustDrain) / r), true
}

// prefillSteps returns the decode steps a prompt of n uncomputed tokens
// takes: n / Config.Batch rounded up, or one step without a Batch.
func (a *Allocator) prefillSteps(n int) float64 {
	switch {
	case n <= 0:
		return 0
	case a.cfg.Batch <= 0:
		return 1
	}
	return float64((n + a.cfg.Batch - 1) / a.cfg.Batch)
}

// remainingSteps returns the steps after which running lease l ends at the
// latest, the generation part scaled by frac: the steps to prefill the
// prompt tokens it has not charged yet, plus frac times its reserved cells
// beyond them (the generation budget left).
func (a *Allocator) remainingSteps(l *Lease, frac float64) float64 {
	promptLeft := max(l.fresh-l.charged, 0)
	genLeft := max(l.cells-l.charged-promptLeft, 0)
	return a.prefillSteps(promptLeft) + frac*float64(genLeft)
}

// waiterSteps returns the steps queued waiter w runs once admitted, the
// generation part scaled by frac.
func (a *Allocator) waiterSteps(w *waiter, frac float64) float64 {
	return max(a.prefillSteps(w.tokens), 1) + frac*float64(w.maxTok)
}

// noteUsedLocked folds the fraction of its MaxTokens that a finished lease
// generated into the moving average the schedule scales generation by.
func (a *Allocator) noteUsedLocked(l *Lease) {
	if l.maxTok <= 0 {
		return
	}
	gen := l.genBase + max(l.charged-l.fresh, 0)
	frac := min(float64(gen)/float64(l.maxTok), 1)
	a.usedFrac += usedAlpha * (frac - a.usedFrac)
}

// simEnd is a lease ending in the simulated schedule.
type simEnd struct {
	at    float64 // the step at which its cells come back
	cells int
	ten   *simTenant
	order int // breaks ties between ends at the same step
}

// simEnds is a heap of lease ends, earliest first; its methods implement
// heap.Interface.
type simEnds []simEnd

func (h simEnds) Len() int { return len(h) }
func (h simEnds) Less(i, j int) bool {
	return h[i].at < h[j].at || h[i].at == h[j].at && h[i].order < h[j].order
}
func (h simEnds) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *simEnds) Push(x any)   { *h = append(*h, x.(simEnd)) }
func (h *simEnds) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// simTenant is a tenant in the simulated schedule: its held cells and how
// far its queue has been admitted. The candidate request, if it is of this
// tenant, sits before queue[extraAt].
type simTenant struct {
	held    int
	running int
	lim     TenantLimits // normalized
	queue   []*waiter
	pos     int
	extra   *waiter
	extraAt int
	idx     int // index in the tenant heap; -1 when not in it
}

// head returns the tenant's next waiter in the simulation and its arrival;
// nil when none is left.
func (s *simTenant) head(newest uint64) (*waiter, uint64) {
	if s.extra != nil && s.pos == s.extraAt {
		return s.extra, newest
	}
	if s.pos < len(s.queue) {
		return s.queue[s.pos], s.queue[s.pos].arrival
	}
	return nil, 0
}

// advance moves past the head, which must not be the candidate: the
// simulation ends when the candidate is admitted.
func (s *simTenant) advance() { s.pos++ }

// simTenants is a heap of the tenants pumping may pick, in pick order; its
// methods implement heap.Interface.
type simTenants struct {
	ts     []*simTenant
	newest uint64
}

func (h *simTenants) Len() int { return len(h.ts) }
func (h *simTenants) Less(i, j int) bool {
	a, b := h.ts[i], h.ts[j]
	la, lb := float64(a.held)/a.lim.Weight, float64(b.held)/b.lim.Weight
	if la != lb {
		return la < lb
	}
	_, aa := a.head(h.newest)
	_, ab := b.head(h.newest)
	return aa < ab
}
func (h *simTenants) Swap(i, j int) {
	h.ts[i], h.ts[j] = h.ts[j], h.ts[i]
	h.ts[i].idx, h.ts[j].idx = i, j
}
func (h *simTenants) Push(x any) {
	s := x.(*simTenant)
	s.idx = len(h.ts)
	h.ts = append(h.ts, s)
}
func (h *simTenants) Pop() any {
	s := h.ts[len(h.ts)-1]
	h.ts = h.ts[:len(h.ts)-1]
	s.idx = -1
	return s
}

// scheduleLocked simulates the schedule under the reserve policy and
// returns the step, counted from now, at which w would be admitted were it
// queued now as the newest arrival of its priority in its tenant's queue;
// +Inf if the simulation never admits it.
//
// Every running lease ends after remainingSteps, scaled by the mean
// fraction of MaxTokens that finished leases generated; its cells come
// back then. At each end the waiters are admitted as pumping does —
// preempted sequences first, then the fair pick among tenants below their
// cap — while the next fits the free and evictable cells and MaxRunning,
// and each admitted waiter runs for waiterSteps. A waiter ahead of w whose
// deadline passes before it is admitted leaves the queue. Prefix hits and
// cells that stay pinned by shared prefixes are not foreseen.
//
// Each waiter is admitted and each lease ends at most once, so the
// simulation takes O((running + queued) log n).
func (a *Allocator) scheduleLocked(w *waiter, now time.Time, rate float64) float64 {
	frac := a.usedFrac
	avail := a.availLocked()
	running := a.running
	newest := a.arrivals

	sims := make(map[string]*simTenant, len(a.tenants)+1)
	simOf := func(name string) *simTenant {
		s := sims[name]
		if s == nil {
			lim := a.limitsLocked(name)
			s = &simTenant{lim: lim, idx: -1}
			if t := a.tenants[name]; t != nil {
				s.held, s.running, s.queue = t.held, t.running, t.queue
			}
			sims[name] = s
		}
		return s
	}
	own := simOf(w.tenant)
	own.extra, own.extraAt = w, 0
	if t := a.tenants[w.tenant]; t != nil {
		own.extraAt = t.insertIndex(w.priority)
	}

	var ends simEnds
	order := MaxSequencesLimit
	// rest is the cells neither available now nor any running lease's own:
	// shared prefixes that running or pinning sequences hold. They are
	// counted back only once every lease has ended.
	rest := a.cfg.Cells - avail
	for _, e := range a.entries {
		if l := e.lease; l != nil {
			ends = append(ends, simEnd{at: a.remainingSteps(l, frac), cells: l.cells, ten: simOf(l.tenant), order: l.seq})
			rest -= l.cells
		}
	}
	heap.Init(&ends)

	picks := &simTenants{newest: newest}
	for _, t := range a.tenants {
		if len(t.queue) > 0 {
			simOf(t.name)
		}
	}
	eligible := func(s *simTenant) bool {
		h, _ := s.head(newest)
		return h != nil && s.lim.belowCap(s.held, a.cfg.Cells, s.running, a.cfg.MaxRunning)
	}
	for _, s := range sims {
		if eligible(s) {
			heap.Push(picks, s)
		}
	}
	// refresh puts s where it belongs in the pick heap after a change.
	refresh := func(s *simTenant) {
		switch in, ok := s.idx >= 0, eligible(s); {
		case in && ok:
			heap.Fix(picks, s.idx)
		case in:
			heap.Remove(picks, s.idx)
		case ok:
			heap.Push(picks, s)
		}
	}
	admit := func(at float64, x *waiter, s *simTenant) {
		avail -= x.need
		running++
		s.held += x.need
		s.running++
		order++
		heap.Push(&ends, simEnd{at: at + a.waiterSteps(x, frac), cells: x.need, ten: s, order: order})
	}
	expired := func(x *waiter, at float64) bool {
		return !x.expires.IsZero() && x.expires.Sub(now).Seconds()*rate <= at
	}

	t, ri := 0.0, 0
	for {
		for ri < len(a.resumes) {
			r := a.resumes[ri]
			if r.need > avail || running >= a.cfg.MaxRunning {
				break
			}
			s := simOf(r.tenant)
			admit(t, r, s)
			refresh(s)
			ri++
		}
		for ri == len(a.resumes) && picks.Len() > 0 {
			s := picks.ts[0]
			x, _ := s.head(newest)
			if x != w && expired(x, t) {
				s.advance()
				refresh(s)
				continue
			}
			if x.need > avail || running >= a.cfg.MaxRunning {
				break
			}
			if x == w {
				return t
			}
			s.advance()
			admit(t, x, s)
			refresh(s)
		}
		if ends.Len() == 0 {
			if rest <= 0 {
				return math.Inf(1)
			}
			avail, rest = avail+rest, 0
			continue
		}
		e := heap.Pop(&ends).(simEnd)
		t = max(t, e.at)
		avail += e.cells
		running--
		e.ten.held -= e.cells
		e.ten.running--
		refresh(e.ten)
	}
}

// retryAfter clamps an estimate to [MinRetryDelay, MaxRetryDelay]; an
// unknown estimate counts as one second.
func (a *Allocator) retryAfter(e waitEstimate) time.Duration {
	est := e.wait
	if !e.known {
		est = unknownRateRetry
	}
	return min(max(est, a.cfg.MinRetryDelay), a.cfg.MaxRetryDelay)
}

// waitBudget returns how long the caller is prepared to wait from now: the
// time left until ctx's deadline or queueTimeout, whichever is shorter. ok
// is false when neither bounds the wait.
func waitBudget(ctx context.Context, queueTimeout time.Duration, now time.Time) (left time.Duration, ok bool) {
	if d, has := ctx.Deadline(); has {
		left, ok = d.Sub(now), true
	}
	if queueTimeout > 0 && (!ok || queueTimeout < left) {
		left, ok = queueTimeout, true
	}
	return left, ok
}

// deadlineOf returns when the caller stops waiting, by ctx's deadline or
// queueTimeout from now, whichever is sooner; zero when neither bounds it.
func deadlineOf(ctx context.Context, queueTimeout time.Duration, now time.Time) time.Time {
	left, ok := waitBudget(ctx, queueTimeout, now)
	if !ok {
		return time.Time{}
	}
	return now.Add(left)
}
