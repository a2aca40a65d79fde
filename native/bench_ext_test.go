//go:build cgo

package native_test

// In-process benchmarks of the decode worker: no gRPC, no service; the
// engine admits every sequence with its own allocator, as in the server.
// Run them with, for example,
//
//	CGO_CFLAGS="-O3 -march=native" CGO_CXXFLAGS="-O3 -march=native" \
//	  go test ./native -run '^$' -bench 'BenchmarkEngine' -benchtime 2x
//
// The model is $KVGATE_BENCH_MODEL when set, else the preset named by
// $KVGATE_BENCH_PRESET (default "15m") written by internal/mkmodel once into
// $KVGATE_CACHE_DIR/bench (default: the user cache directory's kvgate/bench).
// $KVGATE_BENCH_THREADS sets llama.cpp's threads (default: the server's
// default for the CPUs the process may use),
// $KVGATE_BENCH_DETERMINISTIC=1 runs the engine in deterministic mode, and
// $KVGATE_BENCH_LAYOUT=streams gives each sequence a KV stream of its own
// (the default, unified, is one pool), and $KVGATE_BENCH_TUNE=0 turns the
// thread tuner off (it is on, as in the server).

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/kvgate/kvgate/allocator"
	"github.com/kvgate/kvgate/internal/mkmodel"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/native/llama"
)

// The benchmark's shape, matching scripts/bench.sh's server flags
// (--ctx 8192 --max-seqs 32 --batch 512).
const (
	benchCells      = 8192
	benchMaxSeqs    = 32
	benchBatch      = 512
	benchPrompt     = 128
	benchOutput     = 128
	benchPrefillLen = 512
)

var (
	benchModelOnce sync.Once
	benchModelPtr  *llama.Model
	benchModelErr  error
)

// benchModelPath returns the GGUF file the benchmarks run on, writing the
// preset model when it is not cached yet.
func benchModelPath() (string, error) {
	if p := os.Getenv("KVGATE_BENCH_MODEL"); p != "" {
		return p, nil
	}
	preset := os.Getenv("KVGATE_BENCH_PRESET")
	if preset == "" {
		preset = "15m"
	}
	spec, err := mkmodel.Preset(preset)
	if err != nil {
		return "", err
	}
	dir := os.Getenv("KVGATE_CACHE_DIR")
	if dir == "" {
		if dir, err = os.UserCacheDir(); err != nil {
			return "", fmt.Errorf("bench model: %w", err)
		}
		dir = filepath.Join(dir, "kvgate")
	}
	dir = filepath.Join(dir, "bench")
	path := filepath.Join(dir, fmt.Sprintf("%s-%s-seed%d.gguf", spec.Name, spec.Type, spec.Seed))
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("bench model: %w", err)
	}
	if _, err := mkmodel.WriteFile(context.Background(), path, spec); err != nil {
		return "", fmt.Errorf("bench model %s: %w", preset, err)
	}
	return path, nil
}

// benchModel loads the benchmark model once per process.
func benchModel(b *testing.B) *llama.Model {
	b.Helper()
	benchModelOnce.Do(func() {
		llama.Init(llama.LogError)
		path, err := benchModelPath()
		if err != nil {
			benchModelErr = err
			return
		}
		benchModelPtr, benchModelErr = llama.LoadModel(path, llama.LoadOptions{})
	})
	if benchModelErr != nil {
		b.Fatalf("benchmark model: %v", benchModelErr)
	}
	return benchModelPtr
}

// benchThreads returns $KVGATE_BENCH_THREADS, or 0 (the default count) when unset.
func benchThreads(b *testing.B) int {
	v := os.Getenv("KVGATE_BENCH_THREADS")
	if v == "" {
		return 0
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		b.Fatalf("KVGATE_BENCH_THREADS=%q: want a count", v)
	}
	return n
}

// benchStreams reports whether $KVGATE_BENCH_LAYOUT asks for a KV stream
// per sequence.
func benchStreams(b *testing.B) bool {
	switch v := os.Getenv("KVGATE_BENCH_LAYOUT"); v {
	case "", "unified":
		return false
	case "streams":
		return true
	default:
		b.Fatalf("KVGATE_BENCH_LAYOUT=%q: want unified or streams", v)
		return false
	}
}

// stepTimer times decode steps from the worker's OnStep hook: the interval
// between two hooks is one full step (sampling and streaming of the last
// step's tokens, the allocator's Apply, building the batch, llama_decode).
// Steps whose batch holds one token per sequence are pure decode steps.
type stepTimer struct {
	mu           sync.Mutex
	last         time.Time
	decodeSteps  int
	decodeTokens int
	decodeTime   time.Duration
	llamaTime    time.Duration // in Decode, for batches of at most benchMaxSeqs tokens
	llamaSteps   int
}

// onStep is the engine's OnStep hook.
func (t *stepTimer) onStep(tokens, sequences int) {
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.last.IsZero() && tokens == sequences {
		t.decodeSteps++
		t.decodeTokens += tokens
		t.decodeTime += now.Sub(t.last)
	}
	t.last = now
}

// restart forgets the last step, so the idle time before a round is not
// counted as a step.
func (t *stepTimer) restart() {
	t.mu.Lock()
	t.last = time.Time{}
	t.mu.Unlock()
}

// timedBackend times the backend's Decode calls, so that a step's time can
// be split into llama_decode's and the worker's own (sampling, streaming,
// the allocator, building the batch).
type timedBackend struct {
	native.Backend
	t *stepTimer
}

// Decode decodes b and adds its time to the timer's llama_decode time when
// it is a pure decode step (one token per sequence is not known here, so
// every decode of at most benchMaxSeqs tokens counts).
func (tb timedBackend) Decode(b *native.Batch) error {
	start := time.Now()
	err := tb.Backend.Decode(b)
	if b.Len() <= benchMaxSeqs {
		tb.t.mu.Lock()
		tb.t.llamaTime += time.Since(start)
		tb.t.llamaSteps++
		tb.t.mu.Unlock()
	}
	return err
}

// benchEngine returns an engine of the benchmark's shape, admitting under
// reserve admission with no prefix cache, and the model it runs.
func benchEngine(b *testing.B, st *stepTimer) (*native.Engine, *llama.Model) {
	b.Helper()
	m := benchModel(b)
	open := openContext(m, llama.ContextParams{Cells: benchCells, Batch: benchBatch, MaxSequences: benchMaxSeqs,
		Threads: benchThreads(b), Streams: benchStreams(b)})
	var onStep func(tokens, sequences int)
	if st != nil {
		onStep = st.onStep
		inner := open
		open = func() (native.Backend, error) {
			be, err := inner()
			if err != nil {
				return nil, err
			}
			return timedBackend{be, st}, nil
		}
	}
	e, err := native.NewEngine(native.EngineConfig{
		Open:          open,
		Vocab:         m,
		Admission:     allocator.Config{MaxSequences: benchMaxSeqs, MaxQueue: benchMaxSeqs},
		OnStep:        onStep,
		Deterministic: os.Getenv("KVGATE_BENCH_DETERMINISTIC") == "1",
		TuneThreads:   os.Getenv("KVGATE_BENCH_TUNE") != "0",
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(e.Close)
	return e, m
}

// randomPrompt returns n random ordinary token ids.
func randomPrompt(r *rand.Rand, vocab, n int) []int32 {
	p := make([]int32, n)
	for i := range p {
		p[i] = int32(3 + r.IntN(vocab-3))
	}
	return p
}

// runRound starts one sequence per prompt at once, each generating output
// tokens with EOS ignored, and drains every stream. It returns the tokens
// generated.
func runRound(b *testing.B, e *native.Engine, prompts [][]int32, output int) int {
	reqs := make([]native.Request, len(prompts))
	for i, p := range prompts {
		reqs[i] = native.Request{Prompt: p, MaxTokens: output, IgnoreEOS: true}
	}
	return runRequests(b, e, reqs)
}

// BenchmarkEngineDecode runs rounds of 1, 4, 16 and 32 concurrent streams
// of 128 prompt and 128 output tokens. One iteration is one round.
// Reported: out-tok/s, output tokens over the round's wall time (prefill
// included, as a client sees it); decode-tok/s, tokens over the time of
// pure decode steps; ms/decode-step.
func BenchmarkEngineDecode(b *testing.B) {
	for _, n := range []int{1, 4, 16, 32} {
		b.Run(fmt.Sprintf("streams=%d", n), func(b *testing.B) {
			var st stepTimer
			e, m := benchEngine(b, &st)
			r := rand.New(rand.NewPCG(uint64(n), 1))
			vocab := m.Info().VocabSize
			tokens := 0
			for b.Loop() {
				b.StopTimer()
				prompts := make([][]int32, n)
				for i := range prompts {
					prompts[i] = randomPrompt(r, vocab, benchPrompt)
				}
				st.restart()
				b.StartTimer()
				tokens += runRound(b, e, prompts, benchOutput)
			}
			b.ReportMetric(float64(tokens)/b.Elapsed().Seconds(), "out-tok/s")
			if st := e.Stats(); st.ThreadChanges > 0 {
				b.ReportMetric(float64(st.ThreadChanges), "thread-changes")
				b.ReportMetric(float64(st.Threads), "threads-at-end")
			}
			if st := e.Stats(); st.Relocated+st.Held > 0 {
				b.ReportMetric(float64(st.Relocated), "relocations")
				b.ReportMetric(float64(st.Held), "holds")
			}
			st.mu.Lock()
			defer st.mu.Unlock()
			if st.decodeSteps > 0 {
				b.ReportMetric(float64(st.decodeTokens)/st.decodeTime.Seconds(), "decode-tok/s")
				b.ReportMetric(st.decodeTime.Seconds()*1000/float64(st.decodeSteps), "ms/decode-step")
				if st.llamaSteps > 0 {
					b.ReportMetric(st.llamaTime.Seconds()*1000/float64(st.llamaSteps), "ms/llama_decode")
				}
			}
		})
	}
}

// BenchmarkEnginePrefill computes one 512-token prompt (one batch) and
// samples one token; prefill-tok/s is prompt tokens over wall time.
func BenchmarkEnginePrefill(b *testing.B) {
	e, m := benchEngine(b, nil)
	r := rand.New(rand.NewPCG(7, 7))
	vocab := m.Info().VocabSize
	prompt := 0
	for b.Loop() {
		b.StopTimer()
		p := randomPrompt(r, vocab, benchPrefillLen)
		b.StartTimer()
		runRound(b, e, [][]int32{p}, 1)
		prompt += len(p)
	}
	b.ReportMetric(float64(prompt)/b.Elapsed().Seconds(), "prefill-tok/s")
}

// benchJSONLines is the grammar of BenchmarkEngineConstrained: an endless
// run of JSON objects of a small schema, one per line, so that every stream
// generates its full output under the grammar (end-of-generation tokens are
// banned by a logit bias, so the grammar's accepting states cannot end it).
const benchJSONLines = `root ::= (obj "\n")+
obj ::= "{" ws "\"name\"" ws ":" ws str ws "," ws "\"age\"" ws ":" ws int ws "," ws "\"tags\"" ws ":" ws "[" ws (str (ws "," ws str){0,3})? ws "]" ws "}"
str ::= "\"" ([^"\\\x00-\x1f] | "\\" ["\\/bfnrt])* "\""
int ::= "-"? [0-9]{1,9}
ws ::= [ \n]?`

// BenchmarkEngineConstrained compares constrained with unconstrained decode
// at 1 and 16 streams of 128 prompt and 128 output tokens, temperature 1,
// in one interleaved run: "free" is today's sampling; "grammar" adds the
// JSON-lines grammar above (and the bias that bans end-of-generation
// tokens); "logprobs" is free sampling with logprobs and 5 alternatives.
// Compare out-tok/s between the modes of one streams count.
func BenchmarkEngineConstrained(b *testing.B) {
	m := benchModel(b)
	var eog []native.LogitBias
	for id := range int32(m.Info().VocabSize) {
		if m.IsEOG(id) {
			eog = append(eog, native.LogitBias{Token: id, Bias: float32(math.Inf(-1))})
		}
	}
	for _, n := range []int{1, 16} {
		for _, mode := range []string{"free", "grammar", "logprobs"} {
			b.Run(fmt.Sprintf("streams=%d/%s", n, mode), func(b *testing.B) {
				e, _ := benchEngine(b, nil)
				r := rand.New(rand.NewPCG(uint64(n), 2))
				vocab := m.Info().VocabSize
				tokens := 0
				seed := uint32(0)
				for b.Loop() {
					b.StopTimer()
					reqs := make([]native.Request, n)
					for i := range reqs {
						seed++
						req := native.Request{Prompt: randomPrompt(r, vocab, benchPrompt), MaxTokens: benchOutput, IgnoreEOS: true,
							Sampling: native.SamplingParams{Temperature: 1, Seed: seed, HasSeed: true}}
						switch mode {
						case "grammar":
							req.Sampling.Grammar, req.Sampling.LogitBias = benchJSONLines, eog
						case "logprobs":
							req.Logprobs, req.TopLogprobs = true, 5
						}
						reqs[i] = req
					}
					b.StartTimer()
					tokens += runRequests(b, e, reqs)
				}
				b.ReportMetric(float64(tokens)/b.Elapsed().Seconds(), "out-tok/s")
				if st := e.Stats(); st.GrammarTokens > 0 {
					b.ReportMetric(100*float64(st.GrammarResamples)/float64(st.GrammarTokens), "%resampled")
				}
			})
		}
	}
}

// runRequests is runRound for requests of any kind: it starts them at once
// and drains every stream, and returns the tokens generated.
func runRequests(b *testing.B, e *native.Engine, reqs []native.Request) int {
	streams := make([]*native.Stream, len(reqs))
	for i, req := range reqs {
		s, err := e.Submit(context.Background(), req)
		if err != nil {
			b.Fatal(err)
		}
		streams[i] = s
	}
	var wg sync.WaitGroup
	counts := make([]int, len(streams))
	for i, s := range streams {
		wg.Go(func() {
			for ev := range s.Events() {
				counts[i] += len(ev.Tokens)
			}
		})
	}
	wg.Wait()
	total := 0
	for i, s := range streams {
		if err := s.Result().Err; err != nil {
			b.Fatalf("stream %d: %v", i, err)
		}
		if counts[i] != reqs[i].MaxTokens {
			b.Fatalf("stream %d streamed %d tokens, want %d (%v)", i, counts[i], reqs[i].MaxTokens, s.Result().Reason)
		}
		total += counts[i]
	}
	return total
}
