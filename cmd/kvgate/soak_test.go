package main

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/native/llama"
)

// soakRequests is the number of requests TestSoak sends:
// KVGATE_SOAK_REQUESTS, or 2,000 (the CI soak). scripts/soak.sh runs the
// longer one.
func soakRequests(t *testing.T) int {
	n := 2000
	if v := os.Getenv("KVGATE_SOAK_REQUESTS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			t.Fatalf("KVGATE_SOAK_REQUESTS=%q: want a positive count", v)
		}
	}
	return n
}

// soakKind is what one soak request tries.
type soakKind int

const (
	soakNormal    soakKind = iota
	soakCancel             // cancelled after its first chunk
	soakDeadline           // a deadline of 5 to 300 ms
	soakNeverFits          // prompt + max_tokens beyond any sequence
	soakHostile            // sampling values the API refuses (the old crashers and worse)
	soakExtreme            // the most extreme sampling values the API accepts
)

var soakKindNames = [...]string{"normal", "cancel", "deadline", "never-fits", "hostile", "extreme"}

// hostileSampling returns sampling parameters outside the documented
// ranges: each must be refused before it reaches llama.cpp.
func hostileSampling(r *rand.Rand) *kvgatev1.SamplingParams {
	nan, inf := float32(math.NaN()), float32(math.Inf(1))
	zero := float32(0)
	all := []*kvgatev1.SamplingParams{
		{Temperature: 1e-40},
		{RepetitionPenalty: 1e-45},
		{Temperature: 1, FrequencyPenalty: -3.4e38},
		{Temperature: 1, PresencePenalty: -3.4e38},
		{Temperature: nan},
		{Temperature: inf},
		{Temperature: 1, MinP: nan},
		{Temperature: 1, TopP: &zero},
		{Temperature: 1, RepetitionPenalty: 1.1, PenaltyLastN: 300_000_000},
		{Temperature: 1, PenaltyLastN: -5},
		{Temperature: 1, TopK: -1},
		{Temperature: 1, FrequencyPenalty: -2.5},
	}
	return all[r.IntN(len(all))]
}

// extremeSampling returns sampling parameters at the edges of the
// documented ranges: they must run (or end NO_VALID_TOKEN), never abort.
func extremeSampling(r *rand.Rand) *kvgatev1.SamplingParams {
	tiny := float32(math.SmallestNonzeroFloat32)
	one := float32(1)
	all := []*kvgatev1.SamplingParams{
		{Temperature: 0.001, RepetitionPenalty: 100, FrequencyPenalty: 2, PresencePenalty: 2, PenaltyLastN: 256},
		{Temperature: 100, RepetitionPenalty: 0.01, FrequencyPenalty: -2, PresencePenalty: -2},
		{Temperature: 0.001, MinP: 1, TopP: &one, TopK: 1},
		{Temperature: 1, TopP: &tiny, MinP: tiny},
		{Temperature: 0.001, TopK: math.MaxInt32, RepetitionPenalty: 0.01, PenaltyLastN: 512},
		{RepetitionPenalty: 100, FrequencyPenalty: -2, PresencePenalty: 2, PenaltyLastN: 512}, // greedy
	}
	p := all[r.IntN(len(all))]
	seed := r.Uint32()
	p.Seed = &seed
	return p
}

// TestSoak runs a soak at ten times the server's capacity: 80 concurrent
// clients of two tenants against 8 running sequences, mixing cancels,
// deadlines, requests that never fit and hostile sampling values. Each call
// must end with a status that fits it. Afterwards the process is alive,
// llama_decode never reported NoKvSlot, no cell is live, the queue is
// empty, and greedy output equals a fresh server's.
// It runs under both admission policies.
func TestSoak(t *testing.T) {
	for _, policy := range []string{"reserve", "optimistic"} {
		t.Run(policy, func(t *testing.T) { soak(t, policy) })
	}
}

func soak(t *testing.T, policy string) {
	total := soakRequests(t)
	model := testModel(t, "stories260K.gguf")
	tokens := writeTokens(t, "tok-a team-a weight=2", "tok-b team-b max-share=0.6")
	args := []string{"--model", model, "--ctx", "512", "--max-seqs", "8", "--max-queue", "64", "--admission", policy,
		"--auth-tokens", tokens, "--metrics-listen", "127.0.0.1:0",
		// Conversations and embedding calls run beside the rest (issue 14).
		"--chat-template", "chatml", "--embedding-model", testModel(t, "all-MiniLM-L6-v2-Q4_K_M.gguf"),
		"--embedding-max-queue", "8", "--embedding-max-inputs", "16"}
	s := startServer(t, args...)
	s.token = "tok-a"
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()

	const workers = 80
	var next, retries atomic.Int64
	var mu sync.Mutex
	outcomes := map[string]int{}
	var wg sync.WaitGroup
	start := time.Now()
	for w := range soakEmbedClients {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 77))
			c := kvgatev1.NewEmbeddingServiceClient(s.conn)
			for i := 0; i < total/20/soakEmbedClients && !t.Failed(); i++ {
				hostile, req := soakEmbedRequest(rng)
				cctx, ccancel := context.WithTimeout(withToken(ctx, "tok-b"), 5*time.Minute)
				resp, err := c.Embed(cctx, req)
				ccancel()
				outcome, err := checkSoakEmbed(hostile, req, resp, err)
				if err != nil {
					t.Errorf("embed call %d (hostile %v): %v", i, hostile, err)
					return
				}
				mu.Lock()
				outcomes["embed"+map[bool]string{false: "", true: " hostile"}[hostile]+" → "+outcome]++
				mu.Unlock()
			}
		})
	}
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 99))
			tok := "tok-a"
			if w%2 == 1 {
				tok = "tok-b"
			}
			for {
				i := next.Add(1) - 1
				if i >= int64(total) || t.Failed() {
					return
				}
				kind, req := soakRequest(rng)
				// A client backs off and retries a refusal for load, as
				// gRPC's retry policy would, up to 20 attempts.
				var outcome string
				var err error
				for attempt := 0; ; attempt++ {
					// Only bounds a hang: DEADLINE_EXCEEDED is an error
					// for every call but the short-deadline ones.
					cctx, ccancel := context.WithTimeout(withToken(ctx, tok), 10*time.Minute)
					if kind == soakDeadline {
						cctx, ccancel = context.WithTimeout(withToken(ctx, tok), time.Duration(5+rng.IntN(296))*time.Millisecond)
					}
					outcome, err = runStressCall(cctx, ccancel, s, req, kind == soakCancel)
					ccancel()
					if err != nil || !strings.HasPrefix(outcome, "RESOURCE_EXHAUSTED/") || attempt == 19 {
						break
					}
					retries.Add(1)
					time.Sleep(time.Duration(5+rng.IntN(20)) * time.Millisecond)
				}
				if err == nil {
					err = checkSoakOutcome(kind, outcome)
				}
				if err != nil {
					t.Errorf("request %d (%s, tenant %s): %v", i, soakKindNames[kind], tok, err)
					return
				}
				mu.Lock()
				name := soakKindNames[kind]
				if req.GetMessages() != nil {
					name += " chat"
				}
				outcomes[name+" → "+outcome]++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	keys := make([]string, 0, len(outcomes))
	for k := range outcomes {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		t.Logf("%6d  %s", outcomes[k], k)
	}
	select {
	case <-s.done:
		t.Fatalf("the server exited during the soak: %v\n%s", s.err, s.Logs())
	default:
	}
	st := waitQuiet(t, s)
	fams := scrape(t, s)
	t.Logf("%d requests (%d retries after a refusal) in %v; admitted %d, preemptions %d, decode steps %d, generated %d, handler panics %v",
		total, retries.Load(), elapsed.Round(time.Millisecond), st.GetAdmittedTotal(), st.GetPreemptionsTotal(), st.GetDecodeStepsTotal(),
		st.GetGeneratedTokensTotal(), metricValue(fams, "kvgate_handler_panics_total"))
	if st.GetNokvslotTotal() != 0 {
		t.Errorf("NoKvSlot %d", st.GetNokvslotTotal())
	}
	// Requests too long for any sequence are refused by the allocator, so
	// they are counted as NEVER_FITS.
	if got, want := st.GetRejectedTotal()["NEVER_FITS"], uint64(outcomes["never-fits → INVALID_ARGUMENT"]); got != want || want == 0 {
		t.Errorf("rejected_total{NEVER_FITS} = %d, want %d", got, want)
	}
	if live := int64(st.GetCellsUsed()) - int64(st.GetCellsCached()) + int64(st.GetCellsReserved()); live != 0 || st.GetSequencesRunning() != 0 || st.GetSequencesQueued() != 0 {
		t.Errorf("after the soak: %d live cells, %d running, %d queued", live, st.GetSequencesRunning(), st.GetSequencesQueued())
	}
	if n := metricValue(fams, "kvgate_handler_panics_total"); n != 0 {
		t.Errorf("%v handler panics", n)
	}
	if outcomes["normal chat → finished"] == 0 || outcomes["hostile chat → INVALID_ARGUMENT"] == 0 {
		t.Errorf("no conversation finished, or none was refused: the soak did not exercise them")
	}
	es, err := kvgatev1.NewEmbeddingServiceClient(s.conn).GetEmbeddingStats(withToken(ctx, "tok-a"), &kvgatev1.GetEmbeddingStatsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("embedding: %d requests, %d inputs, %d encode calls, refused %v", es.GetRequestsTotal(), es.GetInputsTotal(), es.GetEncodeCallsTotal(), es.GetRejectedTotal())
	if es.GetRequestsQueued() != 0 || es.GetRequestsTotal() == 0 {
		t.Errorf("after the soak: %d embedding requests queued, %d served", es.GetRequestsQueued(), es.GetRequestsTotal())
	}

	// Greedy output equals a fresh server's.
	fresh := startServer(t, args...)
	m, err := llama.LoadModel(model, llama.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for i, prompt := range [][]int32{{1, 400, 50, 300, 7}, {1, 22, 33, 44}, {1, 99, 98, 97, 96, 95}} {
		req := &kvgatev1.GenerateRequest{
			Prompt: &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: prompt}}, MaxTokens: 64, SkipPrefixCache: true,
		}
		got := generateAll(withToken(ctx, "tok-a"), s.Generate(), req)
		want := generateAll(withToken(ctx, "tok-a"), fresh.Generate(), req)
		if got.err != nil || want.err != nil {
			t.Fatalf("greedy check %d: soaked %v, fresh %v", i, got.err, want.err)
		}
		sameOrTie(ctx, t, m, prompt, fmt.Sprintf("greedy check %d", i), want, got)
	}
}

// soakRequest draws one soak request.
func soakRequest(r *rand.Rand) (soakKind, *kvgatev1.GenerateRequest) {
	kind := soakNormal
	switch p := r.IntN(100); {
	case p < 12:
		kind = soakCancel
	case p < 24:
		kind = soakDeadline
	case p < 30:
		kind = soakNeverFits
	case p < 42:
		kind = soakHostile
	case p < 54:
		kind = soakExtreme
	}
	promptLen := 1 + r.IntN(80)
	maxTokens := 1 + r.IntN(96)
	if kind == soakNeverFits {
		maxTokens = 512 - promptLen + 1 + r.IntN(100)
	}
	req := &kvgatev1.GenerateRequest{
		Prompt:    tokenPrompt(r, promptLen),
		MaxTokens: uint32(maxTokens),
		IgnoreEos: r.IntN(2) == 0,
		Priority:  int32(r.IntN(3)),
		// A few cache partitions, so that prefixes are shared within and
		// never across them.
		CacheSalt: [...]string{"", "", "salt-1", "salt-2"}[r.IntN(4)],
	}
	if kind == soakNormal && r.IntN(20) == 0 {
		req.MaxTokens, req.IgnoreEos = 0, false // the server's default_max_tokens
	}
	if kind != soakNeverFits && r.IntN(5) == 0 {
		req.Prompt = &kvgatev1.GenerateRequest_Messages{Messages: &kvgatev1.ChatMessages{Messages: soakConversation(r)}}
		req.ContextOverflow = kvgatev1.ContextOverflow(r.IntN(3))
	}
	switch kind {
	case soakHostile:
		switch r.IntN(6) {
		case 0:
			req.CacheSalt = strings.Repeat("s", 257+r.IntN(1000)) // over its 256-byte bound
			return kind, req
		case 1:
			hostileConversation(r, req)
			return kind, req
		case 2:
			hostileStructured(r, req)
			return kind, req
		}
		req.Sampling = hostileSampling(r)
	case soakExtreme:
		req.Sampling = extremeSampling(r)
	default:
		if r.IntN(2) == 0 {
			seed := r.Uint32()
			req.Sampling = &kvgatev1.SamplingParams{Temperature: 0.8, TopK: 40, Seed: &seed}
		}
		if kind != soakNeverFits && r.IntN(3) == 0 {
			soakStructured(r, req)
		}
	}
	return kind, req
}

// soakSchema is the JSON Schema of soak requests with a json_schema.
const soakSchema = `{"type":"object","properties":{"name":{"type":"string","maxLength":8},"n":{"type":"integer"},"ok":{"type":"boolean"}},"required":["name"]}`

// soakStructured gives a valid request one of issue 15's features: a
// grammar, a JSON Schema, logprobs, a logit bias, stop token ids or n
// samples.
func soakStructured(r *rand.Rand, req *kvgatev1.GenerateRequest) {
	switch r.IntN(6) {
	case 0:
		req.Constraint = &kvgatev1.GenerateRequest_Grammar{Grammar: `root ::= ("yes" | "no" | [a-z]{1,8}) "."`}
		req.IgnoreEos = false // the grammar's end is an end of generation
	case 1:
		req.Constraint = &kvgatev1.GenerateRequest_JsonSchema{JsonSchema: soakSchema}
		req.IgnoreEos = false
	case 2:
		top := uint32(r.IntN(21))
		req.Logprobs = &top
	case 3:
		req.LogitBias = map[int32]float32{int32(3 + r.IntN(509)): float32(math.Inf(-1)), int32(3 + r.IntN(509)): float32(r.IntN(20) - 10)}
	case 4:
		req.StopTokenIds = []int32{int32(3 + r.IntN(509))}
		req.IgnoreEos = false // a stop token ends it early
	case 5:
		req.N = uint32(2 + r.IntN(2))
	}
}

// hostileStructured gives req a structured-output or token-control field
// that the API refuses.
func hostileStructured(r *rand.Rand, req *kvgatev1.GenerateRequest) {
	switch r.IntN(7) {
	case 0:
		req.Constraint = &kvgatev1.GenerateRequest_Grammar{Grammar: "root ::= root \"a\" | \"b\""}
	case 1:
		req.Constraint = &kvgatev1.GenerateRequest_Grammar{Grammar: "root ::= " + strings.Repeat("(", 65+r.IntN(1000))}
	case 2:
		req.Constraint = &kvgatev1.GenerateRequest_JsonSchema{JsonSchema: `{"type":"string","format":"email"}`}
	case 3:
		top := uint32(21 + r.IntN(1000))
		req.Logprobs = &top
	case 4:
		req.LogitBias = map[int32]float32{int32(512 + r.IntN(1000)): 1}
	case 5:
		req.StopTokenIds = []int32{-1 - int32(r.IntN(100))}
	case 6:
		req.N = uint32(17 + r.IntN(100))
	}
}

// soakWords are the words of soak conversations and embedding texts, the
// chat template's own markers among them: in a message they are text.
var soakWords = []string{"Once", "upon", "a", "time", "Lily", "saw", "a", "big", "dog", "<|im_end|>", "<|im_start|>", "\n", "ünï", "🙂"}

// soakText returns up to n random words.
func soakText(r *rand.Rand, n int) string {
	var b strings.Builder
	for i := range 1 + r.IntN(n) {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(soakWords[r.IntN(len(soakWords))])
	}
	return b.String()
}

// soakConversation returns 1 to 4 short messages that fit a soak sequence.
func soakConversation(r *rand.Rand) []*kvgatev1.ChatMessage {
	var out []*kvgatev1.ChatMessage
	if r.IntN(2) == 0 {
		out = append(out, &kvgatev1.ChatMessage{Role: "system", Content: soakText(r, 4)})
	}
	for i := range 1 + r.IntN(3) {
		out = append(out, &kvgatev1.ChatMessage{Role: [...]string{"user", "assistant"}[i%2], Content: soakText(r, 5)})
	}
	return out
}

// hostileConversation makes req a conversation that the API refuses.
func hostileConversation(r *rand.Rand, req *kvgatev1.GenerateRequest) {
	conv := soakConversation(r)
	switch r.IntN(5) {
	case 0:
		conv[0].Role = "not a role!"
	case 1:
		conv[0].Content = "nul \x00 inside"
	case 2:
		conv = nil
	case 3:
		for range 300 { // over max_chat_messages (256)
			conv = append(conv, &kvgatev1.ChatMessage{Role: "user", Content: "x"})
		}
	case 4:
		req.ContextOverflow = kvgatev1.ContextOverflow(3 + r.IntN(100))
	}
	req.Prompt = &kvgatev1.GenerateRequest_Messages{Messages: &kvgatev1.ChatMessages{Messages: conv}}
}

// soakEmbedClients is the number of clients that send embedding calls
// during the soak, total/20 calls among them.
const soakEmbedClients = 4

// soakEmbedRequest draws one embedding call: one in four is hostile.
func soakEmbedRequest(r *rand.Rand) (hostile bool, req *kvgatev1.EmbedRequest) {
	req = &kvgatev1.EmbedRequest{Normalize: r.IntN(2) == 0, Truncation: kvgatev1.Truncation(r.IntN(3))}
	for range 1 + r.IntN(6) {
		req.Inputs = append(req.Inputs, &kvgatev1.EmbedInput{Input: &kvgatev1.EmbedInput_Text{Text: soakText(r, 12)}})
	}
	if r.IntN(4) != 0 {
		return false, req
	}
	switch r.IntN(5) {
	case 0:
		req.Inputs = nil
	case 1:
		req.Inputs[0].Input = &kvgatev1.EmbedInput_Text{Text: ""}
	case 2:
		req.Inputs[0].Input = &kvgatev1.EmbedInput_Tokens{Tokens: &kvgatev1.TokenList{Ids: []int32{101, -5, 1 << 30}}}
	case 3:
		for range 17 { // over --embedding-max-inputs
			req.Inputs = append(req.Inputs, req.Inputs[0])
		}
	case 4:
		req.Truncation = kvgatev1.Truncation(3 + r.IntN(100))
	}
	return true, req
}

// checkSoakEmbed reports an embedding call's outcome that does not fit it.
func checkSoakEmbed(hostile bool, req *kvgatev1.EmbedRequest, resp *kvgatev1.EmbedResponse, err error) (string, error) {
	if err == nil {
		if hostile {
			return "", fmt.Errorf("a hostile call succeeded")
		}
		if n := len(resp.GetEmbeddings()); n != len(req.GetInputs()) {
			return "", fmt.Errorf("%d embeddings for %d inputs", n, len(req.GetInputs()))
		}
		for i, e := range resp.GetEmbeddings() {
			if len(e.GetValues()) != 384 {
				return "", fmt.Errorf("embedding %d has %d values", i, len(e.GetValues()))
			}
		}
		return "OK", nil
	}
	outcome, cerr := classify(err)
	switch {
	case cerr != nil:
		return "", cerr
	case outcome == "INVALID_ARGUMENT" && !hostile:
		return "", fmt.Errorf("INVALID_ARGUMENT for a valid call: %v", err)
	case strings.HasPrefix(outcome, "RESOURCE_EXHAUSTED/") && hostile:
		return "", fmt.Errorf("%s for a call that can never run", outcome)
	case outcome != "INVALID_ARGUMENT" && !strings.HasPrefix(outcome, "RESOURCE_EXHAUSTED/"):
		return "", fmt.Errorf("unexpected %s: %v", outcome, err)
	}
	return outcome, nil
}

// checkSoakOutcome reports an outcome that does not fit the request.
func checkSoakOutcome(kind soakKind, outcome string) error {
	switch outcome {
	case "finished":
		if kind == soakNeverFits || kind == soakHostile {
			return fmt.Errorf("finished, but the request is invalid")
		}
	case "INVALID_ARGUMENT":
		if kind != soakNeverFits && kind != soakHostile && kind != soakExtreme {
			return fmt.Errorf("INVALID_ARGUMENT for a valid request")
		}
	case "DEADLINE_EXCEEDED":
		if kind != soakDeadline {
			return fmt.Errorf("DEADLINE_EXCEEDED without a short deadline")
		}
	case "CANCELED":
		if kind != soakCancel {
			return fmt.Errorf("CANCELLED, but the client did not cancel")
		}
	case "RESOURCE_EXHAUSTED/QUEUE_FULL", "RESOURCE_EXHAUSTED/KV_CELLS_EXHAUSTED", "RESOURCE_EXHAUSTED/QUEUE_TIMEOUT":
		if kind == soakNeverFits || kind == soakHostile {
			return fmt.Errorf("%s for a request that can never run", outcome)
		}
	default:
		return fmt.Errorf("unexpected outcome %s", outcome)
	}
	return nil
}
