package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"strconv"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/native/llama"
)

func cacheStats(t testing.TB, s *server) *kvgatev1.GetCacheStatsResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if s.token != "" {
		ctx = withToken(ctx, s.token)
	}
	st, err := s.Cache().GetCacheStats(ctx, &kvgatev1.GetCacheStatsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// waitQuiet waits until nothing runs or waits, and every used cell belongs
// to the prefix cache, and returns the stats.
func waitQuiet(t testing.TB, s *server) *kvgatev1.GetCacheStatsResponse {
	t.Helper()
	var st *kvgatev1.GetCacheStatsResponse
	waitFor(t, 30*time.Second, "all cells to be free or cached", func() bool {
		st = cacheStats(t, s)
		return st.GetCellsUsed() == st.GetCellsCached() && st.GetCellsReserved() == 0 &&
			st.GetSequencesRunning() == 0 && st.GetSequencesQueued() == 0
	})
	return st
}

func tokenPrompt(r *rand.Rand, n int) *kvgatev1.GenerateRequest_Tokens {
	ids := make([]int32, n)
	ids[0] = 1 // BOS
	for i := 1; i < n; i++ {
		ids[i] = int32(3 + r.IntN(509)) // stories260K has 512 tokens
	}
	return &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: ids}}
}

func errorInfoReason(err error) string {
	st, _ := status.FromError(err)
	for _, d := range st.Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok {
			return ei.GetReason()
		}
	}
	return ""
}

// TestStress hammers a server with a 512-cell pool with 240 concurrent
// calls of random sizes; about 20 % are cancelled mid-stream, some have
// short deadlines and a few can never fit. Every call must end with a
// finished event or an actionable status, llama_decode must never report
// NoKvSlot, and every cell must come back.
//
// How many calls find room depends on how the 240 arrive against the
// server's progress, so the test bounds the refusals by what the queue must
// hold instead of counting the calls that finished: a call is refused
// QUEUE_FULL only while --max-queue calls wait, so at most the others can
// be.
func TestStress(t *testing.T) {
	const maxQueue = 96
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "512", "--max-seqs", "32", "--max-queue", strconv.Itoa(maxQueue))
	const calls = 240
	type kind int
	const (
		normal kind = iota
		cancelMid
		shortDeadline
		neverFits
	)
	rng := rand.New(rand.NewPCG(7, 11))
	type call struct {
		kind kind
		req  *kvgatev1.GenerateRequest
	}
	plan := make([]call, calls)
	for i := range plan {
		c := call{kind: normal}
		switch p := rng.IntN(100); {
		case p < 20:
			c.kind = cancelMid
		case p < 30:
			c.kind = shortDeadline
		case p < 34:
			c.kind = neverFits
		}
		promptLen := 1 + rng.IntN(120)
		maxTokens := 1 + rng.IntN(150)
		if c.kind == neverFits {
			maxTokens = 512 - promptLen + 1 + rng.IntN(200)
		}
		c.req = &kvgatev1.GenerateRequest{
			Prompt:    tokenPrompt(rng, promptLen),
			MaxTokens: uint32(maxTokens),
			IgnoreEos: rng.IntN(2) == 0,
			Priority:  int32(rng.IntN(3)),
			Sampling:  &kvgatev1.SamplingParams{Temperature: float32(rng.IntN(2))},
		}
		plan[i] = c
	}

	var mu sync.Mutex
	outcomes := map[string]int{}
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i, c := range plan {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			// Only bounds a hang: a normal call that met this deadline
			// would count as an error.
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			if c.kind == shortDeadline {
				ctx, cancel = context.WithTimeout(ctx, time.Duration(20+i%300)*time.Millisecond)
				defer cancel()
			}
			outcome, err := runStressCall(ctx, cancel, s, c.req, c.kind == cancelMid)
			if err != nil {
				t.Errorf("call %d (kind %d): %v", i, c.kind, err)
				return
			}
			// Check the outcome fits the call.
			switch {
			case outcome == "INVALID_ARGUMENT" && c.kind != neverFits:
				t.Errorf("call %d: INVALID_ARGUMENT for a request that fits", i)
			case c.kind == neverFits && outcome != "INVALID_ARGUMENT":
				t.Errorf("call %d: a request that never fits ended %s", i, outcome)
			case outcome == "DEADLINE_EXCEEDED" && c.kind != shortDeadline:
				t.Errorf("call %d: DEADLINE_EXCEEDED without a short deadline", i)
			case outcome == "CANCELED" && c.kind != cancelMid:
				t.Errorf("call %d: CANCELED but it was not cancelled", i)
			}
			mu.Lock()
			outcomes[outcome]++
			mu.Unlock()
		}()
	}
	close(start)
	wg.Wait()
	t.Logf("outcomes of %d calls: %v", calls, outcomes)
	if full, most := outcomes["RESOURCE_EXHAUSTED/QUEUE_FULL"], calls-maxQueue-outcomes["INVALID_ARGUMENT"]; full > most {
		t.Errorf("%d calls refused QUEUE_FULL: more than the %d the queue of %d leaves", full, most, maxQueue)
	}
	if outcomes["finished"] == 0 {
		t.Error("no call finished")
	}

	st := waitQuiet(t, s)
	if st.GetNokvslotTotal() != 0 {
		t.Errorf("nokvslot_total = %d", st.GetNokvslotTotal())
	}
	t.Logf("after the storm: %v", st)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r := generateAll(ctx, s.Generate(), textPrompt("Once upon a time", 16))
	if r.err != nil || r.finished == nil {
		t.Fatalf("normal request after the stress: %+v", r)
	}
}

// runStressCall runs one call and names how it ended: "finished" or the
// status code. It returns an error for an outcome no client could act on.
func runStressCall(ctx context.Context, cancel context.CancelFunc, s *server, req *kvgatev1.GenerateRequest, cancelMid bool) (string, error) {
	stream, err := s.Generate().Generate(ctx, req)
	if err != nil {
		return classify(err)
	}
	chunks := 0
	cancelled := false
	var finished *kvgatev1.Finished
	for {
		resp, err := stream.Recv()
		if err != nil {
			if finished != nil && err.Error() == "EOF" {
				return "finished", nil
			}
			if finished != nil && cancelled && status.Code(err) == codes.Canceled {
				// The client cancelled after its second chunk, while the
				// end of the stream was already on its way.
				return "CANCELED", nil
			}
			if finished != nil {
				return "", fmt.Errorf("error after finished: %v", err)
			}
			return classify(err)
		}
		switch ev := resp.GetEvent().(type) {
		case *kvgatev1.GenerateResponse_Chunk:
			chunks++
			if cancelMid && chunks == 2 {
				cancel()
				cancelled = true
			}
		case *kvgatev1.GenerateResponse_Finished:
			finished = ev.Finished
			if got, want := finished.GetUsage().GetCompletionTokens(), req.GetMaxTokens(); req.GetIgnoreEos() && got != want {
				return "", fmt.Errorf("ignore_eos call generated %d tokens, want %d", got, want)
			}
		}
	}
}

func classify(err error) (string, error) {
	st, _ := status.FromError(err)
	switch st.Code() {
	case codes.ResourceExhausted:
		switch r := errorInfoReason(err); r {
		case "QUEUE_FULL", "KV_CELLS_EXHAUSTED", "QUEUE_TIMEOUT":
			return "RESOURCE_EXHAUSTED/" + r, nil
		default:
			return "", fmt.Errorf("RESOURCE_EXHAUSTED with reason %q: %v", r, err)
		}
	case codes.InvalidArgument:
		return "INVALID_ARGUMENT", nil
	case codes.DeadlineExceeded:
		return "DEADLINE_EXCEEDED", nil
	case codes.Canceled:
		return "CANCELED", nil
	}
	return "", fmt.Errorf("unexpected status: %v", err)
}

// TestBatchingIsReal holds 8 greedy requests in the queue behind a blocker,
// releases them together, and checks that the worker ran them in about as
// many steps as one stream needs, each with its solo output up to a
// near-tie (see sameOrTie: batching changes the last bits of the logits).
//
// The steps are counted from the moment every stream has its Started
// message, which the server sends once it has handed the sequence to the
// worker: from then on a worker that batches needs at most one stream's 64
// steps, however the handlers' goroutines were scheduled before (on a busy
// machine they join the worker several steps apart), while one that ran
// the streams one after another would need up to 8 x 64.
func TestBatchingIsReal(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "1024", "--max-seqs", "16")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	prompts := []string{"Once upon a time", "The cat sat", "Lily wanted", "One day, a big", "Tom and Sue", "The sun was", "A little bird", "Mom said"}
	const n = 64
	req := func(p string) *kvgatev1.GenerateRequest {
		r := textPrompt(p, n)
		r.IgnoreEos = true
		return r
	}
	solo := make([]streamResult, len(prompts))
	for i, p := range prompts {
		solo[i] = generateAll(ctx, s.Generate(), req(p))
		if solo[i].err != nil {
			t.Fatal(solo[i].err)
		}
	}
	// The blocker takes nearly every cell, so the 8 requests queue.
	blockCtx, unblock := context.WithCancel(ctx)
	defer unblock()
	blocker, err := s.Generate().Generate(blockCtx, &kvgatev1.GenerateRequest{
		Prompt: &kvgatev1.GenerateRequest_Text{Text: "Once"}, MaxTokens: 1000, IgnoreEos: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := blocker.Recv(); err != nil { // started: admitted
		t.Fatal(err)
	}
	got := make([]streamResult, len(prompts))
	var wg, running sync.WaitGroup
	for i, p := range prompts {
		wg.Add(1)
		running.Add(1)
		go func() {
			defer wg.Done()
			got[i] = generateStarted(ctx, s.Generate(), req(p), running.Done)
		}()
	}
	waitFor(t, 5*time.Minute, "8 queued requests", func() bool { return cacheStats(t, s).GetSequencesQueued() == 8 })
	before := cacheStats(t, s).GetDecodeStepsTotal()
	unblock()
	running.Wait() // every stream is with the worker (or ended: see generateStarted)
	joined := cacheStats(t, s).GetDecodeStepsTotal()
	wg.Wait()
	end := cacheStats(t, s).GetDecodeStepsTotal()
	steps, after := end-before, end-joined
	m, err := llama.LoadModel(testModel(t, "stories260K.gguf"), llama.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	equal := 0
	for i, p := range prompts {
		if got[i].err != nil {
			t.Fatalf("stream %d: %v", i, got[i].err)
		}
		prompt, err := m.Tokenize(p, true, true)
		if err != nil {
			t.Fatal(err)
		}
		if sameOrTie(ctx, t, m, prompt, fmt.Sprintf("stream %d", i), solo[i], got[i]) {
			equal++
		}
	}
	t.Logf("%d of %d batched streams equal their solo run token for token", equal, len(prompts))
	t.Logf("8 concurrent streams of %d tokens took %d decode steps, %d of them once all 8 were with the worker (one stream needs %d)", n, steps, after, n)
	// A stream handed to the worker while a step runs joins at the next
	// one, so the step in progress when the last Started arrived may count
	// too: n+1. Unbatched streams would take about 8n.
	if after > n+1 {
		t.Fatalf("%d decode steps after all 8 streams of %d tokens were with the worker: not batched", after, n)
	}
}

// generateStarted runs one Generate call to the end like generateAll, and
// calls started once, when the Started message arrives or the call ends
// without one.
func generateStarted(ctx context.Context, c kvgatev1.GenerateServiceClient, req *kvgatev1.GenerateRequest, started func()) streamResult {
	var once sync.Once
	defer once.Do(started)
	var r streamResult
	stream, err := c.Generate(ctx, req)
	if err != nil {
		r.err = err
		return r
	}
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return r
		}
		if err != nil {
			r.err = err
			return r
		}
		switch ev := resp.GetEvent().(type) {
		case *kvgatev1.GenerateResponse_Started:
			r.started = ev.Started
			once.Do(started)
		case *kvgatev1.GenerateResponse_Chunk:
			r.chunks = append(r.chunks, ev.Chunk)
		case *kvgatev1.GenerateResponse_Finished:
			r.finished = ev.Finished
		}
	}
}

// attemptRecorder is a client stats.Handler that records every attempt of
// a call (gRPC retries included) with its pushback trailer.
type attemptRecorder struct {
	mu       sync.Mutex
	attempts []attempt
}

type attempt struct {
	begin, end time.Time
	pushback   string
	err        error
}

func (a *attemptRecorder) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context {
	return ctx
}
func (a *attemptRecorder) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}
func (a *attemptRecorder) HandleConn(context.Context, stats.ConnStats) {}
func (a *attemptRecorder) HandleRPC(_ context.Context, s stats.RPCStats) {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch s := s.(type) {
	case *stats.Begin:
		a.attempts = append(a.attempts, attempt{begin: s.BeginTime})
	case *stats.InTrailer:
		if v := s.Trailer.Get("grpc-retry-pushback-ms"); len(v) > 0 {
			a.attempts[len(a.attempts)-1].pushback = v[0]
		}
	case *stats.End:
		a.attempts[len(a.attempts)-1].end = s.EndTime
		a.attempts[len(a.attempts)-1].err = s.Error
	}
}

func (a *attemptRecorder) snapshot() []attempt {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]attempt(nil), a.attempts...)
}

const retryServiceConfig = `{
  "methodConfig": [{
    "name": [{"service": "kvgate.v1.GenerateService", "method": "Generate"}],
    "retryPolicy": {
      "maxAttempts": 5,
      "initialBackoff": "0.05s",
      "maxBackoff": "2s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"]
    }
  }]
}`

// TestRetryWithPushback fills the pool, sends a request with gRPC's
// built-in retry policy, frees the cells after its first attempt is
// refused, and checks that the client succeeds on a retry that waited at
// least the server's grpc-retry-pushback-ms.
func TestRetryWithPushback(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "256", "--max-queue", "0")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	blockCtx, unblock := context.WithCancel(ctx)
	defer unblock()
	blocker, err := s.Generate().Generate(blockCtx, &kvgatev1.GenerateRequest{
		Prompt: &kvgatev1.GenerateRequest_Text{Text: "Once"}, MaxTokens: 240, IgnoreEos: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := blocker.Recv(); err != nil {
		t.Fatal(err)
	}

	rec := &attemptRecorder{}
	conn, err := grpc.NewClient(s.addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(retryServiceConfig),
		grpc.WithStatsHandler(rec))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	// Free the cells as soon as the first attempt has been refused.
	go func() {
		for ctx.Err() == nil {
			if a := rec.snapshot(); len(a) > 0 && !a[0].end.IsZero() {
				unblock()
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	var trailer metadata.MD
	r := generateAll(ctx, kvgatev1.NewGenerateServiceClient(conn), textPrompt("Once upon a time", 16), grpc.Trailer(&trailer))
	if r.err != nil || r.finished == nil {
		t.Fatalf("retried call failed: %v", r.err)
	}
	attempts := rec.snapshot()
	if len(attempts) < 2 {
		t.Fatalf("%d attempts: the first was not refused", len(attempts))
	}
	first := attempts[0]
	if st, _ := status.FromError(first.err); st.Code() != codes.ResourceExhausted {
		t.Fatalf("first attempt ended %v, want RESOURCE_EXHAUSTED", first.err)
	}
	pushback, err := strconv.Atoi(first.pushback)
	if err != nil || pushback <= 0 {
		t.Fatalf("first attempt's pushback trailer %q", first.pushback)
	}
	waited := attempts[1].begin.Sub(first.end)
	t.Logf("%d attempts; pushback %d ms; the retry waited %v", len(attempts), pushback, waited)
	if waited < time.Duration(pushback)*time.Millisecond {
		t.Fatalf("the retry waited %v, less than the pushback of %d ms", waited, pushback)
	}
	if len(r.chunks) == 0 || r.started == nil {
		t.Fatalf("retried call streamed nothing: %+v", r)
	}
}

// TestRefusalDetails checks the details of a RESOURCE_EXHAUSTED refusal:
// ErrorInfo with the cell counts, RetryInfo, the pushback trailer, and no
// message before the status. (TestRetryWithPushback shows the refusal is
// Trailers-Only: gRPC retries nothing else.)
func TestRefusalDetails(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "256", "--max-queue", "0")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	blocker, err := s.Generate().Generate(ctx, &kvgatev1.GenerateRequest{
		Prompt: &kvgatev1.GenerateRequest_Text{Text: "Once"}, MaxTokens: 240, IgnoreEos: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := blocker.Recv(); err != nil {
		t.Fatal(err)
	}
	var trailer metadata.MD
	r := generateAll(ctx, s.Generate(), textPrompt("Once upon a time", 100), grpc.Trailer(&trailer))
	st, _ := status.FromError(r.err)
	if st.Code() != codes.ResourceExhausted || r.started != nil {
		t.Fatalf("got %v, started %v; want RESOURCE_EXHAUSTED before any message", r.err, r.started)
	}
	var info *errdetails.ErrorInfo
	var retry *errdetails.RetryInfo
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			info = d
		case *errdetails.RetryInfo:
			retry = d
		}
	}
	if info == nil || info.GetReason() != "QUEUE_FULL" || info.GetMetadata()["cells_needed"] == "" || info.GetMetadata()["cells_free"] == "" {
		t.Fatalf("ErrorInfo = %v", info)
	}
	if retry == nil || retry.GetRetryDelay().AsDuration() <= 0 {
		t.Fatalf("RetryInfo = %v", retry)
	}
	pb := trailer.Get("grpc-retry-pushback-ms")
	if len(pb) != 1 || pb[0] != strconv.FormatInt(retry.GetRetryDelay().AsDuration().Milliseconds(), 10) {
		t.Fatalf("pushback trailer %v, RetryInfo %v", pb, retry.GetRetryDelay().AsDuration())
	}
}
