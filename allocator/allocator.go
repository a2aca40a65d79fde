package allocator

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"
)

const (
	// MaxSequencesLimit is the largest Config.MaxSequences accepted.
	MaxSequencesLimit = 256

	// MaxSamples is the largest Request.N accepted: the most samples of
	// one prompt a request may ask for.
	MaxSamples = 16

	defaultMinRetryDelay = 50 * time.Millisecond
	defaultMaxRetryDelay = 30 * time.Second
	// unknownRateRetry is the RetryAfter reported, before clamping, when the
	// drain rate is unknown.
	unknownRateRetry = time.Second
)

// Config configures an Allocator.
type Config struct {
	// Cells is the number of cells in the pool; it must be positive.
	Cells int
	// MaxSequences is the number of sequence ids, 0..MaxSequences-1; it must
	// be in 1..MaxSequencesLimit. Running sequences and cached ones (see
	// PrefixCache) share them.
	MaxSequences int
	// MaxRunning bounds the sequences running at once; 0 means
	// MaxSequences. It must not exceed MaxSequences.
	MaxRunning int
	// PrefixCache keeps the cells of finished sequences as a cache that later
	// requests with the same prompt prefix share instead of recomputing. The
	// cache is evicted, least recently used first, whenever cells or
	// sequence ids are needed.
	PrefixCache bool
	// Policy selects the admission policy; the zero value is PolicyReserve.
	Policy Policy
	// Watermark is, under PolicyOptimistic, the free cells a request must
	// leave beside its prompt to be admitted.
	Watermark int
	// MaxQueue is the capacity of the wait queue; it must not be negative.
	// With 0 nothing waits: a request that cannot be admitted at once is
	// refused with QUEUE_FULL.
	MaxQueue int
	// MaxSequenceTokens limits PromptTokens+MaxTokens of a request; 0 means
	// Cells. It must not be negative.
	MaxSequenceTokens int
	// MinRetryDelay is the lower clamp of RetryAfter estimates; 0 means 50ms.
	MinRetryDelay time.Duration
	// MaxRetryDelay is the upper clamp of RetryAfter estimates; 0 means 30s.
	MaxRetryDelay time.Duration
	// Tenants returns the limits of a tenant by name; nil means
	// DefaultTenantLimits for every tenant. It is called with the
	// Allocator's lock held and must not block or call back into the
	// Allocator. Invalid limits it returns are replaced by the defaults.
	Tenants func(name string) TenantLimits
	// StepRate returns the decode worker's measured steps per second while
	// busy (0 when unknown). nil means unknown. Called with the lock held;
	// must not block. With StepRate set, wait estimates under
	// PolicyReserve are taken from a simulation of the schedule instead of
	// the drain rate; see the package documentation.
	StepRate func() float64
	// ReportsStepRate says that the KV cache's owner reports its step rate
	// with every Apply (Step.StepRate) instead: wait estimates then work as
	// with StepRate, from the last rate reported.
	ReportsStepRate bool
	// Batch is the decode worker's token budget of one step (n_batch);
	// wait estimates count ceil(prompt tokens / Batch) steps to prefill a
	// prompt. 0 counts every prefill as one step. It must not be negative.
	Batch int
	// Now is the clock for lease times, the drain rate and wait estimates;
	// nil means time.Now. It is called with the Allocator's lock held and
	// must not call back into the Allocator. Estimates are compared with
	// context deadlines, which are wall-clock times, so Now should follow
	// the wall clock. QueueTimeout is timed by the time package's timers.
	Now func() time.Time
}

// Policy is an admission policy.
type Policy int

const (
	// PolicyReserve admits a sequence only when its prompt and all of
	// MaxTokens fit, so a running sequence never runs out of cells.
	PolicyReserve Policy = iota
	// PolicyOptimistic admits a sequence when its prompt plus the watermark
	// fit; cells for generated tokens are taken with Lease.Grow as they are
	// needed, and when none are left the engine preempts a sequence
	// (Lease.Requeue).
	PolicyOptimistic
)

// String returns the policy's flag name.
func (p Policy) String() string {
	if p == PolicyOptimistic {
		return "optimistic"
	}
	return "reserve"
}

// Request describes what a sequence needs.
type Request struct {
	// Prompt holds the prompt's token ids, for prefix sharing; when set,
	// PromptTokens may be 0 and is taken as len(Prompt).
	Prompt []int32
	// NoCache keeps the request out of the prefix cache: it reuses no
	// cached prefix and leaves no cells behind.
	NoCache bool
	// N is the number of samples of the prompt to run, 0..MaxSamples; 0
	// and 1 both mean one. A request with N > 1 is a sample group: it is
	// admitted atomically with N sequence ids and reserves its prompt's
	// cells once (less the shared prefix) plus N×MaxTokens, under both
	// policies, so that no sample ever needs Grow beyond its reservation
	// or is preempted. Admit returns the leader's lease (sample 0);
	// Lease.Samples returns the others. See the package documentation,
	// section Sample groups.
	N int
	// PromptTokens is the number of prompt tokens; it must be at least 1.
	PromptTokens int
	// MaxTokens is the most tokens the sequence may generate; it must be at
	// least 1.
	MaxTokens int
	// Priority orders the queue of the request's tenant: higher first,
	// equal priorities in arrival order. It does not order requests of
	// different tenants.
	Priority int32
	// Tenant names the tenant the request belongs to; "" is the default
	// tenant.
	Tenant string
	// CacheSalt partitions the prefix cache within a tenant: a request
	// shares cached cells only with requests of the same Tenant and
	// CacheSalt.
	CacheSalt string
	// QueueTimeout bounds the time spent queued; 0 means as long as the
	// context allows.
	QueueTimeout time.Duration
}

// Stats is a snapshot of an Allocator.
type Stats struct {
	// CellsTotal is Config.Cells.
	CellsTotal int
	// CellsUsed is the number of cells holding tokens: the cells charged
	// by running sequences and the cells of the prefix cache (CellsCached),
	// each cell counted once however many sequences share it.
	CellsUsed int
	// CellsReserved is the number of cells reserved but not yet charged.
	CellsReserved int
	// CellsFree is CellsTotal - CellsUsed - CellsReserved.
	CellsFree int
	// Running is the number of leases held; each sample of a sample group
	// holds one.
	Running int
	// Queued is the number of requests waiting, preempted sequences
	// waiting to resume included.
	Queued int
	// Admitted counts the Admit calls that returned a lease.
	Admitted uint64
	// Rejected counts refusals by reason; it has a key for every reason and
	// is a fresh copy on each call.
	Rejected map[string]uint64
	// DrainCellsPerSecond is the rate at which released leases returned
	// cells over the last ten seconds (or since New, if shorter, but over at
	// least one second); 0 when nothing was released in that window.
	DrainCellsPerSecond float64
	// CellsCached counts used cells that no running sequence uses: the
	// prefix cache.
	CellsCached int
	// CellsEvictable counts cached cells that could be evicted now.
	CellsEvictable int
	// CellsShared counts used cells shared by two or more sequences.
	CellsShared int
	// Cached is the number of finished sequences kept as cache.
	Cached int
	// PrefixHitTokens counts prompt tokens whose cells were reused.
	PrefixHitTokens uint64
	// PromptTokens counts prompt tokens of admitted requests.
	PromptTokens uint64
	// Evictions counts cached sequences evicted.
	Evictions uint64
	// Preemptions counts running sequences requeued by Lease.Requeue.
	Preemptions uint64
	// CellsQueued is the cells the queued requests need at admission.
	CellsQueued int
	// Tenants holds, for every tenant with running leases or queued
	// requests, its part of the snapshot. It is a fresh copy on each call.
	Tenants map[string]TenantStats
	// Applies counts Apply calls: the decode worker makes one per step.
	Applies uint64
}

// Allocator owns every cell of a KV cache pool and admits sequences under
// the reserve policy. See the package documentation.
type Allocator struct {
	cfg      Config // normalized
	limit    int    // min(Cells, MaxSequenceTokens)
	now      func() time.Time
	start    time.Time
	seqValid [MaxSequencesLimit / 64]uint64 // bit set for every valid id

	mu       sync.Mutex
	used     int
	reserved int
	running  int
	seqUsed  [MaxSequencesLimit / 64]uint64
	resumes  []*waiter               // preempted sequences, in arrival order
	tenants  map[string]*tenantState // tenants running or queued
	queued   int                     // waiters: resumes and tenant queues
	arrivals uint64
	draining bool
	admitted uint64
	rejected map[string]uint64
	drained  drainWindow
	idle     chan struct{} // closed when idle; nil when nobody asked

	tree        tree
	entries     map[int]*entry // by sequence id: running and cached
	lru         list.List      // cached entries, most recently used first
	prefixHits  uint64
	prompts     uint64
	evictions   uint64
	preemptions uint64
	// The owner's side (see Apply): sequences evicted and leases resumed
	// since its last Apply, and the last step rate it reported.
	evicted  []int
	evictSet [MaxSequencesLimit / 64]uint64
	resumed  []*Lease
	wake     chan struct{}
	stepRate float64
	applies  uint64
	// Apply pumps the queue once, at its end (deferPump is set until
	// then); holdPreempted keeps the leases it preempted from resuming in
	// that pumping, and yieldedTo lists the waiters its Grows yielded to,
	// which that pumping admits first.
	deferPump, holdPreempted bool
	yieldedTo                []*waiter
	// usedFrac is the moving average of the fraction of MaxTokens that
	// finished leases generated; it starts at 1.
	usedFrac float64
}

// waiter is a queued request. All fields after ready are guarded by the
// Allocator's lock and are final once ready is closed.
type waiter struct {
	need     int // an upper bound of the cells to admit it
	prompt   []int32
	tokens   int // prompt tokens
	maxTok   int // tokens it may still generate
	n        int // samples: 1, or the size of a sample group
	noCache  bool
	tenant   string
	salt     string
	resume   *Lease // a preempted lease waiting to run again
	priority int32
	arrival  uint64
	enqueued time.Time
	timeout  time.Duration
	expires  time.Time     // when the caller stops waiting; zero for never
	ready    chan struct{} // closed when resolved by the Allocator

	resolved bool   // granted, drained, or abandoned
	lease    *Lease // set when granted
	err      error  // set when refused
}

// New returns an Allocator for cfg. The error wraps ErrInvalidConfig.
func New(cfg Config) (*Allocator, error) {
	switch {
	case cfg.Cells <= 0:
		return nil, fmt.Errorf("%w: cells %d must be positive", ErrInvalidConfig, cfg.Cells)
	case cfg.MaxSequences < 1 || cfg.MaxSequences > MaxSequencesLimit:
		return nil, fmt.Errorf("%w: max sequences %d must be in 1..%d", ErrInvalidConfig, cfg.MaxSequences, MaxSequencesLimit)
	case cfg.MaxQueue < 0:
		return nil, fmt.Errorf("%w: max queue %d must not be negative", ErrInvalidConfig, cfg.MaxQueue)
	case cfg.MaxSequenceTokens < 0:
		return nil, fmt.Errorf("%w: max sequence tokens %d must not be negative", ErrInvalidConfig, cfg.MaxSequenceTokens)
	case cfg.MaxRunning < 0 || cfg.MaxRunning > cfg.MaxSequences:
		return nil, fmt.Errorf("%w: max running %d must be in 0..%d", ErrInvalidConfig, cfg.MaxRunning, cfg.MaxSequences)
	case cfg.Watermark < 0 || cfg.Watermark >= cfg.Cells:
		return nil, fmt.Errorf("%w: watermark %d must be in 0..%d", ErrInvalidConfig, cfg.Watermark, cfg.Cells-1)
	case cfg.Policy != PolicyReserve && cfg.Policy != PolicyOptimistic:
		return nil, fmt.Errorf("%w: unknown policy %d", ErrInvalidConfig, cfg.Policy)
	case cfg.Batch < 0:
		return nil, fmt.Errorf("%w: batch %d must not be negative", ErrInvalidConfig, cfg.Batch)
	case cfg.MinRetryDelay < 0 || cfg.MaxRetryDelay < 0:
		return nil, fmt.Errorf("%w: retry delays %v, %v must not be negative", ErrInvalidConfig, cfg.MinRetryDelay, cfg.MaxRetryDelay)
	}
	if cfg.MaxSequenceTokens == 0 {
		cfg.MaxSequenceTokens = cfg.Cells
	}
	if cfg.MaxRunning == 0 {
		cfg.MaxRunning = cfg.MaxSequences
	}
	if cfg.MinRetryDelay == 0 {
		cfg.MinRetryDelay = defaultMinRetryDelay
	}
	if cfg.MaxRetryDelay == 0 {
		cfg.MaxRetryDelay = defaultMaxRetryDelay
	}
	if cfg.MinRetryDelay > cfg.MaxRetryDelay {
		return nil, fmt.Errorf("%w: min retry delay %v exceeds max retry delay %v", ErrInvalidConfig, cfg.MinRetryDelay, cfg.MaxRetryDelay)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	a := &Allocator{
		cfg:      cfg,
		limit:    min(cfg.Cells, cfg.MaxSequenceTokens),
		now:      cfg.Now,
		rejected: make(map[string]uint64, len(reasons)),
		tenants:  make(map[string]*tenantState),
		entries:  make(map[int]*entry),
		usedFrac: 1,
		wake:     make(chan struct{}, 1),
	}
	a.start = a.now()
	for id := range cfg.MaxSequences {
		a.seqValid[id/64] |= 1 << (id % 64)
	}
	for _, r := range reasons {
		a.rejected[r] = 0
	}
	return a, nil
}

// Admit blocks until req is admitted, refused, ctx ends, or req.QueueTimeout
// passes. On admission it returns a Lease holding PromptTokens+MaxTokens
// reserved cells and a sequence id; the caller must Release it. A refusal is
// a *RejectError; a malformed req gives an error wrapping ErrInvalidRequest.
//
// A request with N > 1 is a sample group (see the package documentation):
// the lease returned is its leader's, and Lease.Samples holds the others.
//
// Refusals are checked in this order: an invalid request (N included),
// DRAINING, NEVER_FITS, an already
// ended ctx, then, if the request cannot be admitted at once, QUEUE_FULL
// (Config.MaxQueue, then the tenant's MaxQueued) and KV_CELLS_EXHAUSTED. A
// request that gives up while queued never holds a lease: if it was
// granted one at the same moment, the grant is undone and the cells go to
// the next waiter.
func (a *Allocator) Admit(ctx context.Context, req Request) (*Lease, error) {
	l, w, err := a.begin(ctx, req)
	if w == nil {
		return l, err
	}
	return a.await(ctx, w)
}

// begin decides a request without blocking: it returns a lease if admitted
// at once, an error if refused, or the queued waiter.
func (a *Allocator) begin(ctx context.Context, req Request) (*Lease, *waiter, error) {
	if req.Prompt != nil && req.PromptTokens == 0 {
		req.PromptTokens = len(req.Prompt)
	}
	if req.PromptTokens < 1 || req.MaxTokens < 1 || req.QueueTimeout < 0 || (req.Prompt != nil && len(req.Prompt) != req.PromptTokens) {
		return nil, nil, fmt.Errorf("%w: prompt tokens %d (%d ids), max tokens %d, queue timeout %v",
			ErrInvalidRequest, req.PromptTokens, len(req.Prompt), req.MaxTokens, req.QueueTimeout)
	}
	if req.N < 0 || req.N > MaxSamples {
		return nil, nil, fmt.Errorf("%w: %d samples outside 0..%d", ErrInvalidRequest, req.N, MaxSamples)
	}
	n := max(req.N, 1)
	if n > a.cfg.MaxRunning {
		return nil, nil, fmt.Errorf("%w: %d samples, but at most %d sequences may run at once", ErrInvalidRequest, n, a.cfg.MaxRunning)
	}
	perSeq := math.MaxInt
	if req.MaxTokens <= math.MaxInt-req.PromptTokens {
		perSeq = req.PromptTokens + req.MaxTokens
	}
	total, limit := perSeq, a.limit
	if n > 1 {
		// A group holds its prompt once and every sample's generation.
		total, limit = groupCells(req.PromptTokens, req.MaxTokens, n), a.cfg.Cells
		if perSeq > a.limit {
			total, limit = perSeq, a.limit
		}
	}

	a.mu.Lock()
	defer a.mu.Unlock()
	if a.draining {
		return nil, nil, a.refuseLocked(ReasonDraining, total, a.queued, 0, ErrDraining)
	}
	if total > limit {
		err := a.refuseLocked(ReasonNeverFits, total, a.queued, 0, ErrNeverFits)
		err.Limit = limit
		return nil, nil, err
	}
	if ctx.Err() != nil {
		reason, causes := contextRefusal(ctx)
		return nil, nil, a.refuseLocked(reason, total, a.queued, 0, causes...)
	}
	now := a.now()
	w := a.newWaiter(ctx, req, total, now)
	if a.wouldPickLocked(w) {
		if l := a.tryGrantLocked(w, now); l != nil {
			// Its tenant's load grew: another tenant's head may now be
			// the pick, and fit.
			a.pumpLocked()
			return l, nil, nil
		}
	}
	full := a.queued >= a.cfg.MaxQueue
	if lim := a.limitsLocked(req.Tenant); lim.MaxQueued > 0 {
		if t := a.tenants[req.Tenant]; t != nil && len(t.queue) >= lim.MaxQueued {
			full = true
		}
	}
	left, bounded := waitBudget(ctx, req.QueueTimeout, now)
	if full || bounded {
		est := a.estimateLocked(w, now)
		if full {
			return nil, nil, a.refuseLocked(ReasonQueueFull, w.need, a.queued, a.retryAfter(est), ErrQueueFull)
		}
		if est.confident && est.wait > left {
			return nil, nil, a.refuseLocked(ReasonKVCellsExhausted, w.need, a.queued, a.retryAfter(est), ErrKVCellsExhausted)
		}
	}
	w.ready = make(chan struct{})
	a.enqueueLocked(w)
	// Going ahead of its tenant's head, w may have handed a tie in load to
	// another tenant whose head fits.
	a.pumpLocked()
	return nil, w, nil
}

// newWaiter returns the waiter for a valid req of total tokens (prompt +
// max tokens) arriving at now; it is not queued.
func (a *Allocator) newWaiter(ctx context.Context, req Request, total int, now time.Time) *waiter {
	n := max(req.N, 1)
	need := a.upperNeed(req.PromptTokens, total)
	if n > 1 {
		need = total // a group reserves everything under both policies
	}
	return &waiter{
		need:     need,
		n:        n,
		prompt:   req.Prompt,
		tokens:   req.PromptTokens,
		maxTok:   req.MaxTokens,
		noCache:  req.NoCache,
		tenant:   req.Tenant,
		salt:     req.CacheSalt,
		priority: req.Priority,
		enqueued: now,
		timeout:  req.QueueTimeout,
		expires:  deadlineOf(ctx, req.QueueTimeout, now),
	}
}

// groupCells returns the cells a sample group of n samples reserves at
// most: its prompt once and n times maxTok, or math.MaxInt on overflow.
func groupCells(prompt, maxTok, n int) int {
	if maxTok > (math.MaxInt-prompt)/n {
		return math.MaxInt
	}
	return prompt + n*maxTok
}

// upperNeed returns the most cells a request of prompt tokens and total
// tokens (prompt + max tokens) needs at admission: all of them under the
// reserve policy, the prompt and the watermark under the optimistic one.
func (a *Allocator) upperNeed(prompt, total int) int {
	if a.cfg.Policy == PolicyOptimistic {
		return min(prompt+a.cfg.Watermark, a.cfg.Cells)
	}
	return total
}

// await waits for a queued waiter to be resolved, or abandons it when ctx
// ends or its QueueTimeout passes.
func (a *Allocator) await(ctx context.Context, w *waiter) (*Lease, error) {
	var expired <-chan time.Time
	if w.timeout > 0 {
		t := time.NewTimer(w.timeout)
		defer t.Stop()
		expired = t.C
	}
	select {
	case <-w.ready:
		return w.lease, w.err
	case <-ctx.Done():
		reason, causes := contextRefusal(ctx)
		return a.abandon(w, reason, causes...)
	case <-expired:
		return a.abandon(w, ReasonQueueTimeout, ErrQueueTimeout)
	}
}

// abandon takes w out of the queue and refuses it with reason. If w was
// granted a lease before abandon took the lock, the lease is rolled back as
// if it had never been granted; if w was already refused, that refusal is
// returned.
func (a *Allocator) abandon(w *waiter, reason string, causes ...error) (*Lease, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if w.resolved {
		if w.err != nil {
			return nil, w.err
		}
		// Granted concurrently with the caller giving up: undo the grant.
		// This does not count toward the drain rate.
		a.returnLocked(w.lease)
		a.admitted--
		w.lease = nil
	} else {
		a.dequeueLocked(w)
	}
	var retry time.Duration
	if reason == ReasonQueueTimeout {
		retry = a.retryAfter(a.estimateLocked(w, a.now()))
	}
	err := a.refuseLocked(reason, w.need, a.queued, retry, causes...)
	w.resolved, w.err = true, err
	a.pumpLocked()
	a.notifyIdleLocked()
	return nil, err
}

// Drain refuses every later Admit with DRAINING and wakes every queued
// waiter with DRAINING. Leases already held are untouched. Drain is
// idempotent.
func (a *Allocator) Drain() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.draining = true
	// Preempted sequences are running streams: they stay queued.
	depth := a.queued - 1
	for _, t := range a.tenants {
		for _, w := range t.queue {
			w.resolved = true
			w.err = a.refuseLocked(ReasonDraining, w.need, depth, 0, ErrDraining)
			close(w.ready)
			a.queued--
		}
		t.queue = nil
		a.tidyTenantLocked(t.name)
	}
	a.notifyIdleLocked()
}

// FlushCache evicts every cached sequence that no new sequence is about to
// copy from, and returns the cells freed; the next Apply reports the
// evicted sequences. A
// draining server calls it last, so that it exits with no cell in use.
func (a *Allocator) FlushCache() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	before := a.used
	for el := a.lru.Back(); el != nil; {
		prev := el.Prev()
		if e := el.Value.(*entry); e.pins == 0 {
			a.evictLocked(e)
		}
		el = prev
	}
	return before - a.used
}

// Idle returns a channel that is closed when no lease is held and nothing
// is queued. If that is already so, the channel is closed on return. After
// Drain, Idle reports when the last running lease is released.
func (a *Allocator) Idle() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.running == 0 && a.queued == 0 {
		c := make(chan struct{})
		close(c)
		return c
	}
	if a.idle == nil {
		a.idle = make(chan struct{})
	}
	return a.idle
}

// Stats returns a snapshot of the Allocator.
func (a *Allocator) Stats() Stats {
	a.mu.Lock()
	defer a.mu.Unlock()
	rej := make(map[string]uint64, len(a.rejected))
	for k, v := range a.rejected {
		rej[k] = v
	}
	cached, shared := a.tree.stats()
	tenants := make(map[string]TenantStats, len(a.tenants))
	for name, t := range a.tenants {
		tenants[name] = TenantStats{Running: t.running, CellsHeld: t.held, Queued: len(t.queue)}
	}
	for _, w := range a.resumes {
		ts := tenants[w.tenant]
		ts.Queued++
		tenants[w.tenant] = ts
	}
	return Stats{
		CellsCached:         cached,
		CellsEvictable:      a.tree.evictable,
		CellsShared:         shared,
		Cached:              a.lru.Len(),
		PrefixHitTokens:     a.prefixHits,
		PromptTokens:        a.prompts,
		Evictions:           a.evictions,
		Preemptions:         a.preemptions,
		CellsQueued:         a.cellsQueuedLocked(),
		CellsTotal:          a.cfg.Cells,
		CellsUsed:           a.used,
		CellsReserved:       a.reserved,
		CellsFree:           a.freeLocked(),
		Running:             a.running,
		Queued:              a.queued,
		Admitted:            a.admitted,
		Rejected:            rej,
		DrainCellsPerSecond: a.drained.rate(a.start, a.now()),
		Tenants:             tenants,
		Applies:             a.applies,
	}
}

func (a *Allocator) freeLocked() int { return a.cfg.Cells - a.used - a.reserved }

// availLocked returns the cells free now or after evicting the cache.
func (a *Allocator) availLocked() int { return a.freeLocked() + a.tree.evictable }

// contextRefusal maps an ended context to a reason and the errors to wrap.
func contextRefusal(ctx context.Context) (string, []error) {
	err := ctx.Err()
	reason := ReasonCancelled
	if errors.Is(err, context.DeadlineExceeded) {
		reason = ReasonDeadlineExceeded
	}
	causes := []error{err}
	if c := context.Cause(ctx); c != nil && c != err {
		causes = append(causes, c)
	}
	return reason, causes
}

// refuseLocked counts a refusal and builds its error.
func (a *Allocator) refuseLocked(reason string, need, depth int, retry time.Duration, causes ...error) *RejectError {
	a.rejected[reason]++
	return &RejectError{
		Reason:      reason,
		CellsNeeded: need,
		CellsFree:   a.freeLocked(),
		CellsTotal:  a.cfg.Cells,
		QueueDepth:  depth,
		RetryAfter:  retry,
		errs:        causes,
	}
}

// notifyIdleLocked closes the Idle channel if nothing is held or queued.
func (a *Allocator) notifyIdleLocked() {
	if a.idle != nil && a.running == 0 && a.queued == 0 {
		close(a.idle)
		a.idle = nil
	}
}
