//go:build cgo

package native_test

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kvgate/kvgate/allocator"
	"github.com/kvgate/kvgate/internal/llamatest"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/native/llama"
)

// checkReleased fails t unless every lease of e's allocator is released
// and no cell is used: the engine settles a sequence's end with the
// allocator before it closes its stream.
func checkReleased(t *testing.T, e *native.Engine) {
	t.Helper()
	if st := e.Allocator().Stats(); st.Running != 0 || st.CellsUsed != 0 {
		t.Errorf("after the streams closed: %d leases held, %d cells used; want none", st.Running, st.CellsUsed)
	}
}

func TestEngineMatchesReference(t *testing.T) {
	m := stories(t)
	e := newEngine(t, llama.ContextParams{Cells: 512, Batch: 64, MaxSequences: 4}, native.EngineConfig{})
	prompt, _ := m.Tokenize("Once upon a time", true, false)
	want, err := llamatest.GreedyReference(context.Background(), m, prompt, 32)
	if err != nil {
		t.Fatal(err)
	}
	s, err := e.Submit(context.Background(), native.Request{Prompt: prompt, MaxTokens: 32})
	if err != nil {
		t.Fatal(err)
	}
	got := collect(s)
	if !slices.Equal(got.ids, want) {
		t.Fatalf("engine ids %v\nreference ids %v", got.ids, want)
	}
	wantText, _ := m.Detokenize(want, native.DetokenizeOptions{})
	if got.text != wantText {
		t.Fatalf("engine text %q, reference %q", got.text, wantText)
	}
	checkReleased(t, e)
	if got.result.Err != nil {
		t.Fatal(got.result.Err)
	}
}

// TestEngineBatches runs 8 greedy streams at once: the steps must stay near
// one stream's token count, and each stream must equal its solo run. The
// worker is held in the first stream's first step until the test has
// handed over the other seven, so all eight run from the next step on
// whatever the scheduling: n + 1 steps in all, where one at a time would
// take 8 x n.
func TestEngineBatches(t *testing.T) {
	m := stories(t)
	var gate stepGate
	e := newEngine(t, llama.ContextParams{Cells: 2048, Batch: 512, MaxSequences: 8}, native.EngineConfig{OnStep: gate.onStep})
	prompts := []string{"Once upon a time", "The cat", "Lily wanted", "One day, a big", "Tom and Sue", "The sun was", "A little bird", "Mom said"}
	const n = 64
	solo := make([][]int32, len(prompts))
	toks := make([][]int32, len(prompts))
	for i, p := range prompts {
		toks[i], _ = m.Tokenize(p, true, false)
		s, err := e.Submit(context.Background(), native.Request{Prompt: toks[i], MaxTokens: n, IgnoreEOS: true})
		if err != nil {
			t.Fatal(err)
		}
		solo[i] = collect(s).ids
	}
	got, steps := runTogether(t, e, &gate, toks, n)
	for i := range prompts {
		if !slices.Equal(got[i].ids, solo[i]) {
			t.Errorf("stream %d differs from its solo run:\n got %v\nwant %v", i, got[i].ids, solo[i])
		}
		if len(got[i].ids) != n {
			t.Errorf("stream %d: %d tokens, want %d", i, len(got[i].ids), n)
		}
	}
	t.Logf("8 streams x %d tokens took %d decode steps", n, steps)
	if steps > n+1 {
		t.Fatalf("%d steps for 8 concurrent streams of %d tokens: not batched", steps, n)
	}
}

// TestEngineCancelFreesSequence cancels a stream's context at its 10th
// token, from inside the worker's step, and checks that the sequence ends
// with context.Canceled at the next step, with its lease released. The
// cancel is made at a known token, so the bound on what ran after it is a
// count, not a race between the test goroutine and the worker.
func TestEngineCancelFreesSequence(t *testing.T) {
	m := stories(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const at = 10
	steps := 0 // the worker's alone
	e := newEngine(t, llama.ContextParams{Cells: 1024, Batch: 64, MaxSequences: 2}, native.EngineConfig{StreamBuffer: 4096,
		OnStep: func(int, int) {
			// Step 1 is the prefill, which samples the first token; step
			// at+1 carries the at-th token into the cache and goes on to
			// sample the next one. Cancel there.
			if steps++; steps == at+1 {
				cancel()
			}
		}})
	prompt, _ := m.Tokenize("Once upon a time", true, false)
	s, err := e.Submit(ctx, native.Request{Prompt: prompt, MaxTokens: 900, IgnoreEOS: true})
	if err != nil {
		t.Fatal(err)
	}
	got := collect(s)
	if !errors.Is(got.result.Err, context.Canceled) {
		t.Fatalf("result err = %v, want context.Canceled", got.result.Err)
	}
	checkReleased(t, e)
	if len(got.ids) != at+1 {
		t.Fatalf("%d tokens streamed for a cancel at token %d: want %d, the cancel must end the sequence at the next step", len(got.ids), at, at+1)
	}
}

func TestEngineSlowConsumer(t *testing.T) {
	m := stories(t)
	e := newEngine(t, llama.ContextParams{Cells: 1024, Batch: 64, MaxSequences: 2}, native.EngineConfig{StreamBuffer: 8})
	prompt, _ := m.Tokenize("Once upon a time", true, false)
	s, err := e.Submit(context.Background(), native.Request{Prompt: prompt, MaxTokens: 200, IgnoreEOS: true})
	if err != nil {
		t.Fatal(err)
	}
	// Nothing reads the stream, so the worker's 9th event overflows it and
	// the sequence ends, releasing its lease; the timeout only bounds a
	// hang.
	select {
	case <-e.Allocator().Idle():
	case <-time.After(2 * time.Minute):
		t.Fatal("the unread stream's lease was not released within two minutes")
	}
	if !s.Failed() {
		t.Error("the stream does not report its failure")
	}
	got := collect(s)
	if !errors.Is(got.result.Err, native.ErrSlowConsumer) {
		t.Fatalf("err = %v, want ErrSlowConsumer", got.result.Err)
	}
	if len(got.steps) > 8 {
		t.Fatalf("%d events buffered, bound is 8", len(got.steps))
	}
	if e.Stats().SlowConsumers != 1 {
		t.Fatalf("stats %+v", e.Stats())
	}
	checkReleased(t, e)
}

func TestEngineStopString(t *testing.T) {
	m := stories(t)
	e := newEngine(t, llama.ContextParams{Cells: 512, Batch: 64, MaxSequences: 1}, native.EngineConfig{})
	prompt, _ := m.Tokenize("Once upon a time", true, false)
	ref, _ := llamatest.GreedyReference(context.Background(), m, prompt, 32)
	full, _ := m.Detokenize(ref, native.DetokenizeOptions{})
	// The reference text is ", there was a little girl named Lily. ..."; stop at "girl".
	s, err := e.Submit(context.Background(), native.Request{Prompt: prompt, MaxTokens: 32, Stop: []string{"zzz", "girl"}})
	if err != nil {
		t.Fatal(err)
	}
	got := collect(s)
	i := strings.Index(full, "girl")
	if i < 0 {
		t.Fatalf("stories260K's greedy text %q has no 'girl' to stop at (the model is pinned by sha256, so its text should not change)", full)
	}
	if got.result.Reason != native.FinishStop || got.result.StopString != "girl" || got.text != full[:i] {
		t.Fatalf("got %q reason %v stop %q; want %q", got.text, got.result.Reason, got.result.StopString, full[:i])
	}
}

// TestEnginePrefillDoesNotStall prefills a 1500-token prompt while three
// streams decode: the prompt is chunked across steps, and the running
// streams get a token at every step meanwhile (gaps measured in steps).
// The worker is held in its first step until the three streams are handed
// over, and the long prompt is handed over from inside the worker, at the
// first stream's 30th token, so the streams have 770 tokens left for the
// few prefill steps whatever the scheduling.
func TestEnginePrefillDoesNotStall(t *testing.T) {
	m := stories(t)
	bg, stopBG := context.WithCancel(context.Background())
	defer stopBG()
	type run struct {
		steps []uint64
		done  chan struct{}
	}
	long := make([]int32, 1500)
	for i := range long {
		long[i] = int32(3 + (i*7919)%509) // valid ids of the 512-token vocabulary
	}
	type handover struct {
		before uint64 // steps when the long prompt was handed over
		s      *native.Stream
		err    error
	}
	handed := make(chan handover, 1)
	var gate stepGate
	var e *native.Engine // set before the first Submit, so before any step
	steps := 0           // the worker's alone
	e = newEngine(t, llama.ContextParams{Cells: 4096, Batch: 512, MaxSequences: 4}, native.EngineConfig{StreamBuffer: 4096,
		OnStep: func(tokens, seqs int) {
			gate.onStep(tokens, seqs)
			// The first stream ran in every step from the first: step 31
			// carries its 30th token into the cache. Admission is
			// immediate (the pool holds every request's prompt and
			// tokens) and the worker's hand-over channel is empty, so
			// Submit does not block the worker.
			if steps++; steps == 31 {
				before := e.Stats().Steps // this step's number: the long prompt joins the next
				s, err := e.Submit(context.Background(), native.Request{Prompt: long, MaxTokens: 4})
				handed <- handover{before, s, err}
			}
		}})
	runs := make([]*run, 3)
	handOver := gate.arm()
	defer handOver()
	for i := range runs {
		prompt, _ := m.Tokenize([]string{"Once upon a time", "The dog", "Sue had a"}[i], true, false)
		// Far longer than the prefill below; cancelled once it is done.
		s, err := e.Submit(bg, native.Request{Prompt: prompt, MaxTokens: 800, IgnoreEOS: true})
		if err != nil {
			t.Fatal(err)
		}
		r := &run{done: make(chan struct{})}
		runs[i] = r
		go func() {
			defer close(r.done)
			for ev := range s.Events() {
				r.steps = append(r.steps, ev.Step)
			}
		}()
	}
	handOver()
	var h handover
	select {
	case h = <-handed:
	case <-time.After(5 * time.Minute): // only bounds a hang
		t.Fatal("the first stream never reached its 30th token")
	}
	if h.err != nil {
		t.Fatal(h.err)
	}
	before := h.before
	longRes := collect(h.s)
	if longRes.result.Err != nil {
		t.Fatal(longRes.result.Err)
	}
	prefillEnd := longRes.steps[0]
	stopBG()
	for _, r := range runs {
		<-r.done
	}
	if prefillSteps := prefillEnd - before; prefillSteps < 3 {
		t.Fatalf("1500-token prompt prefilled in %d steps: not chunked", prefillSteps)
	}
	for i, r := range runs {
		maxGap, during := uint64(0), 0
		for j, st := range r.steps {
			if st > before && st <= prefillEnd {
				during++
			}
			if j == 0 {
				continue
			}
			if r.steps[j] >= before && r.steps[j-1] <= prefillEnd {
				maxGap = max(maxGap, r.steps[j]-r.steps[j-1])
			}
		}
		t.Logf("stream %d: %d events, largest gap during the long prefill: %d steps", i, len(r.steps), maxGap)
		if during < int(prefillEnd-before)-1 {
			t.Errorf("stream %d got %d tokens during the %d prefill steps", i, during, prefillEnd-before)
		}
		if maxGap > 2 {
			t.Errorf("stream %d waited %d steps between tokens during the prefill", i, maxGap)
		}
	}
}

// TestEnginePreemptResume preempts a greedy sequence in the middle of its
// generation and checks that, recomputed, it continues exactly as the
// reference decode does. The preemption is forced by optimistic admission
// on a pool too small for two streams: at the stream's token at, a filler
// (a prompt that leaves only a few cells free, and a few tokens) joins from
// inside the worker, the pool runs dry a few tokens later, and the stream,
// of lower priority, is the one preempted; it resumes, recomputing its
// tokens, when the filler has ended.
func TestEnginePreemptResume(t *testing.T) {
	m := stories(t)
	prompt, _ := m.Tokenize("Once upon a time", true, false)
	want, err := llamatest.GreedyReference(context.Background(), m, prompt, 120)
	if err != nil {
		t.Fatal(err)
	}
	const (
		watermark = 4
		slack     = 2 // cells beside the watermark when the filler joins
		filler    = 8 // tokens the filler generates
	)
	for _, at := range []int{3, 40, 90} {
		if at+watermark+slack >= len(want) {
			t.Fatalf("the reference has %d tokens: too few to preempt after %d", len(want), at)
		}
		type handover struct {
			s   *native.Stream
			err error
		}
		handed := make(chan handover, 1)
		var e *native.Engine // set before the first Submit, so before any step
		steps := 0           // the worker's alone
		e = newEngine(t, llama.ContextParams{Cells: 256, Batch: 512, MaxSequences: 2, KVType: "f32"},
			native.EngineConfig{Admission: allocator.Config{Policy: allocator.PolicyOptimistic, Watermark: watermark},
				OnStep: func(int, int) {
					// Step at decodes the stream's token at-1 and goes on
					// to sample token at: the allocator holds a cell for
					// each of its prompt's and first at-1 tokens.
					if steps++; steps != at {
						return
					}
					// The filler's prompt leaves watermark+slack cells
					// free once token at is in too: it is admitted at
					// once (MaxQueue is 0, so a miscount fails Submit
					// instead of holding the worker), and the two run
					// out of room a few steps later.
					n := e.Cells() - (len(prompt) + at) - watermark - slack
					p := make([]int32, n)
					p[0] = 1 // BOS
					for i := 1; i < n; i++ {
						p[i] = int32(3 + (i*7919)%509)
					}
					s, err := e.Submit(context.Background(), native.Request{Prompt: p, MaxTokens: filler, IgnoreEOS: true})
					handed <- handover{s, err}
				}})
		s, err := e.Submit(context.Background(), native.Request{Prompt: prompt, MaxTokens: len(want), Priority: -1})
		if err != nil {
			t.Fatal(err)
		}
		got := collect(s)
		var h handover
		select {
		case h = <-handed:
		default:
			t.Fatalf("preempt after %d tokens: the filler was never handed over", at)
		}
		if h.err != nil {
			t.Fatalf("preempt after %d tokens: filler: %v", at, h.err)
		}
		fill := collect(h.s)
		if fill.result.Err != nil || len(fill.ids) != filler {
			t.Fatalf("preempt after %d tokens: filler: err %v, %d tokens of %d", at, fill.result.Err, len(fill.ids), filler)
		}
		if got.result.Err != nil {
			t.Fatalf("preempt after %d tokens: %v", at, got.result.Err)
		}
		if got.result.Preempted == 0 {
			t.Fatalf("filler at token %d: the stream was not preempted", at)
		}
		t.Logf("filler at token %d: preempted %d times, engine preemptions %d", at, got.result.Preempted, e.Stats().Preempted)
		if !slices.Equal(got.ids, want) {
			t.Errorf("preempted after %d tokens: output differs from the reference at token %d", at, firstDiff(got.ids, want))
		}
		checkReleased(t, e)
	}
}

// TestEngineNoValidToken runs a sequence whose sampling parameters leave
// no token to draw beside a greedy one: only the first ends, with
// ErrNoValidToken, and the other runs as it would alone.
func TestEngineNoValidToken(t *testing.T) {
	m := stories(t)
	e := newEngine(t, llama.ContextParams{Cells: 512, Batch: 64, MaxSequences: 2}, native.EngineConfig{})
	prompt, _ := m.Tokenize("Once upon a time", true, false)
	want, err := llamatest.GreedyReference(context.Background(), m, prompt, 24)
	if err != nil {
		t.Fatal(err)
	}
	sBad, err := e.Submit(context.Background(), native.Request{Prompt: prompt, MaxTokens: 24,
		Sampling: native.SamplingParams{Temperature: float32(math.NaN())}})
	if err != nil {
		t.Fatal(err)
	}
	sGood, err := e.Submit(context.Background(), native.Request{Prompt: prompt, MaxTokens: len(want)})
	if err != nil {
		t.Fatal(err)
	}
	gotBad, gotGood := collect(sBad), collect(sGood)
	if !errors.Is(gotBad.result.Err, native.ErrNoValidToken) || len(gotBad.ids) != 0 || !sBad.Failed() {
		t.Errorf("NaN temperature: err %v, %d tokens; want ErrNoValidToken and none", gotBad.result.Err, len(gotBad.ids))
	}
	if gotGood.result.Err != nil || !slices.Equal(gotGood.ids, want) {
		t.Errorf("the greedy sequence beside it: err %v, ids %v; want %v", gotGood.result.Err, gotGood.ids, want)
	}
	checkReleased(t, e)
}

// TestEngineTenantPreemption runs, under optimistic admission with the real
// allocator, one short low-priority request beside three long
// high-priority ones on a pool too small for them. When the light request
// is its own tenant, within its share, it is never preempted: the
// preemptions fall on the loaded tenant, despite its higher priority. When
// all four share a tenant, priority alone decides and the light request is
// the one preempted.
func TestEngineTenantPreemption(t *testing.T) {
	m := stories(t)
	tests := []struct {
		name              string
		lightTenant       string
		wantLightPreempts bool
	}{
		{"two tenants", "light", false},
		{"one tenant", "heavy", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var gate stepGate
			e := newEngine(t, llama.ContextParams{Cells: 256, Batch: 64, MaxSequences: 8}, native.EngineConfig{
				Admission: allocator.Config{MaxQueue: 32, Policy: allocator.PolicyOptimistic, Watermark: 8},
				OnStep:    gate.onStep})
			r := rand.New(rand.NewPCG(5, 6))
			prompt := func(n int) []int32 {
				p := make([]int32, n)
				p[0] = 1 // BOS
				for i := 1; i < n; i++ {
					p[i] = int32(3 + r.IntN(m.Info().VocabSize-3))
				}
				return p
			}
			// The light request holds at most 10 + 40 = 50 cells, fewer than
			// any running heavy lease (a heavy one is admitted, and
			// resumed, with its 50-token prompt plus the watermark of 8):
			// whenever a heavy sequence runs, the heavy tenant is the more
			// loaded. The pool first runs out after about 24 tokens each
			// (3 x (50 + t) + 10 + t = 256), while the light request still
			// runs.
			type job struct {
				req    native.Request
				stream *native.Stream
			}
			jobs := []*job{{req: native.Request{Prompt: prompt(10), MaxTokens: 40, Priority: -10, Tenant: tc.lightTenant, IgnoreEOS: true}}}
			for range 3 {
				jobs = append(jobs, &job{req: native.Request{Prompt: prompt(50), MaxTokens: 120, Priority: 10, Tenant: "heavy", IgnoreEOS: true}})
			}
			// All four are admitted (their prompts and the watermark fit)
			// and handed over while the worker holds the first one's
			// first step.
			handOver := gate.arm()
			defer handOver()
			for _, j := range jobs {
				var err error
				if j.stream, err = e.Submit(context.Background(), j.req); err != nil {
					t.Fatal(err)
				}
			}
			handOver()
			preempted := make([]int, len(jobs))
			for i, j := range jobs {
				got := collect(j.stream)
				if got.result.Err != nil || len(got.ids) != j.req.MaxTokens {
					t.Fatalf("request %d: err %v, %d tokens of %d", i, got.result.Err, len(got.ids), j.req.MaxTokens)
				}
				preempted[i] = got.result.Preempted
			}
			t.Logf("preemptions: light %d, heavy %v", preempted[0], preempted[1:])
			if heavy := preempted[1] + preempted[2] + preempted[3]; heavy == 0 && !tc.wantLightPreempts {
				t.Fatal("no preemption: the pool is too big for the test")
			}
			if got := preempted[0] > 0; got != tc.wantLightPreempts {
				t.Errorf("light request preempted %d times; want preemptions: %v", preempted[0], tc.wantLightPreempts)
			}
			if st := e.Allocator().Stats(); st.CellsUsed != 0 {
				t.Errorf("%d cells still used after the run", st.CellsUsed)
			}
		})
	}
}

// TestEngineStreamsLayout runs the worker on a context with a KV stream per
// sequence: 8 concurrent greedy streams must each equal their solo run on
// a unified pool, in one batched decode per step, and a request that
// cannot fit one stream is refused at once with NEVER_FITS although the
// pool as a whole has room for it.
func TestEngineStreamsLayout(t *testing.T) {
	m := stories(t)
	unified := newEngine(t, llama.ContextParams{Cells: 2048, Batch: 512, MaxSequences: 8}, native.EngineConfig{})
	var gate stepGate
	streams := newEngine(t, llama.ContextParams{Cells: 2048, Batch: 512, MaxSequences: 8, Streams: true},
		native.EngineConfig{OnStep: gate.onStep})
	if streams.Cells() != 2048 || streams.SequenceCells() != 256 || unified.SequenceCells() != 2048 {
		t.Fatalf("cells %d, sequence cells %d (unified %d): want 2048, 256 (2048)",
			streams.Cells(), streams.SequenceCells(), unified.SequenceCells())
	}
	prompts := []string{"Once upon a time", "The cat", "Lily wanted", "One day, a big", "Tom and Sue", "The sun was", "A little bird", "Mom said"}
	const n = 64
	solo := make([][]int32, len(prompts))
	toks := make([][]int32, len(prompts))
	for i, p := range prompts {
		toks[i], _ = m.Tokenize(p, true, false)
		s, err := unified.Submit(context.Background(), native.Request{Prompt: toks[i], MaxTokens: n, IgnoreEOS: true})
		if err != nil {
			t.Fatal(err)
		}
		solo[i] = collect(s).ids
	}
	got, steps := runTogether(t, streams, &gate, toks, n)
	if steps > n+1 {
		t.Errorf("%d steps for 8 concurrent streams of %d tokens: not batched", steps, n)
	}
	for i := range prompts {
		if err := got[i].result.Err; err != nil {
			t.Errorf("stream %d: %v", i, err)
		}
		if !slices.Equal(got[i].ids, solo[i]) {
			t.Errorf("stream %d differs from its solo run on a unified pool:\n got %v\nwant %v", i, got[i].ids, solo[i])
		}
	}
	checkReleased(t, streams)

	_, err := streams.Submit(context.Background(), native.Request{Prompt: toks[0], MaxTokens: 257 - len(toks[0]), IgnoreEOS: true})
	if !errors.Is(err, allocator.ErrNeverFits) {
		t.Fatalf("a request one cell over a stream: %v, want NEVER_FITS", err)
	}
	s, err := streams.Submit(context.Background(), native.Request{Prompt: toks[0], MaxTokens: 256 - len(toks[0]), IgnoreEOS: true})
	if err != nil {
		t.Fatalf("a request that fills a stream exactly: %v", err)
	}
	if c := collect(s); c.result.Err != nil || len(c.ids) != 256-len(toks[0]) {
		t.Fatalf("a request that fills a stream: %d tokens, %v", len(c.ids), c.result.Err)
	}
	checkReleased(t, streams)
}

// TestEngineStreamsPrefixCache runs the prefix cache on a context with a KV
// stream per sequence, where llama.cpp cannot share cells between streams
// and a shared prefix is a copy of a whole stream cut back to the prefix:
// requests that share a cached prefix must get it (CachedTokens) and
// generate exactly what they generate on a unified pool whose prefix cache
// shares the same cells without copying them.
//
// The reference shares its prefixes too, so that both engines compute the
// same tokens in the same batches: a token computed alone after a cached
// prefix and the same token computed inside a whole-prompt batch go through
// different matrix kernels, whose last bits differ, and on some CPUs
// (AVX2 without AVX-512, here) that flips a near-tie of greedy decoding on
// this model. The copy between streams must be exact; the kernels are not
// kvgate's to make agree.
func TestEngineStreamsPrefixCache(t *testing.T) {
	m := stories(t)
	base := "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her"
	prompts := []string{base + " dog.", base + " friends, and", base + " dog.", base + " mom"}
	ref := newEngine(t, llama.ContextParams{Cells: 2048, Batch: 256, MaxSequences: 8},
		native.EngineConfig{Admission: allocator.Config{MaxSequences: 8, MaxRunning: 4, PrefixCache: true, MaxQueue: 8}})
	streams := newEngine(t, llama.ContextParams{Cells: 2048, Batch: 256, MaxSequences: 8, Streams: true},
		native.EngineConfig{Admission: allocator.Config{MaxSequences: 8, MaxRunning: 4, PrefixCache: true, MaxQueue: 8}})
	const n = 48
	baseToks, _ := m.Tokenize(base, true, false)
	for i, p := range prompts {
		toks, _ := m.Tokenize(p, true, false)
		s, err := ref.Submit(context.Background(), native.Request{Prompt: toks, MaxTokens: n, IgnoreEOS: true})
		if err != nil {
			t.Fatal(err)
		}
		refRun := collect(s)
		want := refRun.ids
		s, err = streams.Submit(context.Background(), native.Request{Prompt: toks, MaxTokens: n, IgnoreEOS: true})
		if err != nil {
			t.Fatal(err)
		}
		got := collect(s)
		if got.result.Err != nil {
			t.Fatalf("request %d: %v", i, got.result.Err)
		}
		cached := got.result.CachedTokens
		t.Logf("request %d: %d of %d prompt tokens cached", i, cached, len(toks))
		switch {
		case i == 0 && cached != 0:
			t.Errorf("request 0: %d tokens cached from an empty cache", cached)
		case i == 2 && cached < len(toks)-1:
			t.Errorf("request 2 repeats request 0: %d of %d tokens cached", cached, len(toks))
		case i > 0 && cached < len(baseToks)-1:
			t.Errorf("request %d: %d tokens cached, want the %d-token shared prefix", i, cached, len(baseToks)-1)
		}
		if refRun.result.CachedTokens != cached {
			t.Errorf("request %d: %d tokens cached in streams, %d in the unified pool", i, cached, refRun.result.CachedTokens)
		}
		if !slices.Equal(got.ids, want) {
			t.Errorf("request %d (%d cached) differs from its run on a unified pool:\n got %v\nwant %v", i, cached, got.ids, want)
		}
	}
}

// runTogether submits one greedy request of n tokens per prompt while gate
// holds the worker, so that all of them run from the same step on, and
// returns what each stream delivered and the decode steps they took.
func runTogether(t *testing.T, e *native.Engine, gate *stepGate, toks [][]int32, n int) ([]collected, uint64) {
	t.Helper()
	before := e.Stats().Steps
	var wg sync.WaitGroup
	got := make([]collected, len(toks))
	handOver := gate.arm()
	defer handOver() // a failed Submit must not leave the worker held
	for i := range toks {
		s, err := e.Submit(context.Background(), native.Request{Prompt: toks[i], MaxTokens: n, IgnoreEOS: true})
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() { got[i] = collect(s) })
	}
	handOver()
	wg.Wait()
	return got, e.Stats().Steps - before
}
