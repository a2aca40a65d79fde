package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// The end-to-end tests of structured output and token control (issue 15),
// on stories260K over a real server process.

// storyPrompt is the prompt of these tests.
const storyPrompt = "Once upon a time"

func seeded(req *kvgatev1.GenerateRequest, temperature float32, seed uint32) *kvgatev1.GenerateRequest {
	req.Sampling = &kvgatev1.SamplingParams{Temperature: temperature, Seed: &seed}
	return req
}

// TestGrammarEndToEnd checks GBNF grammars over gRPC: a yes/no grammar
// yields exactly "yes" or "no" across 20 seeds at temperature 1, the JSON
// object constraint yields text encoding/json parses, and an unparsable and
// an over-size grammar each get INVALID_ARGUMENT naming the field while the
// server keeps serving.
func TestGrammarEndToEnd(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "8192")
	c := s.Generate()
	ctx := t.Context()

	t.Run("yes or no", func(t *testing.T) {
		for seed := range uint32(20) {
			req := seeded(textPrompt(storyPrompt, 16), 1, seed)
			req.Constraint = &kvgatev1.GenerateRequest_Grammar{Grammar: `root ::= "yes" | "no"`}
			r := generateAll(ctx, c, req)
			if r.err != nil {
				t.Fatalf("seed %d: %v", seed, r.err)
			}
			if got := r.text(); got != "yes" && got != "no" {
				t.Fatalf("seed %d: %q", seed, got)
			}
			if r.finished.GetReason() != kvgatev1.FinishReason_FINISH_REASON_EOS {
				t.Errorf("seed %d: finished %v, want EOS once the grammar is complete", seed, r.finished.GetReason())
			}
		}
		// Every token of the 20 calls was drawn under the grammar; a story
		// model's first draws are rarely "y" or "n", so some were misses.
		st := cacheStats(t, s)
		if st.GetGrammarTokensTotal() < 20*2 || st.GetGrammarResamplesTotal() == 0 || st.GetGrammarResamplesTotal() > st.GetGrammarTokensTotal() {
			t.Errorf("grammar counters: %d tokens, %d resamples", st.GetGrammarTokensTotal(), st.GetGrammarResamplesTotal())
		}
	})

	t.Run("JSON object grammar", func(t *testing.T) {
		// A GBNF grammar of JSON objects of up to three members whose
		// values are strings, integers or such objects again.
		const objects = `root ::= object
object ::= "{" ws (member ("," ws member){0,2})? "}" ws
member ::= string ":" ws value
value ::= string | [0-9]{1,6} ws | object
string ::= "\"" [a-zA-Z ]{0,12} "\"" ws
ws ::= [ \n]?`
		for seed := range uint32(10) {
			req := seeded(textPrompt(storyPrompt, 2000), 1, seed)
			req.Constraint = &kvgatev1.GenerateRequest_Grammar{Grammar: objects}
			checkJSONObject(t, seed, generateAll(ctx, c, req))
		}
	})

	t.Run("JSON object constraint", func(t *testing.T) {
		// json.object_only admits objects and strings of any size, and
		// stories260K at temperature 1 rarely closes either: a bias
		// towards '"' and '}' (an ordinary use of logit_bias) makes it
		// finish within max_tokens. The grammar still decides what is
		// valid.
		tok, err := c.Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: `"}`})
		if err != nil || len(tok.GetIds()) == 0 {
			t.Fatalf("tokenize: %v %v", tok, err)
		}
		bias := map[int32]float32{}
		for _, id := range tok.GetIds() {
			if id > 2 { // not BOS or EOS
				bias[id] = 4
			}
		}
		for seed := range uint32(10) {
			req := seeded(textPrompt(storyPrompt, 2000), 1, seed)
			req.Constraint = &kvgatev1.GenerateRequest_Json{Json: &kvgatev1.JSONConstraint{ObjectOnly: true}}
			req.LogitBias = bias
			checkJSONObject(t, seed, generateAll(ctx, c, req))
		}
	})

	t.Run("refused", func(t *testing.T) {
		huge := "root ::= " + strings.Repeat(`"a" `, 70000)
		for _, tc := range []struct{ name, gbnf string }{
			{"unparsable", `root ::= "unterminated`},
			{"undefined rule", `root ::= missing`},
			{"left recursion", "root ::= root \"a\" | \"b\""},
			{"over-size", huge},
			{"huge repetition", `root ::= "a"{5000}`}, {"token outside the vocabulary", `root ::= <[9999]>`}, {"deep nesting", "root ::= " + strings.Repeat("(", 100) + `"a"` + strings.Repeat(")", 100)},
		} {
			req := textPrompt(storyPrompt, 8)
			req.Constraint = &kvgatev1.GenerateRequest_Grammar{Grammar: tc.gbnf}
			r := generateAll(ctx, c, req)
			if status.Code(r.err) != codes.InvalidArgument || !slices.Contains(violationFields(r.err), "grammar") {
				t.Errorf("%s: %v (fields %v), want INVALID_ARGUMENT on grammar", tc.name, r.err, violationFields(r.err))
				continue
			}
			t.Logf("%s: %v", tc.name, status.Convert(r.err).Message())
		}
		if r := generateAll(ctx, c, textPrompt(storyPrompt, 8)); r.err != nil || r.finished == nil {
			t.Fatalf("the server stopped serving: %v", r.err)
		}
	})
}

// checkJSONObject checks that r ended at its grammar's end with a JSON
// object that encoding/json parses.
func checkJSONObject(t *testing.T, seed uint32, r streamResult) {
	t.Helper()
	if r.err != nil {
		t.Fatalf("seed %d: %v", seed, r.err)
	}
	var v map[string]any
	if err := json.Unmarshal([]byte(r.text()), &v); err != nil || r.finished.GetReason() != kvgatev1.FinishReason_FINISH_REASON_EOS {
		t.Fatalf("seed %d: %q (%v, %v): %v", seed, r.text(), r.finished.GetReason(), r.finished.GetUsage(), err)
	}
	t.Logf("seed %d: an object of %d members in %d tokens", seed, len(v), r.finished.GetUsage().GetCompletionTokens())
}

// schemaFiles returns the JSON Schema test suite of internal/grammar.
func schemaFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob("../../internal/grammar/testdata/schemas/*.json")
	if err != nil || len(files) < 30 {
		t.Fatalf("the schema suite has %d files (%v), want at least 30", len(files), err)
	}
	return files
}

// TestJSONSchemaEndToEnd samples 10 outputs (temperature 1, seeds 0 to 9)
// for every schema of the suite and checks that each validates against its
// schema with santhosh-tekuri/jsonschema; and that schemas outside the
// supported subset are refused with INVALID_ARGUMENT naming the keyword.
func TestJSONSchemaEndToEnd(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "8192", "--max-seqs", "16")
	c := s.Generate()
	ctx := t.Context()
	files := schemaFiles(t)
	type job struct {
		file string
		seed uint32
	}
	jobs := make(chan job)
	var wg sync.WaitGroup
	var mu sync.Mutex
	failures := 0
	for range 8 {
		wg.Go(func() {
			for j := range jobs {
				if err := sampleSchema(ctx, c, j.file, j.seed); err != nil {
					mu.Lock()
					failures++
					t.Errorf("%s seed %d: %v", filepath.Base(j.file), j.seed, err)
					mu.Unlock()
				}
			}
		})
	}
	for _, f := range files {
		for seed := range uint32(10) {
			jobs <- job{f, seed}
		}
	}
	close(jobs)
	wg.Wait()
	t.Logf("%d schemas x 10 samples, %d failures", len(files), failures)

	t.Run("unsupported keywords", func(t *testing.T) {
		for _, kw := range []struct{ keyword, schema string }{
			{"pattern", `{"type":"string","pattern":"^a+$"}`},
			{"format", `{"type":"string","format":"email"}`},
			{"minimum", `{"type":"integer","minimum":3}`},
			{"allOf", `{"allOf":[{"type":"string"}]}`},
			{"not", `{"not":{"type":"string"}}`},
			{"patternProperties", `{"type":"object","patternProperties":{"^x":{"type":"string"}}}`},
		} {
			req := textPrompt(storyPrompt, 8)
			req.Constraint = &kvgatev1.GenerateRequest_JsonSchema{JsonSchema: kw.schema}
			r := generateAll(ctx, c, req)
			msg := status.Convert(r.err).Message()
			if status.Code(r.err) != codes.InvalidArgument || !slices.Contains(violationFields(r.err), "json_schema") || !strings.Contains(msg, kw.keyword) {
				t.Errorf("%s: %v (fields %v), want INVALID_ARGUMENT on json_schema naming it", kw.keyword, r.err, violationFields(r.err))
			}
		}
		for _, bad := range []string{`{`, `{"type":"strin"}`, `[1,2]`} {
			req := textPrompt(storyPrompt, 8)
			req.Constraint = &kvgatev1.GenerateRequest_JsonSchema{JsonSchema: bad}
			if r := generateAll(ctx, c, req); status.Code(r.err) != codes.InvalidArgument {
				t.Errorf("schema %s: %v, want INVALID_ARGUMENT", bad, r.err)
			}
		}
	})
}

// sampleSchema draws one output for the schema in file and validates it.
func sampleSchema(ctx context.Context, c kvgatev1.GenerateServiceClient, file string, seed uint32) error {
	raw, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(string(raw)))
	if err != nil {
		return err
	}
	comp := jsonschema.NewCompiler()
	if err := comp.AddResource("schema.json", doc); err != nil {
		return err
	}
	sch, err := comp.Compile("schema.json")
	if err != nil {
		return err
	}
	req := seeded(textPrompt(storyPrompt, 1500), 1, seed)
	req.Constraint = &kvgatev1.GenerateRequest_JsonSchema{JsonSchema: string(raw)}
	r := generateAll(ctx, c, req)
	if r.err != nil {
		return r.err
	}
	if r.finished.GetReason() != kvgatev1.FinishReason_FINISH_REASON_EOS {
		return fmt.Errorf("finished %v after %d tokens, not at the grammar's end: %q", r.finished.GetReason(), r.finished.GetUsage().GetCompletionTokens(), r.text())
	}
	v, err := jsonschema.UnmarshalJSON(strings.NewReader(r.text()))
	if err != nil {
		return fmt.Errorf("output %q is not JSON: %w", r.text(), err)
	}
	if err := sch.Validate(v); err != nil {
		return fmt.Errorf("output %q does not validate: %w", r.text(), err)
	}
	return nil
}

// TestTokenControlEndToEnd checks logprobs, logit bias and stop token ids
// over gRPC: the top-1 alternative is the greedy token, logprobs are at
// most 0 and sorted; a banned token never appears in 1,000 sampled tokens;
// a bias computed from the logprobs of the two most likely first tokens
// makes the runner-up the greedy choice; a stop token id ends generation
// unstreamed; and bad values are refused naming the field.
func TestTokenControlEndToEnd(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "2048")
	c := s.Generate()
	ctx := t.Context()
	five := uint32(5)
	greedy := textPrompt(storyPrompt, 32)
	greedy.Logprobs = &five
	g := generateAll(ctx, c, greedy)
	if g.err != nil {
		t.Fatal(g.err)
	}
	ids := g.ids()
	var lps []*kvgatev1.TokenLogprob
	for _, ch := range g.chunks {
		if len(ch.GetLogprobs()) != len(ch.GetTokenIds()) {
			t.Fatalf("chunk with %d tokens and %d logprobs", len(ch.GetTokenIds()), len(ch.GetLogprobs()))
		}
		lps = append(lps, ch.GetLogprobs()...)
	}
	if len(ids) < 10 {
		t.Fatalf("only %d tokens", len(ids))
	}

	t.Run("logprobs", func(t *testing.T) {
		for i, lp := range lps {
			top := lp.GetTop()
			if lp.GetTokenId() != ids[i] || len(top) != 5 || top[0].GetTokenId() != ids[i] || lp.GetLogprob() > 0 {
				t.Fatalf("token %d (%d): %v", i, ids[i], lp)
			}
			if lp.GetLogprob() != top[0].GetLogprob() {
				t.Errorf("token %d: logprob %v, top-1 %v", i, lp.GetLogprob(), top[0].GetLogprob())
			}
			for k := 1; k < len(top); k++ {
				if top[k].GetLogprob() > top[k-1].GetLogprob() || top[k].GetLogprob() > 0 {
					t.Fatalf("token %d: alternatives not sorted: %v", i, top)
				}
			}
			if len(top[0].GetText()) == 0 {
				t.Errorf("token %d: top-1 without text", i)
			}
		}
	})

	t.Run("a positive bias changes the greedy choice", func(t *testing.T) {
		top := lps[0].GetTop()
		// Raw logprobs differ by exactly the logits' difference.
		gap := top[0].GetLogprob() - top[1].GetLogprob()
		req := textPrompt(storyPrompt, 1)
		req.LogitBias = map[int32]float32{top[1].GetTokenId(): gap + 0.5}
		r := generateAll(ctx, c, req)
		if r.err != nil || len(r.ids()) != 1 || r.ids()[0] != top[1].GetTokenId() {
			t.Fatalf("with a bias of %v on %d: %v %v (greedy without: %d)", gap+0.5, top[1].GetTokenId(), r.ids(), r.err, top[0].GetTokenId())
		}
	})

	t.Run("a banned token never appears", func(t *testing.T) {
		ban := ids[0] // the most likely first token
		seen := 0
		for seed := range uint32(10) {
			req := seeded(textPrompt(storyPrompt, 100), 1, seed)
			req.IgnoreEos = true
			req.LogitBias = map[int32]float32{ban: float32(math.Inf(-1))}
			r := generateAll(ctx, c, req)
			if r.err != nil {
				t.Fatal(r.err)
			}
			if slices.Contains(r.ids(), ban) {
				t.Fatalf("seed %d: banned token %d in %v", seed, ban, r.ids())
			}
			seen += len(r.ids())
		}
		if seen != 1000 {
			t.Fatalf("%d tokens sampled, want 1000", seen)
		}
	})

	t.Run("a stop token ends generation unstreamed", func(t *testing.T) {
		stop := ids[6]
		req := textPrompt(storyPrompt, 32)
		req.StopTokenIds = []int32{stop}
		r := generateAll(ctx, c, req)
		want := ids[:slices.Index(ids, stop)]
		if r.err != nil || !slices.Equal(r.ids(), want) {
			t.Fatalf("streamed %v (%v), want %v", r.ids(), r.err, want)
		}
		if r.finished.GetReason() != kvgatev1.FinishReason_FINISH_REASON_STOP || r.finished.StopToken == nil || r.finished.GetStopToken() != stop {
			t.Fatalf("finished %v, want STOP on %d", r.finished, stop)
		}
	})

	t.Run("bad values", func(t *testing.T) {
		big := uint32(21)
		for _, tc := range []struct {
			field string
			edit  func(*kvgatev1.GenerateRequest)
		}{
			{"logprobs", func(r *kvgatev1.GenerateRequest) { r.Logprobs = &big }},
			{"logit_bias[512]", func(r *kvgatev1.GenerateRequest) { r.LogitBias = map[int32]float32{512: 1} }},
			{"logit_bias[-1]", func(r *kvgatev1.GenerateRequest) { r.LogitBias = map[int32]float32{-1: 1} }},
			{"logit_bias[3]", func(r *kvgatev1.GenerateRequest) { r.LogitBias = map[int32]float32{3: float32(math.NaN())} }},
			{"logit_bias[4]", func(r *kvgatev1.GenerateRequest) { r.LogitBias = map[int32]float32{4: float32(math.Inf(1))} }},
			{"logit_bias[5]", func(r *kvgatev1.GenerateRequest) { r.LogitBias = map[int32]float32{5: 101} }},
			{"stop_token_ids[1]", func(r *kvgatev1.GenerateRequest) { r.StopTokenIds = []int32{3, 9999} }},
			{"n", func(r *kvgatev1.GenerateRequest) { r.N = 1000 }},
		} {
			req := textPrompt(storyPrompt, 8)
			tc.edit(req)
			r := generateAll(ctx, c, req)
			if status.Code(r.err) != codes.InvalidArgument || !slices.Contains(violationFields(r.err), tc.field) {
				t.Errorf("%s: %v (fields %v), want INVALID_ARGUMENT on it", tc.field, r.err, violationFields(r.err))
			}
		}
		if r := generateAll(ctx, c, textPrompt(storyPrompt, 8)); r.err != nil {
			t.Fatal(errors.Join(errors.New("the server stopped serving"), r.err))
		}
	})
}

// TestSamplesEndToEnd checks n over gRPC on stories260K: n = 4 with a seed
// gives 4 different completions that a second call reproduces, each with
// its own Finished, in index order, after every chunk; the prompt is
// prefilled once (prefill_tokens_total grows by the prompt, not 4 times
// it); admission counts the prompt's cells once (a prompt + 4 * max_tokens
// that fits the pool only that way is admitted); and an n whose cells can
// never fit gets INVALID_ARGUMENT naming n.
func TestSamplesEndToEnd(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "512", "--max-seqs", "8")
	c := s.Generate()
	ctx := t.Context()

	run := func(req *kvgatev1.GenerateRequest) (map[uint32][]int32, []*kvgatev1.Finished) {
		t.Helper()
		stream, err := c.Generate(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		ids := map[uint32][]int32{}
		var fin []*kvgatev1.Finished
		for {
			resp, err := stream.Recv()
			if err != nil {
				if status.Code(err) != codes.OK && !errors.Is(err, io.EOF) {
					t.Fatal(err)
				}
				return ids, fin
			}
			switch ev := resp.GetEvent().(type) {
			case *kvgatev1.GenerateResponse_Chunk:
				if len(fin) > 0 {
					t.Fatalf("a chunk of sample %d after a Finished", ev.Chunk.GetIndex())
				}
				ids[ev.Chunk.GetIndex()] = append(ids[ev.Chunk.GetIndex()], ev.Chunk.GetTokenIds()...)
			case *kvgatev1.GenerateResponse_Finished:
				fin = append(fin, ev.Finished)
			}
		}
	}

	prompt := tokenPrompt(rand.New(rand.NewPCG(15, 6)), 100)
	req := func(n, maxTokens uint32) *kvgatev1.GenerateRequest {
		r := seeded(&kvgatev1.GenerateRequest{Prompt: prompt, MaxTokens: maxTokens, IgnoreEos: true, SkipPrefixCache: true, N: n}, 1, 42)
		return r
	}
	before := cacheStats(t, s)
	// 100 + 4 * 100 = 500 cells of 512: it fits only if the prompt's cells
	// are counted once.
	ids, fin := run(req(4, 100))
	after := cacheStats(t, s)
	if len(fin) != 4 {
		t.Fatalf("%d Finished messages, want 4", len(fin))
	}
	for i, f := range fin {
		if f.GetIndex() != uint32(i) || f.GetUsage().GetCompletionTokens() != 100 || len(ids[uint32(i)]) != 100 {
			t.Fatalf("Finished %d: %v with %d tokens streamed", i, f, len(ids[uint32(i)]))
		}
		for j := range i {
			if slices.Equal(ids[uint32(i)], ids[uint32(j)]) {
				t.Fatalf("samples %d and %d are equal", i, j)
			}
		}
	}
	if d := after.GetPrefillTokensTotal() - before.GetPrefillTokensTotal(); d != 100 {
		t.Errorf("prefill_tokens_total grew by %d for a 100-token prompt and 4 samples, want 100", d)
	}
	if d := after.GetGeneratedTokensTotal() - before.GetGeneratedTokensTotal(); d != 400 {
		t.Errorf("generated_tokens_total grew by %d, want 400", d)
	}
	again, _ := run(req(4, 100))
	for i := range uint32(4) {
		if !slices.Equal(ids[i], again[i]) {
			t.Fatalf("sample %d differs on the second call with the same seed", i)
		}
	}
	waitFor(t, 10*time.Second, "every cell to come back", func() bool {
		st := cacheStats(t, s)
		return st.GetCellsUsed() == 0 && st.GetCellsReserved() == 0
	})

	// 100 + 5 * 100 = 600 cells: never.
	r := generateAll(ctx, c, req(5, 100))
	if status.Code(r.err) != codes.InvalidArgument || !slices.Contains(violationFields(r.err), "n") {
		t.Fatalf("n = 5: %v (fields %v), want INVALID_ARGUMENT on n", r.err, violationFields(r.err))
	}
	if r := generateAll(ctx, c, textPrompt(storyPrompt, 8)); r.err != nil {
		t.Fatalf("the server stopped serving: %v", r.err)
	}
}
