package native

// This file is the embedding worker: one goroutine that owns an encoder
// context (an EmbedBackend) and packs the inputs of every queued request
// into as few encode calls as the context's batch budget allows. The queue
// is bounded, shared fairly between tenants by tokens (embedqueue.go), and
// refuses with the allocator's *allocator.RejectError, so that the service
// maps its refusals exactly as it maps Generate's.

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kvgate/kvgate/allocator"
)

// EmbedBackend is the embedding worker's view of one llama.cpp encoder
// context. Package native/llama implements it; the worker's tests use a
// fake that checks llama.cpp's encode rules. The worker calls every method
// on its own goroutine, locked to its OS thread, from the Open that created
// the backend to Close.
type EmbedBackend interface {
	// BatchTokens is the most tokens one Encode may carry, across all its
	// inputs (llama.cpp's n_ubatch, which equals n_batch: an encoder
	// cannot split a batch).
	BatchTokens() int
	// MaxSequences is the most inputs one Encode may carry (n_seq_max).
	MaxSequences() int
	// MaxInputTokens is the most tokens of one input: the model's training
	// context (its position table) or BatchTokens, whichever is smaller.
	MaxInputTokens() int
	// Dimensions is the length of every vector.
	Dimensions() int
	// Encode runs the model on inputs, one sequence each, and writes the
	// pooled vector of inputs[i] into out[i], which has Dimensions floats.
	// The caller keeps within the limits above and passes only valid,
	// non-empty token lists; the backend checks them again and refuses a
	// batch outside them with an error instead of reaching llama.cpp.
	Encode(inputs [][]int32, out [][]float32) error
	// Close frees the context.
	Close()
}

// ErrNoEmbeddingModel reports a call to the embedding service of a server
// that loaded no embedding model.
var ErrNoEmbeddingModel = errors.New("no embedding model is loaded (serve --embedding-model PATH)")

// ErrNoGenerationModel reports a call to the generation service of a
// server that loaded no generation model.
var ErrNoGenerationModel = errors.New("no generation model is loaded (serve --model PATH)")

// EmbedInputError refuses one input of an embedding request: empty, too
// long, or holding a token outside the vocabulary. It wraps ErrBadRequest.
type EmbedInputError struct {
	// Index is the input's position in the request.
	Index int
	// Reason says what is wrong with it.
	Reason string
}

// Error describes the refusal.
func (e *EmbedInputError) Error() string { return fmt.Sprintf("inputs[%d]: %s", e.Index, e.Reason) }

// Unwrap returns ErrBadRequest.
func (e *EmbedInputError) Unwrap() error { return ErrBadRequest }

// EmbedConfig configures an EmbedEngine.
type EmbedConfig struct {
	// Open creates the backend. The worker calls it on its own goroutine,
	// locked to its OS thread, and closes the backend when it stops.
	Open func() (EmbedBackend, error)
	// Vocab checks token ids.
	Vocab interface{ ValidTokens(ids []int32) int }
	// MaxQueue is the most requests queued or being encoded at once; a
	// request beyond it is refused with QUEUE_FULL. It must be positive.
	MaxQueue int
	// Tenants returns a tenant's limits: its Weight shares the encoder by
	// tokens, its MaxQueued bounds its requests in the queue. nil means
	// allocator.DefaultTenantLimits.
	Tenants func(name string) allocator.TenantLimits
	// MinRetryDelay and MaxRetryDelay clamp the RetryAfter of a refusal;
	// 0 means 50 ms and 30 s.
	MinRetryDelay, MaxRetryDelay time.Duration
	// OnEncode, when set, is called on the worker after every encode call
	// with its inputs, its tokens and its duration. It must not block.
	OnEncode func(inputs, tokens int, d time.Duration)
	// TuneThreads lets the worker lower the backend's thread count, and
	// raise it back, from encode durations, as EngineConfig.TuneThreads
	// does for decodes, when the backend implements ThreadSetter: ggml's
	// threads spin at their barriers, so a busy CPU can make an encode
	// with too many threads far slower than one with fewer.
	TuneThreads bool

	// clock times encodes for the thread tuner; nil means time.Now. The
	// package's tests set it to a clock the fake encoder moves.
	clock func() time.Time
}

// ThreadSetter is a backend whose CPU thread count can change between
// calls (llama_set_n_threads).
type ThreadSetter interface {
	// Threads returns the CPU threads of the next call.
	Threads() int
	// SetThreads sets them (at least 1).
	SetThreads(n int)
}

// EmbedRequest is one call's inputs, already tokenized and within the
// backend's limits.
type EmbedRequest struct {
	// Inputs are the token lists, each non-empty, at most MaxInputTokens
	// long and within the vocabulary.
	Inputs [][]int32
	// Tenant names the caller's tenant.
	Tenant string
	// QueueTimeout bounds the wait before the first of the request's
	// inputs is encoded; 0 means as long as the context allows.
	QueueTimeout time.Duration
}

// EmbedResult is the outcome of one request.
type EmbedResult struct {
	// Vectors holds one pooled vector per input, in input order.
	Vectors [][]float32
	// QueueWait is the time from arrival to the first encode of one of its
	// inputs.
	QueueWait time.Duration
	// Tokens counts the tokens of all inputs.
	Tokens int
}

// EmbedStats counts the embedding worker's work since start.
type EmbedStats struct {
	// Queued is the requests waiting for their first encode; Running the
	// requests with some inputs encoded and some not.
	Queued, Running int
	// Requests, Inputs and Tokens count what was embedded; EncodeCalls the
	// llama_decode calls that did it.
	Requests, Inputs, Tokens, EncodeCalls uint64
	// Failed counts requests ended by an encode failure or by Close.
	Failed uint64
	// Rejected counts refusals by allocator reason (QUEUE_FULL, DRAINING,
	// DEADLINE_EXCEEDED, CANCELLED, QUEUE_TIMEOUT).
	Rejected map[string]uint64
	// Threads is the backend's CPU threads of the next encode (0 when it
	// cannot tell); ThreadChanges counts the tuner's changes.
	Threads       int64
	ThreadChanges uint64
}

// embedReasons are the refusal reasons an EmbedEngine counts.
var embedReasons = []string{
	allocator.ReasonQueueFull, allocator.ReasonDraining, allocator.ReasonDeadlineExceeded,
	allocator.ReasonCancelled, allocator.ReasonQueueTimeout,
}

// EmbedEngine is the embedding worker and the front door to it: Embed
// queues a request and waits for its vectors; the worker owns the backend
// and encodes the queued inputs in batches.
type EmbedEngine struct {
	cfg                                  EmbedConfig
	batchTokens, maxSeqs, maxInput, dims int

	mu       sync.Mutex
	q        *embedQueue
	draining bool
	closed   bool
	idle     chan struct{} // closed while nothing is queued or running; replaced when work arrives
	rejected map[string]uint64

	wake chan struct{} // buffered 1: the queue changed
	quit chan struct{}
	done chan struct{}

	requests, inputs, tokens, calls, failed atomic.Uint64
	threads                                 atomic.Int64
	threadChanges                           atomic.Uint64
	// encodeNanos is math.Float64bits of the moving average of an encode
	// call's duration per token, for RetryAfter; the worker writes it.
	encodeNanos atomic.Uint64
}

// NewEmbedEngine starts the embedding worker. It returns once the backend
// exists, or with the error that prevented it. Close stops the worker.
func NewEmbedEngine(cfg EmbedConfig) (*EmbedEngine, error) {
	switch {
	case cfg.Open == nil || cfg.Vocab == nil:
		return nil, errors.New("embed engine: Open and Vocab are required")
	case cfg.MaxQueue <= 0:
		return nil, fmt.Errorf("embed engine: max queue %d must be positive", cfg.MaxQueue)
	}
	if cfg.Tenants == nil {
		cfg.Tenants = allocator.DefaultTenantLimits
	}
	if cfg.MinRetryDelay <= 0 {
		cfg.MinRetryDelay = 50 * time.Millisecond
	}
	if cfg.MaxRetryDelay <= 0 {
		cfg.MaxRetryDelay = 30 * time.Second
	}
	if cfg.clock == nil {
		cfg.clock = time.Now
	}
	e := &EmbedEngine{
		cfg: cfg, q: newEmbedQueue(), idle: make(chan struct{}), rejected: map[string]uint64{},
		wake: make(chan struct{}, 1), quit: make(chan struct{}), done: make(chan struct{}),
	}
	close(e.idle)
	for _, r := range embedReasons {
		e.rejected[r] = 0
	}
	ready := make(chan error, 1)
	go e.run(ready)
	if err := <-ready; err != nil {
		return nil, err
	}
	return e, nil
}

// BatchTokens returns the most tokens of one encode call.
func (e *EmbedEngine) BatchTokens() int { return e.batchTokens }

// MaxSequences returns the most inputs of one encode call.
func (e *EmbedEngine) MaxSequences() int { return e.maxSeqs }

// MaxInputTokens returns the most tokens of one input.
func (e *EmbedEngine) MaxInputTokens() int { return e.maxInput }

// Dimensions returns the length of every vector.
func (e *EmbedEngine) Dimensions() int { return e.dims }

// MaxQueue returns the queue's capacity in requests.
func (e *EmbedEngine) MaxQueue() int { return e.cfg.MaxQueue }

// run is the worker goroutine: it owns the backend from Open to Close.
func (e *EmbedEngine) run(ready chan<- error) {
	defer close(e.done)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	b, err := e.cfg.Open()
	if err != nil {
		ready <- err
		return
	}
	defer b.Close()
	e.batchTokens, e.maxSeqs, e.maxInput, e.dims = b.BatchTokens(), b.MaxSequences(), b.MaxInputTokens(), b.Dimensions()
	if e.batchTokens <= 0 || e.maxSeqs <= 0 || e.maxInput <= 0 || e.maxInput > e.batchTokens || e.dims <= 0 {
		ready <- fmt.Errorf("embed engine: backend limits out of range: batch %d, sequences %d, input %d, dimensions %d",
			e.batchTokens, e.maxSeqs, e.maxInput, e.dims)
		return
	}
	var tuner *threadTuner
	ts, canTune := b.(ThreadSetter)
	if canTune {
		e.threads.Store(int64(ts.Threads()))
		if e.cfg.TuneThreads {
			tuner = newThreadTuner(ts.Threads())
		}
	}
	ready <- nil
	defer e.failAll(ErrEngineClosed)
	var inputs [][]int32
	var outs [][]float32
	for {
		e.mu.Lock()
		slots := e.q.next(e.batchTokens, e.maxSeqs, e.cfg.Tenants, time.Now())
		e.mu.Unlock()
		if len(slots) == 0 {
			select {
			case <-e.quit:
				return
			case <-e.wake:
				continue
			}
		}
		select {
		case <-e.quit:
			return
		default:
		}
		inputs, outs = inputs[:0], outs[:0]
		tokens := 0
		for _, s := range slots {
			inputs = append(inputs, s.req.inputs[s.index])
			outs = append(outs, s.req.vectors[s.index])
			tokens += len(s.req.inputs[s.index])
		}
		start := e.cfg.clock()
		err := b.Encode(inputs, outs)
		d := e.cfg.clock().Sub(start)
		e.calls.Add(1)
		if err == nil && tuner != nil {
			if n := tuner.observe(tokens, d); n != ts.Threads() {
				ts.SetThreads(n)
				e.threads.Store(int64(ts.Threads()))
				e.threadChanges.Add(1)
			}
		}
		if err == nil {
			e.recordEncode(d, tokens)
			e.tokens.Add(uint64(tokens))
			e.inputs.Add(uint64(len(slots)))
			if e.cfg.OnEncode != nil {
				e.cfg.OnEncode(len(slots), tokens, d)
			}
		}
		e.mu.Lock()
		for _, s := range slots {
			e.q.finish(s, err)
		}
		e.checkIdle()
		e.mu.Unlock()
	}
}

// recordEncode folds one encode call into the per-token average behind
// RetryAfter.
func (e *EmbedEngine) recordEncode(d time.Duration, tokens int) {
	ns := float64(max(d, 1)) / float64(max(tokens, 1))
	if old := math.Float64frombits(e.encodeNanos.Load()); old > 0 {
		ns = old + 0.1*(ns-old)
	}
	e.encodeNanos.Store(math.Float64bits(ns))
}

// retryAfter estimates when the queue will have room: the time to encode
// the tokens queued now, clamped to the configured delays. It runs under
// e.mu.
func (e *EmbedEngine) retryAfter() time.Duration {
	perToken := math.Float64frombits(e.encodeNanos.Load())
	if perToken <= 0 {
		perToken = 1e6 // 1 ms a token until the first encode says better
	}
	d := time.Duration(perToken * float64(e.q.pendingTokens))
	return min(max(d, e.cfg.MinRetryDelay), e.cfg.MaxRetryDelay)
}

// checkIdle closes the idle channel once nothing is queued or running. It
// runs under e.mu.
func (e *EmbedEngine) checkIdle() {
	if e.q.active() == 0 {
		select {
		case <-e.idle:
		default:
			close(e.idle)
		}
	}
}

// failAll ends every request still in the queue with err.
func (e *EmbedEngine) failAll(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.closed = true
	for _, r := range e.q.all() {
		e.q.remove(r)
		r.fail(err)
	}
	e.checkIdle()
}

// reject counts and builds a refusal.
func (e *EmbedEngine) reject(reason string, cause error, retry time.Duration, tokens int) error {
	e.rejected[reason]++
	return newEmbedReject(reason, cause, retry, tokens, e.q.queued())
}

// newEmbedReject builds the allocator's refusal type for an embedding
// request; its cells fields count tokens.
func newEmbedReject(reason string, cause error, retry time.Duration, tokens, depth int) error {
	return allocator.NewRejectError(allocator.RejectError{
		Reason: reason, CellsNeeded: tokens, QueueDepth: depth, RetryAfter: retry,
	}, cause)
}

// Embed queues req and waits for its vectors. A refusal is an
// *allocator.RejectError (QUEUE_FULL, DRAINING, QUEUE_TIMEOUT, or
// DEADLINE_EXCEEDED and CANCELLED while it waits for its first encode); an
// input the backend cannot take is an *EmbedInputError. Once its first
// input is encoded, ctx still ends the request, with ctx's error, and its
// remaining inputs are skipped.
func (e *EmbedEngine) Embed(ctx context.Context, req EmbedRequest) (EmbedResult, error) {
	arrived := time.Now()
	if len(req.Inputs) == 0 {
		return EmbedResult{}, fmt.Errorf("%w: no inputs", ErrBadRequest)
	}
	if req.QueueTimeout < 0 {
		return EmbedResult{}, fmt.Errorf("%w: negative queue timeout", ErrBadRequest)
	}
	total := 0
	for i, in := range req.Inputs {
		switch {
		case len(in) == 0:
			return EmbedResult{}, &EmbedInputError{Index: i, Reason: "empty input"}
		case len(in) > e.maxInput:
			return EmbedResult{}, &EmbedInputError{Index: i, Reason: fmt.Sprintf("%d tokens, more than the limit of %d", len(in), e.maxInput)}
		}
		if j := e.cfg.Vocab.ValidTokens(in); j >= 0 {
			return EmbedResult{}, &EmbedInputError{Index: i, Reason: fmt.Sprintf("%v: token %d = %d", ErrTokenOutOfRange, j, in[j])}
		}
		total += len(in)
	}
	r := newEmbedRequest(req, arrived, e.dims)

	e.mu.Lock()
	limits := e.cfg.Tenants(req.Tenant)
	switch {
	case e.closed:
		e.mu.Unlock()
		return EmbedResult{}, ErrEngineClosed
	case e.draining:
		err := e.reject(allocator.ReasonDraining, allocator.ErrDraining, 0, total)
		e.mu.Unlock()
		return EmbedResult{}, err
	case ctx.Err() != nil:
		err := e.ctxReject(ctx, total)
		e.mu.Unlock()
		return EmbedResult{}, err
	case e.q.active() >= e.cfg.MaxQueue,
		limits.MaxQueued > 0 && e.q.tenantActive(req.Tenant) >= limits.MaxQueued:
		err := e.reject(allocator.ReasonQueueFull, allocator.ErrQueueFull, e.retryAfter(), total)
		e.mu.Unlock()
		return EmbedResult{}, err
	}
	if e.q.active() == 0 {
		e.idle = make(chan struct{})
	}
	e.q.add(r)
	e.mu.Unlock()
	select {
	case e.wake <- struct{}{}:
	default:
	}

	var timeout <-chan time.Time
	if req.QueueTimeout > 0 {
		t := time.NewTimer(req.QueueTimeout)
		defer t.Stop()
		timeout = t.C
	}
	for {
		select {
		case <-r.done:
			if r.err != nil {
				e.failed.Add(1)
				return EmbedResult{}, r.err
			}
			e.requests.Add(1)
			return EmbedResult{Vectors: r.vectors, QueueWait: r.started.Sub(arrived), Tokens: total}, nil
		case <-ctx.Done():
			return EmbedResult{}, e.abandon(ctx, r, total)
		case <-timeout:
			e.mu.Lock()
			if r.startedLocked() {
				// Encoding has begun: the queue timeout no longer applies.
				e.mu.Unlock()
				timeout = nil
				continue
			}
			e.q.remove(r)
			err := e.reject(allocator.ReasonQueueTimeout, allocator.ErrQueueTimeout, e.retryAfter(), total)
			e.checkIdle()
			e.mu.Unlock()
			return EmbedResult{}, err
		}
	}
}

// abandon takes r out of the queue when ctx ends its wait. It returns a
// refusal when none of r's inputs was encoded yet, ctx's error otherwise.
func (e *EmbedEngine) abandon(ctx context.Context, r *embedRequest, total int) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	select {
	case <-r.done:
		// The worker finished it in the meantime; the caller is gone anyway.
	default:
	}
	started := r.startedLocked()
	e.q.remove(r)
	e.checkIdle()
	if started {
		e.failed.Add(1)
		return fmt.Errorf("embed: %w", context.Cause(ctx))
	}
	return e.ctxReject(ctx, total)
}

// ctxReject is the refusal of a request whose context ended before it was
// encoded. It runs under e.mu.
func (e *EmbedEngine) ctxReject(ctx context.Context, total int) error {
	reason := allocator.ReasonCancelled
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		reason = allocator.ReasonDeadlineExceeded
	}
	cause := ctx.Err()
	if c := context.Cause(ctx); c != nil && c != cause {
		cause = fmt.Errorf("%w: %w", cause, c)
	}
	return e.reject(reason, cause, 0, total)
}

// Drain refuses every later request with DRAINING; queued ones still run.
func (e *EmbedEngine) Drain() {
	e.mu.Lock()
	e.draining = true
	e.mu.Unlock()
}

// Idle returns a channel closed once no request is queued or being
// encoded.
func (e *EmbedEngine) Idle() <-chan struct{} {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.idle
}

// Close ends every request still queued with ErrEngineClosed, frees the
// backend and waits for the worker to exit. It is idempotent.
func (e *EmbedEngine) Close() {
	e.mu.Lock()
	if !e.closed {
		e.closed = true
		close(e.quit)
	}
	e.mu.Unlock()
	<-e.done
}

// Stats returns the worker's counters.
func (e *EmbedEngine) Stats() EmbedStats {
	e.mu.Lock()
	rej := make(map[string]uint64, len(e.rejected))
	for k, v := range e.rejected {
		rej[k] = v
	}
	queued, active := e.q.queued(), e.q.active()
	e.mu.Unlock()
	return EmbedStats{
		Queued: queued, Running: active - queued,
		Requests: e.requests.Load(), Inputs: e.inputs.Load(), Tokens: e.tokens.Load(), EncodeCalls: e.calls.Load(),
		Failed: e.failed.Load(), Rejected: rej, Threads: e.threads.Load(), ThreadChanges: e.threadChanges.Load(),
	}
}
