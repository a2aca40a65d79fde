package native

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// Errors that end a sequence early. They are domain errors; the service maps
// them onto gRPC codes.
var (
	// ErrSlowConsumer ends a stream whose reader fell behind by more than
	// the stream's buffer.
	ErrSlowConsumer = errors.New("stream reader too slow")
	// ErrEngineClosed ends sequences still running when the engine closes.
	ErrEngineClosed = errors.New("engine closed")
	// ErrSequenceAborted ends the newest sequence when llama_decode found no
	// KV slot even for the smallest batch: the last resort that keeps every
	// other sequence running.
	ErrSequenceAborted = errors.New("sequence aborted: no KV slot")
	// ErrBadRequest reports a request the engine cannot run.
	ErrBadRequest = errors.New("bad sequence request")
)

// Ledger is the engine's view of the allocator's account for one sequence.
// Commit is called as tokens enter the KV cache; Finish exactly once when
// the sequence ends. When Finish returns true the sequence's cells stay in
// the KV cache (the allocator keeps them as prefix cache and will evict them
// through Engine.Evict); otherwise the engine removes them.
type Ledger interface {
	Commit(tokens []int32) error
	Finish() (keep bool)
}

// PrefixLedger is a Ledger whose sequence may start with cells shared from
// another sequence: the engine copies positions [0, n) of sequence src
// (llama_memory_seq_cp, which only tags the cells in a unified cache) and
// then calls Copied.
type PrefixLedger interface {
	Ledger
	Prefix() (src, n int)
	Copied()
}

// GrowLedger is a Ledger under optimistic admission: the engine asks for
// cells before decoding tokens, and preempts a sequence when Grow reports
// that none are left (ok false). Requeue gives a preempted sequence's cells
// back and queues it to run again with tokens as its prompt; resumed is
// closed when it may, and SeqID then names its new sequence id.
//
// Load reports how far the sequence's tenant is over its fair share: the
// cells its tenant holds divided by the tenant's weight. The engine preempts
// from the tenant with the highest Load first (see Engine.victim), so all
// of one tenant's sequences must report the same value at a given moment.
// The engine calls it only when cells have run out; a NaN counts as the
// highest load.
type GrowLedger interface {
	Ledger
	Grow(n int) (ok bool, err error)
	Requeue(tokens []int32) (keep bool, resumed <-chan struct{}, err error)
	SeqID() int
	Load() float64
}

// FinishReason says why a sequence ended normally.
type FinishReason int

// Finish reasons.
const (
	FinishNone FinishReason = iota
	FinishEOS
	FinishLength
	FinishStop
)

// String returns the reason's name.
func (r FinishReason) String() string {
	switch r {
	case FinishEOS:
		return "eos"
	case FinishLength:
		return "length"
	case FinishStop:
		return "stop"
	}
	return "none"
}

// Request is one admitted sequence.
type Request struct {
	// Ctx ends the sequence at the next step when it is done.
	Ctx context.Context
	// SeqID is the llama.cpp sequence id the allocator assigned, in
	// [0, MaxSequenceIDs).
	SeqID int
	// Priority orders preemption within a tenant: among the sequences of
	// the most loaded tenant (GrowLedger.Load), the lowest priority, most
	// recently started one goes first.
	Priority int32
	// Prompt holds the prompt's token ids, all in the vocabulary.
	Prompt []int32
	// MaxTokens is the most tokens to generate.
	MaxTokens int
	// Sampling chooses the next token.
	Sampling SamplingParams
	// Stop strings end generation and are not streamed.
	Stop []string
	// IgnoreEOS keeps generating past end-of-generation tokens.
	IgnoreEOS bool
	// Ledger is charged for the sequence's cells and finished at its end.
	Ledger Ledger

	// Admission: what the allocator needs beyond the prompt and MaxTokens.

	// NoCache keeps the sequence out of the prefix cache.
	NoCache bool
	// QueueTimeout bounds the time spent queued; 0 means as long as Ctx
	// allows.
	QueueTimeout time.Duration
	// Tenant names the sequence's tenant; CacheSalt partitions the prefix
	// cache within it.
	Tenant, CacheSalt string
}

// Event is a piece of generated text.
type Event struct {
	// Text is valid UTF-8.
	Text string
	// Tokens are the ids whose text Text completes.
	Tokens []int32
	// Step is the decode step that produced the last of the tokens.
	Step uint64
}

// Result describes how a sequence ended. Err is nil for a normal end.
type Result struct {
	Reason           FinishReason
	CachedTokens     int // prompt tokens shared from the prefix cache
	Preempted        int // times the sequence was preempted and resumed
	StopString       string
	Err              error
	PromptTokens     int
	CompletionTokens int
	Started          time.Time // when the engine took the sequence
	FirstToken       time.Time // when the first token was sampled
	Ended            time.Time
}

// Stream delivers one sequence's events. Events is closed after the last
// event; Result is valid after that.
type Stream struct {
	events chan Event
	result Result
	failed atomic.Bool
}

// Events returns the stream's events, closed at the end.
func (s *Stream) Events() <-chan Event { return s.events }

// Result returns how the sequence ended. Call it after Events is closed.
func (s *Stream) Result() Result { return s.result }

// Failed reports, without waiting, that the sequence has ended with an
// error, so that a sender may stop early.
func (s *Stream) Failed() bool { return s.failed.Load() }

// EngineConfig configures an Engine.
type EngineConfig struct {
	// Cells is the KV-cell pool size requested from llama.cpp.
	Cells int
	// Batch is the token budget of one decode step (n_batch).
	Batch int
	// MaxSequences bounds the sequences running at once. Sequence ids may
	// go up to MaxSequenceIDs, for cached sequences.
	MaxSequences int
	// Threads is the CPU thread count; 0 means all CPUs.
	Threads int
	// KVType is the KV cache's element type: "f16" (default) or "f32".
	KVType string
	// StreamBuffer is how many events a stream may hold before its reader
	// counts as too slow; 0 means 1024.
	StreamBuffer int
	// OnStep, when set, is called on the worker after every decode step
	// with the batch's token count and the number of sequences in it. It
	// must not block.
	OnStep func(tokens, sequences int)
	// Deterministic makes every sequence's logits bit-identical to a solo
	// decode of it, whatever runs beside it, by removing the two ways
	// batching changes llama.cpp's arithmetic:
	//   - every llama_decode carries at least two tokens and, when any token
	//     asks for logits, at least two outputs (a padding token of sequence
	//     PadSequence makes up the count), so that every matrix product takes
	//     llamafile's tinyBLAS, which sums each element the same way for any
	//     batch width;
	//   - every sequence's cells stay in position order, which is the order
	//     flash attention sums them in: the worker mirrors llama.cpp's cell
	//     placement, keeps the cells of ended sequences (RetiredSequence)
	//     until a batch needs the room, holds a sequence back for a step
	//     when its next token would land below its earlier ones, and
	//     recomputes it from scratch when it has waited HoldLimit steps.
	// It costs the padding token where a step has a single token, and held
	// steps and recomputation when cells run short. Sequence ids must be
	// below RetiredSequence, and prefix sharing (Ledger.Prefix) is not
	// allowed, because a shared prefix pins a sequence's lowest cells where
	// others put them.
	Deterministic bool
}

// PadSequence is the sequence id of the padding token of a deterministic
// engine (EngineConfig.Deterministic).
const PadSequence = MaxSequenceIDs - 1

// RetiredSequence is the sequence id under which a deterministic engine
// keeps the cells of sequences that ended, were preempted or are being
// recomputed, instead of freeing them at once: freed cells below running
// sequences would take their next tokens out of order. The cells are freed
// together when a batch needs the room, or when nothing runs.
const RetiredSequence = MaxSequenceIDs - 2

// HoldLimit is how many steps in a row a deterministic engine holds a
// sequence back before it recomputes it in cells that keep its order.
const HoldLimit = 4

// MoveLimit is how many times a deterministic engine recomputes a sequence
// to keep its cells in order without the sequence producing a token in
// between. Past it the sequence runs out of order (EngineStats.Disordered),
// so that no sequence is recomputed forever.
const MoveLimit = 3

// EngineStats counts the worker's work since start.
type EngineStats struct {
	Steps           uint64
	PrefillTokens   uint64
	GeneratedTokens uint64
	NoKVSlot        uint64
	SlowConsumers   uint64
	Aborted         uint64
	Preempted       uint64
	Evicted         uint64
	Running         int64
	// Held counts steps a deterministic engine held a sequence back to keep
	// its cells in order; Relocated counts sequences it recomputed for
	// that; Padded counts its padding tokens; Disordered counts sequences
	// it let break their cell order because nothing else could run (their
	// output is no longer guaranteed to match a solo decode).
	Held, Relocated, Padded, Disordered uint64
}

// Engine is the single decode worker. It owns the llama.cpp context and runs
// every admitted sequence in one llama_decode per step: one token for each
// decoding sequence plus prefill chunks of new prompts, up to the batch
// budget.
type Engine struct {
	model  *Model
	cfg    EngineConfig
	cells  int
	batch  int
	submit chan *sequence
	quit   chan struct{}
	done   chan struct{}
	closed atomic.Bool

	steps, prefill, generated, nokvslot, slow, aborted atomic.Uint64
	preempted, evicted                                 atomic.Uint64
	held, relocated, padded, disordered                atomic.Uint64
	running                                            atomic.Int64
	// stepNanos is math.Float64bits of the moving average of a step's
	// duration in nanoseconds (0 before the first step), for StepRate; the
	// worker alone writes it.
	stepNanos atomic.Uint64

	evictMu sync.Mutex
	evicts  []int // sequences to remove from the cache, in order

	// Owned by the worker goroutine.
	ctx     *Context
	b       *Batch
	active  []*sequence // in the order they (re)started
	paused  []*sequence // preempted, waiting to resume
	piece   []byte
	drained []int
	// Deterministic mode (EngineConfig.Deterministic): the mirror of
	// llama.cpp's cells and scratch space for placing a batch.
	cmap       *cellMap
	order      []*sequence
	bseq, bpos []int32
	placed     []int32
	outputs    int
	padIdx     int
}

type seqState int

const (
	statePrefill seqState = iota
	stateDecode
	statePaused
)

type sequence struct {
	req       Request
	stream    *Stream
	sampler   *Sampler
	seq       int // current llama.cpp sequence id
	inCache   bool
	toks      []int32 // prompt, then every generated token fed back
	state     seqState
	nPast     int // tokens in the cache
	chunk     int // tokens of toks in the current batch
	out       int // output index in the current batch, or -1
	next      int32
	one       [1]int32
	generated int
	ledgered  int  // tokens of toks committed to the Ledger
	grown     bool // Grow gave a cell for the pending token
	held      int  // steps in a row a deterministic engine held s back
	skip      bool // held back this step
	force     bool // may break its cell order this step, to make progress
	moves     int  // times recomputed to keep order since its last token
	resumed   <-chan struct{}
	cancelled atomic.Bool
	stopWatch func() bool
	text      textBuffer
}

// NewEngine starts the decode worker for m. It returns once the context
// exists, or with the error that prevented it. Close stops the worker.
func NewEngine(m *Model, cfg EngineConfig) (*Engine, error) {
	if cfg.MaxSequences <= 0 || cfg.MaxSequences > MaxSequenceIDs {
		return nil, fmt.Errorf("engine: max sequences %d outside [1, %d]", cfg.MaxSequences, MaxSequenceIDs)
	}
	if cfg.Deterministic && cfg.MaxSequences >= RetiredSequence {
		return nil, fmt.Errorf("engine: deterministic: max sequences %d leaves no ids for padding and retired cells (want < %d)", cfg.MaxSequences, RetiredSequence)
	}
	if cfg.Batch < cfg.MaxSequences {
		cfg.Batch = cfg.MaxSequences
	}
	if cfg.Deterministic {
		cfg.Batch++ // room for the padding token
	}
	if cfg.StreamBuffer <= 0 {
		cfg.StreamBuffer = 1024
	}
	e := &Engine{
		model:  m,
		cfg:    cfg,
		submit: make(chan *sequence, cfg.MaxSequences),
		quit:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	ready := make(chan error, 1)
	go e.run(ready)
	if err := <-ready; err != nil {
		return nil, err
	}
	return e, nil
}

// StepRateWeight is the weight of the newest step in the moving average
// behind Engine.StepRate.
const StepRateWeight = 0.1

// StepRate returns the decode steps per second the worker manages while it
// is busy: the inverse of an exponentially weighted moving average (weight
// StepRateWeight) of the wall time of its steps, each from the start of its
// planning to the end of its sampling and streaming. Idle time between steps
// does not count. It is 0 before the first step. It is safe to call from
// any goroutine and does not allocate.
func (e *Engine) StepRate() float64 {
	ns := math.Float64frombits(e.stepNanos.Load())
	if ns <= 0 {
		return 0
	}
	return 1e9 / ns
}

// recordStep folds one step's duration into the average behind StepRate.
// It runs on the worker.
func (e *Engine) recordStep(d time.Duration) {
	ns := float64(max(d, 1)) // a step of 0 ns would make an infinite rate
	if old := math.Float64frombits(e.stepNanos.Load()); old > 0 {
		ns = old + StepRateWeight*(ns-old)
	}
	e.stepNanos.Store(math.Float64bits(ns))
}

// Cells returns the KV cells sequences may use: the pool after llama.cpp's
// padding, less the padding token's cell in deterministic mode.
func (e *Engine) Cells() int { return e.cells }

// Batch returns the per-step token budget.
func (e *Engine) Batch() int { return e.batch }

// Stats returns the worker's counters.
func (e *Engine) Stats() EngineStats {
	return EngineStats{
		Steps:           e.steps.Load(),
		PrefillTokens:   e.prefill.Load(),
		GeneratedTokens: e.generated.Load(),
		NoKVSlot:        e.nokvslot.Load(),
		SlowConsumers:   e.slow.Load(),
		Aborted:         e.aborted.Load(),
		Preempted:       e.preempted.Load(),
		Evicted:         e.evicted.Load(),
		Running:         e.running.Load(),
		Held:            e.held.Load(),
		Relocated:       e.relocated.Load(),
		Padded:          e.padded.Load(),
		Disordered:      e.disordered.Load(),
	}
}

// Close ends every running sequence with ErrEngineClosed, frees the context
// and waits for the worker to exit. It is idempotent.
func (e *Engine) Close() {
	if e.closed.CompareAndSwap(false, true) {
		close(e.quit)
	}
	<-e.done
}

// Evict removes a cached sequence's cells from the KV cache before the
// next decode and before any sequence started after the call. It does not
// block; the allocator calls it when it evicts a prefix cache entry. An id
// outside [0, MaxSequenceIDs) is ignored.
func (e *Engine) Evict(seq int) {
	if !validSeq(seq) {
		return
	}
	e.evictMu.Lock()
	e.evicts = append(e.evicts, seq)
	e.evictMu.Unlock()
}

// removeEvicted carries out pending evictions. It runs on the worker.
func (e *Engine) removeEvicted() {
	e.evictMu.Lock()
	e.drained, e.evicts = e.evicts, e.drained[:0]
	e.evictMu.Unlock()
	for _, seq := range e.drained {
		e.seqRemove(seq)
		e.evicted.Add(1)
	}
}

// seqRemove removes seq's tokens from the cache (and from the mirror).
func (e *Engine) seqRemove(seq int) {
	e.ctx.SeqRemove(seq, -1, -1)
	if e.cmap != nil {
		e.cmap.remove(seq)
	}
}

// release takes seq's tokens out of the cache when the sequence is done
// with them. A deterministic engine moves the cells to RetiredSequence
// instead (seq_cp then seq_rm frees nothing and leaves llama.cpp's head
// alone), so that no hole opens below a running sequence.
func (e *Engine) release(seq int) {
	if e.cmap == nil {
		e.seqRemove(seq)
		return
	}
	if e.cmap.maxCell[seq] >= 0 {
		e.ctx.SeqCopy(seq, RetiredSequence, -1, -1)
		e.cmap.copyPrefix(seq, RetiredSequence, math.MaxInt32)
	}
	e.seqRemove(seq)
}

// retired reports whether RetiredSequence holds cells.
func (e *Engine) retired() bool { return e.cmap != nil && e.cmap.maxCell[RetiredSequence] >= 0 }

// freeRetired frees the cells of RetiredSequence.
func (e *Engine) freeRetired() {
	if e.retired() {
		e.seqRemove(RetiredSequence)
	}
}

// Start hands an admitted sequence to the worker. The engine finishes the
// sequence's Ledger when the sequence ends, also when Start fails.
func (e *Engine) Start(req Request) (*Stream, error) {
	fail := func(err error) (*Stream, error) {
		if req.Ledger != nil {
			req.Ledger.Finish()
		}
		return nil, err
	}
	switch {
	case req.Ledger == nil || req.Ctx == nil:
		return fail(fmt.Errorf("%w: ledger and context are required", ErrBadRequest))
	case req.SeqID < 0 || req.SeqID >= MaxSequenceIDs:
		return fail(fmt.Errorf("%w: sequence id %d outside [0, %d)", ErrBadRequest, req.SeqID, MaxSequenceIDs))
	case e.cfg.Deterministic && req.SeqID >= RetiredSequence:
		return fail(fmt.Errorf("%w: sequence id %d is reserved by the deterministic engine", ErrBadRequest, req.SeqID))
	case len(req.Prompt) == 0:
		return fail(fmt.Errorf("%w: empty prompt", ErrBadRequest))
	case req.MaxTokens <= 0:
		return fail(fmt.Errorf("%w: max tokens %d", ErrBadRequest, req.MaxTokens))
	case len(req.Prompt)+req.MaxTokens > e.cells:
		return fail(fmt.Errorf("%w: %d prompt + %d max tokens exceed %d cells", ErrBadRequest, len(req.Prompt), req.MaxTokens, e.cells))
	}
	if i := e.model.ValidTokens(req.Prompt); i >= 0 {
		return fail(fmt.Errorf("%w: %w: prompt[%d] = %d", ErrBadRequest, ErrTokenOutOfRange, i, req.Prompt[i]))
	}
	s := &sequence{req: req, stream: &Stream{events: make(chan Event, e.cfg.StreamBuffer)}, out: -1, seq: req.SeqID}
	s.stopWatch = context.AfterFunc(req.Ctx, func() { s.cancelled.Store(true) })
	select {
	case e.submit <- s:
		return s.stream, nil
	case <-e.quit:
		s.stopWatch()
		return fail(ErrEngineClosed)
	}
}

func (e *Engine) run(ready chan<- error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer close(e.done)
	ctx, err := NewContext(e.model, ContextParams{
		Cells: e.cfg.Cells, Batch: e.cfg.Batch, MaxSequences: e.cfg.MaxSequences, Threads: e.cfg.Threads,
		KVType: e.cfg.KVType,
	})
	if err != nil {
		ready <- err
		return
	}
	e.ctx, e.cells, e.batch = ctx, ctx.Cells(), ctx.BatchSize()
	e.b = NewBatch(e.batch)
	if e.cfg.Deterministic {
		e.cmap = newCellMap(ctx.Cells(), min(ctx.BatchSize(), 512))
		e.cells-- // the padding token's cell
		e.order = make([]*sequence, 0, e.cfg.MaxSequences)
		e.bseq = make([]int32, 0, e.batch)
		e.bpos = make([]int32, 0, e.batch)
		e.placed = make([]int32, 0, e.batch)
		e.batch-- // the padding token's room
	}
	e.piece = make([]byte, 0, 256)
	ready <- nil

	defer func() {
		for len(e.active) > 0 {
			e.finish(e.active[0], FinishNone, "", ErrEngineClosed)
		}
		for len(e.paused) > 0 {
			e.finish(e.paused[0], FinishNone, "", ErrEngineClosed)
		}
		// Sequences handed over but never taken.
		for {
			select {
			case s := <-e.submit:
				e.add(s)
				e.finish(s, FinishNone, "", ErrEngineClosed)
				continue
			default:
			}
			break
		}
		e.b.Free()
		e.ctx.Close()
	}()

	var incoming []*sequence
	for {
		incoming = incoming[:0]
		if len(e.active) == 0 && len(e.paused) == 0 {
			e.freeRetired() // nothing runs that a hole could disorder
			select {
			case s := <-e.submit:
				incoming = append(incoming, s)
			case <-e.quit:
				return
			}
		}
	drain:
		for {
			select {
			case s := <-e.submit:
				incoming = append(incoming, s)
			case <-e.quit:
				return
			default:
				break drain
			}
		}
		// Evictions made before these sequences were admitted come first:
		// one may have freed the sequence id a newcomer uses.
		e.removeEvicted()
		for _, s := range incoming {
			e.add(s)
		}
		e.reap()
		e.resume()
		if len(e.active) > 0 {
			e.step()
		} else if len(e.paused) > 0 {
			time.Sleep(time.Millisecond) // nothing runs; wait for a resume
		}
	}
}

// add takes a newly admitted sequence: it builds its sampler and copies the
// cached prefix the allocator found for it.
func (e *Engine) add(s *sequence) {
	s.sampler = NewSampler(s.req.Sampling)
	if s.req.Sampling.HasPenalties() {
		for _, t := range s.req.Prompt {
			s.sampler.Accept(t)
		}
	}
	s.toks = append(make([]int32, 0, len(s.req.Prompt)+min(s.req.MaxTokens, 4096)), s.req.Prompt...)
	s.text.reset(s.req.Stop)
	s.stream.result.Started = time.Now()
	s.stream.result.PromptTokens = len(s.req.Prompt)
	s.inCache = true
	n := e.copyPrefix(s)
	e.active = append(e.active, s)
	e.running.Add(1)
	if n < 0 {
		e.finish(s, FinishNone, "", errDeterministicPrefix)
		return
	}
	s.stream.result.CachedTokens = n
}

// errDeterministicPrefix ends a sequence offered a shared prefix by a
// deterministic engine: a misconfigured server, not a bad request.
var errDeterministicPrefix = errors.New("engine: a deterministic engine cannot share prefixes; turn the prefix cache off")

// copyPrefix shares the cached cells the allocator chose for s and returns
// how many tokens they hold.
func (e *Engine) copyPrefix(s *sequence) int {
	s.nPast = 0
	pl, ok := s.req.Ledger.(PrefixLedger)
	src, n := -1, 0
	if ok {
		src, n = pl.Prefix()
	}
	if n <= 0 || src < 0 {
		src, n = -1, 0
	}
	if n > 0 && e.cmap != nil {
		// A shared prefix pins the sequence's first cells wherever its
		// owner put them; the caller was told not to offer one.
		pl.Copied()
		return -1
	}
	// A fresh sequence owns no cells but its prefix. Stale ones under its
	// id (an eviction the allocator did not send) would break the copy
	// below (llama.cpp asserts that no cell holds dst already) and make its
	// first decode fail for the whole batch.
	switch {
	case src == s.seq:
		e.ctx.SeqRemove(s.seq, n, -1) // its own cells are the prefix
	case e.ctx.SeqPosMax(s.seq) >= 0:
		e.seqRemove(s.seq)
	}
	if n > 0 {
		e.ctx.SeqCopy(src, s.seq, 0, n)
		s.nPast = n
	}
	if ok {
		pl.Copied()
	}
	return s.nPast
}

// reap ends sequences whose client went away.
func (e *Engine) reap() {
	for _, list := range []*[]*sequence{&e.active, &e.paused} {
		for i := 0; i < len(*list); {
			s := (*list)[i]
			if s.cancelled.Load() {
				e.finish(s, FinishNone, "", context.Cause(s.req.Ctx))
				continue // finish removed it
			}
			i++
		}
	}
}

// resume restarts preempted sequences the allocator has readmitted: they
// recompute their tokens, sharing whatever prefix is still cached.
func (e *Engine) resume() {
	if len(e.paused) == 0 {
		return
	}
	// A resumed sequence may get the id of a sequence evicted a moment ago:
	// remove that one's cells before copying a prefix into the id.
	e.removeEvicted()
	for i := 0; i < len(e.paused); {
		s := e.paused[i]
		select {
		case <-s.resumed:
		default:
			i++
			continue
		}
		e.paused = append(e.paused[:i], e.paused[i+1:]...)
		s.resumed = nil
		s.seq = s.req.Ledger.(GrowLedger).SeqID()
		if !validSeq(s.seq) || (e.cmap != nil && s.seq >= RetiredSequence) {
			// One bad id in a batch would fail the whole decode step.
			e.finish(s, FinishNone, "", fmt.Errorf("%w: resumed with sequence id %d", ErrBadRequest, s.seq))
			continue
		}
		s.inCache = true
		n := e.copyPrefix(s)
		s.state = statePrefill
		e.active = append(e.active, s)
		e.running.Add(1)
		if n < 0 {
			e.finish(s, FinishNone, "", errDeterministicPrefix)
		}
	}
}

// target is how many tokens must be in the cache before s samples or
// decodes: all of s.toks. (A sequence that has sampled holds its last
// sampled token in s.next; the next decode step feeds it.)
func (s *sequence) target() int { return len(s.toks) }

// grow makes sure every decoding sequence has a cell for its next token,
// preempting sequences when an optimistic pool runs dry.
func (e *Engine) grow() {
	for i := 0; i < len(e.active); {
		s := e.active[i]
		gl, ok := s.req.Ledger.(GrowLedger)
		if !ok || s.state != stateDecode || s.grown {
			i++
			continue
		}
		got, err := gl.Grow(1)
		if err != nil {
			e.finish(s, FinishNone, "", err)
			continue
		}
		if got {
			s.grown = true // until the token is decoded; it may be held back
			i++
			continue
		}
		v := e.victim()
		e.preempt(v)
		if v == s {
			continue // s left e.active; e.active[i] is the next one
		}
		if idx := position(e.active, s); idx >= 0 {
			i = idx // retry s, which may have moved
		}
	}
}

func position(list []*sequence, s *sequence) int {
	for i, x := range list {
		if x == s {
			return i
		}
	}
	return -1
}

// victim picks the sequence to preempt among those with a GrowLedger (the
// only ones that can be requeued; grow calls victim for one of them, so
// there is one): those of the most loaded tenant (the highest
// GrowLedger.Load), among them the lowest priority, and among those the
// most recently started. One tenant's requests therefore cannot preempt
// another tenant's while that one is within its share, and priority orders
// only within a tenant. It does not allocate.
func (e *Engine) victim() *sequence {
	var v *sequence
	var vLoad float64
	// From the newest: later ones replace v only when strictly better, so
	// ties go to the most recently started.
	for i := len(e.active) - 1; i >= 0; i-- {
		s := e.active[i]
		gl, ok := s.req.Ledger.(GrowLedger)
		if !ok {
			continue
		}
		load := gl.Load()
		if math.IsNaN(load) {
			load = math.Inf(1)
		}
		if v == nil || load > vLoad || (load == vLoad && s.req.Priority < v.req.Priority) {
			v, vLoad = s, load
		}
	}
	return v
}

// preempt frees s's cells and queues it to run again later; its stream
// stays open and simply pauses.
func (e *Engine) preempt(s *sequence) {
	gl := s.req.Ledger.(GrowLedger)
	// Everything in s.toks is recomputed on resume, less any prefix that is
	// still cached then.
	keep, resumed, err := gl.Requeue(s.toks)
	if err != nil {
		e.finish(s, FinishNone, "", err)
		return
	}
	if !keep {
		e.release(s.seq)
	}
	e.preempted.Add(1)
	s.stream.result.Preempted++
	s.inCache = false
	s.state, s.resumed, s.chunk, s.out, s.nPast = statePaused, resumed, 0, -1, 0
	s.ledgered, s.grown, s.held = 0, false, 0 // the allocator starts s afresh
	i := position(e.active, s)
	e.active = append(e.active[:i], e.active[i+1:]...)
	e.paused = append(e.paused, s)
	e.running.Add(-1)
}

// fill builds the step's batch: one token per decoding sequence, then
// chunks of the tokens that prefilling sequences still lack, up to budget
// tokens.
func (e *Engine) fill(budget int) {
	e.b.Reset()
	if e.cmap != nil {
		e.fillOrdered(budget)
		return
	}
	for _, s := range e.active {
		s.out, s.chunk = -1, 0
		if s.state == stateDecode {
			s.out = e.b.Add(s.next, s.nPast, s.seq, true)
		}
	}
	for _, s := range e.active {
		if s.state != statePrefill {
			continue
		}
		room := budget - e.b.Len()
		if room <= 0 {
			break
		}
		n := min(room, s.target()-s.nPast)
		last := s.nPast+n == s.target()
		for i := range n {
			idx := e.b.Add(s.toks[s.nPast+i], s.nPast+i, s.seq, last && i == n-1)
			if last && i == n-1 {
				s.out = idx
			}
		}
		s.chunk = n
	}
}

// put adds a token to a deterministic engine's batch and to its record of
// the batch's sequences and positions.
func (e *Engine) put(tok int32, pos, seq int, logits bool) int {
	e.bseq = append(e.bseq, int32(seq))
	e.bpos = append(e.bpos, int32(pos))
	if logits {
		e.outputs++
	}
	return e.b.Add(tok, pos, seq, logits)
}

// fillOrdered is fill for a deterministic engine. It leaves out sequences
// held back this step, puts each sequence's tokens together, the sequences
// whose highest cell is lowest first (new ones, with no cells, lead: they
// may fill holes below everyone else), and pads the batch to two tokens
// and, if any token asks for logits, two outputs.
func (e *Engine) fillOrdered(budget int) {
	e.order = e.order[:0]
	room := budget
	for _, s := range e.active {
		s.out, s.chunk = -1, 0
		if !s.skip && s.state == stateDecode {
			room--
			e.order = append(e.order, s)
		}
	}
	for _, s := range e.active {
		if s.skip || s.state != statePrefill || room <= 0 {
			continue
		}
		s.chunk = min(room, s.target()-s.nPast)
		room -= s.chunk
		e.order = append(e.order, s)
	}
	top := func(s *sequence) int32 { return e.cmap.maxCell[s.seq] }
	for i := 1; i < len(e.order); i++ {
		for j := i; j > 0 && top(e.order[j]) < top(e.order[j-1]); j-- {
			e.order[j], e.order[j-1] = e.order[j-1], e.order[j]
		}
	}
	e.bseq, e.bpos, e.outputs, e.padIdx = e.bseq[:0], e.bpos[:0], 0, -1
	for _, s := range e.order {
		if s.state == stateDecode {
			s.out = e.put(s.next, s.nPast, s.seq, true)
			continue
		}
		last := s.nPast+s.chunk == s.target()
		for i := range s.chunk {
			out := last && i == s.chunk-1
			if idx := e.put(s.toks[s.nPast+i], s.nPast+i, s.seq, out); out {
				s.out = idx
			}
		}
	}
	if n := e.b.Len(); n > 0 && (n < 2 || e.outputs == 1) {
		e.padIdx = e.put(0, 0, PadSequence, true)
	}
}

// plan builds a deterministic engine's batch. Placing it on the mirror of
// llama.cpp's cells, it holds back every sequence whose tokens would land
// below cells it already holds, until the rest fits in order. A sequence
// held HoldLimit steps in a row, or one whose hold would leave the step
// empty, is recomputed from its first token, which lets it go wherever
// there is room; one that still cannot go anywhere in order runs out of
// order (counted in Disordered) so that the engine never stalls. plan
// returns false when no sequence can run this step.
func (e *Engine) plan(budget int) bool {
	for _, s := range e.active {
		s.skip, s.force = false, false
		if s.held >= HoldLimit && e.cmap.maxCell[s.seq] >= 0 && s.moves < MoveLimit {
			e.relocate(s)
		}
	}
	for {
		e.removeEvicted() // before placing: an eviction moves llama.cpp's head
		e.fill(budget)
		if e.b.Len() == 0 {
			// Everyone is held: free the one held longest.
			var v *sequence
			for _, s := range e.active {
				if s.skip && (v == nil || s.held > v.held) {
					v = s
				}
			}
			if v == nil {
				return false
			}
			v.skip = false
			if e.cmap.maxCell[v.seq] >= 0 && v.moves < MoveLimit {
				e.relocate(v)
			} else {
				v.force = true
				e.disordered.Add(1)
			}
			continue
		}
		e.cmap.mark()
		var broken seqSet
		var fits bool
		e.placed, fits = e.cmap.place(e.bseq, e.bpos, e.placed[:0], PadSequence, &broken)
		if !fits && e.retired() {
			// The allocator counts retired cells as free: free them now.
			e.cmap.rollback()
			e.freeRetired()
			continue
		}
		if !fits {
			break // llama.cpp will say so too; step rolls back and shrinks
		}
		held := false
		for _, s := range e.active {
			if s.skip || s.force || !broken.has(s.seq) {
				continue
			}
			if s.moves >= MoveLimit && s.held >= HoldLimit {
				s.force = true // recomputed often enough: go on out of order
				e.disordered.Add(1)
				continue
			}
			s.skip, held = true, true
		}
		if !held {
			break
		}
		e.cmap.rollback()
	}
	for _, s := range e.active {
		switch {
		case s.skip:
			s.held++
			e.held.Add(1)
		case s.out >= 0 || s.chunk > 0:
			s.held = 0
		}
	}
	return true
}

// relocate drops s's cells and sends it back to prefill: it recomputes its
// prompt and generated tokens (bit-identically, in a deterministic engine)
// in whatever cells are free, which keeps them in order. Its ledger keeps
// its cells counted; it does not commit its tokens again.
func (e *Engine) relocate(s *sequence) {
	// Freed, not retired: s's own recompute, which goes first in the
	// batch, is what fills these cells.
	e.seqRemove(s.seq)
	s.nPast, s.state, s.held = 0, statePrefill, 0
	s.moves++
	e.relocated.Add(1)
}

func (e *Engine) decoding() int {
	n := 0
	for _, s := range e.active {
		if s.state == stateDecode {
			n++
		}
	}
	return n
}

func (e *Engine) step() {
	start := time.Now()
	e.grow()
	if len(e.active) == 0 {
		return
	}
	defer func() { e.recordStep(time.Since(start)) }()
	budget := e.batch
	for {
		if e.cmap != nil {
			if !e.plan(budget) {
				return
			}
		} else {
			e.fill(budget)
			// Cells the allocator freed by eviction must be free in
			// llama.cpp before this decode uses them.
			e.removeEvicted()
		}
		err := e.ctx.Decode(e.b)
		if e.cmap != nil {
			if err != nil {
				e.cmap.rollback()
			}
			if e.padIdx >= 0 {
				e.seqRemove(PadSequence)
				e.padded.Add(1)
			}
		}
		if err == nil {
			break
		}
		if errors.Is(err, ErrNoKVSlot) {
			// The allocator's bound makes this impossible; if it happens
			// anyway, count it, shrink the batch, and as a last resort end
			// only the newest sequence.
			e.nokvslot.Add(1)
			if floor := e.decoding() + 1; budget > floor {
				budget = max(floor, budget/2)
				continue
			}
			e.aborted.Add(1)
			e.finish(e.active[len(e.active)-1], FinishNone, "", ErrSequenceAborted)
			if len(e.active) == 0 {
				return
			}
			continue
		}
		// A failed computation: roll back what this step put in the cache
		// and end the sequences that were in the batch.
		for i := 0; i < len(e.active); {
			s := e.active[i]
			if s.out >= 0 || s.chunk > 0 {
				e.finish(s, FinishNone, "", fmt.Errorf("decode step: %w", err))
				continue
			}
			i++
		}
		return
	}
	step := e.steps.Add(1)
	if e.cfg.OnStep != nil {
		seqs := 0
		for _, s := range e.active {
			if s.out >= 0 || s.chunk > 0 {
				seqs++
			}
		}
		e.cfg.OnStep(e.b.Len(), seqs)
	}
	for i := 0; i < len(e.active); {
		s := e.active[i]
		if e.advance(s, step) {
			i++
		}
	}
}

// advance accounts for s's part of the step and samples its next token. It
// returns false when s ended (and was removed from e.active).
func (e *Engine) advance(s *sequence, step uint64) bool {
	switch {
	case s.state == statePrefill && s.chunk > 0:
		s.nPast += s.chunk
		e.prefill.Add(uint64(s.chunk))
		// A sequence recomputed to keep its cells in order has committed
		// its tokens already.
		if from := max(s.nPast-s.chunk, s.ledgered); from < s.nPast {
			if err := s.req.Ledger.Commit(s.toks[from:s.nPast]); err != nil {
				e.finish(s, FinishNone, "", err)
				return false
			}
			s.ledgered = s.nPast
		}
		if s.nPast < s.target() {
			return true
		}
		if s.generated > 0 {
			// A resumed sequence has recomputed its cells; it goes on
			// with the token it had sampled.
			s.state = stateDecode
			return true
		}
	case s.state == stateDecode && s.out >= 0:
		s.nPast++
		s.grown = false
		s.toks = append(s.toks, s.next)
		s.one[0] = s.next
		if err := s.req.Ledger.Commit(s.one[:]); err != nil {
			e.finish(s, FinishNone, "", err)
			return false
		}
		s.ledgered = s.nPast
	default:
		return true // waiting for room in the batch
	}
	tok, err := s.sampler.Sample(e.ctx, s.out)
	if err != nil {
		// Only this sequence ends (ErrNoValidToken for parameters that left
		// nothing to draw); the others go on.
		e.finish(s, FinishNone, "", fmt.Errorf("sample after %d tokens: %w", s.generated, err))
		return false
	}
	return e.accept(s, tok, step)
}

// accept streams a sampled token and decides whether s goes on.
func (e *Engine) accept(s *sequence, tok int32, step uint64) bool {
	s.generated++
	s.moves = 0
	e.generated.Add(1)
	if s.generated == 1 {
		s.stream.result.FirstToken = time.Now()
	}
	if !s.req.IgnoreEOS && e.model.IsEOG(tok) {
		e.finish(s, FinishEOS, "", nil)
		return false
	}
	e.piece = e.model.AppendPiece(e.piece[:0], tok, false, false)
	if at, stop := s.text.push(tok, e.piece); at >= 0 {
		if at > 0 && !e.emit(s, at, false, step) {
			return false
		}
		s.text.take(len(s.text.pend), true) // drop the stop string and what follows
		e.finish(s, FinishStop, stop, nil)
		return false
	}
	if s.generated >= s.req.MaxTokens {
		e.finish(s, FinishLength, "", nil)
		return false
	}
	if n := s.text.safeLen(); n > 0 && !e.emit(s, n, false, step) {
		return false
	}
	s.next = tok
	s.state = stateDecode
	return true
}

// emit sends the first n pending bytes without blocking. A full buffer ends
// the sequence with ErrSlowConsumer, and emit returns false.
func (e *Engine) emit(s *sequence, n int, all bool, step uint64) bool {
	text, ids := s.text.take(n, all)
	if text == "" && len(ids) == 0 {
		return true
	}
	select {
	case s.stream.events <- Event{Text: text, Tokens: ids, Step: step}:
		return true
	default:
		e.slow.Add(1)
		e.finish(s, FinishNone, "", ErrSlowConsumer)
		return false
	}
}

// finish ends s: it flushes held-back text on a normal end, settles the
// sequence's cells with the allocator and in llama.cpp, and closes the
// stream.
func (e *Engine) finish(s *sequence, reason FinishReason, stop string, err error) {
	if i := position(e.active, s); i >= 0 {
		e.active = append(e.active[:i], e.active[i+1:]...)
		e.running.Add(-1)
	} else if i := position(e.paused, s); i >= 0 {
		e.paused = append(e.paused[:i], e.paused[i+1:]...)
	}
	if err == nil && len(s.text.pend)+len(s.text.toks) > 0 {
		if !e.emit(s, len(s.text.pend), true, e.steps.Load()) {
			return // emit ended s as a slow consumer
		}
	}
	if err != nil {
		s.stream.failed.Store(true)
	}
	if keep := s.req.Ledger.Finish(); !keep && s.inCache {
		e.release(s.seq)
	}
	s.inCache = false
	if s.sampler != nil {
		s.sampler.Free()
		s.sampler = nil
	}
	s.stopWatch()
	r := &s.stream.result
	r.Reason, r.StopString, r.Err = reason, stop, err
	r.CompletionTokens = s.generated
	r.Ended = time.Now()
	close(s.stream.events)
}
