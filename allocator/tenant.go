package allocator

import (
	"math"
	"slices"
	"time"
)

// TenantLimits are the limits of one tenant; Config.Tenants returns them.
// Invalid values (NaN, infinite or negative) are treated as their zero
// value's meaning.
type TenantLimits struct {
	// Weight is the tenant's share weight; 0 means 1. Must not be negative.
	Weight float64
	// MaxShare caps the fraction of Config.Cells the tenant's running
	// leases may hold (their reserved + charged cells; prefix-cache cells
	// are not counted), and the fraction of Config.MaxRunning sequences
	// they may be: under optimistic admission a lease holds few cells at
	// first, and a tenant could otherwise take every running slot. 0 means
	// 1 (no cap). A tenant below its cap may still be admitted when that
	// admission takes it above the cap, so a tenant can always run at least
	// one request that fits the pool.
	MaxShare float64
	// MaxQueued bounds the tenant's queued requests; 0 means no bound beyond
	// Config.MaxQueue. Past it the request is refused with QUEUE_FULL (with
	// a RetryAfter estimate as for a full queue).
	MaxQueued int
}

// DefaultTenantLimits returns the limits every tenant has when
// Config.Tenants is nil: weight 1, no cap on its share and no bound on its
// queued requests beyond Config.MaxQueue. It can be used as Config.Tenants.
func DefaultTenantLimits(string) TenantLimits {
	return TenantLimits{Weight: 1, MaxShare: 1}
}

// normalized returns l with every invalid or zero value replaced by its
// default: Weight 1, MaxShare 1, MaxQueued 0 (no bound).
func (l TenantLimits) normalized() TenantLimits {
	if !(l.Weight > 0) || math.IsInf(l.Weight, 1) {
		l.Weight = 1
	}
	if !(l.MaxShare > 0) || l.MaxShare > 1 {
		l.MaxShare = 1
	}
	l.MaxQueued = max(l.MaxQueued, 0)
	return l
}

// belowCap reports whether a tenant holding held of cells cells and running
// of maxRunning sequences is below its MaxShare cap on both, and so may be
// admitted. l must be normalized.
func (l TenantLimits) belowCap(held, cells, running, maxRunning int) bool {
	return l.MaxShare >= 1 ||
		float64(held) < l.MaxShare*float64(cells) && float64(running) < l.MaxShare*float64(maxRunning)
}

// TenantStats is the part of a Stats snapshot about one tenant.
type TenantStats struct {
	// Running is the number of leases of the tenant held, not counting
	// preempted ones waiting to resume.
	Running int
	// CellsHeld is the cells the tenant's running leases hold: reserved
	// plus charged, not counting cells shared from the prefix cache.
	CellsHeld int
	// Queued is the number of the tenant's requests waiting, preempted
	// sequences waiting to resume included.
	Queued int
}

// tenantState is the Allocator's state of one tenant. It exists while the
// tenant has running leases or queued requests.
type tenantState struct {
	name    string
	queue   []*waiter // priority descending, then arrival; resumes excluded
	held    int       // Lease.cells of the tenant's running leases
	running int       // the tenant's running leases
}

// insertIndex returns where a request of priority p goes in the tenant's
// queue: after every waiter of priority >= p.
func (t *tenantState) insertIndex(p int32) int {
	lo, hi := 0, len(t.queue)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if t.queue[m].priority >= p {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo
}

// limitsLocked returns the normalized limits of tenant name.
func (a *Allocator) limitsLocked(name string) TenantLimits {
	if a.cfg.Tenants == nil {
		return DefaultTenantLimits(name)
	}
	return a.cfg.Tenants(name).normalized()
}

// tenantLocked returns the state of tenant name, creating it if need be.
func (a *Allocator) tenantLocked(name string) *tenantState {
	t := a.tenants[name]
	if t == nil {
		t = &tenantState{name: name}
		a.tenants[name] = t
	}
	return t
}

// tidyTenantLocked drops the state of tenant name once it has neither
// running leases nor queued requests.
func (a *Allocator) tidyTenantLocked(name string) {
	if t := a.tenants[name]; t != nil && t.running == 0 && len(t.queue) == 0 {
		delete(a.tenants, name)
	}
}

// loadLocked returns a tenant's cells held by running leases divided by its
// weight.
func (a *Allocator) loadLocked(name string) float64 {
	t := a.tenants[name]
	if t == nil {
		return 0
	}
	return float64(t.held) / a.limitsLocked(name).Weight
}

// wouldPickLocked reports whether a new request w, were it queued now, would
// be the waiter pumping admits next: no preempted sequence waits, w's
// tenant is below its cap, w goes ahead of its tenant's queued requests,
// and its tenant's load is below that of every other tenant pumping could
// pick (a tie goes to the other tenant, whose head arrived first).
func (a *Allocator) wouldPickLocked(w *waiter) bool {
	if len(a.resumes) > 0 {
		return false
	}
	own := a.tenants[w.tenant]
	held, running := 0, 0
	if own != nil {
		running = own.running
		if len(own.queue) > 0 && own.queue[0].priority >= w.priority {
			return false
		}
		held = own.held
	}
	lim := a.limitsLocked(w.tenant)
	if !lim.belowCap(held, a.cfg.Cells, running, a.cfg.MaxRunning) {
		return false
	}
	load := float64(held) / lim.Weight
	for _, t := range a.tenants {
		if t == own || len(t.queue) == 0 {
			continue
		}
		tl := a.limitsLocked(t.name)
		if tl.belowCap(t.held, a.cfg.Cells, t.running, a.cfg.MaxRunning) && float64(t.held)/tl.Weight <= load {
			return false
		}
	}
	return true
}

// enqueueLocked puts w in the queue: its tenant's queue, or, for a
// preempted sequence, the back of the resumes.
func (a *Allocator) enqueueLocked(w *waiter) {
	w.arrival = a.arrivals
	a.arrivals++
	a.queued++
	if w.resume != nil {
		a.resumes = append(a.resumes, w)
		return
	}
	t := a.tenantLocked(w.tenant)
	t.queue = slices.Insert(t.queue, t.insertIndex(w.priority), w)
}

// dequeueLocked takes a queued w out of the queue.
func (a *Allocator) dequeueLocked(w *waiter) {
	a.queued--
	if w.resume != nil {
		i := slices.Index(a.resumes, w)
		a.resumes = slices.Delete(a.resumes, i, i+1)
		return
	}
	t := a.tenants[w.tenant]
	i := slices.Index(t.queue, w)
	t.queue = slices.Delete(t.queue, i, i+1)
	a.tidyTenantLocked(w.tenant)
}

// headLocked returns the waiter tenant name would have admitted next: its
// earliest preempted sequence waiting to resume (not one the current Apply
// preempted, while Apply holds those back), else the head of its queue;
// nil when it has neither.
func (a *Allocator) headLocked(name string) *waiter {
	for _, r := range a.resumes {
		if r.tenant == name && !(a.holdPreempted && r.resume.mark == a.applies) {
			return r
		}
	}
	if t := a.tenants[name]; t != nil && len(t.queue) > 0 {
		return t.queue[0]
	}
	return nil
}

// nextLocked returns the waiter pumping admits next: of the tenants with
// waiters that are below their MaxShare cap, the one with the smallest load
// (cells held / weight), and among equal loads the one whose head arrived
// first (a preempted sequence waiting to resume counting as first); of
// that tenant, its earliest preempted sequence waiting to resume,
// else the head of its queue. Resumes thus go first within their tenant,
// but never ahead of a less loaded tenant: under optimistic admission a
// tenant that preempts its own sequences would otherwise keep the cells
// they free. It returns nil when no tenant qualifies.
func (a *Allocator) nextLocked() *waiter {
	var best *waiter
	bestLoad := 0.0
	consider := func(name string) {
		w := a.headLocked(name)
		if w == nil {
			return
		}
		held, running := 0, 0
		if t := a.tenants[name]; t != nil {
			held, running = t.held, t.running
		}
		lim := a.limitsLocked(name)
		if !lim.belowCap(held, a.cfg.Cells, running, a.cfg.MaxRunning) {
			return
		}
		load := float64(held) / lim.Weight
		if best == nil || load < bestLoad || load == bestLoad && before(w, best) {
			best, bestLoad = w, load
		}
	}
	for _, r := range a.resumes {
		if _, ok := a.tenants[r.tenant]; !ok {
			consider(r.tenant) // a tenant whose only waiters are resumes
		}
	}
	for name := range a.tenants {
		consider(name)
	}
	return best
}

// before reports whether head w goes before head v of an equally loaded
// tenant: a preempted sequence, a running stream, before a new request,
// and otherwise the earlier arrival.
func before(w, v *waiter) bool {
	if (w.resume != nil) != (v.resume != nil) {
		return w.resume != nil
	}
	return w.arrival < v.arrival
}

// pumpLocked admits waiters while the next one (nextLocked) fits. It stops
// at the first waiter that does not fit, so that a large request is not
// starved by small ones.
func (a *Allocator) pumpLocked() {
	if a.queued == 0 || a.deferPump {
		return
	}
	now := a.now()
	for {
		w := a.nextLocked()
		if w == nil || !a.admitWaiterLocked(w, now) {
			return
		}
	}
}

// admitWaiterLocked admits w, if it is queued and fits now, taking it out
// of the queue, and reports whether it did.
func (a *Allocator) admitWaiterLocked(w *waiter, now time.Time) bool {
	queue := &a.resumes
	if w.resume == nil {
		t := a.tenants[w.tenant]
		if t == nil {
			return false
		}
		queue = &t.queue
	}
	i := slices.Index(*queue, w)
	if i < 0 {
		return false
	}
	l := a.tryGrantLocked(w, now)
	if l == nil {
		return false
	}
	*queue = slices.Delete(*queue, i, i+1)
	a.queued--
	w.lease, w.resolved = l, true
	close(w.ready)
	return true
}

// yieldLocked reports whether a lease of tenant name must not grow by more
// cells because another tenant's next waiter needs them and the shares say
// that tenant comes first: name holds more than its fair share of the pool
// and the waiter's tenant, with the waiter admitted, would still hold less
// than its own. Under optimistic admission growth would otherwise take
// every cell that preemption frees, and the waiter would never fit. Two
// tenants within their shares never make each other yield, so they cannot
// preempt each other back and forth; nor can two tenants whose sequences
// each outgrow their share: a waiter that would hold its share or more
// once admitted is not yielded to, because at its first growth it would
// yield back, before either made progress.
func (a *Allocator) yieldLocked(name string, more int) bool {
	return a.yieldToLocked(name, more) != nil
}

// yieldToLocked returns the waiter a lease of tenant name growing by more
// cells must yield to (see yieldLocked), or nil.
func (a *Allocator) yieldToLocked(name string, more int) *waiter {
	w := a.nextLocked()
	if w == nil || w.tenant == name || more+w.need <= a.availLocked() {
		return nil
	}
	if a.heldLocked(name)+more > a.fairShareLocked(name) && a.heldLocked(w.tenant)+w.need < a.fairShareLocked(w.tenant) {
		return w
	}
	return nil
}

// heldLocked returns the cells tenant name's running leases hold.
func (a *Allocator) heldLocked(name string) int {
	if t := a.tenants[name]; t != nil {
		return t.held
	}
	return 0
}

// fairShareLocked returns tenant name's fair share of the pool: the cells
// in proportion to its weight among the tenants with running or waiting
// requests (name included).
func (a *Allocator) fairShareLocked(name string) int {
	total := a.limitsLocked(name).Weight
	for n := range a.tenants {
		if n != name {
			total += a.limitsLocked(n).Weight
		}
	}
	for _, r := range a.resumes {
		if _, ok := a.tenants[r.tenant]; !ok && r.tenant != name {
			total += a.limitsLocked(r.tenant).Weight // counted once per resume: an upper bound
		}
	}
	return int(float64(a.cfg.Cells) * a.limitsLocked(name).Weight / total)
}
