// Package native is kvgate's decode worker: one goroutine that owns a
// llama.cpp context (a Backend) and runs every admitted sequence in one
// llama_decode per step. It is pure Go; package native/llama is the cgo
// binding that implements Backend, and the worker's tests run against a
// fake that checks llama.cpp's rules.
//
// A step is one-way: the worker reports what the last step did and what
// the next one needs to the allocator in one Apply, carries out the answer
// (evictions, preemptions, resumes), plans the batch (a planner: plain, or
// ordered for deterministic mode), decodes it, and samples.
//
// A request for several samples of one prompt (Request.N) runs as a group
// of sequences: sample 0 prefills the prompt; once it is decoded, each
// other sample is given the prompt's cells with Backend.SeqCopy (shared,
// in a unified cache), draws its first token from sample 0's output for
// the last prompt token, and decodes only its own tokens from then on.
// Sample 0's end is reported to the allocator only after every other
// sample's, since its cells hold the prompt they share.
package native

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kvgate/kvgate/allocator"
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
	// ErrBadRequest reports a request the engine cannot run: a prompt
	// token outside the vocabulary.
	ErrBadRequest = errors.New("bad sequence request")
	// ErrSamples wraps (with ErrBadRequest) the refusal of a Request.N the
	// engine cannot run: over allocator.MaxSamples or the sequences that
	// run at once, or N > 1 in deterministic mode or with a KV stream per
	// sequence.
	ErrSamples = errors.New("n samples")
)

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

// Request is one sequence to admit and run.
type Request struct {
	// Priority orders the queue of the request's tenant, and preemption
	// within the tenant: among the sequences of the most loaded tenant,
	// the lowest priority, most recently started one goes first.
	Priority int32
	// Prompt holds the prompt's token ids, all in the vocabulary.
	Prompt []int32
	// MaxTokens is the most tokens to generate.
	MaxTokens int
	// Sampling chooses the next token.
	Sampling SamplingParams
	// Stop strings end generation and are not streamed.
	Stop []string
	// StopTokens end generation when sampled, beside the end-of-generation
	// tokens; the token is not streamed (Result.StopToken names it).
	StopTokens []int32
	// IgnoreEOS keeps generating past end-of-generation tokens, except
	// that a sequence with a grammar ends at an end-of-generation token
	// (the grammar allows one only once it is complete).
	IgnoreEOS bool
	// Logprobs makes every Event carry the log-probability of each of its
	// tokens and of the TopLogprobs (at most MaxTopLogprobs) most likely
	// tokens of that step, under the model's raw distribution.
	Logprobs    bool
	TopLogprobs int
	// NoCache keeps the sequence out of the prefix cache.
	NoCache bool
	// QueueTimeout bounds the time spent queued; 0 means as long as the
	// context allows.
	QueueTimeout time.Duration
	// Tenant names the sequence's tenant; CacheSalt partitions the prefix
	// cache within it.
	Tenant, CacheSalt string
	// N is the number of completions of the prompt to generate, at most
	// allocator.MaxSamples; 0 and 1 mean one. The prompt is decoded once,
	// by sample 0, and shared zero-copy with samples 1..N-1
	// (Backend.SeqCopy); each sample then draws its own tokens with a
	// sampler of its own, seeded Sampling.Seed+i (wrapping) when
	// Sampling.HasSeed, so that a seed gives N reproducible samples. The
	// allocator admits the N samples as one sample group (see
	// allocator.Request.N). N > 1 is refused with ErrBadRequest by a
	// deterministic engine and where each sequence has a KV stream of its
	// own (Backend.SequenceCells below Backend.Cells), whose SeqCopy copies
	// the cells instead of sharing them.
	N int
}

// Event is a piece of generated text.
type Event struct {
	// Text is valid UTF-8.
	Text string
	// Tokens are the ids whose text Text completes.
	Tokens []int32
	// Step is the decode step that produced the last of the tokens.
	Step uint64
	// Logprobs holds one entry per token of Tokens when the request asked
	// for them (Request.Logprobs), nil otherwise.
	Logprobs []TokenLogprob
	// Index is the sample the event belongs to, 0..N-1 (Request.N).
	Index int
}

// Result describes how a sequence ended. Err is nil for a normal end.
type Result struct {
	Reason       FinishReason
	CachedTokens int // prompt tokens shared from the prefix cache
	Preempted    int // times the sequence was preempted and resumed
	StopString   string
	// StopToken is the Request.StopTokens id that ended the sequence, when
	// HasStopToken is set (Reason is then FinishStop).
	StopToken        int32
	HasStopToken     bool
	Err              error
	PromptTokens     int
	CompletionTokens int
	Started          time.Time // when the engine took the sequence
	FirstToken       time.Time // when the first token was sampled
	Ended            time.Time
}

// Stream delivers the events of one request's samples (one sample unless
// Request.N > 1), each tagged with its Event.Index, on one channel. Events
// is closed after the last event of the last sample; Result and Results
// are valid after that. A slow reader ends every sample
// (ErrSlowConsumer).
type Stream struct {
	events  chan Event
	results []Result // one per sample index
	failed  atomic.Bool
	cached  int
}

// CachedTokens returns the prompt tokens shared from the prefix cache at
// admission.
func (s *Stream) CachedTokens() int { return s.cached }

// Events returns the stream's events, closed at the end.
func (s *Stream) Events() <-chan Event { return s.events }

// Result returns how sample 0 ended: the sequence of a request of one
// sample. Call it after Events is closed.
func (s *Stream) Result() Result { return s.results[0] }

// Results returns how every sample ended, indexed by Event.Index: each has
// its own Reason, Err and CompletionTokens, and all share PromptTokens and
// CachedTokens, the prompt's. Call it after Events is closed; the slice is
// the stream's own.
func (s *Stream) Results() []Result { return s.results }

// Failed reports, without waiting, that every sample of the stream has
// ended with an error, so that a sender may stop early.
func (s *Stream) Failed() bool { return s.failed.Load() }

// EngineConfig configures an Engine.
type EngineConfig struct {
	// Open creates the backend. The worker calls it on its own goroutine,
	// locked to its OS thread, and closes the backend when it stops.
	Open func() (Backend, error)
	// Vocab is the model's vocabulary.
	Vocab Vocab
	// Admission configures the allocator the engine creates once the
	// backend exists and admits every sequence with. The engine sets its
	// Cells to the backend's cells (less the padding token's in
	// deterministic mode), its Batch to the step's token budget and
	// ReportsStepRate, and keeps Watermark below Cells. Its MaxRunning (or
	// MaxSequences when 0) bounds the sequences running at once.
	Admission allocator.Config
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
	// steps and recomputation when cells run short. It needs the prefix
	// cache off (a shared prefix pins a sequence's lowest cells where
	// others put them) and Admission.MaxSequences below RetiredSequence;
	// NewEngine checks both.
	Deterministic bool
	// TuneThreads lets the worker change the backend's thread count
	// between decodes, from the backend's own count downwards, when decode
	// steps run far slower than they did: ggml's threads spin at their
	// barriers, so a step with more threads than the CPUs that are free
	// for it (other processes busy on the machine) waits for descheduled
	// threads and can take 100 to 1000 times as long. See threadTuner.
	TuneThreads bool

	// clock times decodes for the thread tuner; nil means time.Now. The
	// package's tests set it to a clock the fake backend moves.
	clock func() time.Time
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
	// Threads is the CPU thread count of the next decode; ThreadChanges
	// counts the times the thread tuner (EngineConfig.TuneThreads)
	// changed it, its probes of a neighbouring count (there and back)
	// included.
	Threads       int64
	ThreadChanges uint64
	// GrammarTokens counts tokens drawn under a grammar; GrammarResamples
	// those the grammar rejected at first, which cost a mask of the whole
	// vocabulary (see SamplingParams.Grammar). Both are added when a
	// sequence ends.
	GrammarTokens, GrammarResamples uint64
}

// Engine is the decode worker and the front door to it: Submit admits a
// sequence with the engine's allocator and hands it to the worker, which
// owns the backend and runs every sequence in one Decode per step.
type Engine struct {
	cfg      EngineConfig
	vocab    Vocab
	alloc    *allocator.Allocator
	cells    int
	seqCells int // the most cells one sequence may hold
	batch    int
	submit   chan *sequence
	quit     chan struct{}
	done     chan struct{}
	closed   atomic.Bool
	mu       sync.RWMutex // Submit's hand-over (read) against Close (write)

	steps, prefill, generated, nokvslot, slow, aborted atomic.Uint64
	preempted, evicted                                 atomic.Uint64
	held, relocated, padded, disordered                atomic.Uint64
	threadChanges                                      atomic.Uint64
	grammarTokens, grammarResamples                    atomic.Uint64
	running, threads                                   atomic.Int64
	// stepNanos is math.Float64bits of the moving average of a step's
	// duration in nanoseconds (0 before the first step), for StepRate; the
	// worker alone writes it.
	stepNanos atomic.Uint64

	w worker // owned by the worker goroutine
}

// NewEngine starts the decode worker. It returns once the backend and the
// allocator exist, or with the error that prevented them. Close stops the
// worker.
func NewEngine(cfg EngineConfig) (*Engine, error) {
	ids := cfg.Admission.MaxSequences
	running := cfg.Admission.MaxRunning
	if running == 0 {
		running = ids
	}
	switch {
	case cfg.Open == nil || cfg.Vocab == nil:
		return nil, errors.New("engine: Open and Vocab are required")
	case ids <= 0 || ids > MaxSequenceIDs:
		return nil, fmt.Errorf("engine: max sequences %d outside [1, %d]", ids, MaxSequenceIDs)
	case running < 0 || running > ids:
		return nil, fmt.Errorf("engine: max running %d outside [1, %d]", running, ids)
	case cfg.Deterministic && ids >= RetiredSequence:
		return nil, fmt.Errorf("engine: deterministic: max sequences %d leaves no ids for padding and retired cells (want < %d)", ids, RetiredSequence)
	case cfg.Deterministic && cfg.Admission.PrefixCache:
		return nil, errDeterministicPrefix
	}
	if cfg.StreamBuffer <= 0 {
		cfg.StreamBuffer = 1024
	}
	if cfg.clock == nil {
		cfg.clock = time.Now
	}
	e := &Engine{
		cfg:    cfg,
		vocab:  cfg.Vocab,
		submit: make(chan *sequence, running),
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

// errDeterministicPrefix refuses a deterministic engine with a prefix
// cache: a misconfigured server, not a bad request.
var errDeterministicPrefix = errors.New("engine: a deterministic engine cannot share prefixes; turn the prefix cache off")

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

// SequenceCells returns the most cells one sequence may hold: Cells in a
// unified cache, a stream's cells where each sequence has a stream of its
// own.
func (e *Engine) SequenceCells() int { return e.seqCells }

// Batch returns the per-step token budget.
func (e *Engine) Batch() int { return e.batch }

// Allocator returns the allocator that admits the engine's sequences, for
// its statistics, Drain, Idle and FlushCache.
func (e *Engine) Allocator() *allocator.Allocator { return e.alloc }

// Stats returns the worker's counters.
func (e *Engine) Stats() EngineStats {
	return EngineStats{
		Steps:            e.steps.Load(),
		PrefillTokens:    e.prefill.Load(),
		GeneratedTokens:  e.generated.Load(),
		NoKVSlot:         e.nokvslot.Load(),
		SlowConsumers:    e.slow.Load(),
		Aborted:          e.aborted.Load(),
		Preempted:        e.preempted.Load(),
		Evicted:          e.evicted.Load(),
		Running:          e.running.Load(),
		Held:             e.held.Load(),
		Relocated:        e.relocated.Load(),
		Padded:           e.padded.Load(),
		Disordered:       e.disordered.Load(),
		Threads:          e.threads.Load(),
		ThreadChanges:    e.threadChanges.Load(),
		GrammarTokens:    e.grammarTokens.Load(),
		GrammarResamples: e.grammarResamples.Load(),
	}
}

// Close ends every running sequence with ErrEngineClosed, frees the backend
// and waits for the worker to exit. It is idempotent.
func (e *Engine) Close() {
	e.mu.Lock()
	if e.closed.CompareAndSwap(false, true) {
		close(e.quit)
	}
	e.mu.Unlock()
	<-e.done
}

// Submit admits req with the engine's allocator, blocking while it is
// queued, and hands it to the worker: it is where a request is admitted.
// ctx ends the sequence, queued or running, at the next step when it is
// done. A refusal is the allocator's (*allocator.RejectError, or an error
// wrapping allocator.ErrInvalidRequest); a prompt token outside the
// vocabulary wraps ErrBadRequest and ErrTokenOutOfRange.
//
// A request for N > 1 samples is admitted as one sample group, with all
// its sequence ids and cells at once, and its samples stream on the one
// Stream. A group that can never run is refused at once, never queued: an
// N outside 0..allocator.MaxSamples or above the sequences that may run at
// once, or N > 1 where samples cannot share a prompt (deterministic mode,
// a KV stream per sequence), wraps ErrBadRequest (the first two also
// allocator.ErrInvalidRequest); a group whose prompt plus N×MaxTokens
// exceeds the pool is the allocator's NEVER_FITS, with Limit the pool's
// cells. Cancelling ctx ends every sample, as does a slow reader
// (ErrSlowConsumer); any other failure (ErrNoValidToken, say) ends only
// its sample.
func (e *Engine) Submit(ctx context.Context, req Request) (*Stream, error) {
	if i := e.vocab.ValidTokens(req.Prompt); i >= 0 {
		return nil, fmt.Errorf("%w: %w: prompt[%d] = %d", ErrBadRequest, ErrTokenOutOfRange, i, req.Prompt[i])
	}
	if err := e.checkSamples(req.N); err != nil {
		return nil, err
	}
	lease, err := e.alloc.Admit(ctx, allocator.Request{
		Prompt: req.Prompt, NoCache: req.NoCache, MaxTokens: req.MaxTokens, Priority: req.Priority,
		Tenant: req.Tenant, CacheSalt: req.CacheSalt, QueueTimeout: req.QueueTimeout, N: req.N,
	})
	if err != nil {
		return nil, err
	}
	n := max(req.N, 1)
	st := &Stream{events: make(chan Event, e.cfg.StreamBuffer), cached: lease.CachedTokens(), results: make([]Result, n)}
	s := &sequence{req: req, ctx: ctx, lease: lease, out: -1, stream: st, res: &st.results[0]}
	s.seq, s.src, s.shared = lease.Prepared()
	if n > 1 {
		g := &group{members: make([]*sequence, n), live: n}
		g.members[0], s.group = s, g
		for i, fl := range lease.Samples() {
			f := &sequence{req: req, ctx: ctx, lease: fl, out: -1, stream: st, res: &st.results[i+1], index: i + 1, group: g}
			if req.Sampling.HasSeed {
				f.req.Sampling.Seed += uint32(i + 1) // wraps
			}
			f.seq, f.src, f.shared = fl.Prepared()
			g.members[i+1] = f
		}
	}
	// The read lock keeps Close from closing the worker's door while the
	// sequence goes through it: the worker takes every sequence handed
	// over before it stops.
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.closed.Load() {
		lease.Release()
		return nil, ErrEngineClosed
	}
	e.submit <- s
	return s.stream, nil
}

// checkSamples refuses, with ErrBadRequest, a number of samples the engine
// cannot run: outside 0..allocator.MaxSamples, more than may run at once,
// or N > 1 in deterministic mode (whose ordered planner places every
// sequence's own cells) or with a KV stream per sequence (where SeqCopy
// copies the prompt instead of sharing it).
func (e *Engine) checkSamples(n int) error {
	running := e.cfg.Admission.MaxRunning
	if running == 0 {
		running = e.cfg.Admission.MaxSequences
	}
	switch {
	case n < 0 || n > allocator.MaxSamples:
		return fmt.Errorf("%w: %w: %w: %d samples outside 0..%d", ErrBadRequest, ErrSamples, allocator.ErrInvalidRequest, n, allocator.MaxSamples)
	case n > running:
		return fmt.Errorf("%w: %w: %w: %d samples, but at most %d sequences run at once", ErrBadRequest, ErrSamples, allocator.ErrInvalidRequest, n, running)
	case n > 1 && e.cfg.Deterministic:
		return fmt.Errorf("%w: %w: a deterministic engine runs one sample a request, not %d", ErrBadRequest, ErrSamples, n)
	case n > 1 && e.seqCells < e.cells:
		return fmt.Errorf("%w: %w: with a KV stream per sequence the prompt cannot be shared by %d samples", ErrBadRequest, ErrSamples, n)
	}
	return nil
}
