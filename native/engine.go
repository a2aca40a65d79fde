package native

import (
	"context"
	"errors"
	"fmt"
	"runtime"
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

// Ledger is the engine's view of the allocator's account for one sequence:
// Charge is called as tokens enter the KV cache, Release exactly once when
// the sequence ends.
type Ledger interface {
	Charge(n int) error
	Release()
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
	// SeqID is the llama.cpp sequence id the allocator assigned.
	SeqID int
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
	// Ledger is charged for the sequence's cells and released at its end.
	Ledger Ledger
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
	// MaxSequences bounds the sequences running at once.
	MaxSequences int
	// Threads is the CPU thread count; 0 means all CPUs.
	Threads int
	// StreamBuffer is how many events a stream may hold before its reader
	// counts as too slow; 0 means 1024.
	StreamBuffer int
	// OnStep, when set, is called on the worker after every decode step
	// with the batch's token count and the number of sequences in it. It
	// must not block.
	OnStep func(tokens, sequences int)
}

// EngineStats counts the worker's work since start.
type EngineStats struct {
	Steps           uint64
	PrefillTokens   uint64
	GeneratedTokens uint64
	NoKVSlot        uint64
	SlowConsumers   uint64
	Aborted         uint64
	Running         int64
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
	running                                            atomic.Int64

	// Owned by the worker goroutine.
	ctx    *Context
	b      *Batch
	active []*sequence
	piece  []byte
}

type seqState int

const (
	statePrefill seqState = iota
	stateDecode
)

type sequence struct {
	req       Request
	stream    *Stream
	sampler   *Sampler
	state     seqState
	nPast     int // tokens in the cache
	chunk     int // prompt tokens in the current batch
	out       int // output index in the current batch, or -1
	next      int32
	generated int
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
	if cfg.Batch < cfg.MaxSequences {
		cfg.Batch = cfg.MaxSequences
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

// Cells returns the KV-cell pool size after llama.cpp's padding.
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
		Running:         e.running.Load(),
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

// Start hands an admitted sequence to the worker. The sequence's Ledger is
// released by the engine when the sequence ends, also when Start fails.
func (e *Engine) Start(req Request) (*Stream, error) {
	fail := func(err error) (*Stream, error) {
		if req.Ledger != nil {
			req.Ledger.Release()
		}
		return nil, err
	}
	switch {
	case req.Ledger == nil || req.Ctx == nil:
		return fail(fmt.Errorf("%w: ledger and context are required", ErrBadRequest))
	case req.SeqID < 0 || req.SeqID >= e.cfg.MaxSequences:
		return fail(fmt.Errorf("%w: sequence id %d outside [0, %d)", ErrBadRequest, req.SeqID, e.cfg.MaxSequences))
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
	s := &sequence{req: req, stream: &Stream{events: make(chan Event, e.cfg.StreamBuffer)}, out: -1}
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
	})
	if err != nil {
		ready <- err
		return
	}
	e.ctx, e.cells, e.batch = ctx, ctx.Cells(), ctx.BatchSize()
	e.b = NewBatch(e.batch)
	e.piece = make([]byte, 0, 256)
	ready <- nil

	defer func() {
		for len(e.active) > 0 {
			e.finish(e.active[0], FinishNone, "", ErrEngineClosed)
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

	for {
		if len(e.active) == 0 {
			select {
			case s := <-e.submit:
				e.add(s)
			case <-e.quit:
				return
			}
		}
	drain:
		for {
			select {
			case s := <-e.submit:
				e.add(s)
			case <-e.quit:
				return
			default:
				break drain
			}
		}
		e.reap()
		if len(e.active) > 0 {
			e.step()
		}
	}
}

func (e *Engine) add(s *sequence) {
	s.sampler = NewSampler(s.req.Sampling)
	if s.req.Sampling.HasPenalties() {
		for _, t := range s.req.Prompt {
			s.sampler.Accept(t)
		}
	}
	s.text.reset(s.req.Stop)
	s.stream.result.Started = time.Now()
	s.stream.result.PromptTokens = len(s.req.Prompt)
	e.active = append(e.active, s)
	e.running.Add(1)
}

// reap ends sequences whose client went away.
func (e *Engine) reap() {
	for i := 0; i < len(e.active); {
		s := e.active[i]
		if s.cancelled.Load() {
			e.finish(s, FinishNone, "", context.Cause(s.req.Ctx))
			continue // finish removed e.active[i]
		}
		i++
	}
}

// fill builds the step's batch: one token per decoding sequence, then
// prefill chunks in admission order up to budget tokens.
func (e *Engine) fill(budget int) {
	e.b.Reset()
	for _, s := range e.active {
		s.out, s.chunk = -1, 0
		if s.state == stateDecode {
			s.out = e.b.Add(s.next, s.nPast, s.req.SeqID, true)
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
		n := min(room, len(s.req.Prompt)-s.nPast)
		last := s.nPast+n == len(s.req.Prompt)
		for i := range n {
			idx := e.b.Add(s.req.Prompt[s.nPast+i], s.nPast+i, s.req.SeqID, last && i == n-1)
			if last && i == n-1 {
				s.out = idx
			}
		}
		s.chunk = n
	}
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
	budget := e.batch
	for {
		e.fill(budget)
		err := e.ctx.Decode(e.b)
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
		if err := s.req.Ledger.Charge(s.chunk); err != nil {
			e.finish(s, FinishNone, "", err)
			return false
		}
		if s.nPast < len(s.req.Prompt) {
			return true
		}
	case s.state == stateDecode:
		s.nPast++
		if err := s.req.Ledger.Charge(1); err != nil {
			e.finish(s, FinishNone, "", err)
			return false
		}
	default:
		return true // waiting for room in the batch
	}
	tok := s.sampler.Sample(e.ctx, s.out)
	if tok < 0 {
		e.finish(s, FinishNone, "", errors.New("sampler selected no token"))
		return false
	}
	return e.accept(s, tok, step)
}

// accept streams a sampled token and decides whether s goes on.
func (e *Engine) accept(s *sequence, tok int32, step uint64) bool {
	s.generated++
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

// finish ends s: it flushes held-back text on a normal end, frees the
// sequence's cells in llama.cpp and in the ledger, and closes the stream.
func (e *Engine) finish(s *sequence, reason FinishReason, stop string, err error) {
	for i, a := range e.active {
		if a == s {
			e.active = append(e.active[:i], e.active[i+1:]...)
			e.running.Add(-1)
			break
		}
	}
	if err == nil && len(s.text.pend)+len(s.text.toks) > 0 {
		if !e.emit(s, len(s.text.pend), true, e.steps.Load()) {
			return // emit ended s as a slow consumer
		}
	}
	if err != nil {
		s.stream.failed.Store(true)
	}
	e.ctx.SeqRemove(s.req.SeqID, -1, -1)
	if s.sampler != nil {
		s.sampler.Free()
		s.sampler = nil
	}
	s.stopWatch()
	s.req.Ledger.Release()
	r := &s.stream.result
	r.Reason, r.StopString, r.Err = reason, stop, err
	r.CompletionTokens = s.generated
	r.Ended = time.Now()
	close(s.stream.events)
}
