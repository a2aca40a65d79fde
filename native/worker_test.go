package native

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kvgate/kvgate/allocator"
)

// The worker's pure-Go tests: the engine runs on fakeBackend, which checks
// llama.cpp's rules, and every stream is compared with soloRun, its output
// when it runs alone.

// startEngine starts an engine on fb with cfg, whose Open and Vocab it
// fills in. When t ends it closes the engine and reports fb's violations.
func startEngine(t testing.TB, fb *fakeBackend, cfg EngineConfig) *Engine {
	t.Helper()
	cfg.Open = func() (Backend, error) { return fb, nil }
	cfg.Vocab = fakeVocab{}
	e, err := NewEngine(cfg)
	if err != nil {
		t.Fatalf("NewEngine: %v", err)
	}
	t.Cleanup(func() {
		e.Close()
		fb.check(t)
	})
	return e
}

// admission returns an allocator configuration of maxSeqs sequences with
// room to queue.
func admission(maxSeqs int) allocator.Config {
	return allocator.Config{MaxSequences: maxSeqs, MaxQueue: 256}
}

// prompt returns n tokens drawn from r.
func prompt(r *rand.Rand, n int) []int32 {
	p := make([]int32, n)
	for i := range p {
		p[i] = int32(r.IntN(fakeVocabSize))
	}
	return p
}

// request returns a request that ignores end-of-generation tokens.
func request(p []int32, maxTokens int) Request {
	return Request{Prompt: p, MaxTokens: maxTokens, IgnoreEOS: true}
}

// delivered is everything a stream delivered.
type delivered struct {
	toks  []int32
	text  string
	steps []uint64
	res   Result
}

// readAll reads s to its end.
func readAll(s *Stream) delivered {
	var d delivered
	for ev := range s.Events() {
		d.add(ev)
	}
	d.res = s.Result()
	return d
}

func (d *delivered) add(ev Event) {
	d.toks = append(d.toks, ev.Tokens...)
	d.text += ev.Text
	d.steps = append(d.steps, ev.Step)
}

// fakeText returns the text of toks.
func fakeText(toks []int32) string {
	var b strings.Builder
	for _, t := range toks {
		b.WriteString(fakePiece(t))
	}
	return b.String()
}

// checkStream checks what a stream of req delivered against its solo run:
// all of it for a normal end, a prefix of it otherwise. It also checks the
// stream's text and step numbers.
func checkStream(t testing.TB, name string, req Request, d delivered) {
	t.Helper()
	want, eos := soloRun(req.Prompt, req.MaxTokens, req.IgnoreEOS)
	if len(req.Stop) == 0 && d.text != fakeText(d.toks) {
		t.Errorf("%s: text %q is not that of its tokens %v", name, d.text, d.toks)
	}
	if !slices.IsSorted(d.steps) {
		t.Errorf("%s: event steps %v out of order", name, d.steps)
	}
	r := d.res
	if r.PromptTokens != len(req.Prompt) {
		t.Errorf("%s: PromptTokens %d, want %d", name, r.PromptTokens, len(req.Prompt))
	}
	if r.Err != nil || r.Reason == FinishStop {
		if len(d.toks) > len(want) || !slices.Equal(d.toks, want[:len(d.toks)]) {
			t.Errorf("%s (ended with %v): tokens %v are not a prefix of its solo run %v", name, r.Err, d.toks, want)
		}
		return
	}
	wantReason, completion := FinishLength, len(want)
	if eos {
		wantReason, completion = FinishEOS, len(want)+1
	}
	if !slices.Equal(d.toks, want) || r.Reason != wantReason || r.CompletionTokens != completion {
		t.Errorf("%s: tokens %v (%v, %d completion tokens)\nsolo run %v (%v, %d)", name, d.toks, r.Reason, r.CompletionTokens, want, wantReason, completion)
	}
}

// checkSettled checks that, with every stream ended, the allocator holds
// no cells but the prefix cache, reserves none and runs nothing.
func checkSettled(t testing.TB, e *Engine) {
	t.Helper()
	st := e.Allocator().Stats()
	if st.CellsUsed != st.CellsCached || st.CellsReserved != 0 || st.Running != 0 || st.Queued != 0 {
		t.Errorf("after every stream ended the allocator holds %d cells (%d cached), reserves %d, runs %d, queues %d",
			st.CellsUsed, st.CellsCached, st.CellsReserved, st.Running, st.Queued)
	}
	if r := e.Stats().Running; r != 0 {
		t.Errorf("engine still counts %d running sequences", r)
	}
}

// checkClosedCells closes e, whose streams all ended, and checks that the
// cache holds exactly the cells the allocator counts: the prefix cache
// (retired cells of a deterministic engine aside).
func checkClosedCells(t testing.TB, e *Engine, fb *fakeBackend) {
	t.Helper()
	e.Close()
	if used := e.Allocator().Stats().CellsUsed; fb.liveAtClose != used {
		t.Errorf("at Close the cache holds %d cells of sequences, the allocator counts %d used", fb.liveAtClose, used)
	}
}

// stepLog records the engine's OnStep calls; the worker writes it, and a
// test reads it after the streams it waits for ended.
type stepLog struct{ steps [][2]int }

func (l *stepLog) onStep(tokens, seqs int) { l.steps = append(l.steps, [2]int{tokens, seqs}) }

// holdFirstDecode makes fb's first decode wait until the returned function
// is called, and returns a channel closed when that decode started. The
// release function is idempotent; the test defers it.
func holdFirstDecode(fb *fakeBackend) (started <-chan struct{}, release func()) {
	reached, gate := make(chan struct{}), make(chan struct{})
	fb.hook = func(call int, _ *Batch) error {
		if call == 1 {
			close(reached)
			<-gate
		}
		return nil
	}
	return reached, sync.OnceFunc(func() { close(gate) })
}

// spinUntil yields until cond holds: for states that no channel announces,
// such as a Submit queued in the allocator.
func spinUntil(cond func() bool) {
	for !cond() {
		runtime.Gosched()
	}
}

// mustSubmit submits req, or fails the test; call it on the test's
// goroutine.
func mustSubmit(t testing.TB, e *Engine, ctx context.Context, req Request) *Stream {
	t.Helper()
	s, err := e.Submit(ctx, req)
	if err != nil {
		t.Fatalf("Submit: %v", err)
	}
	return s
}

// submitAndRead submits req and reads its stream to the end; unlike
// mustSubmit it may run on any goroutine, and reports a refusal with
// t.Errorf.
func submitAndRead(t testing.TB, e *Engine, req Request) delivered {
	s, err := e.Submit(context.Background(), req)
	if err != nil {
		t.Errorf("Submit: %v", err)
		return delivered{res: Result{Err: err, PromptTokens: len(req.Prompt)}}
	}
	return readAll(s)
}

// eosPrompt returns a prompt of n tokens, drawn from r, whose solo run
// ends on an end-of-generation token after at least two tokens.
func eosPrompt(r *rand.Rand, n int) []int32 {
	for {
		p := prompt(r, n)
		if toks, eos := soloRun(p, 1000, false); eos && len(toks) >= 2 {
			return p
		}
	}
}

// TestWorkerSolo runs single requests of every shape and checks each
// against its solo run, token for token, with its finish reason, its
// counts, and the steps it took.
func TestWorkerSolo(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	tests := []struct {
		name          string
		prompt        []int32
		maxTokens     int
		ignoreEOS     bool
		deterministic bool
	}{
		{"one-token prompt", prompt(r, 1), 7, true, false},
		{"short prompt", prompt(r, 5), 12, true, false},
		{"one token to generate", prompt(r, 5), 1, true, false},
		{"prompt longer than the batch", prompt(r, 37), 9, true, false},
		{"prompt of exactly two batches", prompt(r, 32), 3, true, false},
		{"ends on EOS", eosPrompt(r, 6), 1000 - 6, false, false},
		{"deterministic, short prompt", prompt(r, 5), 12, true, true},
		{"deterministic, long prompt", prompt(r, 37), 9, true, true},
		{"deterministic, ends on EOS", eosPrompt(r, 6), 1000 - 6, false, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fb := newFakeBackend(1024, 16)
			var log stepLog
			e := startEngine(t, fb, EngineConfig{Admission: admission(4), Deterministic: tc.deterministic, OnStep: log.onStep})
			req := Request{Prompt: tc.prompt, MaxTokens: tc.maxTokens, IgnoreEOS: tc.ignoreEOS}
			d := readAll(mustSubmit(t, e, context.Background(), req))
			checkStream(t, tc.name, req, d)
			if d.res.Err != nil {
				t.Fatalf("err %v", d.res.Err)
			}
			// Prefill takes ceil(prompt / batch) steps and yields the first
			// token; each further token takes one step, and the last one
			// sampled is never decoded.
			batch := e.Batch()
			want := (len(tc.prompt)+batch-1)/batch + d.res.CompletionTokens - 1
			if got := e.Stats().Steps; got != uint64(want) || len(log.steps) != want {
				t.Errorf("%d steps (%d OnStep calls), want %d", got, len(log.steps), want)
			}
			if tc.deterministic && e.Stats().Padded == 0 {
				t.Error("a deterministic engine running one sequence padded no step")
			}
			checkSettled(t, e)
			checkClosedCells(t, e, fb)
		})
	}
}

// TestWorkerBatching holds the first stream's first decode until three
// more are handed over: from the next step on all four share every step,
// and each equals its solo run.
func TestWorkerBatching(t *testing.T) {
	fb := newFakeBackend(256, 16)
	var log stepLog
	e := startEngine(t, fb, EngineConfig{Admission: admission(4), OnStep: log.onStep})
	started, release := holdFirstDecode(fb)
	defer release()
	r := rand.New(rand.NewPCG(3, 4))
	reqs := make([]Request, 4)
	streams := make([]*Stream, 4)
	for i := range reqs {
		reqs[i] = request(prompt(r, 4), 10)
		streams[i] = mustSubmit(t, e, context.Background(), reqs[i])
		if i == 0 {
			<-started
		}
	}
	release()
	for i, s := range streams {
		checkStream(t, "stream", reqs[i], readAll(s))
	}
	// Step 1: the first prompt. Step 2: its token and the three prompts.
	// Steps 3-10: four tokens; the first stream has its 10 tokens at step
	// 10, the others at step 11.
	want := [][2]int{{4, 1}, {13, 4}}
	for range 8 {
		want = append(want, [2]int{4, 4})
	}
	want = append(want, [2]int{3, 3})
	if !slices.Equal(log.steps, want) {
		t.Errorf("steps (tokens, sequences) %v\nwant %v", log.steps, want)
	}
	if st := e.Stats(); st.Steps != 11 || st.GeneratedTokens != 40 || st.PrefillTokens != 16 {
		t.Errorf("stats %+v: want 11 steps, 40 tokens generated, 16 prefilled", st)
	}
	checkSettled(t, e)
}

// TestWorkerNarrowBatch runs more sequences than a batch has tokens, on
// both planners: no step exceeds the batch, sequences wait for room to
// prefill, and every stream equals its solo run.
func TestWorkerNarrowBatch(t *testing.T) {
	for _, deterministic := range []bool{false, true} {
		t.Run(fmt.Sprintf("deterministic %v", deterministic), func(t *testing.T) {
			fb := newFakeBackend(256, 4)
			var log stepLog
			e := startEngine(t, fb, EngineConfig{Admission: admission(8), OnStep: log.onStep, Deterministic: deterministic})
			started, release := holdFirstDecode(fb)
			defer release()
			r := rand.New(rand.NewPCG(29, 30))
			reqs := make([]Request, 8)
			got := make([]delivered, len(reqs))
			var wg sync.WaitGroup
			for i := range reqs {
				reqs[i] = request(prompt(r, 1+r.IntN(6)), 20)
				s := mustSubmit(t, e, context.Background(), reqs[i])
				if i == 0 {
					<-started
				}
				wg.Go(func() { got[i] = readAll(s) })
			}
			release()
			wg.Wait()
			for i := range reqs {
				checkStream(t, "stream", reqs[i], got[i])
			}
			for i, st := range log.steps {
				if st[0] > 4 {
					t.Errorf("step %d carried %d tokens, the batch holds 4", i+1, st[0])
				}
			}
			checkSettled(t, e)
		})
	}
}

// TestWorkerChunkedPrefill prefills a prompt longer than the batch in
// chunks: alone it takes ceil(n / batch) steps; beside a decoding stream
// the chunks shrink by its token, and that stream gets a token every step.
func TestWorkerChunkedPrefill(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	long := request(prompt(r, 30), 3)
	t.Run("alone", func(t *testing.T) {
		fb := newFakeBackend(256, 8)
		var log stepLog
		e := startEngine(t, fb, EngineConfig{Admission: admission(2), OnStep: log.onStep})
		d := readAll(mustSubmit(t, e, context.Background(), long))
		checkStream(t, "long", long, d)
		want := [][2]int{{8, 1}, {8, 1}, {8, 1}, {6, 1}, {1, 1}, {1, 1}}
		if !slices.Equal(log.steps, want) || !slices.Equal(d.steps, []uint64{4, 5, 6}) {
			t.Errorf("steps %v, events at steps %v; want %v and [4 5 6]", log.steps, d.steps, want)
		}
	})
	t.Run("beside a decoding stream", func(t *testing.T) {
		fb := newFakeBackend(256, 8)
		var log stepLog
		e := startEngine(t, fb, EngineConfig{Admission: admission(2), OnStep: log.onStep})
		started, release := holdFirstDecode(fb)
		defer release()
		short := request(prompt(r, 3), 20)
		sShort := mustSubmit(t, e, context.Background(), short)
		<-started
		sLong := mustSubmit(t, e, context.Background(), long)
		release()
		dLong, dShort := readAll(sLong), readAll(sShort)
		checkStream(t, "long", long, dLong)
		checkStream(t, "short", short, dShort)
		// Steps 2-5 carry the short stream's token and 7 prompt tokens,
		// step 6 the last 2: the long stream's first token.
		want := [][2]int{{3, 1}, {8, 2}, {8, 2}, {8, 2}, {8, 2}, {3, 2}, {2, 2}, {2, 2}}
		for range 12 {
			want = append(want, [2]int{1, 1})
		}
		if !slices.Equal(log.steps, want) {
			t.Errorf("steps %v\nwant %v", log.steps, want)
		}
		wantShort := make([]uint64, 20)
		for i := range wantShort {
			wantShort[i] = uint64(i + 1)
		}
		if !slices.Equal(dShort.steps, wantShort) || !slices.Equal(dLong.steps, []uint64{6, 7, 8}) {
			t.Errorf("events at steps %v (short) and %v (long); want a token every step and [6 7 8]", dShort.steps, dLong.steps)
		}
	})
}

// TestWorkerPrefixCache runs requests one after another with the prefix
// cache on: a request shares the cached prefix it may (same tenant and
// salt, cache not refused), and its output is its solo run all the same.
func TestWorkerPrefixCache(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	p := prompt(r, 20)
	other := append(slices.Clone(p[:10]), prompt(r, 10)...)
	fb := newFakeBackend(512, 16)
	cfg := admission(8)
	cfg.PrefixCache = true
	e := startEngine(t, fb, EngineConfig{Admission: cfg})
	tests := []struct {
		name   string
		req    Request
		cached int
	}{
		{"first", request(p, 5), 0},
		{"the same prompt", request(p, 5), 19},
		{"the same prompt, longer output", request(p, 12), 19},
		{"a shared first half", request(other, 5), 10},
		{"NoCache", Request{Prompt: p, MaxTokens: 5, IgnoreEOS: true, NoCache: true}, 0},
		{"another tenant", Request{Prompt: p, MaxTokens: 5, IgnoreEOS: true, Tenant: "b"}, 0},
		{"another salt", Request{Prompt: p, MaxTokens: 5, IgnoreEOS: true, CacheSalt: "s"}, 0},
		{"the prompt and its output", request(append(slices.Clone(p), func() []int32 { o, _ := soloRun(p, 5, true); return o[:4] }()...), 5), 23},
	}
	for _, tc := range tests {
		s := mustSubmit(t, e, context.Background(), tc.req)
		d := readAll(s)
		checkStream(t, tc.name, tc.req, d)
		if s.CachedTokens() != tc.cached || d.res.CachedTokens != tc.cached {
			t.Errorf("%s: %d cached tokens (result %d), want %d", tc.name, s.CachedTokens(), d.res.CachedTokens, tc.cached)
		}
	}
	checkSettled(t, e)
	checkClosedCells(t, e, fb)
}

// TestWorkerPreemption runs four streams on a pool too small for them
// all. Optimistic admission preempts and resumes streams, which still
// equal their solo runs; reserve admission never preempts and runs them
// one at a time instead.
func TestWorkerPreemption(t *testing.T) {
	tests := []struct {
		name        string
		policy      allocator.Policy
		watermark   int
		prefixCache bool
	}{
		{"optimistic", allocator.PolicyOptimistic, 4, false},
		{"optimistic, prefix cache", allocator.PolicyOptimistic, 4, true},
		// With no watermark a preempted stream fits again in the cells
		// its preemption freed: the allocator must not hand them back to
		// it before the growth that needed them.
		{"optimistic, no watermark", allocator.PolicyOptimistic, 0, false},
		{"optimistic, no watermark, prefix cache", allocator.PolicyOptimistic, 0, true},
		{"reserve", allocator.PolicyReserve, 0, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fb := newFakeBackend(64, 16)
			var log stepLog
			cfg := admission(4)
			cfg.Policy, cfg.Watermark, cfg.PrefixCache = tc.policy, tc.watermark, tc.prefixCache
			e := startEngine(t, fb, EngineConfig{Admission: cfg, OnStep: log.onStep})
			// The first decode waits until every stream is handed over (or,
			// under reserve admission, queued), so that they compete for the
			// pool whatever the scheduling.
			started, release := holdFirstDecode(fb)
			defer release()
			r := rand.New(rand.NewPCG(9, 10))
			reqs := make([]Request, 4)
			got := make([]delivered, 4)
			var wg sync.WaitGroup
			for i := range reqs {
				reqs[i] = request(prompt(r, 8), 30)
				if tc.policy == allocator.PolicyOptimistic || i == 0 {
					s := mustSubmit(t, e, context.Background(), reqs[i])
					wg.Go(func() { got[i] = readAll(s) })
				} else {
					wg.Go(func() { got[i] = submitAndRead(t, e, reqs[i]) })
				}
				if i == 0 {
					<-started
				}
			}
			if tc.policy == allocator.PolicyReserve {
				spinUntil(func() bool { return e.Allocator().Stats().Queued == 3 })
			}
			release()
			wg.Wait()
			preempted := 0
			for i := range reqs {
				checkStream(t, "stream", reqs[i], got[i])
				if got[i].res.Err != nil {
					t.Errorf("stream %d: %v", i, got[i].res.Err)
				}
				preempted += got[i].res.Preempted
			}
			st, ast := e.Stats(), e.Allocator().Stats()
			t.Logf("%d steps, %d preemptions, %d evictions", st.Steps, st.Preempted, st.Evicted)
			if uint64(preempted) != st.Preempted || ast.Preemptions != st.Preempted {
				t.Errorf("results count %d preemptions, the engine %d, the allocator %d", preempted, st.Preempted, ast.Preemptions)
			}
			if tc.policy == allocator.PolicyOptimistic {
				if st.Preempted == 0 {
					t.Error("no preemption: the pool is too big for the test")
				}
			} else {
				maxSeqs := 0
				for _, s := range log.steps {
					maxSeqs = max(maxSeqs, s[1])
				}
				if st.Preempted != 0 || maxSeqs != 1 {
					t.Errorf("reserve admission: %d preemptions, up to %d sequences a step; want 0 and 1", st.Preempted, maxSeqs)
				}
			}
			checkSettled(t, e)
			checkClosedCells(t, e, fb)
		})
	}
}

// TestWorkerEviction fills a small pool with cached prefixes: later
// requests evict the least recently used, whose cells leave the cache
// before anything reuses them, and a prompt whose prefix was evicted runs
// from scratch with the same output.
func TestWorkerEviction(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	fb := newFakeBackend(64, 16)
	cfg := admission(4)
	cfg.PrefixCache = true
	e := startEngine(t, fb, EngineConfig{Admission: cfg})
	p := [][]int32{prompt(r, 20), prompt(r, 20), prompt(r, 20)}
	tests := []struct {
		name   string
		prompt []int32
		cached int
	}{
		{"first", p[0], 0},
		{"second", p[1], 0},
		{"third: evicts the first", p[2], 0},
		{"the first again: evicted", p[0], 0},
		{"the third again: cached", p[2], 19},
	}
	for _, tc := range tests {
		req := request(tc.prompt, 5)
		s := mustSubmit(t, e, context.Background(), req)
		checkStream(t, tc.name, req, readAll(s))
		if s.CachedTokens() != tc.cached {
			t.Errorf("%s: %d cached tokens, want %d", tc.name, s.CachedTokens(), tc.cached)
		}
	}
	st, ast := e.Stats(), e.Allocator().Stats()
	if st.Evicted == 0 || st.Evicted != ast.Evictions {
		t.Errorf("the engine removed %d evicted sequences, the allocator evicted %d; want as many, and some", st.Evicted, ast.Evictions)
	}
	checkSettled(t, e)
	checkClosedCells(t, e, fb)
}

// TestWorkerDeterministic runs mixes on a deterministic engine: every
// sequence's cells stay in position order in the fake's cache unless the
// engine reports a forced break, and streams equal their solo runs.
func TestWorkerDeterministic(t *testing.T) {
	tests := []struct {
		name   string
		policy allocator.Policy
		cells  int
	}{
		{"optimistic", allocator.PolicyOptimistic, 128},
		{"optimistic, tight", allocator.PolicyOptimistic, 80},
		{"reserve", allocator.PolicyReserve, 128},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fb := newFakeBackend(tc.cells, 17)
			cfg := admission(6)
			cfg.Policy, cfg.Watermark = tc.policy, 4
			e := startEngine(t, fb, EngineConfig{Admission: cfg, Deterministic: true})
			if e.Cells() != tc.cells-1 || e.Batch() != 16 {
				t.Fatalf("cells %d, batch %d: want one of each for the padding token", e.Cells(), e.Batch())
			}
			// The first decode waits until every request is admitted or
			// queued, so that they compete whatever the scheduling.
			started, release := holdFirstDecode(fb)
			defer release()
			r := rand.New(rand.NewPCG(13, 14))
			reqs := make([]Request, 10)
			got := make([]delivered, len(reqs))
			var wg sync.WaitGroup
			for i := range reqs {
				reqs[i] = request(prompt(r, 5+r.IntN(25)), 10+r.IntN(30))
				if tc.policy == allocator.PolicyReserve {
					reqs[i].MaxTokens /= 2
				}
				if i == 0 {
					s := mustSubmit(t, e, context.Background(), reqs[0])
					wg.Go(func() { got[0] = readAll(s) })
					<-started
					continue
				}
				wg.Go(func() { got[i] = submitAndRead(t, e, reqs[i]) })
			}
			spinUntil(func() bool { st := e.Allocator().Stats(); return int(st.Admitted)+st.Queued == len(reqs) })
			release()
			wg.Wait()
			for i := range reqs {
				checkStream(t, "stream", reqs[i], got[i])
				if got[i].res.Err != nil {
					t.Errorf("stream %d: %v", i, got[i].res.Err)
				}
			}
			st := e.Stats()
			t.Logf("%d steps: preempted %d, held %d, relocated %d, padded %d, disordered %d", st.Steps, st.Preempted, st.Held, st.Relocated, st.Padded, st.Disordered)
			if st.Disordered == 0 && len(fb.disorders) > 0 {
				t.Errorf("cells out of position order after decodes (sequence: decodes) %v, yet no forced break counted", fb.disorders)
			}
			if tc.policy == allocator.PolicyOptimistic && (st.Preempted == 0 || st.Relocated == 0) {
				t.Errorf("%d preemptions and %d relocations: the pool is too big for the test", st.Preempted, st.Relocated)
			}
			checkSettled(t, e)
			checkClosedCells(t, e, fb)
		})
	}
}

// TestWorkerPadding checks the deterministic engine's padding token: a
// step with one token, or with one output, gets a token of PadSequence, and
// the padding leaves the cache after every decode.
func TestWorkerPadding(t *testing.T) {
	fb := newFakeBackend(128, 9)
	var log stepLog
	e := startEngine(t, fb, EngineConfig{Admission: admission(2), Deterministic: true, OnStep: log.onStep})
	pads := 0
	fb.hook = func(_ int, b *Batch) error {
		outputs := 0
		for i, s := range b.Seq {
			if s == PadSequence {
				pads++
				if b.Pos[i] != 0 || !b.Logits[i] {
					t.Errorf("padding token at position %d, logits %v", b.Pos[i], b.Logits[i])
				}
			}
			if b.Logits[i] {
				outputs++
			}
		}
		if b.Len() < 2 || outputs == 1 {
			t.Errorf("batch of %d tokens with %d outputs reached llama.cpp", b.Len(), outputs)
		}
		return nil
	}
	req := request(prompt(rand.New(rand.NewPCG(15, 16)), 5), 6)
	checkStream(t, "stream", req, readAll(mustSubmit(t, e, context.Background(), req)))
	// Six steps (the prompt, then five tokens), each with one output.
	want := [][2]int{{6, 1}, {2, 1}, {2, 1}, {2, 1}, {2, 1}, {2, 1}}
	if st := e.Stats(); st.Padded != 6 || pads != 6 || !slices.Equal(log.steps, want) {
		t.Errorf("padded %d (%d padding tokens seen), steps %v; want 6, 6 and %v", st.Padded, pads, log.steps, want)
	}
	checkSettled(t, e)
}

// TestWorkerConfig checks NewEngine's refusals.
func TestWorkerConfig(t *testing.T) {
	errOpen := errors.New("no context")
	tests := []struct {
		name    string
		cfg     EngineConfig
		batch   int
		openErr error
		want    error // nil: any error
	}{
		{"no sequences", EngineConfig{}, 16, nil, nil},
		{"too many sequences", EngineConfig{Admission: allocator.Config{MaxSequences: MaxSequenceIDs + 1}}, 16, nil, nil},
		{"running above sequences", EngineConfig{Admission: allocator.Config{MaxSequences: 2, MaxRunning: 3}}, 16, nil, nil},
		{"deterministic with a prefix cache", EngineConfig{Deterministic: true, Admission: allocator.Config{MaxSequences: 2, PrefixCache: true}}, 16, nil, errDeterministicPrefix},
		{"deterministic without spare ids", EngineConfig{Deterministic: true, Admission: allocator.Config{MaxSequences: RetiredSequence}}, 512, nil, nil},
		{"Open fails", EngineConfig{Admission: allocator.Config{MaxSequences: 2}}, 16, errOpen, errOpen},
		{"an invalid allocator configuration", EngineConfig{Admission: allocator.Config{MaxSequences: 2, MaxQueue: -1}}, 16, nil, allocator.ErrInvalidConfig},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fb := newFakeBackend(64, tc.batch)
			cfg := tc.cfg
			opened := false
			cfg.Open = func() (Backend, error) {
				opened = true
				if tc.openErr != nil {
					return nil, tc.openErr
				}
				return fb, nil
			}
			cfg.Vocab = fakeVocab{}
			e, err := NewEngine(cfg)
			if err == nil {
				e.Close()
				t.Fatal("NewEngine accepted the configuration")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("err %v, want %v", err, tc.want)
			}
			if opened && tc.openErr == nil && !fb.closed {
				t.Error("the backend was left open after the refusal")
			}
			fb.check(t)
		})
	}
	if _, err := NewEngine(EngineConfig{Admission: allocator.Config{MaxSequences: 1}}); err == nil {
		t.Error("NewEngine accepted no Open and no Vocab")
	}
}

// TestWorkerCancel cancels streams running and queued: a cancelled stream
// ends with context.Canceled after a prefix of its solo run, its cells go
// back, and the streams beside it are untouched.
func TestWorkerCancel(t *testing.T) {
	r := rand.New(rand.NewPCG(17, 18))
	t.Run("after reading events", func(t *testing.T) {
		// The first decode waits until the other two streams are handed
		// over, the fifth until the second stream, having read three
		// events, cancelled: that stream starts at step 2, its third token
		// comes from step 4, and the cancel, made while step 5 decodes
		// (after that step checked the contexts), ends it after step 5,
		// with four tokens.
		fb := newFakeBackend(256, 16)
		e := startEngine(t, fb, EngineConfig{Admission: admission(4)})
		reached, handedOver := make(chan struct{}), make(chan struct{})
		atFifth, cancelled := make(chan struct{}), make(chan struct{})
		handOver := sync.OnceFunc(func() { close(handedOver) })
		markCancelled := sync.OnceFunc(func() { close(cancelled) })
		defer handOver() // a failing test must not leave the worker held
		defer markCancelled()
		fb.hook = func(call int, _ *Batch) error {
			switch call {
			case 1:
				close(reached)
				<-handedOver
			case 5:
				close(atFifth)
				<-cancelled
			}
			return nil
		}
		reqs := []Request{request(prompt(r, 6), 40), request(prompt(r, 6), 40), request(prompt(r, 6), 40)}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		got := make([]delivered, len(reqs))
		var wg sync.WaitGroup
		for i, req := range reqs {
			c := context.Background()
			if i == 1 {
				c = ctx
			}
			s := mustSubmit(t, e, c, req)
			if i == 0 {
				<-reached
			}
			wg.Go(func() {
				if i == 1 {
					for range 3 {
						got[i].add(<-s.Events())
					}
					<-atFifth // past the step's reap
					cancel()
					markCancelled()
				}
				for ev := range s.Events() {
					got[i].add(ev)
				}
				got[i].res = s.Result()
			})
		}
		handOver()
		wg.Wait()
		for i, req := range reqs {
			checkStream(t, "stream", req, got[i])
			if err := got[i].res.Err; (i == 1) != (err != nil) || i == 1 && !errors.Is(err, context.Canceled) {
				t.Errorf("stream %d ended with %v", i, err)
			}
		}
		if n := len(got[1].toks); n != 4 {
			t.Errorf("the cancelled stream delivered %d tokens at steps %v, want 4", n, got[1].steps)
		}
		checkSettled(t, e)
		checkClosedCells(t, e, fb)
	})
	t.Run("at a step", func(t *testing.T) {
		// OnStep runs after the step's decode and before its sampling: a
		// cancel there ends the stream at the next step, after the token
		// of this one.
		fb := newFakeBackend(256, 16)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		const at = 7
		steps := 0
		e := startEngine(t, fb, EngineConfig{Admission: admission(2), OnStep: func(int, int) {
			if steps++; steps == at {
				cancel()
			}
		}})
		req := request(prompt(r, 6), 100)
		d := readAll(mustSubmit(t, e, ctx, req))
		checkStream(t, "stream", req, d)
		if !errors.Is(d.res.Err, context.Canceled) || len(d.toks) != at || d.res.CompletionTokens != at {
			t.Errorf("err %v after %d tokens (%d completion tokens), want context.Canceled after %d", d.res.Err, len(d.toks), d.res.CompletionTokens, at)
		}
		checkSettled(t, e)
	})
	t.Run("queued", func(t *testing.T) {
		fb := newFakeBackend(256, 16)
		e := startEngine(t, fb, EngineConfig{Admission: admission(1)})
		started, release := holdFirstDecode(fb)
		defer release()
		first := request(prompt(r, 4), 5)
		s := mustSubmit(t, e, context.Background(), first)
		<-started
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() {
			_, err := e.Submit(ctx, request(prompt(r, 4), 5))
			errc <- err
		}()
		spinUntil(func() bool { return e.Allocator().Stats().Queued == 1 })
		cancel()
		err := <-errc
		var re *allocator.RejectError
		if !errors.As(err, &re) || re.Reason != allocator.ReasonCancelled || !errors.Is(err, context.Canceled) {
			t.Errorf("queued Submit cancelled: err %v, want a CANCELLED refusal", err)
		}
		release()
		checkStream(t, "first", first, readAll(s))
		if _, err := e.Submit(ctx, request(prompt(r, 4), 5)); !errors.Is(err, context.Canceled) {
			t.Errorf("Submit with a cancelled context: err %v", err)
		}
		checkSettled(t, e)
	})
}

// TestWorkerSlowConsumer leaves a stream unread: it ends with
// ErrSlowConsumer once its buffer is full, and the stream beside it runs on.
func TestWorkerSlowConsumer(t *testing.T) {
	r := rand.New(rand.NewPCG(19, 20))
	fb := newFakeBackend(256, 16)
	e := startEngine(t, fb, EngineConfig{Admission: admission(2), StreamBuffer: 2})
	slow := request(prompt(r, 4), 50)
	sSlow := mustSubmit(t, e, context.Background(), slow)
	other := request(prompt(r, 4), 1) // a buffer of 2 holds its one event
	dOther := readAll(mustSubmit(t, e, context.Background(), other))
	checkStream(t, "other", other, dOther)
	<-e.Allocator().Idle() // the slow stream has ended: reading it changes nothing now
	d := readAll(sSlow)
	checkStream(t, "slow", slow, d)
	if !errors.Is(d.res.Err, ErrSlowConsumer) || len(d.toks) != 2 || d.res.CompletionTokens != 3 || !sSlow.Failed() {
		t.Errorf("err %v after %d events (%d completion tokens); want ErrSlowConsumer after 2 (3)", d.res.Err, len(d.toks), d.res.CompletionTokens)
	}
	if n := e.Stats().SlowConsumers; n != 1 {
		t.Errorf("%d slow consumers counted", n)
	}
	checkSettled(t, e)
}

// TestWorkerNoKVSlot makes llama.cpp find no slot where the allocator saw
// room: the engine shrinks the batch and retries, and as a last resort
// ends the newest sequence only.
func TestWorkerNoKVSlot(t *testing.T) {
	r := rand.New(rand.NewPCG(21, 22))
	t.Run("the batch shrinks", func(t *testing.T) {
		fb := newFakeBackend(256, 16)
		fb.hook = func(_ int, b *Batch) error {
			if b.Len() > 4 {
				return ErrNoKVSlot
			}
			return nil
		}
		e := startEngine(t, fb, EngineConfig{Admission: admission(2)})
		req := request(prompt(r, 40), 5)
		d := readAll(mustSubmit(t, e, context.Background(), req))
		checkStream(t, "stream", req, d)
		// Each of the first nine prefill steps fails at 16 and 8 tokens
		// and runs 4; the tenth has only 4 tokens left.
		if st := e.Stats(); d.res.Err != nil || st.NoKVSlot != 18 || st.Aborted != 0 || st.Steps != 14 {
			t.Errorf("err %v, stats %+v: want 18 NoKVSlot, no abort, 14 steps", d.res.Err, st)
		}
		checkSettled(t, e)
	})
	for _, tc := range []struct {
		name    string
		phantom int
		cache   bool
	}{
		// 20 of 32 cells are held behind the allocator's back: two
		// sequences of 4 + 3 cells each fit its count, not llama.cpp's 12
		// free cells. The older one prefills alone at step 1, the newer
		// one joins at step 2, and at step 4 there is room for one token:
		// the older one's, once the newer one is out of the batch.
		{"the newest sequence leaves the batch", 20, false},
		// With 21 cells held, step 4 has no room at all: the newer
		// sequence's cells must be freed before the older one can go on.
		{"the newest sequence's cells are freed", 21, false},
		{"the newest sequence's cells are freed, prefix cache", 21, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fb := newFakeBackend(32, 16)
			fb.occupy(tc.phantom)
			cfg := admission(4)
			cfg.PrefixCache = tc.cache
			e := startEngine(t, fb, EngineConfig{Admission: cfg})
			started, release := holdFirstDecode(fb)
			defer release()
			older, newer := request(prompt(r, 4), 4), request(prompt(r, 4), 4)
			sOlder := mustSubmit(t, e, context.Background(), older)
			<-started
			sNewer := mustSubmit(t, e, context.Background(), newer)
			release()
			dOlder, dNewer := readAll(sOlder), readAll(sNewer)
			checkStream(t, "older", older, dOlder)
			checkStream(t, "newer", newer, dNewer)
			st := e.Stats()
			if dOlder.res.Err != nil || !errors.Is(dNewer.res.Err, ErrSequenceAborted) || st.Aborted != 1 || st.NoKVSlot == 0 {
				t.Errorf("older ended with %v, newer with %v (after %d tokens); stats %+v: want only the newer aborted, once",
					dOlder.res.Err, dNewer.res.Err, len(dNewer.toks), st)
			}
			checkSettled(t, e)
		})
	}
	t.Run("a failed computation", func(t *testing.T) {
		fb := newFakeBackend(256, 16)
		fb.hook = func(call int, _ *Batch) error {
			if call == 3 {
				return errFakeCompute
			}
			return nil
		}
		e := startEngine(t, fb, EngineConfig{Admission: admission(2)})
		req := request(prompt(r, 4), 10)
		d := readAll(mustSubmit(t, e, context.Background(), req))
		checkStream(t, "failed", req, d)
		if !errors.Is(d.res.Err, errFakeCompute) || len(d.toks) != 2 {
			t.Errorf("err %v after %d tokens, want the computation's error after 2", d.res.Err, len(d.toks))
		}
		// The engine goes on with the next request.
		next := request(prompt(r, 4), 10)
		checkStream(t, "next", next, readAll(mustSubmit(t, e, context.Background(), next)))
		checkSettled(t, e)
		checkClosedCells(t, e, fb)
	})
	t.Run("no valid token", func(t *testing.T) {
		fb := newFakeBackend(256, 16)
		e := startEngine(t, fb, EngineConfig{Admission: admission(2)})
		bad := Request{Prompt: prompt(r, 4), MaxTokens: 10, Sampling: SamplingParams{Temperature: float32(math.NaN())}}
		good := request(prompt(r, 4), 10)
		sBad := mustSubmit(t, e, context.Background(), bad)
		sGood := mustSubmit(t, e, context.Background(), good)
		dBad, dGood := readAll(sBad), readAll(sGood)
		if !errors.Is(dBad.res.Err, ErrNoValidToken) || len(dBad.toks) != 0 || !sBad.Failed() {
			t.Errorf("NaN temperature: err %v after %d tokens, want ErrNoValidToken after none", dBad.res.Err, len(dBad.toks))
		}
		checkStream(t, "good", good, dGood)
		checkSettled(t, e)
	})
}

// TestWorkerStopString ends a stream on a stop string, which is not
// streamed.
func TestWorkerStopString(t *testing.T) {
	r := rand.New(rand.NewPCG(23, 24))
	p := prompt(r, 5)
	solo, _ := soloRun(p, 20, true)
	// The third token's text, unless it occurs earlier.
	stop := fakePiece(solo[2])
	full := fakeText(solo)
	i := strings.Index(full, stop)
	fb := newFakeBackend(256, 16)
	e := startEngine(t, fb, EngineConfig{Admission: admission(2)})
	req := Request{Prompt: p, MaxTokens: 20, IgnoreEOS: true, Stop: []string{"never", stop}}
	d := readAll(mustSubmit(t, e, context.Background(), req))
	if d.res.Reason != FinishStop || d.res.StopString != stop || d.text != full[:i] || d.res.Err != nil {
		t.Errorf("text %q, reason %v, stop %q, err %v; want %q, stop, %q", d.text, d.res.Reason, d.res.StopString, d.res.Err, full[:i], stop)
	}
	checkStream(t, "stop", req, d)
	checkSettled(t, e)
}

// TestWorkerBadRequest checks Submit's refusals of malformed requests.
func TestWorkerBadRequest(t *testing.T) {
	fb := newFakeBackend(64, 16)
	e := startEngine(t, fb, EngineConfig{Admission: admission(2)})
	tests := []struct {
		name string
		req  Request
		want []error
	}{
		{"token outside the vocabulary", request([]int32{1, fakeVocabSize}, 4), []error{ErrBadRequest, ErrTokenOutOfRange}},
		{"negative token", request([]int32{-1}, 4), []error{ErrBadRequest, ErrTokenOutOfRange}},
		{"empty prompt", request(nil, 4), []error{allocator.ErrInvalidRequest}},
		{"no tokens to generate", request([]int32{1}, 0), []error{allocator.ErrInvalidRequest}},
		{"never fits", request([]int32{1, 2}, 63), []error{allocator.ErrNeverFits}},
	}
	for _, tc := range tests {
		s, err := e.Submit(context.Background(), tc.req)
		if s != nil {
			t.Errorf("%s: Submit returned a stream", tc.name)
		}
		for _, w := range tc.want {
			if !errors.Is(err, w) {
				t.Errorf("%s: err %v, want %v", tc.name, err, w)
			}
		}
	}
	checkSettled(t, e)
}

// TestWorkerClose closes the engine with streams running and queued: the
// running ones end with ErrEngineClosed, every Submit returns, and Submit
// refuses afterwards.
func TestWorkerClose(t *testing.T) {
	r := rand.New(rand.NewPCG(25, 26))
	fb := newFakeBackend(128, 16)
	cfg := admission(2)
	e := startEngine(t, fb, EngineConfig{Admission: cfg})
	started, release := holdFirstDecode(fb)
	defer release()
	running := []*Stream{mustSubmit(t, e, context.Background(), request(prompt(r, 4), 40))}
	<-started
	running = append(running, mustSubmit(t, e, context.Background(), request(prompt(r, 4), 40)))
	const queued = 5
	type outcome struct {
		s   *Stream
		err error
	}
	outcomes := make(chan outcome, queued)
	for range queued {
		go func() {
			s, err := e.Submit(context.Background(), request(prompt(rand.New(rand.NewPCG(1, 1)), 4), 40))
			outcomes <- outcome{s, err}
		}()
	}
	spinUntil(func() bool { return e.Allocator().Stats().Queued == queued })
	closed := make(chan struct{})
	go func() { e.Close(); close(closed) }()
	<-e.quit // Close has begun: the worker stops after the held step
	release()
	<-closed
	for i, s := range running {
		if d := readAll(s); !errors.Is(d.res.Err, ErrEngineClosed) {
			t.Errorf("running stream %d ended with %v, want ErrEngineClosed", i, d.res.Err)
		}
	}
	for range queued {
		o := <-outcomes
		switch {
		case o.err != nil && !errors.Is(o.err, ErrEngineClosed):
			t.Errorf("queued Submit: %v, want ErrEngineClosed", o.err)
		case o.err == nil:
			// Handed over before the worker stopped: it must have ended.
			select {
			case _, ok := <-o.s.Events():
				for ok {
					_, ok = <-o.s.Events()
				}
				if !errors.Is(o.s.Result().Err, ErrEngineClosed) {
					t.Errorf("queued stream ended with %v", o.s.Result().Err)
				}
			default:
				t.Error("a stream handed over is still open after Close")
			}
		}
	}
	if _, err := e.Submit(context.Background(), request(prompt(r, 4), 4)); !errors.Is(err, ErrEngineClosed) {
		t.Errorf("Submit after Close: %v", err)
	}
	if st := e.Allocator().Stats(); st.Running != 0 || st.Queued != 0 {
		t.Errorf("after Close the allocator runs %d and queues %d", st.Running, st.Queued)
	}
	e.Close() // idempotent
}

// TestEngineStepRate checks the moving average behind StepRate, and that
// an engine's rate is no slower than its steps could have been.
func TestEngineStepRate(t *testing.T) {
	t.Run("moving average", func(t *testing.T) {
		e := &Engine{}
		if r := e.StepRate(); r != 0 {
			t.Fatalf("rate before any step = %v, want 0", r)
		}
		steps := []struct {
			d    time.Duration
			want float64 // steps per second after it
		}{
			{10 * time.Millisecond, 100},
			{10 * time.Millisecond, 100},
			{110 * time.Millisecond, 1e9 / (10e6 + StepRateWeight*100e6)},
			{0, 1e9 / (20e6 + StepRateWeight*(1-20e6))},
		}
		for i, s := range steps {
			e.recordStep(s.d)
			if got := e.StepRate(); math.Abs(got-s.want) > 1e-9*s.want {
				t.Errorf("after step %d (%v): rate %v, want %v", i, s.d, got, s.want)
			}
		}
		if allocs := testing.AllocsPerRun(100, func() { e.recordStep(time.Millisecond); e.StepRate() }); allocs != 0 {
			t.Errorf("recordStep and StepRate allocate %v times", allocs)
		}
	})
	// The engine's rate is an average of the durations of its steps, each
	// of which lies between the decodes of its neighbours (timed by
	// OnStep, on the worker): so its mean step time is at most the longest
	// such bracket, however the machine's load stretches single steps.
	t.Run("engine", func(t *testing.T) {
		var decoded []time.Time // written by the worker; read after the stream ends
		fb := newFakeBackend(512, 64)
		e := startEngine(t, fb, EngineConfig{Admission: admission(2),
			OnStep: func(int, int) { decoded = append(decoded, time.Now()) }})
		if r := e.StepRate(); r != 0 {
			t.Fatalf("rate before any step = %v, want 0", r)
		}
		start := time.Now()
		readAll(mustSubmit(t, e, context.Background(), request(prompt(rand.New(rand.NewPCG(27, 28)), 5), 24)))
		rate := e.StepRate()
		end := time.Now()
		steps := e.Stats().Steps
		if !(rate > 0) || math.IsInf(rate, 0) {
			t.Fatalf("rate %v after %d steps", rate, steps)
		}
		if len(decoded) != int(steps) {
			t.Fatalf("OnStep ran %d times for %d steps", len(decoded), steps)
		}
		marks := append(append([]time.Time{start}, decoded...), end)
		var longest time.Duration
		for k := 1; k+1 < len(marks); k++ {
			longest = max(longest, marks[k+1].Sub(marks[k-1]))
		}
		if mean := time.Duration(1e9 / rate); mean > longest {
			t.Errorf("mean step time %v (rate %.0f/s) is longer than any step could have taken (%v)", mean, rate, longest)
		}
	})
}
