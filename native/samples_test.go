package native

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"github.com/kvgate/kvgate/allocator"
)

// The tests of requests for n samples of one prompt (Request.N).

// readSamples reads s to its end and returns what each sample delivered,
// by Event.Index, with its Result.
func readSamples(t testing.TB, s *Stream) []delivered {
	t.Helper()
	var by []delivered
	for ev := range s.Events() {
		if ev.Index < 0 || ev.Index >= len(s.results) {
			t.Errorf("event of sample %d in a stream of %d samples", ev.Index, len(s.results))
			continue
		}
		for len(by) <= ev.Index {
			by = append(by, delivered{})
		}
		by[ev.Index].add(ev)
	}
	res := s.Results()
	for len(by) < len(res) {
		by = append(by, delivered{})
	}
	for i := range res {
		by[i].res = res[i]
	}
	if r := s.Result(); len(res) > 0 && !sameResult(r, res[0]) {
		t.Errorf("Result() %+v is not Results()[0] %+v", r, res[0])
	}
	return by
}

// sameResult compares two results field by field.
func sameResult(a, b Result) bool {
	return a.Reason == b.Reason && a.CompletionTokens == b.CompletionTokens && errors.Is(a.Err, b.Err) && errors.Is(b.Err, a.Err) &&
		a.PromptTokens == b.PromptTokens && a.CachedTokens == b.CachedTokens && a.Ended.Equal(b.Ended)
}

// seededRun is the fake's draws for a sampler of seed (with a positive
// temperature) that generates maxTokens tokens after prompt, ignoring
// end-of-generation: each token mixes the fake model's next token with the
// seed and the draw count, as fakeSampler.Sample does.
func seededRun(prompt []int32, maxTokens int, seed uint32) []int32 {
	content := slices.Clone(prompt)
	var toks []int32
	for draw := 1; len(toks) < maxTokens; draw++ {
		t := fakeNext([]int32{fakeNext(content), int32(seed), int32(seed >> 16), int32(draw)})
		toks = append(toks, t)
		content = append(content, t)
	}
	return toks
}

// TestWorkerSamples runs requests for several samples, greedy and seeded,
// and checks every sample against its own reference, that the prompt was
// decoded once and shared by SeqCopy, that the allocator's cells match the
// cache's at every decode (the prompt once, plus every sample's tokens),
// that seeded samples differ and repeat, and that nothing is left at the
// end.
func TestWorkerSamples(t *testing.T) {
	r := rand.New(rand.NewPCG(41, 42))
	cases := []struct {
		name        string
		n           int
		prompt      int
		maxTokens   int
		seed        uint32
		seeded      bool
		policy      allocator.Policy
		prefixCache bool
	}{
		{name: "one sample as N=1", n: 1, prompt: 9, maxTokens: 12},
		{name: "greedy 4", n: 4, prompt: 9, maxTokens: 12},
		{name: "seeded 4", n: 4, prompt: 9, maxTokens: 12, seed: 7, seeded: true},
		{name: "seeded 4 wrapping seed", n: 4, prompt: 5, maxTokens: 10, seed: ^uint32(0) - 1, seeded: true},
		{name: "seeded 3, prompt longer than the batch", n: 3, prompt: 37, maxTokens: 6, seed: 99, seeded: true},
		{name: "seeded 16, optimistic", n: allocator.MaxSamples, prompt: 4, maxTokens: 5, seed: 3, seeded: true, policy: allocator.PolicyOptimistic},
		{name: "greedy 2, prefix cache", n: 2, prompt: 12, maxTokens: 8, prefixCache: true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := prompt(r, c.prompt)
			req := request(p, c.maxTokens)
			req.N = c.n
			if c.seeded {
				req.Sampling = SamplingParams{Temperature: 0.8, Seed: c.seed, HasSeed: true}
			}
			var runs [2][]delivered
			for run := range runs {
				fb := newFakeBackend(256, 16)
				adm := admission(allocator.MaxSamples)
				adm.Policy, adm.PrefixCache = c.policy, c.prefixCache
				e := startEngine(t, fb, EngineConfig{Admission: adm})
				total := len(p) + c.n*c.maxTokens
				var mismatch []string
				decodes := 0
				fb.hook = func(call int, _ *Batch) error {
					// At a decode the allocator has been told of every
					// token the cache holds: its used cells are those
					// cells, and the group's reservation never grows.
					st := e.Allocator().Stats()
					decodes++
					if st.CellsUsed != fb.used || st.CellsUsed+st.CellsReserved > total || call == 1 && st.CellsUsed+st.CellsReserved != total-st.CellsCached {
						mismatch = append(mismatch, fmt.Sprintf("decode %d: allocator %d used + %d reserved, cache %d cells, group total %d",
							call, st.CellsUsed, st.CellsReserved, fb.used, total))
					}
					return nil
				}
				got := readSamples(t, mustSubmit(t, e, context.Background(), req))
				runs[run] = got
				if len(mismatch) > 0 {
					t.Errorf("run %d: %v", run, mismatch)
				}
				if len(got) != c.n {
					t.Fatalf("run %d: %d results, want %d", run, len(got), c.n)
				}
				for i, d := range got {
					name := fmt.Sprintf("run %d sample %d", run, i)
					if c.seeded {
						seed := c.seed + uint32(i)
						if want := seededRun(p, c.maxTokens, seed); !slices.Equal(d.toks, want) || d.res.Err != nil || d.res.CompletionTokens != c.maxTokens {
							t.Errorf("%s: tokens %v (%v, %d), want %v", name, d.toks, d.res.Err, d.res.CompletionTokens, want)
						}
					} else {
						checkStream(t, name, req, d)
					}
					if d.res.PromptTokens != len(p) || d.res.Reason != FinishLength {
						t.Errorf("%s: prompt tokens %d, reason %v", name, d.res.PromptTokens, d.res.Reason)
					}
				}
				if st := e.Stats(); st.PrefillTokens != uint64(len(p)) || st.GeneratedTokens != uint64(c.n*c.maxTokens) {
					t.Errorf("run %d: %d prefill tokens, %d generated; want %d and %d", run, st.PrefillTokens, st.GeneratedTokens, len(p), c.n*c.maxTokens)
				}
				if fb.copies != c.n-1 {
					t.Errorf("run %d: %d SeqCopy calls, want %d", run, fb.copies, c.n-1)
				}
				checkSettled(t, e)
				checkClosedCells(t, e, fb)
				if c.prefixCache {
					// Sample 0's cells stay: its prompt and every token it
					// fed back (all but its last).
					if st := e.Allocator().Stats(); st.CellsCached != len(p)+c.maxTokens-1 {
						t.Errorf("run %d: %d cells cached, want sample 0's %d", run, st.CellsCached, len(p)+c.maxTokens-1)
					}
				}
			}
			for i := range runs[0] {
				if !slices.Equal(runs[0][i].toks, runs[1][i].toks) {
					t.Errorf("sample %d differs between two runs: %v and %v", i, runs[0][i].toks, runs[1][i].toks)
				}
				for j := range i {
					if same := slices.Equal(runs[0][i].toks, runs[0][j].toks); same == c.seeded {
						t.Errorf("samples %d and %d equal: %v; seeded %v", j, i, same, c.seeded)
					}
				}
			}
		})
	}
}

// streamsFake is a fake whose SequenceCells is below its Cells, as with a
// KV stream per sequence: only its refusal of several samples is tested.
type streamsFake struct{ *fakeBackend }

func (f streamsFake) SequenceCells() int { return f.Cells() / 4 }

// TestWorkerSamplesRefused checks that requests for samples that can never
// run are refused at once, queueing nothing, with an error the service maps
// onto INVALID_ARGUMENT: ErrBadRequest (malformed N, a deterministic
// engine, streams) or the allocator's NEVER_FITS.
func TestWorkerSamplesRefused(t *testing.T) {
	cases := []struct {
		name      string
		backend   func(fb *fakeBackend) Backend
		det       bool
		running   int
		n         int
		maxTokens int
		bad       bool // ErrBadRequest; otherwise NEVER_FITS with Limit
		limit     int
	}{
		{name: "negative", n: -1, maxTokens: 4, bad: true},
		{name: "over MaxSamples", n: allocator.MaxSamples + 1, maxTokens: 4, bad: true},
		{name: "over MaxRunning", running: 3, n: 4, maxTokens: 4, bad: true},
		{name: "deterministic", det: true, n: 2, maxTokens: 4, bad: true},
		{name: "streams", backend: func(fb *fakeBackend) Backend { return streamsFake{fb} }, n: 2, maxTokens: 4, bad: true},
		{name: "group over the pool", n: 8, maxTokens: 16, limit: 128},
		{name: "one sample over the pool", n: 2, maxTokens: 127, limit: 128},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			fb := newFakeBackend(128, 16)
			adm := admission(allocator.MaxSamples)
			adm.MaxRunning = c.running
			cfg := EngineConfig{Admission: adm, Deterministic: c.det}
			var e *Engine
			if c.backend != nil {
				cfg.Open, cfg.Vocab = func() (Backend, error) { return c.backend(fb), nil }, fakeVocab{}
				var err error
				if e, err = NewEngine(cfg); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { e.Close(); fb.check(t) })
			} else {
				e = startEngine(t, fb, cfg)
			}
			if c.det {
				c.limit-- // the padding token's cell
			}
			req := request([]int32{1, 2, 3, 4, 5, 6, 7, 8}, c.maxTokens)
			req.N = c.n
			s, err := e.Submit(context.Background(), req)
			if s != nil {
				t.Fatalf("admitted a stream, err %v", err)
			}
			var re *allocator.RejectError
			switch {
			case c.bad && !errors.Is(err, ErrBadRequest):
				t.Errorf("err %v, want ErrBadRequest", err)
			case !c.bad && (!errors.As(err, &re) || re.Reason != allocator.ReasonNeverFits || re.Limit != c.limit || re.CellsNeeded <= c.limit):
				t.Errorf("err %v, want NEVER_FITS with limit %d", err, c.limit)
			}
			if st := e.Allocator().Stats(); st.Queued != 0 || st.Admitted != 0 || st.Running != 0 {
				t.Errorf("allocator: %d queued, %d admitted, %d running", st.Queued, st.Admitted, st.Running)
			}
		})
	}
}

// TestWorkerSamplesEnd ends groups early every way a group ends — its
// context cancelled mid-stream, a slow reader of its channel, the engine
// closing, and pressure from single requests that preempt each other under
// optimistic admission — and checks that every sample ends, only the
// failing one ends on a sampling failure, and every cell comes back.
func TestWorkerSamplesEnd(t *testing.T) {
	cases := []struct {
		name string
		run  func(t *testing.T, r *rand.Rand)
	}{
		{name: "cancel mid-stream", run: func(t *testing.T, r *rand.Rand) {
			fb := newFakeBackend(256, 16)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			const cancelAt = 6
			steps := 0
			onStep := func(int, int) {
				if steps++; steps == cancelAt {
					cancel()
				}
			}
			e := startEngine(t, fb, EngineConfig{Admission: admission(8), OnStep: onStep})
			req := request(prompt(r, 6), 40)
			req.N = 4
			s := mustSubmit(t, e, ctx, req)
			for range s.Events() {
			}
			for i, res := range s.Results() {
				if !errors.Is(res.Err, context.Canceled) || res.CompletionTokens >= req.MaxTokens {
					t.Errorf("sample %d: err %v after %d tokens; want cancelled early", i, res.Err, res.CompletionTokens)
				}
			}
			if !s.Failed() {
				t.Error("a cancelled group does not report Failed")
			}
			checkSettled(t, e)
			checkClosedCells(t, e, fb)
		}},
		{name: "slow consumer", run: func(t *testing.T, r *rand.Rand) {
			fb := newFakeBackend(256, 16)
			e := startEngine(t, fb, EngineConfig{Admission: admission(8), StreamBuffer: 3})
			req := request(prompt(r, 6), 30)
			req.N = 3
			s := mustSubmit(t, e, context.Background(), req)
			<-e.Allocator().Idle()
			got := readSamples(t, s)
			for i, d := range got {
				if !errors.Is(d.res.Err, ErrSlowConsumer) {
					t.Errorf("sample %d: err %v, want ErrSlowConsumer", i, d.res.Err)
				}
				checkStream(t, fmt.Sprint("sample ", i), req, d)
			}
			checkSettled(t, e)
			checkClosedCells(t, e, fb)
		}},
		{name: "engine close", run: func(t *testing.T, r *rand.Rand) {
			fb := newFakeBackend(256, 16)
			started, release := holdFirstDecode(fb)
			defer release()
			e := startEngine(t, fb, EngineConfig{Admission: admission(8)})
			req := request(prompt(r, 6), 30)
			req.N = 4
			s := mustSubmit(t, e, context.Background(), req)
			<-started
			closed := make(chan struct{})
			go func() { defer close(closed); e.Close() }()
			// The worker sees the close at its next step: release the
			// held decode only once Close has begun, or the samples
			// could all finish first.
			spinUntil(e.closed.Load)
			release()
			<-closed
			for i, d := range readSamples(t, s) {
				if !errors.Is(d.res.Err, ErrEngineClosed) {
					t.Errorf("sample %d: err %v, want ErrEngineClosed", i, d.res.Err)
				}
			}
			if st := e.Allocator().Stats(); st.Running != 0 || st.CellsUsed != 0 || st.CellsReserved != 0 {
				t.Errorf("after Close: %d running, %d used, %d reserved", st.Running, st.CellsUsed, st.CellsReserved)
			}
		}},
		{name: "one sample fails", run: func(t *testing.T, r *rand.Rand) {
			fb := newFakeBackend(256, 16)
			e := startEngine(t, fb, EngineConfig{Admission: admission(8)})
			req := request(prompt(r, 6), 10)
			req.N = 3
			fails := &failingSampler{at: 4}
			fb.wrap = func(s Sampler, i int) Sampler {
				if i == 1 { // the second sampler made: sample 1's
					fails.Sampler = s
					return fails
				}
				return s
			}
			got := readSamples(t, mustSubmit(t, e, context.Background(), req))
			for i, d := range got {
				wantErr := i == 1
				if (d.res.Err != nil) != wantErr || wantErr && (!errors.Is(d.res.Err, ErrNoValidToken) || d.res.CompletionTokens != 3) {
					t.Errorf("sample %d: err %v after %d tokens", i, d.res.Err, d.res.CompletionTokens)
				}
				checkStream(t, fmt.Sprint("sample ", i), req, d)
			}
			checkSettled(t, e)
			checkClosedCells(t, e, fb)
		}},
		{name: "preemption pressure", run: func(t *testing.T, r *rand.Rand) {
			fb := newFakeBackend(96, 16)
			adm := admission(8)
			adm.Policy = allocator.PolicyOptimistic
			// The first decode is held until every request is admitted
			// or queued, so that they all run together whatever the
			// goroutines' scheduling.
			started, release := holdFirstDecode(fb)
			defer release()
			e := startEngine(t, fb, EngineConfig{Admission: adm})
			var wg sync.WaitGroup
			groups := make([]Request, 3)
			groupOut := make([][]delivered, len(groups))
			for i := range groups {
				groups[i] = request(prompt(r, 4), 6)
				groups[i].N = 2 + i
				wg.Go(func() {
					s, err := e.Submit(context.Background(), groups[i])
					if err != nil {
						t.Errorf("group %d: %v", i, err)
						return
					}
					groupOut[i] = readSamples(t, s)
				})
			}
			singles := make([]Request, 6)
			singleOut := make([]delivered, len(singles))
			for i := range singles {
				singles[i] = request(prompt(r, 8), 40)
				wg.Go(func() { singleOut[i] = submitAndRead(t, e, singles[i]) })
			}
			<-started
			spinUntil(func() bool {
				st := e.Allocator().Stats()
				return int(st.Admitted)+st.Queued >= len(groups)+len(singles)
			})
			release()
			wg.Wait()
			for i, out := range groupOut {
				for j, d := range out {
					checkStream(t, fmt.Sprintf("group %d sample %d", i, j), groups[i], d)
					if d.res.Err != nil || d.res.Preempted != 0 {
						t.Errorf("group %d sample %d: err %v, preempted %d", i, j, d.res.Err, d.res.Preempted)
					}
				}
			}
			for i, d := range singleOut {
				checkStream(t, fmt.Sprint("single ", i), singles[i], d)
			}
			if e.Stats().Preempted == 0 {
				t.Error("no preemption: the test puts no pressure")
			}
			checkSettled(t, e)
			checkClosedCells(t, e, fb)
		}},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) { c.run(t, rand.New(rand.NewPCG(uint64(i), 77))) })
	}
}

// failingSampler fails its at-th draw with ErrNoValidToken.
type failingSampler struct {
	Sampler
	at, draws int
}

func (f *failingSampler) Sample(out int) (int32, error) {
	tok, err := f.Sampler.Sample(out)
	if f.draws++; f.draws == f.at {
		return 0, ErrNoValidToken
	}
	return tok, err
}
