package native

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"time"

	"github.com/kvgate/kvgate/allocator"
)

// worker is the state the worker goroutine alone touches.
type worker struct {
	be       Backend
	plan     planner
	b        *Batch
	active   []*sequence // running, in the order they (re)started
	paused   []*sequence // preempted, waiting to resume
	ended    []*sequence // ended; their streams close after the next Apply
	incoming []*sequence
	step     allocator.Step // the report for the next Apply, and its answer
	piece    []byte
	tuner    *threadTuner // nil unless EngineConfig.TuneThreads
}

type seqState int

const (
	statePrefill seqState = iota
	stateDecode
	statePaused
	// stateWait is a sample 1..N-1 of a group waiting for sample 0 to
	// decode the prompt it shares.
	stateWait
)

// group is the worker's state of one request's samples (Request.N > 1).
type group struct {
	members []*sequence // by sample index; members[0] decodes the prompt
	live    int         // members not yet ended
	failed  int         // members ended with an error
	started bool        // the prompt is decoded and shared with every member
	// The leader's end is reported only once every member has ended, as
	// the group's last End: its cells hold the prompt the others share.
	leaderNormal, leaderReported bool
	doom                         error // set to end every member at once
}

// sequence is one admitted sequence on the worker.
type sequence struct {
	req       Request
	ctx       context.Context
	lease     *allocator.Lease
	stream    *Stream
	res       *Result // the stream's result of this sample
	index     int     // sample index, 0..N-1
	group     *group  // nil for a request of one sample
	sampler   Sampler
	seq       int // current llama.cpp sequence id
	src       int // sequence to copy the cached prefix from, or -1
	shared    int // tokens of that prefix
	inCache   bool
	toks      []int32 // prompt, then every generated token fed back
	state     seqState
	nPast     int // tokens in the cache
	chunk     int // tokens of toks in the current batch
	out       int // output index in the current batch, or -1
	next      int32
	generated int
	committed int  // tokens of toks reported to the allocator
	grown     bool // the allocator gave a cell for the pending token
	text      textBuffer
}

func (e *Engine) run(ready chan<- error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer close(e.done)
	w := &e.w
	be, err := e.cfg.Open()
	if err != nil {
		ready <- err
		return
	}
	w.be = be
	e.cells, e.batch = be.Cells(), be.BatchSize()
	if e.cfg.Deterministic {
		w.plan = newOrderedPlanner(be.Cells(), be.BatchSize(), e.cfg.Admission.MaxSequences)
		e.cells-- // the padding token's cell
		e.batch-- // the padding token's room
	} else {
		w.plan = plainPlanner{}
	}
	acfg := e.cfg.Admission
	acfg.Cells, acfg.Batch, acfg.ReportsStepRate = e.cells, e.batch, true
	// With a KV stream per sequence no sequence may outgrow its stream:
	// the allocator then refuses at once (NEVER_FITS) what could never
	// be placed.
	e.seqCells = min(be.SequenceCells(), e.cells)
	if acfg.MaxSequenceTokens <= 0 || acfg.MaxSequenceTokens > e.seqCells {
		acfg.MaxSequenceTokens = e.seqCells
	}
	acfg.Watermark = min(acfg.Watermark, e.cells-1)
	if e.alloc, err = allocator.New(acfg); err != nil {
		be.Close()
		ready <- err
		return
	}
	e.threads.Store(int64(be.Threads()))
	if e.cfg.TuneThreads {
		w.tuner = newThreadTuner(be.Threads())
	}
	w.b = NewBatch(be.BatchSize())
	w.piece = make([]byte, 0, 256)
	ready <- nil
	defer e.shutdown()
	for e.collect() {
		e.apply()
		e.admit()
		e.reap()
		if len(w.active) > 0 {
			e.decodeStep()
		}
	}
}

// shutdown ends every sequence with ErrEngineClosed, reports their ends
// and frees the backend. Ending sample 0 of a group that never started
// ends its other samples too.
func (e *Engine) shutdown() {
	w := &e.w
	for len(w.active) > 0 {
		e.finish(w.active[0], FinishNone, "", ErrEngineClosed)
	}
	for len(w.paused) > 0 {
		e.finish(w.paused[0], FinishNone, "", ErrEngineClosed)
	}
	// Sequences handed over but never taken.
	for _, s := range w.incoming {
		e.finish(s, FinishNone, "", ErrEngineClosed)
	}
	w.incoming = w.incoming[:0]
	for {
		select {
		case s := <-e.submit:
			e.finish(s, FinishNone, "", ErrEngineClosed)
			continue
		default:
		}
		break
	}
	w.step.Grow, w.step.Running = w.step.Grow[:0], w.step.Running[:0]
	e.alloc.Apply(&w.step)
	e.closeEnded()
	w.be.Close()
}

// pending reports whether the report for the next Apply holds anything.
func (w *worker) pending() bool {
	return len(w.ended) > 0 || len(w.step.Commits) > 0 || len(w.step.Copied) > 0
}

// collect takes the sequences handed over since the last step. With
// nothing to run and nothing to report it blocks until a sequence arrives,
// a preempted one may resume, or the engine closes; it returns false then.
func (e *Engine) collect() bool {
	w := &e.w
	w.incoming = w.incoming[:0]
	if len(w.active) == 0 && len(w.incoming) == 0 && !w.pending() {
		if len(w.paused) == 0 {
			w.plan.idle(e) // nothing runs that a freed cell could disorder
		}
		select {
		case s := <-e.submit:
			w.incoming = append(w.incoming, s)
		case <-e.alloc.Resumes():
		case <-e.quit:
			return false
		}
	}
	for {
		select {
		case s := <-e.submit:
			w.incoming = append(w.incoming, s)
		case <-e.quit:
			return false
		default:
			return true
		}
	}
}

// apply makes the step's one call to the allocator: it reports what the
// last step did and asks for a cell for every decoding sequence's next
// token, then carries out the answer in order: evictions, the cells of
// ended and preempted sequences, failures, resumes.
func (e *Engine) apply() {
	w := &e.w
	st := &w.step
	st.Grow, st.Running = st.Grow[:0], st.Running[:0]
	for _, s := range w.active {
		st.Running = append(st.Running, allocator.Candidate{Lease: s.lease, Tokens: s.toks})
		if s.state == stateDecode && !s.grown {
			st.Grow = append(st.Grow, s.lease)
		}
	}
	st.StepRate = e.StepRate()
	e.alloc.Apply(st)
	st.Copied, st.Commits, st.Ends = st.Copied[:0], st.Commits[:0], st.Ends[:0]

	for _, seq := range st.Evicted {
		w.plan.remove(e, seq)
		e.evicted.Add(1)
	}
	for i, s := range w.ended {
		if !st.Kept[i] && s.inCache {
			w.plan.release(e, s.seq)
		}
		s.inCache = false
	}
	e.closeEnded()
	for _, p := range st.Preempted {
		if s := find(w.active, p.Lease); s != nil {
			e.pause(s, p.Keep)
		}
	}
	for _, f := range st.Failed {
		if s := find(w.active, f.Lease); s != nil {
			e.finish(s, FinishNone, "", f.Err)
		} else if s := find(w.paused, f.Lease); s != nil {
			e.finish(s, FinishNone, "", f.Err)
		}
	}
	for _, s := range w.active {
		if s.state == stateDecode {
			s.grown = true // until its pending token is decoded
		}
	}
	for _, l := range st.Resumed {
		if s := find(w.paused, l); s != nil {
			e.resume(s)
		}
	}
}

// closeEnded closes the streams of the sequences whose ends the last Apply
// reported: their cells are settled with the allocator by then.
func (e *Engine) closeEnded() {
	w := &e.w
	for i, s := range w.ended {
		if s.index == 0 {
			close(s.stream.events)
		}
		w.ended[i] = nil
	}
	w.ended = w.ended[:0]
}

func find(list []*sequence, l *allocator.Lease) *sequence {
	for _, s := range list {
		if s.lease == l {
			return s
		}
	}
	return nil
}

func remove(list []*sequence, s *sequence) ([]*sequence, bool) {
	for i, x := range list {
		if x == s {
			return append(list[:i], list[i+1:]...), true
		}
	}
	return list, false
}

// admit takes the newly admitted sequences: it builds their samplers and
// copies the cached prefixes the allocator found for them.
func (e *Engine) admit() {
	w := &e.w
	for i, s := range w.incoming {
		w.incoming[i] = nil
		if s.group == nil {
			e.start(s)
			continue
		}
		// The samples run together, sample 0 first, so that the others
		// are in the active list behind it when it starts them.
		for _, m := range s.group.members {
			e.start(m)
		}
	}
	w.incoming = w.incoming[:0]
}

// start makes an admitted sequence active. Samples 1..N-1 of a group wait
// for sample 0's prompt.
func (e *Engine) start(s *sequence) {
	w := &e.w
	s.sampler = w.be.NewSampler(s.req.Sampling)
	if s.req.Sampling.HasPenalties() {
		for _, t := range s.req.Prompt {
			s.sampler.Accept(t)
		}
	}
	s.toks = append(make([]int32, 0, len(s.req.Prompt)+min(s.req.MaxTokens, 4096)), s.req.Prompt...)
	s.text.reset(s.req.Stop)
	s.res.Started = time.Now()
	s.res.PromptTokens = len(s.req.Prompt)
	s.res.CachedTokens = e.copyPrefix(s)
	if s.index > 0 {
		s.state = stateWait
	}
	w.active = append(w.active, s)
	e.running.Add(1)
}

// startSamples shares leader's decoded prompt with the other samples of
// its group and draws each one's first token from the leader's output for
// its last prompt token, out: no sample but the leader ever decodes the
// prompt. It runs when the leader's prefill is done, before the leader
// samples.
func (e *Engine) startSamples(leader *sequence, step uint64) {
	g := leader.group
	g.started = true
	n := len(leader.req.Prompt)
	for _, f := range g.members[1:] {
		if f.state != stateWait || !f.res.Ended.IsZero() {
			continue // ended already
		}
		e.w.be.SeqCopy(leader.seq, f.seq, 0, n)
		f.nPast, f.committed = n, n // the prompt's cells are the leader's
		f.res.CachedTokens = leader.res.CachedTokens
		tok, err := f.sampler.Sample(leader.out)
		if err == nil && f.req.Logprobs {
			err = e.logprob(f, leader.out, tok)
		}
		if err != nil {
			e.finish(f, FinishNone, "", fmt.Errorf("sample after 0 tokens: %w", err))
			continue
		}
		e.accept(f, tok, step)
	}
}

// copyPrefix shares the cached cells the allocator chose for s and returns
// how many tokens they hold.
func (e *Engine) copyPrefix(s *sequence) int {
	w := &e.w
	s.inCache = true
	s.nPast = 0
	src, n := s.src, s.shared
	if n <= 0 || src < 0 {
		src, n = -1, 0
	}
	// A fresh sequence owns no cells but its prefix. Stale ones under its
	// id would break the copy below (llama.cpp asserts that no cell holds
	// dst already) and make its first decode fail for the whole batch.
	switch {
	case src == s.seq:
		w.be.SeqRemove(s.seq, n, -1) // its own cells are the prefix
	case w.be.SeqPosMax(s.seq) >= 0:
		w.plan.remove(e, s.seq)
	}
	if n > 0 {
		w.be.SeqCopy(src, s.seq, 0, n)
		s.nPast = n
		w.step.Copied = append(w.step.Copied, s.lease)
	}
	s.committed = s.nPast // a shared prefix is not charged again
	return s.nPast
}

// reap ends sequences whose client went away. It asks each context
// directly, once per step: a flag set by context.AfterFunc would come from
// a goroutine of its own, which may run only steps after the cancel, and
// Submit promises the end at the next step.
func (e *Engine) reap() {
	w := &e.w
	for _, list := range []*[]*sequence{&w.active, &w.paused} {
		for i := 0; i < len(*list); {
			s := (*list)[i]
			if s.ctx.Err() != nil {
				e.finish(s, FinishNone, "", context.Cause(s.ctx))
				continue // finish removed it
			}
			i++
		}
	}
}

// pause takes a preempted sequence out of the batch; its stream stays open
// and it runs again when the allocator readmits it (Step.Resumed).
func (e *Engine) pause(s *sequence, keep bool) {
	w := &e.w
	if !keep {
		w.plan.release(e, s.seq)
	}
	w.plan.forget(s.seq)
	e.preempted.Add(1)
	s.res.Preempted++
	s.inCache = false
	s.state, s.chunk, s.out, s.nPast = statePaused, 0, -1, 0
	s.committed, s.grown = 0, false // the allocator starts s afresh
	w.active, _ = remove(w.active, s)
	w.paused = append(w.paused, s)
	e.running.Add(-1)
}

// resume restarts a preempted sequence the allocator has readmitted: it
// recomputes its tokens, sharing whatever prefix is still cached.
func (e *Engine) resume(s *sequence) {
	w := &e.w
	w.paused, _ = remove(w.paused, s)
	s.seq, s.src, s.shared = s.lease.Prepared()
	e.copyPrefix(s)
	s.state = statePrefill
	w.active = append(w.active, s)
	e.running.Add(1)
}

func (e *Engine) decoding() int {
	n := 0
	for _, s := range e.w.active {
		if s.state == stateDecode {
			n++
		}
	}
	return n
}

// decodeStep plans the step's batch, decodes it and samples every sequence
// that has logits in it.
func (e *Engine) decodeStep() {
	w := &e.w
	start := time.Now()
	defer func() { e.recordStep(time.Since(start)) }()
	budget := e.batch
	for {
		if !w.plan.fill(e, budget) {
			return
		}
		t0 := e.cfg.clock()
		err := w.be.Decode(w.b)
		if err == nil && w.tuner != nil {
			e.tune(w.b.Len(), e.cfg.clock().Sub(t0))
		}
		w.plan.decoded(e, err)
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
			e.finish(w.active[len(w.active)-1], FinishNone, "", ErrSequenceAborted)
			// Its cells leave the cache only after the next Apply: end the
			// step there, or every other sequence would be aborted in turn
			// for want of the room it still holds.
			return
		}
		// A failed computation: end the sequences that were in the batch.
		for i := 0; i < len(w.active); {
			s := w.active[i]
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
		for _, s := range w.active {
			if s.out >= 0 || s.chunk > 0 {
				seqs++
			}
		}
		e.cfg.OnStep(w.b.Len(), seqs)
	}
	for i := 0; i < len(w.active); {
		s := w.active[i]
		if s.group != nil && s.group.doom != nil {
			e.finish(s, FinishNone, "", s.group.doom)
			continue
		}
		if e.advance(s, step) {
			i++
		}
	}
	e.endDoomed() // the members a doom passed by before it fell
}

// tune feeds a successful decode of tokens tokens that took d to the thread
// tuner and applies the thread count it picks for the next decode.
func (e *Engine) tune(tokens int, d time.Duration) {
	w := &e.w
	if n := w.tuner.observe(tokens, d); n != w.be.Threads() {
		w.be.SetThreads(n)
		e.threads.Store(int64(w.be.Threads()))
		e.threadChanges.Add(1)
	}
}

// commit reports that s's tokens up to nPast entered the cache; a
// sequence recomputed to keep its cells in order reported them already.
func (e *Engine) commit(s *sequence) {
	if s.committed < s.nPast {
		e.w.step.Commits = append(e.w.step.Commits, allocator.Commit{Lease: s.lease, Tokens: s.toks[s.committed:s.nPast]})
		s.committed = s.nPast
	}
}

// advance accounts for s's part of the step and samples its next token. It
// returns false when s ended (and was removed from the active list). This
// is where a token is sampled.
func (e *Engine) advance(s *sequence, step uint64) bool {
	switch {
	case s.state == statePrefill && s.chunk > 0:
		s.nPast += s.chunk
		e.prefill.Add(uint64(s.chunk))
		e.commit(s)
		if s.nPast < len(s.toks) {
			return true
		}
		if s.generated > 0 {
			// A resumed sequence has recomputed its cells; it goes on
			// with the token it had sampled.
			s.state = stateDecode
			return true
		}
		if s.group != nil && !s.group.started {
			e.startSamples(s, step)
		}
	case s.state == stateDecode && s.out >= 0:
		s.nPast++
		s.grown = false
		s.toks = append(s.toks, s.next)
		e.commit(s)
	default:
		return true // waiting for room in the batch
	}
	tok, err := s.sampler.Sample(s.out)
	if err == nil && s.req.Logprobs {
		err = e.logprob(s, s.out, tok)
	}
	if err != nil {
		// Only this sequence ends (ErrNoValidToken for parameters that left
		// nothing to draw); the others go on.
		e.finish(s, FinishNone, "", fmt.Errorf("sample after %d tokens: %w", s.generated, err))
		return false
	}
	return e.accept(s, tok, step)
}

// logprob records the log-probability of tok, sampled from output out, for
// s's next push; only sequences that ask for logprobs pay for it.
func (e *Engine) logprob(s *sequence, out int, tok int32) error {
	var lp TokenLogprob
	if err := e.w.be.Logprob(out, tok, s.req.TopLogprobs, &lp); err != nil {
		return fmt.Errorf("logprobs: %w", err)
	}
	s.text.pushLogprob(lp)
	return nil
}

// accept streams a sampled token and decides whether s goes on.
func (e *Engine) accept(s *sequence, tok int32, step uint64) bool {
	w := &e.w
	s.generated++
	w.plan.produced(s.seq)
	e.generated.Add(1)
	if s.generated == 1 {
		s.res.FirstToken = time.Now()
	}
	if (!s.req.IgnoreEOS || s.req.Sampling.Grammar != "") && e.vocab.IsEOG(tok) {
		e.finish(s, FinishEOS, "", nil)
		return false
	}
	for _, stop := range s.req.StopTokens {
		if tok == stop {
			// Its logprob, recorded for a push that never comes, is
			// never taken, as an end-of-generation token's is not.
			s.res.StopToken, s.res.HasStopToken = tok, true
			e.finish(s, FinishStop, "", nil)
			return false
		}
	}
	w.piece = e.vocab.AppendPiece(w.piece[:0], tok, false, false)
	if at, stop := s.text.push(tok, w.piece); at >= 0 {
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
	text, ids, lps := s.text.take(n, all)
	if text == "" && len(ids) == 0 {
		return true
	}
	select {
	case s.stream.events <- Event{Text: text, Tokens: ids, Step: step, Logprobs: lps, Index: s.index}:
		return true
	default:
		e.slow.Add(1)
		if g := s.group; g != nil && g.doom == nil {
			// The channel is the group's: every sample ends. The others
			// end at their turn in this step or after it (endDoomed).
			g.doom = ErrSlowConsumer
		}
		e.finish(s, FinishNone, "", ErrSlowConsumer)
		return false
	}
}

// finish ends s: it flushes held-back text on a normal end, frees the
// sampler and reports the end for the next Apply, after which the stream
// closes.
func (e *Engine) finish(s *sequence, reason FinishReason, stop string, err error) {
	w := &e.w
	var was bool
	if w.active, was = remove(w.active, s); was {
		e.running.Add(-1)
	} else {
		w.paused, _ = remove(w.paused, s)
	}
	if err == nil && len(s.text.pend)+len(s.text.toks) > 0 {
		if !e.emit(s, len(s.text.pend), true, e.steps.Load()) {
			return // emit ended s as a slow consumer
		}
	}
	if s.sampler != nil {
		if gc, ok := s.sampler.(GrammarCounter); ok {
			checked, resampled := gc.GrammarCounts()
			e.grammarTokens.Add(checked)
			e.grammarResamples.Add(resampled)
		}
		s.sampler.Free()
		s.sampler = nil
	}
	w.plan.forget(s.seq)
	r := s.res
	r.Reason, r.StopString, r.Err = reason, stop, err
	r.CompletionTokens = s.generated
	r.Ended = time.Now()
	// An aborted sequence's cells go back rather than into the prefix
	// cache: the cache had no room for them.
	normal := !errors.Is(err, ErrSequenceAborted)
	g := s.group
	if g == nil {
		if err != nil {
			s.stream.failed.Store(true)
		}
		e.ended(s, normal)
		return
	}
	g.live--
	if err != nil {
		if g.failed++; g.failed == len(g.members) {
			s.stream.failed.Store(true)
		}
	}
	if s.index > 0 {
		e.ended(s, normal)
	} else {
		g.leaderNormal = normal
		if !g.started {
			// The prompt the others wait for will never be decoded.
			for _, f := range g.members[1:] {
				if f.res.Ended.IsZero() {
					e.finish(f, FinishNone, "", fmt.Errorf("sample 0 ended before the prompt was decoded: %w", err))
				}
			}
		}
	}
	if g.live == 0 && !g.leaderReported {
		g.leaderReported = true
		e.ended(g.members[0], g.leaderNormal)
	}
}

// ended reports s's end for the next Apply, after which its cells are
// settled; the stream closes with the end of its sample 0, a group's last.
func (e *Engine) ended(s *sequence, normal bool) {
	w := &e.w
	w.ended = append(w.ended, s)
	w.step.Ends = append(w.step.Ends, allocator.End{Lease: s.lease, Normal: normal})
}

// endDoomed ends every active sample of a group that must end as a whole
// (a slow reader of its shared channel).
func (e *Engine) endDoomed() {
	w := &e.w
	for i := 0; i < len(w.active); {
		if s := w.active[i]; s.group != nil && s.group.doom != nil {
			e.finish(s, FinishNone, "", s.group.doom)
			continue
		}
		i++
	}
}
