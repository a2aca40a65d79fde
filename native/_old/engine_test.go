package native

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// testLedger is a minimal Ledger that checks the engine's accounting.
type testLedger struct {
	reserved int
	charged  atomic.Int64
	released atomic.Int32
}

func (l *testLedger) Commit(tokens []int32) error {
	if c := l.charged.Add(int64(len(tokens))); c > int64(l.reserved) {
		return errors.New("over charge")
	}
	return nil
}

func (l *testLedger) Finish() bool { l.released.Add(1); return false }

// hookLedger is a testLedger that calls hook once, on the worker, from the
// Commit that brings its charge to at tokens (prompt included). The worker
// makes no progress until hook returns, so a test can act at an exact point
// of a sequence's generation instead of racing the worker.
type hookLedger struct {
	testLedger
	at   int64
	hook func()
	once sync.Once
}

func (l *hookLedger) Commit(tokens []int32) error {
	err := l.testLedger.Commit(tokens)
	if l.charged.Load() >= l.at {
		l.once.Do(l.hook)
	}
	return err
}

func newEngine(t *testing.T, cfg EngineConfig) *Engine {
	t.Helper()
	cfg.Threads = 1 // the test machines are small and shared
	e, err := NewEngine(stories(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

type collected struct {
	text   string
	ids    []int32
	steps  []uint64
	result Result
}

func collect(s *Stream) collected {
	var c collected
	for ev := range s.Events() {
		c.text += ev.Text
		c.ids = append(c.ids, ev.Tokens...)
		c.steps = append(c.steps, ev.Step)
	}
	c.result = s.Result()
	return c
}

func TestEngineMatchesReference(t *testing.T) {
	m := stories(t)
	e := newEngine(t, EngineConfig{Cells: 512, Batch: 64, MaxSequences: 4})
	prompt, _ := m.Tokenize("Once upon a time", true, false)
	want, err := GreedyReference(context.Background(), m, prompt, 32)
	if err != nil {
		t.Fatal(err)
	}
	l := &testLedger{reserved: len(prompt) + 32}
	s, err := e.Start(Request{Ctx: context.Background(), SeqID: 0, Prompt: prompt, MaxTokens: 32, Ledger: l})
	if err != nil {
		t.Fatal(err)
	}
	got := collect(s)
	if !equal(got.ids, want) {
		t.Fatalf("engine ids %v\nreference ids %v", got.ids, want)
	}
	wantText, _ := m.Detokenize(want, DetokenizeOptions{})
	if got.text != wantText {
		t.Fatalf("engine text %q, reference %q", got.text, wantText)
	}
	if l.released.Load() != 1 {
		t.Fatalf("ledger released %d times", l.released.Load())
	}
	if got.result.Err != nil {
		t.Fatal(got.result.Err)
	}
}

// TestEngineBatches runs 8 greedy streams at once: the steps must stay near
// one stream's token count, and each stream must equal its solo run. The
// first stream's ledger holds the worker in its first step until the test
// has handed over the other seven, so all eight run from the next step on
// whatever the scheduling: n + 1 steps in all, where one at a time would
// take 8 x n.
func TestEngineBatches(t *testing.T) {
	m := stories(t)
	e := newEngine(t, EngineConfig{Cells: 2048, Batch: 512, MaxSequences: 8})
	prompts := []string{"Once upon a time", "The cat", "Lily wanted", "One day, a big", "Tom and Sue", "The sun was", "A little bird", "Mom said"}
	const n = 64
	solo := make([][]int32, len(prompts))
	toks := make([][]int32, len(prompts))
	for i, p := range prompts {
		toks[i], _ = m.Tokenize(p, true, false)
		l := &testLedger{reserved: len(toks[i]) + n}
		s, err := e.Start(Request{Ctx: context.Background(), SeqID: i, Prompt: toks[i], MaxTokens: n, IgnoreEOS: true, Ledger: l})
		if err != nil {
			t.Fatal(err)
		}
		solo[i] = collect(s).ids
	}
	before := e.Stats().Steps
	var wg sync.WaitGroup
	got := make([]collected, len(prompts))
	handedOver := make(chan struct{})
	handOver := sync.OnceFunc(func() { close(handedOver) })
	defer handOver() // a failed Start must not leave the worker held
	for i := range prompts {
		var l Ledger = &testLedger{reserved: len(toks[i]) + n}
		if i == 0 {
			l = &hookLedger{testLedger: testLedger{reserved: len(toks[i]) + n}, at: 1, hook: func() { <-handedOver }}
		}
		s, err := e.Start(Request{Ctx: context.Background(), SeqID: i, Prompt: toks[i], MaxTokens: n, IgnoreEOS: true, Ledger: l})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() { defer wg.Done(); got[i] = collect(s) }()
	}
	handOver()
	wg.Wait()
	steps := e.Stats().Steps - before
	for i := range prompts {
		if !equal(got[i].ids, solo[i]) {
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
// with context.Canceled at the next step, with its ledger released. The
// cancel is made at a known token, so the bound on what ran after it is a
// count, not a race between the test goroutine and the worker.
func TestEngineCancelFreesSequence(t *testing.T) {
	m := stories(t)
	e := newEngine(t, EngineConfig{Cells: 1024, Batch: 64, MaxSequences: 2, StreamBuffer: 4096})
	prompt, _ := m.Tokenize("Once upon a time", true, false)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const at = 10
	var hookErr error
	l := &hookLedger{testLedger: testLedger{reserved: len(prompt) + 900}, at: int64(len(prompt) + at)}
	l.hook = func() {
		// This Commit carries the 10th token back into the cache; the
		// step goes on to sample the 11th. Cancel, and wait (on the
		// worker) for the context's AfterFunc to mark the sequence, so
		// that the next step's reap sees it.
		cancel()
		for _, s := range e.active {
			if s.req.Ledger == Ledger(l) {
				deadline := time.Now().Add(time.Minute) // only bounds a hang
				for !s.cancelled.Load() && time.Now().Before(deadline) {
					time.Sleep(time.Millisecond)
				}
				if !s.cancelled.Load() {
					hookErr = errors.New("the cancel did not reach the sequence within a minute")
				}
				return
			}
		}
		hookErr = errors.New("the sequence is not among the active ones")
	}
	s, err := e.Start(Request{Ctx: ctx, SeqID: 0, Prompt: prompt, MaxTokens: 900, IgnoreEOS: true, Ledger: l})
	if err != nil {
		t.Fatal(err)
	}
	got := collect(s)
	if hookErr != nil {
		t.Fatal(hookErr)
	}
	if !errors.Is(got.result.Err, context.Canceled) {
		t.Fatalf("result err = %v, want context.Canceled", got.result.Err)
	}
	if l.released.Load() != 1 {
		t.Fatal("ledger not released")
	}
	if len(got.ids) != at+1 {
		t.Fatalf("%d tokens streamed for a cancel at token %d: want %d, the cancel must end the sequence at the next step", len(got.ids), at, at+1)
	}
}

func TestEngineSlowConsumer(t *testing.T) {
	m := stories(t)
	e := newEngine(t, EngineConfig{Cells: 1024, Batch: 64, MaxSequences: 2, StreamBuffer: 8})
	prompt, _ := m.Tokenize("Once upon a time", true, false)
	l := &testLedger{reserved: len(prompt) + 200}
	s, err := e.Start(Request{Ctx: context.Background(), SeqID: 0, Prompt: prompt, MaxTokens: 200, IgnoreEOS: true, Ledger: l})
	if err != nil {
		t.Fatal(err)
	}
	// Nothing reads the stream, so the worker's 9th event overflows it;
	// the deadline only bounds a hang.
	deadline := time.Now().Add(2 * time.Minute)
	for !s.Failed() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	got := collect(s)
	if !errors.Is(got.result.Err, ErrSlowConsumer) {
		t.Fatalf("err = %v, want ErrSlowConsumer", got.result.Err)
	}
	if len(got.steps) > 8 {
		t.Fatalf("%d events buffered, bound is 8", len(got.steps))
	}
	if e.Stats().SlowConsumers != 1 || l.released.Load() != 1 {
		t.Fatalf("stats %+v, released %d", e.Stats(), l.released.Load())
	}
}

func TestEngineStopString(t *testing.T) {
	m := stories(t)
	e := newEngine(t, EngineConfig{Cells: 512, Batch: 64, MaxSequences: 1})
	prompt, _ := m.Tokenize("Once upon a time", true, false)
	ref, _ := GreedyReference(context.Background(), m, prompt, 32)
	full, _ := m.Detokenize(ref, DetokenizeOptions{})
	// The reference text is ", there was a little girl named Lily. ..."; stop at "girl".
	s, err := e.Start(Request{Ctx: context.Background(), SeqID: 0, Prompt: prompt, MaxTokens: 32, Stop: []string{"zzz", "girl"}, Ledger: &testLedger{reserved: 64}})
	if err != nil {
		t.Fatal(err)
	}
	got := collect(s)
	i := indexOf(full, "girl")
	if i < 0 {
		t.Fatalf("stories260K's greedy text %q has no 'girl' to stop at (the model is pinned by sha256, so its text should not change)", full)
	}
	if got.result.Reason != FinishStop || got.result.StopString != "girl" || got.text != full[:i] {
		t.Fatalf("got %q reason %v stop %q; want %q", got.text, got.result.Reason, got.result.StopString, full[:i])
	}
}

func indexOf(s, sub string) int {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return i
		}
	}
	return -1
}

// TestEnginePrefillDoesNotStall prefills a 1500-token prompt while three
// streams decode: the prompt is chunked across steps, and the running
// streams get a token at every step meanwhile (gaps measured in steps).
// The long prompt is handed over from inside the worker, at the first
// stream's 30th token, so the streams have 770 tokens left for the few
// prefill steps whatever the scheduling.
func TestEnginePrefillDoesNotStall(t *testing.T) {
	m := stories(t)
	e := newEngine(t, EngineConfig{Cells: 4096, Batch: 512, MaxSequences: 4, StreamBuffer: 4096})
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
		s      *Stream
		err    error
	}
	handed := make(chan handover, 1)
	runs := make([]*run, 3)
	for i := range runs {
		prompt, _ := m.Tokenize([]string{"Once upon a time", "The dog", "Sue had a"}[i], true, false)
		// Far longer than the prefill below; cancelled once it is done.
		var l Ledger = &testLedger{reserved: len(prompt) + 800}
		if i == 0 {
			l = &hookLedger{testLedger: testLedger{reserved: len(prompt) + 800}, at: int64(len(prompt) + 30), hook: func() {
				before := e.Stats().Steps // this step's number: the long prompt joins the next
				s, err := e.Start(Request{Ctx: context.Background(), SeqID: 3, Prompt: long, MaxTokens: 4, Ledger: &testLedger{reserved: 1504}})
				handed <- handover{before, s, err}
			}}
		}
		s, err := e.Start(Request{Ctx: bg, SeqID: i, Prompt: prompt, MaxTokens: 800, IgnoreEOS: true, Ledger: l})
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

// growLedger is a GrowLedger whose Grow fails once at a chosen token, so
// that the engine preempts the sequence and resumes it at once.
type growLedger struct {
	testLedger
	failAt   int64 // Grow fails when this many tokens were charged
	failed   bool
	requeued int
}

func (l *growLedger) Grow(n int) (bool, error) {
	if !l.failed && l.charged.Load() >= l.failAt {
		l.failed = true
		return false, nil
	}
	return true, nil
}

func (l *growLedger) Requeue(tokens []int32) (bool, <-chan struct{}, error) {
	l.requeued++
	l.charged.Store(0)
	ch := make(chan struct{})
	close(ch)
	return false, ch, nil
}

func (l *growLedger) SeqID() int { return 0 }

// Load reports one tenant, within its share.
func (l *growLedger) Load() float64 { return 0 }

// TestEnginePreemptResume preempts a greedy sequence in the middle of its
// generation and checks that, recomputed, it continues exactly as the
// reference decode does.
func TestEnginePreemptResume(t *testing.T) {
	m := stories(t)
	e := newEngine(t, EngineConfig{Cells: 1024, Batch: 512, MaxSequences: 2, KVType: "f32"})
	prompt, _ := m.Tokenize("Once upon a time", true, false)
	want, err := GreedyReference(context.Background(), m, prompt, 120)
	if err != nil {
		t.Fatal(err)
	}
	for _, at := range []int64{3, 40, 90} {
		l := &growLedger{testLedger: testLedger{reserved: 1 << 20}, failAt: int64(len(prompt)) + at}
		s, err := e.Start(Request{Ctx: context.Background(), SeqID: 0, Prompt: prompt, MaxTokens: len(want), Ledger: l})
		if err != nil {
			t.Fatal(err)
		}
		got := collect(s)
		if l.requeued != 1 || got.result.Preempted != 1 {
			t.Fatalf("preempted %d times", l.requeued)
		}
		if !equal(got.ids, want) {
			j := 0
			for j < len(got.ids) && j < len(want) && got.ids[j] == want[j] {
				j++
			}
			t.Errorf("preempted after %d tokens: output differs from the reference at token %d", at, j)
		}
	}
}
