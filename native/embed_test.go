package native

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kvgate/kvgate/allocator"
)

// fakeEncoder is an EmbedBackend that checks llama.cpp's encode rules
// (encode() asserts n_ubatch >= n_tokens; llama_batch_allocr::init refuses
// sequence ids >= n_seq_max and token ids outside the vocabulary; a BERT
// position table has n_ctx_train rows) and records a violation instead of
// aborting. Its vector of an input depends on the input alone, never on
// what shares the batch.
type fakeEncoder struct {
	batch, seqs, input, dims, vocab int

	mu         sync.Mutex
	calls      [][]int // the input lengths of every Encode
	violations []string
	// gate, when set, blocks every Encode until it can receive.
	gate chan struct{}
	// entered, when set, gets a value (if it has room) as every Encode
	// begins, before the gate.
	entered chan struct{}
	// failAt makes the Encode of that call number (1-based) fail.
	failAt int
}

func (f *fakeEncoder) BatchTokens() int    { return f.batch }
func (f *fakeEncoder) MaxSequences() int   { return f.seqs }
func (f *fakeEncoder) MaxInputTokens() int { return f.input }
func (f *fakeEncoder) Dimensions() int     { return f.dims }
func (f *fakeEncoder) Close()              {}

func (f *fakeEncoder) Encode(inputs [][]int32, out [][]float32) error {
	if f.entered != nil {
		select {
		case f.entered <- struct{}{}:
		default:
		}
	}
	if f.gate != nil {
		<-f.gate
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	lens := make([]int, len(inputs))
	total := 0
	for i, in := range inputs {
		lens[i] = len(in)
		total += len(in)
		if len(in) == 0 || len(in) > f.input {
			f.violations = append(f.violations, fmt.Sprintf("input %d has %d tokens (limit %d)", i, len(in), f.input))
		}
		for _, t := range in {
			if t < 0 || int(t) >= f.vocab {
				f.violations = append(f.violations, fmt.Sprintf("token %d out of range", t))
			}
		}
	}
	if total > f.batch || len(inputs) > f.seqs || len(inputs) == 0 {
		f.violations = append(f.violations, fmt.Sprintf("batch of %d tokens, %d sequences (limits %d, %d)", total, len(inputs), f.batch, f.seqs))
	}
	f.calls = append(f.calls, lens)
	if f.failAt == len(f.calls) {
		return errors.New("fake encode failure")
	}
	for i, in := range inputs {
		fakeVector(in, out[i])
	}
	return nil
}

// fakeVector is the fake encoder's vector of in.
func fakeVector(in []int32, out []float32) {
	sum := 0
	for _, t := range in {
		sum += int(t)
	}
	for d := range out {
		out[d] = float32(sum*(d+1) + len(in))
	}
}

type vocabN int

func (n vocabN) ValidTokens(ids []int32) int {
	for i, id := range ids {
		if id < 0 || int(id) >= int(n) {
			return i
		}
	}
	return -1
}

func newFakeEmbed(t *testing.T, f *fakeEncoder, maxQueue int, tenants func(string) allocator.TenantLimits) *EmbedEngine {
	t.Helper()
	e, err := NewEmbedEngine(EmbedConfig{
		Open: func() (EmbedBackend, error) { return f, nil }, Vocab: vocabN(f.vocab), MaxQueue: maxQueue, Tenants: tenants,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if f.gate != nil {
			close(f.gate)
			f.gate = nil
		}
		e.Close()
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, v := range f.violations {
			t.Errorf("encode rule broken: %s", v)
		}
	})
	return e
}

func tokens(n int, first int32) []int32 {
	out := make([]int32, n)
	for i := range out {
		out[i] = (first + int32(i)) % 100
	}
	return out
}

func checkVectors(t *testing.T, inputs [][]int32, got [][]float32, dims int) {
	t.Helper()
	if len(got) != len(inputs) {
		t.Fatalf("%d vectors for %d inputs", len(got), len(inputs))
	}
	want := make([]float32, dims)
	for i, in := range inputs {
		fakeVector(in, want)
		for d := range want {
			if got[i][d] != want[d] {
				t.Fatalf("vector %d[%d] = %v, want %v", i, d, got[i][d], want[d])
			}
		}
	}
}

// waitQueued waits until the engine has n requests waiting for their first
// encode.
func waitQueued(t *testing.T, e *EmbedEngine, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for e.Stats().Queued != n {
		if time.Now().After(deadline) {
			t.Fatalf("queued = %d, want %d", e.Stats().Queued, n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestEmbedBatchesConcurrentRequests(t *testing.T) {
	f := &fakeEncoder{batch: 64, seqs: 8, input: 32, dims: 4, vocab: 100, gate: make(chan struct{})}
	e := newFakeEmbed(t, f, 16, nil)
	// The first request holds the worker in Encode while six more queue.
	type res struct {
		in  [][]int32
		out EmbedResult
		err error
	}
	results := make(chan res, 7)
	submit := func(in [][]int32) {
		go func() {
			out, err := e.Embed(context.Background(), EmbedRequest{Inputs: in, Tenant: "a"})
			results <- res{in, out, err}
		}()
	}
	submit([][]int32{tokens(5, 1)})
	deadline := time.Now().Add(5 * time.Second)
	for e.Stats().Running != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the first request never started")
		}
		time.Sleep(time.Millisecond)
	}
	for i := range 6 {
		submit([][]int32{tokens(3+i, int32(i*7))})
	}
	waitQueued(t, e, 6)
	for range 2 {
		f.gate <- struct{}{}
	}
	for range 7 {
		r := <-results
		if r.err != nil {
			t.Fatal(r.err)
		}
		checkVectors(t, r.in, r.out.Vectors, f.dims)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.calls) != 2 || len(f.calls[1]) != 6 {
		t.Errorf("encode calls %v: want the six queued requests in one call", f.calls)
	}
	if st := e.Stats(); st.EncodeCalls != 2 || st.Inputs != 7 || st.Requests != 7 {
		t.Errorf("stats %+v", st)
	}
}

func TestEmbedSplitsLongRequests(t *testing.T) {
	tests := []struct {
		name      string
		lens      []int
		wantCalls int
	}{
		{"one input", []int{10}, 1},
		{"fits one batch", []int{10, 10, 12}, 1},
		{"tokens over the batch", []int{30, 30, 30}, 3},
		{"sequences over the batch", []int{1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, 3},
		{"mixed, in order", []int{32, 1, 31, 2, 16, 16}, 4},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeEncoder{batch: 32, seqs: 4, input: 32, dims: 3, vocab: 100}
			e := newFakeEmbed(t, f, 4, nil)
			var in [][]int32
			for i, n := range tc.lens {
				in = append(in, tokens(n, int32(i)))
			}
			out, err := e.Embed(context.Background(), EmbedRequest{Inputs: in})
			if err != nil {
				t.Fatal(err)
			}
			checkVectors(t, in, out.Vectors, f.dims)
			if got := e.Stats().EncodeCalls; int(got) != tc.wantCalls {
				t.Errorf("%d encode calls, want %d", got, tc.wantCalls)
			}
		})
	}
}

func TestEmbedRefusesBadInputs(t *testing.T) {
	f := &fakeEncoder{batch: 32, seqs: 4, input: 16, dims: 2, vocab: 100}
	e := newFakeEmbed(t, f, 4, nil)
	tests := []struct {
		name  string
		in    [][]int32
		index int // -1: no input named
	}{
		{"no inputs", nil, -1},
		{"empty input", [][]int32{{1}, {}}, 1},
		{"too long", [][]int32{tokens(17, 0)}, 0},
		{"ten thousand tokens", [][]int32{{1}, {2}, tokens(10000, 0)}, 2},
		{"negative token", [][]int32{{1, -1}}, 0},
		{"token past the vocabulary", [][]int32{{3}, {100}}, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.Embed(context.Background(), EmbedRequest{Inputs: tc.in})
			if !errors.Is(err, ErrBadRequest) {
				t.Fatalf("err = %v, want ErrBadRequest", err)
			}
			var ie *EmbedInputError
			if errors.As(err, &ie) != (tc.index >= 0) || (ie != nil && ie.Index != tc.index) {
				t.Errorf("err = %v, want input %d named", err, tc.index)
			}
		})
	}
	if n := e.Stats().EncodeCalls; n != 0 {
		t.Errorf("%d encode calls for refused inputs", n)
	}
}

func asEmbedReject(t *testing.T, err error, reason string) *allocator.RejectError {
	t.Helper()
	var rej *allocator.RejectError
	if !errors.As(err, &rej) || rej.Reason != reason {
		t.Fatalf("err = %v, want a %s refusal", err, reason)
	}
	return rej
}

func TestEmbedRefusals(t *testing.T) {
	f := &fakeEncoder{batch: 32, seqs: 4, input: 16, dims: 2, vocab: 100, gate: make(chan struct{})}
	e := newFakeEmbed(t, f, 2, func(name string) allocator.TenantLimits {
		return allocator.TenantLimits{Weight: 1, MaxQueued: map[string]int{"small": 1}[name]}
	})
	in := [][]int32{{1, 2, 3}}
	first := make(chan error, 1)
	go func() {
		_, err := e.Embed(context.Background(), EmbedRequest{Inputs: in, Tenant: "small"})
		first <- err
	}()
	deadline := time.Now().Add(5 * time.Second)
	for e.Stats().Running != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the first request never started")
		}
		time.Sleep(time.Millisecond)
	}
	// The tenant's own bound.
	_, err := e.Embed(context.Background(), EmbedRequest{Inputs: in, Tenant: "small"})
	if rej := asEmbedReject(t, err, allocator.ReasonQueueFull); rej.RetryAfter <= 0 {
		t.Errorf("QUEUE_FULL without a RetryAfter: %v", rej)
	}
	// Queue timeout, cancellation and deadline while queued.
	_, err = e.Embed(context.Background(), EmbedRequest{Inputs: in, QueueTimeout: 20 * time.Millisecond})
	asEmbedReject(t, err, allocator.ReasonQueueTimeout)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(20*time.Millisecond, cancel)
	_, err = e.Embed(ctx, EmbedRequest{Inputs: in})
	asEmbedReject(t, err, allocator.ReasonCancelled)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("a cancellation does not wrap context.Canceled: %v", err)
	}
	dctx, dcancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer dcancel()
	_, err = e.Embed(dctx, EmbedRequest{Inputs: in})
	asEmbedReject(t, err, allocator.ReasonDeadlineExceeded)
	// The whole queue: one more request fills it, the next is refused.
	second := make(chan error, 1)
	go func() {
		_, err := e.Embed(context.Background(), EmbedRequest{Inputs: in})
		second <- err
	}()
	waitQueued(t, e, 1)
	_, err = e.Embed(context.Background(), EmbedRequest{Inputs: in})
	asEmbedReject(t, err, allocator.ReasonQueueFull)
	// Draining refuses new work and lets the queued work finish.
	e.Drain()
	_, err = e.Embed(context.Background(), EmbedRequest{Inputs: in})
	asEmbedReject(t, err, allocator.ReasonDraining)
	f.gate <- struct{}{}
	f.gate <- struct{}{}
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if err := <-second; err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.Idle():
	case <-time.After(5 * time.Second):
		t.Fatal("not idle after the drain")
	}
	st := e.Stats()
	want := map[string]uint64{"QUEUE_FULL": 2, "QUEUE_TIMEOUT": 1, "CANCELLED": 1, "DEADLINE_EXCEEDED": 1, "DRAINING": 1}
	for k, v := range want {
		if st.Rejected[k] != v {
			t.Errorf("rejected[%s] = %d, want %d", k, st.Rejected[k], v)
		}
	}
	if st.Queued != 0 || st.Running != 0 {
		t.Errorf("after the drain: %+v", st)
	}
}

func TestEmbedCloseEndsQueued(t *testing.T) {
	f := &fakeEncoder{batch: 32, seqs: 1, input: 16, dims: 2, vocab: 100, gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	e, err := NewEmbedEngine(EmbedConfig{Open: func() (EmbedBackend, error) { return f, nil }, Vocab: vocabN(100), MaxQueue: 4})
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 2)
	for range 2 {
		go func() {
			_, err := e.Embed(context.Background(), EmbedRequest{Inputs: [][]int32{{1}, {2}}})
			errs <- err
		}()
	}
	deadline := time.Now().Add(5 * time.Second)
	for st := e.Stats(); st.Queued+st.Running != 2; st = e.Stats() {
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v", st)
		}
		time.Sleep(time.Millisecond)
	}
	// One call is inside Encode, held at the gate, and the other queued:
	// a call the worker has taken but not yet encoded would count as
	// running too, and would never reach the gate once Close has begun.
	<-f.entered
	closed := make(chan struct{})
	go func() { e.Close(); close(closed) }()
	<-e.quit
	f.gate <- struct{}{} // the call in flight ends; the worker then stops
	<-closed
	for range 2 {
		if err := <-errs; !errors.Is(err, ErrEngineClosed) {
			t.Errorf("err = %v, want ErrEngineClosed", err)
		}
	}
	if _, err := e.Embed(context.Background(), EmbedRequest{Inputs: [][]int32{{1}}}); !errors.Is(err, ErrEngineClosed) {
		t.Errorf("after Close: %v", err)
	}
}

func TestEmbedEncodeFailure(t *testing.T) {
	f := &fakeEncoder{batch: 4, seqs: 4, input: 4, dims: 2, vocab: 100, failAt: 1}
	e := newFakeEmbed(t, f, 4, nil)
	_, err := e.Embed(context.Background(), EmbedRequest{Inputs: [][]int32{{1, 2, 3}, {4, 5, 6}}})
	if err == nil || err.Error() != "fake encode failure" {
		t.Fatalf("err = %v", err)
	}
	// The worker keeps serving.
	in := [][]int32{{7, 8}}
	out, err := e.Embed(context.Background(), EmbedRequest{Inputs: in})
	if err != nil {
		t.Fatal(err)
	}
	checkVectors(t, in, out.Vectors, f.dims)
}

func TestEmbedOpenFails(t *testing.T) {
	tests := []struct {
		name string
		open func() (EmbedBackend, error)
	}{
		{"error", func() (EmbedBackend, error) { return nil, errors.New("no model") }},
		{"limits", func() (EmbedBackend, error) { return &fakeEncoder{batch: 8, seqs: 1, input: 9, dims: 1}, nil }},
		{"no dimensions", func() (EmbedBackend, error) { return &fakeEncoder{batch: 8, seqs: 1, input: 8}, nil }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewEmbedEngine(EmbedConfig{Open: tc.open, Vocab: vocabN(1), MaxQueue: 1}); err == nil {
				t.Fatal("no error")
			}
		})
	}
}

// tunedEncoder is a fakeEncoder with a thread count, whose encodes take,
// on a clock only they move, what cost says.
type tunedEncoder struct {
	*fakeEncoder
	threads   int
	clock     *fakeClock
	cost      func(threads, tokens int) time.Duration
	byThreads map[int]int
}

func (f *tunedEncoder) Threads() int     { return f.threads }
func (f *tunedEncoder) SetThreads(n int) { f.threads = max(n, 1) }
func (f *tunedEncoder) Encode(inputs [][]int32, out [][]float32) error {
	tokens := 0
	for _, in := range inputs {
		tokens += len(in)
	}
	f.clock.advance(f.cost(f.threads, tokens))
	f.byThreads[f.threads]++
	return f.fakeEncoder.Encode(inputs, out)
}

// TestEmbedTunesThreads runs the embedding worker with TuneThreads on an
// encoder whose two threads stall (a busy 2-CPU machine) or help (a quiet
// one): the worker must end at the faster count. Counts, not times, are
// checked.
func TestEmbedTunesThreads(t *testing.T) {
	tests := []struct {
		name string
		cost func(threads, tokens int) time.Duration
		tune bool
		want int64
	}{
		{"busy: two threads stall at their barriers", busyCost, true, 1},
		{"quiet: two threads are faster", quietCost, true, 2},
		{"busy, tuning off", func(threads, tokens int) time.Duration {
			if threads == 2 {
				return 300 * time.Millisecond
			}
			return time.Millisecond
		}, false, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &tunedEncoder{fakeEncoder: &fakeEncoder{batch: 64, seqs: 4, input: 32, dims: 2, vocab: 100},
				threads: 2, clock: &fakeClock{}, cost: tc.cost, byThreads: map[int]int{}}
			e, err := NewEmbedEngine(EmbedConfig{Open: func() (EmbedBackend, error) { return f, nil }, Vocab: vocabN(100),
				MaxQueue: 4, TuneThreads: tc.tune, clock: f.clock.now})
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			for i := range 300 {
				if _, err := e.Embed(context.Background(), EmbedRequest{Inputs: [][]int32{tokens(8+i%16, int32(i))}}); err != nil {
					t.Fatal(err)
				}
			}
			st := e.Stats()
			t.Logf("threads %d after %d changes; encodes by threads %v", st.Threads, st.ThreadChanges, f.byThreads)
			if st.Threads != tc.want {
				t.Errorf("threads %d at the end, want %d", st.Threads, tc.want)
			}
			if !tc.tune && st.ThreadChanges != 0 {
				t.Errorf("%d thread changes with tuning off", st.ThreadChanges)
			}
		})
	}
}
