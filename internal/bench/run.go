// Package bench is kvgate's client-side load generator. It drives a running
// server, a Target: kvgate over gRPC with the project's generated client,
// or llama.cpp's llama-server over HTTP, so that the two can be compared on
// the same load. It runs in closed loop (a fixed number of clients, each
// sending its next request when the last ends) or open loop (Poisson
// arrivals at a fixed rate), with prompts built as token ids so that every
// input length is exact and ignore_eos set so that every output length is
// exact. It reports throughput, latency percentiles, goodput under latency
// objectives, every outcome, and, from kvgate, the prefill work the server
// did, from its GetCacheStats counters.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// Config configures a benchmark run.
type Config struct {
	// Target is the server's address, for the report.
	Target string
	// Concurrency is the number of closed-loop clients. It is used when
	// Rate is 0.
	Concurrency int
	// Rate, when positive, selects open loop: requests arrive as a Poisson
	// process of Rate per second, whatever the server's pace.
	Rate float64
	// MaxInFlight caps outstanding open-loop requests; an arrival beyond it
	// is dropped and counted. 0 means 1024.
	MaxInFlight int
	// Duration is how long measured requests are sent. The run then waits
	// for the outstanding ones to end.
	Duration time.Duration
	// Requests is the most measured requests to send. With Duration, the
	// first limit reached ends sending; one of the two must be set.
	Requests int
	// WarmupDuration and WarmupRequests bound a warm-up phase before the
	// measured window, run with the same load; its requests are left out
	// of the report. When both are 0 there is no warm-up.
	WarmupDuration time.Duration
	// WarmupRequests is the warm-up's request count.
	WarmupRequests int
	// Workload is the shape of the requests.
	Workload Workload
	// NoPrefixCache sets skip_prefix_cache on every request.
	NoPrefixCache bool
	// SLOTTFT and SLOITL are the latency objectives of goodput; 0 does not
	// check one.
	SLOTTFT time.Duration
	// SLOITL is the mean inter-token latency objective.
	SLOITL time.Duration
	// Timeout is each request's deadline; 0 means 5 minutes.
	Timeout time.Duration
	// Seed selects the prompts and arrivals; 0 picks a random seed, which
	// the report records.
	Seed uint64
	// Progress, when set, receives a line per ProgressInterval while the
	// run goes on.
	Progress io.Writer
	// ProgressInterval is the time between progress lines; 0 means 1s.
	ProgressInterval time.Duration
}

// withDefaults fills in the zero-means-default fields.
func (c Config) withDefaults() Config {
	if c.MaxInFlight == 0 {
		c.MaxInFlight = 1024
	}
	if c.Timeout == 0 {
		c.Timeout = 5 * time.Minute
	}
	if c.Seed == 0 {
		c.Seed = rand.Uint64() | 1
	}
	if c.ProgressInterval == 0 {
		c.ProgressInterval = time.Second
	}
	c.Workload = c.Workload.withDefaults()
	return c
}

// Validate reports whether the load configuration can run; the workload is
// checked against the server's limits by Run.
func (c Config) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrConfig, fmt.Sprintf(format, args...))
	}
	switch {
	case c.Rate < 0:
		return bad("rate %g: must be >= 0", c.Rate)
	case c.Rate == 0 && c.Concurrency < 1:
		return bad("concurrency %d: must be >= 1 (or set a rate for open loop)", c.Concurrency)
	case c.MaxInFlight < 0:
		return bad("max in flight %d: must be >= 0", c.MaxInFlight)
	case c.Duration < 0 || c.Requests < 0 || c.WarmupDuration < 0 || c.WarmupRequests < 0:
		return bad("durations and request counts must not be negative")
	case c.Duration == 0 && c.Requests == 0:
		return bad("set a duration or a request count")
	case c.SLOTTFT < 0 || c.SLOITL < 0 || c.Timeout < 0:
		return bad("objectives and the timeout must not be negative")
	}
	return c.Workload.Validate(Limits{})
}

// Mode returns "open" when the configuration runs in open loop, else
// "closed".
func (c Config) Mode() string {
	if c.Rate > 0 {
		return "open"
	}
	return "closed"
}

// outcome is the record of one request.
type outcome struct {
	prompt, asked   int
	status          string // "OK", a code name, or "INCOMPLETE"
	reason          string // ErrorInfo reason, if any
	tokens          int    // streamed token ids
	cached          int    // prompt tokens the server reused (Events.Cached)
	queueMS         float64
	started         bool
	ttft, e2e, span time.Duration // span: first to last token
	itl             []float64     // ms, one per token after the first
}

// ok reports whether the request ended with a Finished event.
func (o *outcome) ok() bool { return o.status == "OK" }

// codeNames are the canonical upper-snake names of the gRPC codes.
var codeNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
	codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
	codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED",
	codes.OutOfRange: "OUT_OF_RANGE", codes.Unimplemented: "UNIMPLEMENTED",
	codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE", codes.DataLoss: "DATA_LOSS",
	codes.Unauthenticated: "UNAUTHENTICATED",
}

// CodeName returns the canonical name of a gRPC code, such as
// "RESOURCE_EXHAUSTED".
func CodeName(c codes.Code) string {
	if n, ok := codeNames[c]; ok {
		return n
	}
	return fmt.Sprintf("CODE_%d", uint32(c))
}

// classify records a failed call's code and reason: those of an *Error,
// else the gRPC status's code and ErrorInfo reason.
func (o *outcome) classify(err error) {
	var e *Error
	if errors.As(err, &e) {
		o.status, o.reason = CodeName(e.Code), e.Reason
		if e.Code == codes.OK {
			o.status = CodeName(codes.Unknown) // a failure without a code
		}
		return
	}
	st := status.Convert(err)
	o.status = CodeName(st.Code())
	if st.Code() == codes.OK {
		o.status = CodeName(codes.Unknown) // an error without a status
	}
	for _, d := range st.Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok {
			o.reason = ei.GetReason()
			break
		}
	}
}

// runner runs one benchmark.
type runner struct {
	cfg    Config
	target Target
	mu     sync.Mutex // guards prompts
	pr     *Generator
	seq    atomic.Int64 // request ids
	stats  progressCounters
}

// progressCounters are the live counts that progress lines show.
type progressCounters struct {
	sent, ok, failed, inFlight, tokens atomic.Int64
}

// reset zeroes the counters.
func (c *progressCounters) reset() {
	for _, v := range []*atomic.Int64{&c.sent, &c.ok, &c.failed, &c.inFlight, &c.tokens} {
		v.Store(0)
	}
}

// next returns the next prompt.
func (r *runner) next() Prompt {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pr.Next()
}

// do sends one request and reads its stream to the end.
func (r *runner) do(ctx context.Context, p Prompt) *outcome {
	o := &outcome{prompt: len(p.Tokens), asked: p.OutputTokens}
	r.stats.sent.Add(1)
	r.stats.inFlight.Add(1)
	defer r.stats.inFlight.Add(-1)
	ctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	defer cancel()
	req := Request{
		ID:            fmt.Sprintf("bench-%d", r.seq.Add(1)),
		Prompt:        p,
		NoPrefixCache: r.cfg.NoPrefixCache,
	}
	rec := &recorder{o: o, counters: &r.stats}
	start := time.Now()
	err := r.target.Generate(ctx, req, rec)
	o.e2e = time.Since(start)
	if o.tokens > 0 {
		o.ttft = rec.first.Sub(start)
		o.span = rec.last.Sub(rec.first)
	}
	switch {
	case err != nil:
		o.classify(err)
	case !rec.finished:
		o.status = "INCOMPLETE"
	default:
		o.status = "OK"
	}
	if o.ok() {
		r.stats.ok.Add(1)
	} else {
		r.stats.failed.Add(1)
	}
	return o
}

// recorder is the Events of one request: it records the stream's events,
// at the time they arrive, into the request's outcome.
type recorder struct {
	o           *outcome
	counters    *progressCounters
	first, last time.Time
	finished    bool
}

// Started records the admission and its queue wait.
func (c *recorder) Started(queueWaitMS float64) {
	c.o.started = true
	c.o.queueMS = queueWaitMS
}

// Cached records the prompt tokens the server reused.
func (c *recorder) Cached(tokens int) { c.o.cached = tokens }

// Tokens records n tokens that arrived now, and their inter-token gaps.
func (c *recorder) Tokens(n int) {
	if n <= 0 {
		return
	}
	now := time.Now()
	o := c.o
	if o.tokens == 0 {
		c.first = now
		// The first token has no gap; the rest of a first chunk of
		// several tokens arrived with it.
		for range n - 1 {
			o.itl = append(o.itl, 0)
		}
	} else {
		gap := ms(now.Sub(c.last)) / float64(n)
		for range n {
			o.itl = append(o.itl, gap)
		}
	}
	c.last = now
	o.tokens += n
	c.counters.tokens.Add(int64(n))
}

// Finished records that the stream completed.
func (c *recorder) Finished() { c.finished = true }

// phase sends requests until requests have been sent (when positive), d
// has passed (when positive) or ctx is done, waits for every outstanding
// request to end, and returns their outcomes and the open-loop drops.
func (r *runner) phase(ctx context.Context, requests int, d time.Duration, seed uint64) ([]*outcome, int) {
	stop := make(chan struct{})
	if d > 0 {
		t := time.AfterFunc(d, func() { close(stop) })
		defer t.Stop()
	}
	var (
		mu   sync.Mutex
		outs []*outcome
		wg   sync.WaitGroup
	)
	record := func(o *outcome) {
		mu.Lock()
		outs = append(outs, o)
		mu.Unlock()
	}
	stopped := func() bool {
		select {
		case <-stop:
			return true
		case <-ctx.Done():
			return true
		default:
			return false
		}
	}
	var issued atomic.Int64
	take := func() bool {
		return !stopped() && (requests <= 0 || issued.Add(1) <= int64(requests))
	}
	if r.cfg.Rate <= 0 {
		for range r.cfg.Concurrency {
			wg.Go(func() {
				for take() {
					record(r.do(ctx, r.next()))
				}
			})
		}
		wg.Wait()
		return outs, 0
	}
	dropped := 0
	arrivals := NewArrivals(r.cfg.Rate, seed)
	begin := time.Now()
	timer := time.NewTimer(0)
	defer timer.Stop()
	inFlight := make(chan struct{}, r.cfg.MaxInFlight)
	for {
		timer.Reset(time.Until(begin.Add(arrivals.Next())))
		select {
		case <-timer.C:
		case <-stop:
		case <-ctx.Done():
		}
		if !take() {
			break
		}
		p := r.next()
		select {
		case inFlight <- struct{}{}:
			wg.Go(func() {
				defer func() { <-inFlight }()
				record(r.do(ctx, p))
			})
		default:
			dropped++
		}
	}
	wg.Wait()
	return outs, dropped
}

// progress writes a line per interval until stop is closed.
func (r *runner) progress(label string, begin time.Time, stop <-chan struct{}) {
	t := time.NewTicker(r.cfg.ProgressInterval)
	defer t.Stop()
	lastTokens, lastAt := r.stats.tokens.Load(), begin
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			tokens := r.stats.tokens.Load()
			rate := perSecond(float64(tokens-lastTokens), now.Sub(lastAt))
			lastTokens, lastAt = tokens, now
			fmt.Fprintf(r.cfg.Progress, "bench %s %5.0fs  sent %d  ok %d  failed %d  in flight %d  output %d tok (%.0f tok/s)\n",
				label, now.Sub(begin).Seconds(), r.stats.sent.Load(), r.stats.ok.Load(), r.stats.failed.Load(),
				r.stats.inFlight.Load(), tokens, rate)
		}
	}
}

// runPhase runs phase with progress lines when configured.
func (r *runner) runPhase(ctx context.Context, label string, requests int, d time.Duration, seed uint64) ([]*outcome, int) {
	if r.cfg.Progress == nil {
		return r.phase(ctx, requests, d, seed)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { r.progress(label, time.Now(), stop) })
	defer wg.Wait()
	defer close(stop)
	return r.phase(ctx, requests, d, seed)
}

// Run benchmarks the kvgate server behind gen and cache with cfg and
// returns the report: it is RunTarget with NewGRPCTarget(gen, cache).
// cache may be nil, and the report then has no server counters.
func Run(ctx context.Context, gen kvgatev1.GenerateServiceClient, cache kvgatev1.CacheServiceClient, cfg Config) (*Report, error) {
	return RunTarget(ctx, NewGRPCTarget(gen, cache), cfg)
}

// RunTarget benchmarks target with cfg and returns the report. The report
// has server counters when target is a StatsTarget. A cancelled ctx ends
// the run early: outstanding requests are cancelled and the report covers
// what ran, marked Interrupted.
func RunTarget(ctx context.Context, target Target, cfg Config) (*Report, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	lim, model, err := target.Info(ctx)
	if err != nil {
		return nil, err
	}
	if err := cfg.Workload.Validate(lim); err != nil {
		return nil, err
	}
	pr, err := NewGenerator(cfg.Workload, lim.VocabSize, cfg.Seed)
	if err != nil {
		return nil, err
	}
	r := &runner{cfg: cfg, target: target, pr: pr}
	stats, _ := target.(StatsTarget)

	warm := 0
	if cfg.WarmupDuration > 0 || cfg.WarmupRequests > 0 {
		outs, _ := r.runPhase(ctx, "warm-up", cfg.WarmupRequests, cfg.WarmupDuration, cfg.Seed^0x7761726d)
		warm = len(outs)
		r.stats.reset()
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("warm-up: %w", err)
	}
	var before *kvgatev1.GetCacheStatsResponse
	if stats != nil {
		if before, err = stats.CacheStats(ctx); err != nil {
			return nil, err
		}
	}
	begin := time.Now()
	outs, dropped := r.runPhase(ctx, "run", cfg.Requests, cfg.Duration, cfg.Seed)
	elapsed := time.Since(begin)
	interrupted := ctx.Err() != nil
	var after *kvgatev1.GetCacheStatsResponse
	if stats != nil {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		after, err = stats.CacheStats(sctx)
		cancel()
		if err != nil {
			return nil, err
		}
	}
	rep := buildReport(cfg, outs, elapsed)
	rep.StartedAt = begin.UTC()
	rep.Interrupted = interrupted
	rep.Requests.Dropped = dropped
	rep.Requests.Warmup = warm
	rep.Model = model
	if before != nil && after != nil {
		rep.Server = serverDelta(before, after)
	}
	return rep, nil
}

// buildReport computes the report's counts, rates and latencies from the
// measured outcomes.
func buildReport(cfg Config, outs []*outcome, elapsed time.Duration) *Report {
	rep := &Report{
		Schema:         Schema,
		ElapsedSeconds: elapsed.Seconds(),
		Status:         map[string]int{},
		ErrorReasons:   map[string]int{},
		Config: ReportConfig{
			Target: cfg.Target, Mode: cfg.Mode(), MaxInFlight: cfg.MaxInFlight,
			DurationSeconds: cfg.Duration.Seconds(), Requests: cfg.Requests,
			WarmupSeconds: cfg.WarmupDuration.Seconds(), WarmupRequests: cfg.WarmupRequests,
			Workload: cfg.Workload, PrefixCache: !cfg.NoPrefixCache,
			TimeoutSeconds: cfg.Timeout.Seconds(), Seed: cfg.Seed,
		},
		Goodput: Goodput{SLOTTFTMS: ms(cfg.SLOTTFT), SLOITLMS: ms(cfg.SLOITL)},
	}
	if cfg.Rate > 0 {
		rep.Config.Rate = cfg.Rate
	} else {
		rep.Config.Concurrency = cfg.Concurrency
		rep.Config.MaxInFlight = 0
	}
	var ttft, itl, e2e, queue []float64
	for _, o := range outs {
		rep.Requests.Sent++
		rep.Status[o.status]++
		rep.Tokens.PromptSent += int64(o.prompt)
		rep.Tokens.CachedReported += int64(o.cached)
		if o.started {
			queue = append(queue, o.queueMS)
		}
		if !o.ok() {
			if o.reason != "" {
				rep.ErrorReasons[o.reason]++
			}
			rep.Tokens.OutputPartial += int64(o.tokens)
			continue
		}
		rep.Requests.OK++
		rep.Tokens.PromptOK += int64(o.prompt)
		rep.Tokens.Output += int64(o.tokens)
		e2e = append(e2e, ms(o.e2e))
		if o.tokens > 0 {
			ttft = append(ttft, ms(o.ttft))
			itl = append(itl, o.itl...)
		}
		if meetsSLO(o, cfg.SLOTTFT, cfg.SLOITL) {
			rep.Goodput.Requests++
		}
	}
	rep.Requests.Failed = rep.Requests.Sent - rep.Requests.OK
	rep.LatencyMS = Latencies{TTFT: Summarize(ttft), ITL: Summarize(itl), E2E: Summarize(e2e), Queue: Summarize(queue)}
	rep.Throughput = Throughput{
		RequestsPerSecond:     perSecond(float64(rep.Requests.OK), elapsed),
		OutputTokensPerSecond: perSecond(float64(rep.Tokens.Output), elapsed),
		TotalTokensPerSecond:  perSecond(float64(rep.Tokens.PromptOK+rep.Tokens.Output), elapsed),
	}
	rep.Goodput.RequestsPerSecond = perSecond(float64(rep.Goodput.Requests), elapsed)
	return rep
}

// meetsSLO reports whether an OK request met both objectives (0: not
// checked). A request that streamed no token has no TTFT and meets no TTFT
// objective.
func meetsSLO(o *outcome, ttft, itl time.Duration) bool {
	if ttft > 0 && (o.tokens == 0 || o.ttft > ttft) {
		return false
	}
	if itl > 0 && o.tokens > 1 && o.span/time.Duration(o.tokens-1) > itl {
		return false
	}
	return true
}

// sub returns a-b, or 0 when the counter went backwards (a restarted
// server).
func sub(a, b uint64) uint64 {
	if a < b {
		return 0
	}
	return a - b
}

// serverDelta returns the change of the server's counters.
func serverDelta(before, after *kvgatev1.GetCacheStatsResponse) *ServerCounters {
	s := &ServerCounters{
		PromptTokens:    sub(after.GetPromptTokensTotal(), before.GetPromptTokensTotal()),
		PrefillTokens:   sub(after.GetPrefillTokensTotal(), before.GetPrefillTokensTotal()),
		PrefixHitTokens: sub(after.GetPrefixHitTokensTotal(), before.GetPrefixHitTokensTotal()),
		GeneratedTokens: sub(after.GetGeneratedTokensTotal(), before.GetGeneratedTokensTotal()),
		DecodeSteps:     sub(after.GetDecodeStepsTotal(), before.GetDecodeStepsTotal()),
		Admitted:        sub(after.GetAdmittedTotal(), before.GetAdmittedTotal()),
		Preemptions:     sub(after.GetPreemptionsTotal(), before.GetPreemptionsTotal()),
		Evictions:       sub(after.GetEvictionsTotal(), before.GetEvictionsTotal()),
		SlowConsumers:   sub(after.GetSlowConsumerTotal(), before.GetSlowConsumerTotal()),
		NoKVSlot:        sub(after.GetNokvslotTotal(), before.GetNokvslotTotal()),
		Rejected:        map[string]uint64{},
	}
	for k, v := range after.GetRejectedTotal() {
		if d := sub(v, before.GetRejectedTotal()[k]); d > 0 {
			s.Rejected[k] = d
		}
	}
	if s.DecodeSteps > 0 {
		s.TokensPerStep = float64(s.PrefillTokens+s.GeneratedTokens) / float64(s.DecodeSteps)
	}
	return s
}
