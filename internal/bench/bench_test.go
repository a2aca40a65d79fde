package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	hundred := make([]float64, 100)
	for i := range hundred {
		hundred[i] = float64(i + 1)
	}
	tests := []struct {
		name   string
		sorted []float64
		p      float64
		want   float64
	}{
		{"empty", nil, 50, 0},
		{"one sample", []float64{7}, 99, 7},
		{"median of even count interpolates", []float64{1, 2, 3, 4}, 50, 2.5},
		{"median of odd count", []float64{1, 2, 10}, 50, 2},
		{"p0 is the minimum", []float64{3, 4, 5}, 0, 3},
		{"p100 is the maximum", []float64{3, 4, 5}, 100, 5},
		{"p90 of 1..10", []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 90, 9.1},
		{"p99 of 1..100", hundred, 99, 99.01},
		{"p50 of 1..100", hundred, 50, 50.5},
		{"below 0 clamps", []float64{1, 2}, -5, 1},
		{"above 100 clamps", []float64{1, 2}, 150, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Percentile(tt.sorted, tt.p); math.Abs(got-tt.want) > 1e-9 {
				t.Fatalf("Percentile(%v, %g) = %g, want %g", tt.sorted, tt.p, got, tt.want)
			}
		})
	}
}

func TestSummarize(t *testing.T) {
	tests := []struct {
		name    string
		samples []float64
		want    Summary
	}{
		{"empty", nil, Summary{}},
		{"only NaN and Inf", []float64{math.NaN(), math.Inf(1)}, Summary{}},
		{"unsorted", []float64{4, 1, 3, 2}, Summary{Count: 4, Mean: 2.5, P50: 2.5, P90: 3.7, P99: 3.97, Max: 4}},
		{"NaN ignored", []float64{2, math.NaN(), 2}, Summary{Count: 2, Mean: 2, P50: 2, P90: 2, P99: 2, Max: 2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Summarize(tt.samples)
			near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }
			if got.Count != tt.want.Count || !near(got.Mean, tt.want.Mean) || !near(got.P50, tt.want.P50) ||
				!near(got.P90, tt.want.P90) || !near(got.P99, tt.want.P99) || !near(got.Max, tt.want.Max) {
				t.Fatalf("Summarize = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// TestArrivals checks the Poisson process's statistics: the mean gap is
// 1/rate, gaps are exponential (their coefficient of variation is 1), and
// counts per window have variance equal to their mean.
func TestArrivals(t *testing.T) {
	for _, rate := range []float64{0.5, 20, 1000} {
		t.Run("", func(t *testing.T) {
			a := NewArrivals(rate, 42)
			const n = 40000
			gaps := make([]float64, n)
			var prev time.Duration
			for i := range gaps {
				at := a.Next()
				if at < prev {
					t.Fatalf("arrival %d at %v before the previous at %v", i, at, prev)
				}
				gaps[i] = (at - prev).Seconds()
				prev = at
			}
			mean, sd := meanSD(gaps)
			if want := 1 / rate; math.Abs(mean-want)/want > 0.03 {
				t.Errorf("rate %g: mean gap %g s, want %g s", rate, mean, want)
			}
			if cv := sd / mean; math.Abs(cv-1) > 0.05 {
				t.Errorf("rate %g: coefficient of variation of gaps %g, want 1 (exponential)", rate, cv)
			}
			// Counts in windows of 10 expected arrivals.
			window := 10 / rate
			counts := make([]float64, int(prev.Seconds()/window))
			at := 0.0
			for _, g := range gaps {
				at += g
				if k := int(at / window); k < len(counts) {
					counts[k]++
				}
			}
			cm, csd := meanSD(counts)
			if d := csd * csd / cm; math.Abs(cm-10) > 0.5 || math.Abs(d-1) > 0.15 {
				t.Errorf("rate %g: window counts mean %g (want 10), dispersion %g (want 1)", rate, cm, d)
			}
		})
	}
}

func meanSD(x []float64) (mean, sd float64) {
	for _, v := range x {
		mean += v
	}
	mean /= float64(len(x))
	for _, v := range x {
		sd += (v - mean) * (v - mean)
	}
	return mean, math.Sqrt(sd / float64(len(x)-1))
}

func TestDrawLength(t *testing.T) {
	tests := []struct {
		dist       Distribution
		lo, hi     int
		wantMedian float64
	}{
		{Uniform, 10, 110, 60},
		{LogNormal, 32, 512, 128}, // sqrt(32*512)
		{LogNormal, 1, 10000, 100},
		{Uniform, 5, 5, 5},
		{LogNormal, 7, 7, 7},
	}
	for _, tt := range tests {
		t.Run(string(tt.dist), func(t *testing.T) {
			r := rand.New(rand.NewPCG(1, 2))
			xs := make([]float64, 20000)
			for i := range xs {
				x := DrawLength(r, tt.dist, tt.lo, tt.hi)
				if x < tt.lo || x > tt.hi {
					t.Fatalf("DrawLength(%s, %d, %d) = %d, out of bounds", tt.dist, tt.lo, tt.hi, x)
				}
				xs[i] = float64(x)
			}
			slices.Sort(xs)
			if med := Percentile(xs, 50); math.Abs(med-tt.wantMedian)/tt.wantMedian > 0.05 {
				t.Errorf("median %g, want about %g", med, tt.wantMedian)
			}
		})
	}
}

func TestWorkloadValidate(t *testing.T) {
	lim := Limits{VocabSize: 512, MaxSequenceTokens: 256, MaxPromptTokens: 200, MaxCompletionTokens: 100}
	tests := []struct {
		name string
		w    Workload
		lim  Limits
		ok   bool
	}{
		{"fixed", Workload{Kind: Fixed, InputTokens: 128, OutputTokens: 64}, lim, true},
		{"fixed at the sequence limit", Workload{Kind: Fixed, InputTokens: 156, OutputTokens: 100}, lim, true},
		{"fixed over the sequence limit", Workload{Kind: Fixed, InputTokens: 157, OutputTokens: 100}, lim, false},
		{"prompt over its limit", Workload{Kind: Fixed, InputTokens: 201, OutputTokens: 1}, lim, false},
		{"output over its limit", Workload{Kind: Fixed, InputTokens: 1, OutputTokens: 101}, lim, false},
		{"no limits", Workload{Kind: Fixed, InputTokens: 100000, OutputTokens: 100000}, Limits{}, true},
		{"zero output", Workload{Kind: Fixed, InputTokens: 16}, lim, false},
		{"unknown kind", Workload{Kind: "chat", InputTokens: 1, OutputTokens: 1}, lim, false},
		{"mixed", Workload{Kind: Mixed, InputMin: 8, InputMax: 150, OutputMin: 1, OutputMax: 100}, lim, true},
		{"mixed max over limit", Workload{Kind: Mixed, InputMin: 8, InputMax: 200, OutputMin: 1, OutputMax: 100}, lim, false},
		{"mixed inverted bounds", Workload{Kind: Mixed, InputMin: 9, InputMax: 8, OutputMin: 1, OutputMax: 2}, lim, false},
		{"mixed bad distribution", Workload{Kind: Mixed, InputMin: 1, InputMax: 8, OutputMin: 1, OutputMax: 2, Distribution: "zipf"}, lim, false},
		{"shared prefix", Workload{Kind: SharedPrefix, InputTokens: 128, PrefixTokens: 100, OutputTokens: 16}, lim, true},
		{"prefix as long as the prompt", Workload{Kind: SharedPrefix, InputTokens: 128, PrefixTokens: 128, OutputTokens: 16}, lim, false},
		{"no prefix", Workload{Kind: SharedPrefix, InputTokens: 128, OutputTokens: 16}, lim, false},
		{"tiny vocabulary", Workload{Kind: Fixed, InputTokens: 1, OutputTokens: 1}, Limits{VocabSize: 3}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.w.Validate(tt.lim)
			if (err == nil) != tt.ok {
				t.Fatalf("Validate = %v, want ok %v", err, tt.ok)
			}
			if err != nil && !errors.Is(err, ErrConfig) {
				t.Fatalf("error %v does not wrap ErrConfig", err)
			}
		})
	}
}

func TestGenerator(t *testing.T) {
	const vocab = 512
	tests := []struct {
		name  string
		w     Workload
		check func(t *testing.T, ps []Prompt)
	}{
		{"fixed lengths are exact", Workload{Kind: Fixed, InputTokens: 128, OutputTokens: 32}, func(t *testing.T, ps []Prompt) {
			for i, p := range ps {
				if len(p.Tokens) != 128 || p.OutputTokens != 32 {
					t.Fatalf("prompt %d: %d in / %d out", i, len(p.Tokens), p.OutputTokens)
				}
			}
			distinctFirst(t, ps, 0)
		}},
		{"mixed lengths stay in bounds and vary", Workload{Kind: Mixed, InputMin: 4, InputMax: 64, OutputMin: 2, OutputMax: 16, Distribution: Uniform}, func(t *testing.T, ps []Prompt) {
			in, out := map[int]bool{}, map[int]bool{}
			for i, p := range ps {
				if len(p.Tokens) < 4 || len(p.Tokens) > 64 || p.OutputTokens < 2 || p.OutputTokens > 16 {
					t.Fatalf("prompt %d: %d in / %d out", i, len(p.Tokens), p.OutputTokens)
				}
				in[len(p.Tokens)], out[p.OutputTokens] = true, true
			}
			if len(in) < 20 || len(out) < 10 {
				t.Fatalf("only %d input and %d output lengths drawn", len(in), len(out))
			}
		}},
		{"shared prefix is common, suffixes unique", Workload{Kind: SharedPrefix, InputTokens: 40, PrefixTokens: 32, OutputTokens: 8}, func(t *testing.T, ps []Prompt) {
			for i, p := range ps {
				if len(p.Tokens) != 40 || p.OutputTokens != 8 {
					t.Fatalf("prompt %d: %d in / %d out", i, len(p.Tokens), p.OutputTokens)
				}
				if !slices.Equal(p.Tokens[:32], ps[0].Tokens[:32]) {
					t.Fatalf("prompt %d does not share the prefix", i)
				}
			}
			distinctFirst(t, ps, 32)
		}},
		{"several prefixes cycle", Workload{Kind: SharedPrefix, InputTokens: 20, PrefixTokens: 16, Prefixes: 3, OutputTokens: 4}, func(t *testing.T, ps []Prompt) {
			for i, p := range ps {
				if !slices.Equal(p.Tokens[:16], ps[i%3].Tokens[:16]) {
					t.Fatalf("prompt %d does not share prefix %d", i, i%3)
				}
				if i >= 3 && i%3 != 0 && slices.Equal(p.Tokens[:16], ps[0].Tokens[:16]) {
					t.Fatalf("prompt %d has prefix 0", i)
				}
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g, err := NewGenerator(tt.w, vocab, 99)
			if err != nil {
				t.Fatal(err)
			}
			again, _ := NewGenerator(tt.w, vocab, 99)
			ps := make([]Prompt, 300)
			for i := range ps {
				ps[i] = g.Next()
				for j, id := range ps[i].Tokens {
					if id < FirstTokenID || id >= vocab {
						t.Fatalf("prompt %d token %d = %d outside [%d, %d)", i, j, id, FirstTokenID, vocab)
					}
				}
				if p := again.Next(); !slices.Equal(p.Tokens, ps[i].Tokens) || p.OutputTokens != ps[i].OutputTokens {
					t.Fatalf("prompt %d differs between two generators with the same seed", i)
				}
			}
			tt.check(t, ps)
		})
	}
}

// distinctFirst checks that the token at position at differs between every
// two prompts (there are fewer prompts than ordinary ids).
func distinctFirst(t *testing.T, ps []Prompt, at int) {
	t.Helper()
	seen := map[int32]int{}
	for i, p := range ps {
		if j, ok := seen[p.Tokens[at]]; ok {
			t.Fatalf("prompts %d and %d share token %d at %d", j, i, p.Tokens[at], at)
		}
		seen[p.Tokens[at]] = i
	}
}

func TestConfigValidate(t *testing.T) {
	fixed := Workload{Kind: Fixed, InputTokens: 4, OutputTokens: 4}
	tests := []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"closed loop by duration", Config{Concurrency: 2, Duration: time.Second, Workload: fixed}, true},
		{"open loop by count", Config{Rate: 5, Requests: 10, Workload: fixed}, true},
		{"no limit", Config{Concurrency: 2, Workload: fixed}, false},
		{"no clients", Config{Requests: 1, Workload: fixed}, false},
		{"negative rate", Config{Rate: -1, Concurrency: 1, Requests: 1, Workload: fixed}, false},
		{"negative SLO", Config{Concurrency: 1, Requests: 1, SLOTTFT: -time.Second, Workload: fixed}, false},
		{"bad workload", Config{Concurrency: 1, Requests: 1}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.cfg.withDefaults().Validate(); (err == nil) != tt.ok {
				t.Fatalf("Validate = %v, want ok %v", err, tt.ok)
			}
		})
	}
}

func TestMeetsSLO(t *testing.T) {
	ms := time.Millisecond
	tests := []struct {
		name      string
		o         outcome
		ttft, itl time.Duration
		want      bool
	}{
		{"no objectives", outcome{tokens: 10, ttft: time.Hour, span: time.Hour}, 0, 0, true},
		{"ttft met", outcome{tokens: 10, ttft: 90 * ms}, 100 * ms, 0, true},
		{"ttft missed", outcome{tokens: 10, ttft: 110 * ms}, 100 * ms, 0, false},
		{"mean itl met", outcome{tokens: 11, span: 100 * ms}, 0, 10 * ms, true},
		{"mean itl missed", outcome{tokens: 11, span: 101 * ms}, 0, 10 * ms, false},
		{"one token has no itl", outcome{tokens: 1, ttft: ms}, 10 * ms, ms, true},
		{"no token misses a ttft objective", outcome{}, 10 * ms, 0, false},
		{"both must hold", outcome{tokens: 11, ttft: ms, span: time.Second}, 10 * ms, 10 * ms, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := meetsSLO(&tt.o, tt.ttft, tt.itl); got != tt.want {
				t.Fatalf("meetsSLO = %v, want %v", got, tt.want)
			}
		})
	}
}

// checkReport checks the invariants every report must hold.
func checkReport(t *testing.T, r *Report) {
	t.Helper()
	sum := 0
	for _, n := range r.Status {
		sum += n
	}
	if sum != r.Requests.Sent {
		t.Errorf("status counts add up to %d, sent %d", sum, r.Requests.Sent)
	}
	if r.Requests.OK != r.Status["OK"] || r.Requests.Failed != r.Requests.Sent-r.Requests.OK {
		t.Errorf("requests %+v vs status %v", r.Requests, r.Status)
	}
	var buf bytes.Buffer
	if err := r.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	var generic any
	if err := json.Unmarshal(buf.Bytes(), &generic); err != nil {
		t.Fatal(err)
	}
	var walk func(path string, v any)
	walk = func(path string, v any) {
		switch v := v.(type) {
		case float64:
			if v < 0 || math.IsNaN(v) || math.IsInf(v, 0) {
				t.Errorf("%s = %v", path, v)
			}
		case map[string]any:
			for k, x := range v {
				walk(path+"."+k, x)
			}
		case []any:
			for _, x := range v {
				walk(path+"[]", x)
			}
		}
	}
	walk("report", generic)
	buf.Reset()
	if err := r.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"throughput", "TTFT", "ITL", "E2E", "goodput"} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("text report lacks %q:\n%s", want, buf.String())
		}
	}
}

func TestRunAccounting(t *testing.T) {
	// Of every 10 calls: 6 served, 2 refused, 1 failing mid-stream, 1
	// incomplete.
	plan := func(i int) behaviour {
		switch i % 10 {
		case 3, 7:
			return refuse
		case 5:
			return failMid
		case 9:
			return incomplete
		}
		return serve
	}
	f := newFake(plan)
	cfg := Config{Concurrency: 4, Requests: 40, Workload: Workload{Kind: Fixed, InputTokens: 8, OutputTokens: 5}, Seed: 3}
	r, err := Run(context.Background(), f, f.cache(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	checkReport(t, r)
	want := map[string]int{"OK": 24, "RESOURCE_EXHAUSTED": 8, "UNAVAILABLE": 4, "INCOMPLETE": 4}
	if !equalMaps(r.Status, want) {
		t.Fatalf("status %v, want %v", r.Status, want)
	}
	if r.ErrorReasons["QUEUE_FULL"] != 8 || len(r.ErrorReasons) != 1 {
		t.Fatalf("error reasons %v", r.ErrorReasons)
	}
	if r.Tokens.PromptSent != 40*8 || r.Tokens.PromptOK != 24*8 {
		t.Fatalf("prompt tokens %+v", r.Tokens)
	}
	if r.Tokens.Output != 24*5 {
		t.Fatalf("output tokens %d, want %d", r.Tokens.Output, 24*5)
	}
	// failMid streams 1+2 tokens, incomplete streams all 5.
	if r.Tokens.OutputPartial != 4*3+4*5 {
		t.Fatalf("partial output tokens %d", r.Tokens.OutputPartial)
	}
	if r.LatencyMS.TTFT.Count != 24 || r.LatencyMS.E2E.Count != 24 || r.LatencyMS.ITL.Count != 24*4 {
		t.Fatalf("latency counts %+v", r.LatencyMS)
	}
	if r.LatencyMS.Queue.Count != 32 {
		t.Fatalf("queue samples %d, want one per started stream (32)", r.LatencyMS.Queue.Count)
	}
	s := r.Server
	if s == nil || s.PrefillTokens != 32*8 || s.PromptTokens != 32*8 || s.Admitted != 32 || s.Rejected["QUEUE_FULL"] != 8 {
		t.Fatalf("server counters %+v", s)
	}
	if r.Goodput.Requests != 24 {
		t.Fatalf("goodput requests %d without objectives, want every OK request", r.Goodput.Requests)
	}
	// Every request asked for exactly its tokens, with ignore_eos.
	for _, req := range f.reqs {
		if !req.GetIgnoreEos() || req.GetMaxTokens() != 5 || len(req.GetTokens().GetIds()) != 8 || req.GetSkipPrefixCache() {
			t.Fatalf("request %v", req)
		}
	}
}

func equalMaps(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestRunWarmupIsExcluded(t *testing.T) {
	f := newFake(nil)
	cfg := Config{Concurrency: 2, Requests: 6, WarmupRequests: 4, NoPrefixCache: true,
		Workload: Workload{Kind: SharedPrefix, InputTokens: 12, PrefixTokens: 8, OutputTokens: 3}}
	r, err := Run(context.Background(), f, f.cache(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	checkReport(t, r)
	if r.Requests.Sent != 6 || r.Requests.Warmup != 4 || len(f.reqs) != 10 {
		t.Fatalf("requests %+v, server saw %d", r.Requests, len(f.reqs))
	}
	if r.Server.PrefillTokens != 6*12 || r.Server.GeneratedTokens != 6*3 {
		t.Fatalf("server counters %+v include the warm-up", r.Server)
	}
	if r.Server.TokensPerStep != float64(6*12+6*3)/float64(6*3) {
		t.Fatalf("tokens per step %g", r.Server.TokensPerStep)
	}
	for _, req := range f.reqs {
		if !req.GetSkipPrefixCache() {
			t.Fatal("skip_prefix_cache not set")
		}
	}
}

// TestRunByDuration runs a closed loop for 150 ms with progress lines every
// 20 ms. The fake server holds every token back until the first progress
// line is written, so that the run cannot end without one however the
// machine schedules the progress ticker.
func TestRunByDuration(t *testing.T) {
	f := newFake(nil)
	f.delay = time.Millisecond
	firstLine := make(chan struct{})
	f.hold = firstLine
	progress := &firstWrite{written: firstLine}
	cfg := Config{Concurrency: 3, Duration: 150 * time.Millisecond, Workload: Workload{Kind: Fixed, InputTokens: 4, OutputTokens: 4},
		Progress: progress, ProgressInterval: 20 * time.Millisecond}
	r, err := Run(context.Background(), f, nil, cfg)
	if err != nil {
		t.Fatal(err)
	}
	checkReport(t, r)
	if r.Requests.Sent == 0 || r.Requests.OK != r.Requests.Sent || int(f.calls.Load()) != r.Requests.Sent {
		t.Fatalf("requests %+v, server saw %d", r.Requests, f.calls.Load())
	}
	if r.Server != nil {
		t.Fatal("server counters without a cache client")
	}
	if r.ElapsedSeconds < 0.15 {
		t.Fatalf("elapsed %gs, shorter than the duration", r.ElapsedSeconds)
	}
	if !strings.Contains(progress.String(), "bench run") {
		t.Fatalf("no progress lines: %q", progress.String())
	}
}

// firstWrite is an io.Writer that keeps what is written and closes written
// at the first write.
type firstWrite struct {
	mu      sync.Mutex
	b       bytes.Buffer
	written chan struct{}
}

func (w *firstWrite) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.b.Len() == 0 {
		close(w.written)
	}
	return w.b.Write(p)
}

func (w *firstWrite) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

func TestRunOpenLoop(t *testing.T) {
	t.Run("by count", func(t *testing.T) {
		f := newFake(nil)
		r, err := Run(context.Background(), f, f.cache(), Config{Rate: 500, Requests: 25, Workload: Workload{Kind: Fixed, InputTokens: 4, OutputTokens: 2}})
		if err != nil {
			t.Fatal(err)
		}
		checkReport(t, r)
		if r.Requests.Sent != 25 || r.Requests.Dropped != 0 || r.Config.Mode != "open" || r.Config.Concurrency != 0 {
			t.Fatalf("requests %+v, config %+v", r.Requests, r.Config)
		}
	})
	// The fake holds every request until the run's 100 ms are over, so
	// the two in flight stay there and every later arrival is dropped,
	// however the requests' goroutines are scheduled.
	t.Run("drops past the in-flight cap", func(t *testing.T) {
		f := newFake(nil)
		const d = 100 * time.Millisecond
		hold := make(chan struct{})
		f.hold = hold
		defer time.AfterFunc(d, func() { close(hold) }).Stop()
		r, err := Run(context.Background(), f, f.cache(), Config{Rate: 2000, MaxInFlight: 2, Duration: d,
			Workload: Workload{Kind: Fixed, InputTokens: 4, OutputTokens: 2}})
		if err != nil {
			t.Fatal(err)
		}
		checkReport(t, r)
		if r.Requests.Dropped == 0 || r.Requests.Sent == 0 || int(f.calls.Load()) != r.Requests.Sent {
			t.Fatalf("requests %+v, server saw %d", r.Requests, f.calls.Load())
		}
	})
}

// TestRunInterrupted cancels a run while requests are in flight: the
// cancel comes when the second request reaches the server, not after a
// delay that a slow machine might spend before sending any.
func TestRunInterrupted(t *testing.T) {
	f := newFake(nil)
	f.delay = 5 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f.onCall = func(i int) {
		if i == 1 {
			cancel()
		}
	}
	r, err := Run(ctx, f, f.cache(), Config{Concurrency: 2, Duration: time.Hour, Workload: Workload{Kind: Fixed, InputTokens: 4, OutputTokens: 100}})
	if err != nil {
		t.Fatal(err)
	}
	checkReport(t, r)
	if !r.Interrupted || r.Status["CANCELLED"] == 0 {
		t.Fatalf("interrupted %v, status %v", r.Interrupted, r.Status)
	}
}

func TestRunRefusesWhatCannotFit(t *testing.T) {
	f := newFake(nil)
	_, err := Run(context.Background(), f, nil, Config{Concurrency: 1, Requests: 1, Workload: Workload{Kind: Fixed, InputTokens: 2000, OutputTokens: 100}})
	if !errors.Is(err, ErrConfig) {
		t.Fatalf("Run = %v, want ErrConfig", err)
	}
	if f.calls.Load() != 0 {
		t.Fatal("requests were sent")
	}
}
