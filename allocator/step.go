package allocator

import (
	"errors"
	"math"
	"slices"
)

// Step is one decode step's exchange between the KV cache's owner (the
// decode worker) and the Allocator, made by one call to Apply under one
// lock: what the owner did since its last Apply, and what it needs for its
// next decode. Data flows one way through it: the owner reports, the
// Allocator answers with return values, and never calls the owner.
//
// The owner fills the inputs, calls Apply, carries out the outputs in the
// order they are listed (Evicted, then the cells of Ends that are not Kept
// and of Preempted that are not kept, then Resumed), and reuses the Step
// for the next step: Apply resets the outputs and keeps no reference to
// the Step.
type Step struct {
	// Copied lists leases whose cached prefix (Lease.Prepared) the owner
	// has copied, so that the source may be evicted again.
	Copied []*Lease
	// Commits lists tokens that entered the cache, per lease, in order.
	Commits []Commit
	// Ends lists sequences that ended, in order.
	Ends []End
	// Grow lists leases that need a cell for their next token, in the
	// order the owner will decode them.
	Grow []*Lease
	// Running lists the leases the owner runs, oldest first, with their
	// tokens (prompt and generated): the candidates for preemption when a
	// Grow finds no cell under PolicyOptimistic. The victim is a sequence
	// of the most loaded tenant (Lease.Load), among those the lowest
	// priority, among those the newest. Members of a sample group
	// (Request.N > 1) are never victims: the group reserved its cells.
	Running []Candidate
	// StepRate is the owner's measured decode steps per second while busy,
	// used with Config.ReportsStepRate; 0 leaves the last one.
	StepRate float64

	// Evicted lists the cached sequences the Allocator evicted since the
	// last Apply: the owner removes their cells before anything else.
	Evicted []int
	// Kept[i] tells whether the cells of Ends[i] stay in the cache as a
	// prefix cache entry; otherwise the owner removes them.
	Kept []bool
	// Failed lists commits, ends and grows that failed, with why: the owner
	// ends those sequences with the error.
	Failed []Failure
	// Preempted lists the leases requeued to free cells for Grow: the owner
	// pauses them, removing their cells unless Keep, and runs them again
	// when Resumed lists them.
	Preempted []Preemption
	// Resumed lists requeued leases admitted again since the last Apply, in
	// order: the owner starts them anew with their new Lease.Prepared.
	Resumed []*Lease
}

// Commit is tokens of one lease that entered the cache.
type Commit struct {
	Lease  *Lease
	Tokens []int32
}

// End is a sequence that ended. Normal ends (Finish) may leave the cells
// as prefix cache; others (Release) free them.
type End struct {
	Lease  *Lease
	Normal bool
}

// Candidate is a running lease that may be preempted, with its tokens.
type Candidate struct {
	Lease  *Lease
	Tokens []int32
}

// Failure is a lease whose commit, end or growth failed.
type Failure struct {
	Lease *Lease
	Err   error
}

// Preemption is a lease requeued by Apply. Keep tells whether its cells
// stay in the cache (as for Kept).
type Preemption struct {
	Lease *Lease
	Keep  bool
}

// Apply takes one step's report and answers it, under one lock: it marks
// prefixes copied, charges the commits, ends the ended leases, and finds a
// cell for each Grow, preempting Running sequences when the pool is dry
// under PolicyOptimistic. A Grow whose lease was preempted in the same call
// is skipped. Only then does it admit waiters, the ones a Grow yielded to
// first, and no lease it preempted resumes before the next Apply. It then
// reports the evictions and resumes since the last Apply. Apply does not
// block.
func (a *Allocator) Apply(s *Step) {
	s.Evicted, s.Kept, s.Failed, s.Preempted, s.Resumed = s.Evicted[:0], s.Kept[:0], s.Failed[:0], s.Preempted[:0], s.Resumed[:0]
	a.mu.Lock()
	defer a.mu.Unlock()
	a.applies++
	// The queue is pumped once, after the Grows: the running sequences'
	// next tokens come before admitting or resuming waiters.
	a.deferPump = true
	if s.StepRate > 0 && !math.IsNaN(s.StepRate) {
		a.stepRate = s.StepRate
	}
	for _, l := range s.Copied {
		l.copiedLocked()
	}
	for _, c := range s.Commits {
		if err := c.Lease.commitTokensLocked(c.Tokens); err != nil {
			s.Failed = append(s.Failed, Failure{c.Lease, err})
		}
	}
	for _, e := range s.Ends {
		s.Kept = append(s.Kept, e.Lease.endLocked(e.Normal))
	}
	for _, l := range s.Grow {
		a.growStepLocked(s, l)
	}
	a.deferPump = false
	// What the Grows left goes first to the waiters a Grow yielded to,
	// whom its preemptions were for, then to the other waiters, but not
	// to the sequences this Apply preempted: one that took back the cells
	// its preemption freed would grow short, or yield, again at the next
	// step, and be preempted again before making progress. The next Apply
	// lets them resume; the owner is woken for it.
	now := a.now()
	for _, w := range a.yieldedTo {
		if !w.resolved {
			a.admitWaiterLocked(w, now)
		}
	}
	a.holdPreempted = true
	a.pumpLocked()
	a.holdPreempted = false
	if len(s.Preempted) > 0 && slices.ContainsFunc(a.resumes, func(w *waiter) bool { return w.resume.mark == a.applies }) {
		select {
		case a.wake <- struct{}{}:
		default:
		}
	}
	clear(a.yieldedTo)
	a.yieldedTo = a.yieldedTo[:0]
	for _, id := range a.evicted {
		a.evictSet[id/64] &^= 1 << (id % 64)
	}
	s.Evicted = append(s.Evicted, a.evicted...)
	a.evicted = a.evicted[:0]
	s.Resumed = append(s.Resumed, a.resumed...)
	clear(a.resumed)
	a.resumed = a.resumed[:0]
}

// growStepLocked finds a cell for l's next token, preempting a running
// sequence, and retrying, while none is free.
func (a *Allocator) growStepLocked(s *Step, l *Lease) {
	for l.mark != a.applies {
		err := l.growLocked(1)
		if err == nil {
			return
		}
		if !errors.Is(err, ErrNoCells) {
			s.Failed = append(s.Failed, Failure{l, err})
			return
		}
		if w := a.yieldToLocked(l.tenant, 1); w != nil && !slices.Contains(a.yieldedTo, w) {
			a.yieldedTo = append(a.yieldedTo, w)
		}
		v := a.victimLocked(s.Running)
		if v < 0 {
			s.Failed = append(s.Failed, Failure{l, err})
			return
		}
		c := s.Running[v]
		c.Lease.stepped = true
		keep, _, err := c.Lease.requeueLocked(c.Tokens)
		c.Lease.mark = a.applies
		if err != nil {
			s.Failed = append(s.Failed, Failure{c.Lease, err})
			continue
		}
		s.Preempted = append(s.Preempted, Preemption{c.Lease, keep})
	}
}

// victimLocked returns the index in running of the sequence to preempt,
// or -1 when none is left: of the sequences not yet preempted by this
// Apply, those of the most loaded tenant, among them the lowest priority,
// and among those the newest. One tenant's requests therefore cannot
// preempt another tenant's while that one is within its share, and
// priority orders only within a tenant.
func (a *Allocator) victimLocked(running []Candidate) int {
	v := -1
	var vLoad float64
	var vPrio int32
	// From the newest: later ones replace v only when strictly better, so
	// ties go to the most recently started.
	for i := len(running) - 1; i >= 0; i-- {
		l := running[i].Lease
		if l.mark == a.applies || l.released || l.entry == nil || l.inGroup() {
			continue // a sample group holds its whole reservation: never a victim
		}
		load := a.loadLocked(l.tenant)
		if math.IsNaN(load) {
			load = math.Inf(1)
		}
		if v < 0 || load > vLoad || (load == vLoad && l.priority < vPrio) {
			v, vLoad, vPrio = i, load, l.priority
		}
	}
	return v
}

// noteEvictedLocked records an eviction for the next Apply. A sequence
// evicted again before the owner heard of the first eviction is recorded
// once: removing its cells once removes them all.
func (a *Allocator) noteEvictedLocked(seq int) {
	if a.evictSet[seq/64]&(1<<(seq%64)) != 0 {
		return
	}
	a.evictSet[seq/64] |= 1 << (seq % 64)
	a.evicted = append(a.evicted, seq)
}

// Resumes returns a channel that receives a value when a lease requeued
// by Apply is admitted again, or may be at the next Apply: an owner with
// nothing to run waits on it beside its other work, then calls Apply to
// learn which.
func (a *Allocator) Resumes() <-chan struct{} { return a.wake }

// PrefixCache reports whether the Allocator keeps a prefix cache.
func (a *Allocator) PrefixCache() bool { return a.cfg.PrefixCache }

// Policy returns the admission policy.
func (a *Allocator) Policy() Policy { return a.cfg.Policy }
