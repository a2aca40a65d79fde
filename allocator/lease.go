package allocator

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"time"
)

// ErrNoCells is returned by Lease.Grow under PolicyOptimistic when no cell
// is free even after evicting the cache: the caller must preempt a running
// sequence (Lease.Requeue) and try again.
var ErrNoCells = errors.New("allocator: no free cells")

// Lease is an admitted sequence's share of the pool: a sequence id and the
// cells reserved for it, charged as its tokens enter the cache. The holder
// must end it with Finish or Release, for whatever reason the sequence
// ends. All methods are safe for concurrent use.
type Lease struct {
	a        *Allocator
	admitted time.Time
	waited   time.Duration
	noCache  bool
	priority int32
	tenant   string
	salt     string
	maxTok   int // Request.MaxTokens
	prompt   int // Request.PromptTokens

	// Guarded by a.mu.
	seq      int
	cells    int // cells reserved over the lease's life: charged + still reserved
	charged  int
	released bool
	entry    *entry // the running entry; nil once ended or while requeued
	src      *entry // the entry to copy the prefix from
	prefix   int
	copied   bool
	waiter   *waiter // set while requeued
	fresh    int     // prompt tokens of this run not shared from the cache
	genBase  int     // tokens generated before the last preemption
	stepped  bool    // requeued by Apply: its resume is reported by Apply
	mark     uint64  // the Apply that last preempted it

	// A sample group's leader lists its followers in samples; a follower
	// names its leader and its index (1..N-1). Set at the grant, final.
	samples []*Lease
	leader  *Lease
	index   int
}

// Samples returns the follower leases of a sample group (Request.N > 1),
// samples 1..N-1 in order, each with a sequence id of its own; nil for a
// single sequence or a follower. A follower shares the leader's prompt:
// the KV cache's owner copies the leader's positions [0, PromptTokens)
// to it (llama_memory_seq_cp) once the leader's prompt is decoded, and
// charges it only the tokens it generates. Followers never enter the
// prefix cache, are never preempted, and must end before their leader: the
// leader's cells stay charged until its own Finish or Release, so that the
// prompt cells the followers share are never counted free while one of
// them still holds them. Ending the leader first releases the followers
// still running with it.
func (l *Lease) Samples() []*Lease { return l.samples }

// SampleIndex returns the lease's sample index in its group: 0 for a
// leader or a single sequence, 1..N-1 for a follower.
func (l *Lease) SampleIndex() int { return l.index }

// inGroup reports whether l belongs to a sample group.
func (l *Lease) inGroup() bool { return l.leader != nil || len(l.samples) > 0 }

// SeqID returns the sequence id held by the lease. It changes when a
// requeued lease runs again.
func (l *Lease) SeqID() int {
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	return l.seq
}

// Prefix returns the sequence whose first n cells the new sequence shares:
// the KV cache's owner copies positions [0, n) from src to SeqID (in a
// unified llama.cpp cache, llama_memory_seq_cp only tags the cells), then
// calls Copied. n is 0 when nothing is shared.
func (l *Lease) Prefix() (src, n int) {
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	if l.src == nil || l.copied {
		return -1, l.prefix
	}
	return l.src.seq, l.prefix
}

// CachedTokens returns the prompt tokens shared from the prefix cache.
func (l *Lease) CachedTokens() int {
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	return l.prefix
}

// Copied reports that the prefix has been copied, so that its source may be
// evicted again.
func (l *Lease) Copied() {
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	l.copiedLocked()
}

func (l *Lease) copiedLocked() {
	a := l.a
	if !l.copied {
		l.copied = true
		a.unpinLocked(l.src)
		// The source may have become evictable: a waiter may fit now.
		a.pumpLocked()
	}
}

// Reserved returns the cells still reserved but not yet charged; 0 after
// Release.
func (l *Lease) Reserved() int {
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	if l.released || l.entry == nil {
		return 0
	}
	return l.cells - l.charged
}

// Charged returns the cells charged so far; after Release it keeps its
// final value.
func (l *Lease) Charged() int {
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	return l.charged
}

// anonymousRun is a source of anonymous token ids for Charge.
var anonymousRun = func() []int32 {
	s := make([]int32, 256)
	for i := range s {
		s[i] = anonymous
	}
	return s
}()

// Charge moves n cells from reserved to used as n tokens enter the cache,
// without naming the tokens: such cells are never shared. The error wraps
// ErrOverCharge if that would exceed the reservation, ErrInvalidRequest if
// n is negative, and ErrReleased after Release; the ledger is unchanged on
// error.
func (l *Lease) Charge(n int) error {
	if n < 0 {
		return fmt.Errorf("%w: charge of %d cells", ErrInvalidRequest, n)
	}
	a := l.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := l.checkChargeLocked(n); err != nil {
		return err
	}
	for n > 0 {
		k := min(n, len(anonymousRun))
		l.commitLocked(anonymousRun[:k])
		n -= k
	}
	return nil
}

// Commit records that tokens entered the cache at the end of the
// sequence: their cells move from reserved to used, and they become a
// prefix later requests can share. Errors are as for Charge.
func (l *Lease) Commit(tokens []int32) error {
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	return l.commitTokensLocked(tokens)
}

func (l *Lease) commitTokensLocked(tokens []int32) error {
	a := l.a
	if err := l.checkChargeLocked(len(tokens)); err != nil {
		return err
	}
	if l.noCache || !a.cfg.PrefixCache {
		for len(tokens) > 0 {
			k := min(len(tokens), len(anonymousRun))
			l.commitLocked(anonymousRun[:k])
			tokens = tokens[k:]
		}
		return nil
	}
	l.commitLocked(tokens)
	return nil
}

func (l *Lease) checkChargeLocked(n int) error {
	if l.released || l.entry == nil {
		return fmt.Errorf("%w: charge of %d cells to sequence %d", ErrReleased, n, l.seq)
	}
	if left := l.cells - l.charged; n > left {
		return fmt.Errorf("%w: charge of %d cells to sequence %d with %d of %d left", ErrOverCharge, n, l.seq, left, l.cells)
	}
	return nil
}

func (l *Lease) commitLocked(tokens []int32) {
	a := l.a
	l.charged += len(tokens)
	a.reserved -= len(tokens)
	a.tree.appendTokens(l.entry, tokens)
	a.used = a.tree.cells
}

// Grow reserves n more cells for tokens about to enter the cache. Under
// PolicyReserve the admission reserved them already, and Grow only checks
// that. Under PolicyOptimistic it takes free cells, evicting cache if
// needed, and returns ErrNoCells when there are none, or when the next
// waiter to be admitted belongs to a less loaded tenant and would no
// longer fit: the engine then preempts a sequence of the most loaded
// tenant, so that growth cannot keep a fairer tenant out.
func (l *Lease) Grow(n int) error {
	if n < 0 {
		return fmt.Errorf("%w: grow by %d cells", ErrInvalidRequest, n)
	}
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	return l.growLocked(n)
}

func (l *Lease) growLocked(n int) error {
	a := l.a
	if l.released || l.entry == nil {
		return fmt.Errorf("%w: grow sequence %d", ErrReleased, l.seq)
	}
	left := l.cells - l.charged
	if n <= left {
		return nil
	}
	if a.cfg.Policy != PolicyOptimistic {
		return fmt.Errorf("%w: grow by %d cells with %d of %d left", ErrOverCharge, n, left, l.cells)
	}
	more := n - left
	if more > a.availLocked() || a.yieldLocked(l.tenant, more) {
		return ErrNoCells
	}
	a.makeRoomLocked(more)
	l.cells += more
	a.reserved += more
	a.tenants[l.tenant].held += more
	return nil
}

// Finish ends the sequence normally. It returns true when its cells stay
// in the KV cache as a prefix cache entry; otherwise the caller must remove
// the sequence's cells from the KV cache. Finish and Release are
// idempotent; only the first call of either counts.
func (l *Lease) Finish() (keep bool) {
	return l.end(true)
}

// Release returns every cell of the lease, used and reserved, and its
// sequence id, and admits waiters that now fit; the caller removes the
// sequence from the KV cache. It is idempotent and safe to call
// concurrently with any other method.
func (l *Lease) Release() {
	l.end(false)
}

func (l *Lease) end(keep bool) bool {
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	return l.endLocked(keep)
}

func (l *Lease) endLocked(keep bool) bool {
	a := l.a
	if l.released {
		return false
	}
	l.released = true
	if l.waiter != nil { // requeued: it holds nothing but its queue place
		a.dequeueLocked(l.waiter)
		l.waiter = nil
		a.pumpLocked()
		a.notifyIdleLocked()
		return false
	}
	// The leader's prompt cells are its followers' too: those still
	// running end with it.
	for _, f := range l.samples {
		if !f.released {
			f.released = true
			a.noteUsedLocked(f)
			a.endLocked(f, false, true)
		}
	}
	a.noteUsedLocked(l)
	kept := a.endLocked(l, keep, true)
	a.pumpLocked()
	a.notifyIdleLocked()
	return kept
}

// Requeue preempts the running sequence to free its cells: its reservation
// is returned and its cells become cache (or are freed without a cache),
// and it waits at the front of the queue, ahead of every tenant's queue and
// behind the sequences preempted before it, to run again with tokens — its
// prompt and the tokens generated so far — as its new prompt. It keeps its
// tenant and prefix-cache partition. It returns whether its cells stay in
// the KV cache, as Finish does, and a channel that is closed when the
// sequence may run again, with a new sequence id and prefix (SeqID,
// Prefix).
func (l *Lease) Requeue(tokens []int32) (keep bool, resumed <-chan struct{}, err error) {
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	keep, resumed, err = l.requeueLocked(tokens)
	if err == nil {
		l.a.pumpLocked()
	}
	return keep, resumed, err
}

// requeueLocked requeues l without pumping the queue: the caller pumps.
// Apply pumps only after every Grow, so that a sequence it preempts cannot
// be admitted again with the very cells its preemption freed for a Grow.
func (l *Lease) requeueLocked(tokens []int32) (keep bool, resumed <-chan struct{}, err error) {
	a := l.a
	if l.released || l.entry == nil {
		return false, nil, fmt.Errorf("%w: requeue sequence %d", ErrReleased, l.seq)
	}
	if len(tokens) == 0 {
		return false, nil, fmt.Errorf("%w: requeue with no tokens", ErrInvalidRequest)
	}
	if l.inGroup() {
		return false, nil, fmt.Errorf("%w: requeue of sample %d of a sample group, which reserved its cells and is never preempted", ErrInvalidRequest, l.index)
	}
	a.preemptions++
	keep = a.endLocked(l, true, true)
	now := a.now()
	l.genBase = max(len(tokens)-l.prompt, 0)
	w := &waiter{
		need:     min(len(tokens)+a.cfg.Watermark, a.cfg.Cells),
		prompt:   slices.Clone(tokens),
		tokens:   len(tokens),
		maxTok:   max(l.maxTok-l.genBase, 0),
		n:        1,
		noCache:  l.noCache,
		tenant:   l.tenant,
		salt:     l.salt,
		priority: math.MaxInt32,
		enqueued: now,
		ready:    make(chan struct{}),
		resume:   l,
	}
	a.enqueueLocked(w)
	l.waiter = w
	return keep, w.ready, nil
}

// Priority returns the request's priority.
func (l *Lease) Priority() int32 { return l.priority }

// Tenant returns the lease's tenant.
func (l *Lease) Tenant() string { return l.tenant }

// Load returns the lease's tenant's cells held by running leases divided by
// its weight, so that the engine, when it must preempt, can pick the
// sequence of the most loaded tenant.
func (l *Lease) Load() float64 {
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	return l.a.loadLocked(l.tenant)
}

// Prepared is what the KV cache's owner needs to start an admitted
// sequence: its sequence id and the cached prefix to copy, read under one
// lock.
func (l *Lease) Prepared() (seq, src, n int) {
	l.a.mu.Lock()
	defer l.a.mu.Unlock()
	src = -1
	if l.src != nil && !l.copied {
		src = l.src.seq
	}
	return l.seq, src, l.prefix
}

// Admitted returns when the lease was granted, by Config.Now.
func (l *Lease) Admitted() time.Time { return l.admitted }

// Waited returns how long the request was queued; 0 if it was admitted at
// once.
func (l *Lease) Waited() time.Duration { return l.waited }
