package main

import (
	"context"
	"encoding/json"
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/testmodels"
)

func embedText(s string) *kvgatev1.EmbedInput {
	return &kvgatev1.EmbedInput{Input: &kvgatev1.EmbedInput_Text{Text: s}}
}

func embedIDs(ids []int32) *kvgatev1.EmbedInput {
	return &kvgatev1.EmbedInput{Input: &kvgatev1.EmbedInput_Tokens{Tokens: &kvgatev1.TokenList{Ids: ids}}}
}

func cosine(a, b []float32) float64 {
	var ab, aa, bb float64
	for i := range a {
		ab += float64(a[i]) * float64(b[i])
		aa += float64(a[i]) * float64(a[i])
		bb += float64(b[i]) * float64(b[i])
	}
	return ab / math.Sqrt(aa*bb)
}

func norm(v []float32) float64 { return math.Sqrt(cosineDot(v, v)) }

func cosineDot(a, b []float32) float64 {
	s := 0.0
	for i := range a {
		s += float64(a[i]) * float64(b[i])
	}
	return s
}

// TestEmbedEndToEnd runs a real kvgate serve with MiniLM as its only model
// (--model none) and checks over TCP: the vectors' shape and norm, their
// agreement with llama.cpp's llama-embedding, that similar sentences are
// closer, that a batch gives the vectors of its inputs one at a time, and
// that every bad input gets a clear INVALID_ARGUMENT naming it while the
// server keeps serving; an input of 10,000 tokens never aborts it.
func TestEmbedEndToEnd(t *testing.T) {
	s := startServer(t, "--model", "none", "--embedding-model", testModel(t, testmodels.MiniLM),
		"--embedding-max-inputs", "8", "--embedding-max-seqs", "16")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := kvgatev1.NewEmbeddingServiceClient(s.conn)

	info, err := c.GetEmbeddingModelInfo(ctx, &kvgatev1.GetEmbeddingModelInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.GetDimensions() != 384 || info.GetPooling() != "mean" || info.GetArchitecture() != "bert" ||
		info.GetMaxInputTokens() != 512 || info.GetMaxInputs() != 8 || info.GetTrainingContext() != 512 {
		t.Fatalf("model info %v", info)
	}

	embed := func(req *kvgatev1.EmbedRequest) [][]float32 {
		t.Helper()
		resp, err := c.Embed(ctx, req)
		if err != nil {
			t.Fatalf("Embed: %v", err)
		}
		var out [][]float32
		for _, e := range resp.GetEmbeddings() {
			out = append(out, e.GetValues())
		}
		return out
	}

	t.Run("shape, norm and similarity", func(t *testing.T) {
		v := embed(&kvgatev1.EmbedRequest{Normalize: true, Inputs: []*kvgatev1.EmbedInput{
			embedText("A cat sits on the mat"), embedText("A kitten is sitting on a rug"), embedText("Stock markets fell sharply today"),
		}})
		for i, x := range v {
			if len(x) != 384 || math.Abs(norm(x)-1) > 1e-5 {
				t.Errorf("vector %d: %d dimensions, norm %v", i, len(x), norm(x))
			}
		}
		near, far := cosine(v[0], v[1]), cosine(v[0], v[2])
		t.Logf("cosine(cat, kitten) = %.4f, cosine(cat, stocks) = %.4f", near, far)
		if !(near > far) {
			t.Errorf("cat/kitten %.4f is not closer than cat/stocks %.4f", near, far)
		}
		raw := embed(&kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{embedText("A cat sits on the mat")}})
		if n := norm(raw[0]); math.Abs(n-1) < 1e-3 {
			t.Errorf("unnormalized vector has norm %v: normalize changes nothing", n)
		}
	})

	t.Run("batch equals one at a time", func(t *testing.T) {
		texts := []string{"A cat sits on the mat", "hello", "A kitten is sitting on a rug", "Stock markets fell sharply today",
			"The quick brown fox jumps over the lazy dog, again and again."}
		var in []*kvgatev1.EmbedInput
		for _, x := range texts {
			in = append(in, embedText(x))
		}
		together := embed(&kvgatev1.EmbedRequest{Inputs: in})
		for i, x := range texts {
			alone := embed(&kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{embedText(x)}})[0]
			for d := range alone {
				if diff := math.Abs(float64(alone[d] - together[i][d])); diff > 1e-5 {
					t.Fatalf("input %d component %d: %v alone, %v in a batch", i, d, alone[d], together[i][d])
				}
			}
		}
	})

	t.Run("matches llama-embedding", func(t *testing.T) {
		raw, err := os.ReadFile("../../native/llama/testdata/minilm-embeddings.json")
		if err != nil {
			t.Fatalf("reference vectors: %v (scripts/embed-reference.sh)", err)
		}
		var ref struct {
			Texts []string `json:"texts"`
			Data  []struct {
				Index     int       `json:"index"`
				Embedding []float64 `json:"embedding"`
			} `json:"data"`
		}
		if err := json.Unmarshal(raw, &ref); err != nil {
			t.Fatal(err)
		}
		var in []*kvgatev1.EmbedInput
		for _, x := range ref.Texts {
			in = append(in, embedText(x))
		}
		got := embed(&kvgatev1.EmbedRequest{Normalize: true, Inputs: in[:min(len(in), 8)]})
		for _, d := range ref.Data {
			if d.Index >= len(got) {
				continue
			}
			// The bound of native/llama's TestEmbedMatchesLlamaEmbedding,
			// whose comment says why it is not the 1e-4.
			cos := 0.0
			for k, want := range d.Embedding {
				cos += float64(got[d.Index][k]) * want
				if diff := math.Abs(float64(got[d.Index][k]) - want); diff > 5e-3 {
					t.Fatalf("text %d component %d: %v, llama-embedding %v", d.Index, k, got[d.Index][k], want)
				}
			}
			if cos < 0.9995 {
				t.Errorf("text %d: cosine %.6f with llama-embedding", d.Index, cos)
			}
		}
	})

	long := strings.Repeat("hello ", 10000) // 10,000 word tokens plus [CLS] and [SEP]
	tenK := make([]int32, 10000)
	for i := range tenK {
		tenK[i] = 7592 // "hello"
	}
	nine := make([]*kvgatev1.EmbedInput, 9)
	for i := range nine {
		nine[i] = embedText("x")
	}
	bad := []struct {
		name   string
		req    *kvgatev1.EmbedRequest
		fields []string
	}{
		{"empty batch", &kvgatev1.EmbedRequest{}, []string{"inputs"}},
		{"empty text", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{embedText("fine"), embedText("")}}, []string{"inputs[1].text"}},
		{"batch over the limit", &kvgatev1.EmbedRequest{Inputs: nine}, []string{"inputs"}},
		{"10,000-token text, refuse", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{embedText("ok"), embedText(long)}}, []string{"inputs[1].text"}},
		{"10,000-token text, refuse explicitly", &kvgatev1.EmbedRequest{Truncation: kvgatev1.Truncation_TRUNCATION_REFUSE, Inputs: []*kvgatev1.EmbedInput{embedText(long)}}, []string{"inputs[0].text"}},
		{"10,000 token ids, refuse", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{embedIDs(tenK)}}, []string{"inputs[0].tokens.ids"}},
		{"token id past the vocabulary", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{embedIDs([]int32{101, 30522, 102})}}, []string{"inputs[0].tokens.ids"}},
		{"negative token id", &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{embedIDs([]int32{-1})}}, []string{"inputs[0].tokens.ids"}},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.Embed(ctx, tc.req)
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("code %v (%v), want INVALID_ARGUMENT", status.Code(err), err)
			}
			if got := violationFields(err); strings.Join(got, ",") != strings.Join(tc.fields, ",") {
				t.Errorf("violations %v, want %v (%v)", got, tc.fields, err)
			}
		})
	}

	t.Run("10,000 tokens truncated", func(t *testing.T) {
		resp, err := c.Embed(ctx, &kvgatev1.EmbedRequest{Truncation: kvgatev1.Truncation_TRUNCATION_END, Normalize: true,
			Inputs: []*kvgatev1.EmbedInput{embedText(long), embedIDs(tenK), embedText("short")}})
		if err != nil {
			t.Fatal(err)
		}
		for i, e := range resp.GetEmbeddings() {
			wantTrunc := i < 2
			if e.GetTruncated() != wantTrunc || (wantTrunc && e.GetTokens() != 512) || len(e.GetValues()) != 384 {
				t.Errorf("embedding %d: truncated %v, tokens %d, %d dimensions", i, e.GetTruncated(), e.GetTokens(), len(e.GetValues()))
			}
		}
		if got := resp.GetUsage().GetPromptTokens(); got != 512+512+3 {
			t.Errorf("prompt tokens %d, want %d", got, 512+512+3)
		}
	})

	// Still serving, and the process is alive.
	if v := embed(&kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{embedText("still here")}}); len(v[0]) != 384 {
		t.Fatal("no vector after the bad inputs")
	}
	select {
	case <-s.done:
		t.Fatalf("the server exited: %v\n%s", s.err, s.Logs())
	default:
	}
	st, err := c.GetEmbeddingStats(ctx, &kvgatev1.GetEmbeddingStatsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.GetTruncatedTotal() != 2 || st.GetEncodeCallsTotal() == 0 || st.GetEncodeCallsTotal() >= st.GetInputsTotal() {
		t.Errorf("stats %v: want 2 truncated, and fewer encode calls than inputs", st)
	}

	// No generation model: generation calls fail FAILED_PRECONDITION, and
	// health says which services serve.
	_, err = s.Generate().Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: "x"})
	if status.Code(err) != codes.FailedPrecondition || errorInfoReason(err) != "NO_GENERATION_MODEL" {
		t.Errorf("Tokenize without a generation model: %v", err)
	}
	h := healthpb.NewHealthClient(s.conn)
	for name, want := range map[string]healthpb.HealthCheckResponse_ServingStatus{
		"":                           healthpb.HealthCheckResponse_SERVING,
		"kvgate.v1.EmbeddingService": healthpb.HealthCheckResponse_SERVING,
		"kvgate.v1.GenerateService":  healthpb.HealthCheckResponse_NOT_SERVING,
		"kvgate.v1.CacheService":     healthpb.HealthCheckResponse_NOT_SERVING,
	} {
		r, err := h.Check(ctx, &healthpb.HealthCheckRequest{Service: name})
		if err != nil || r.GetStatus() != want {
			t.Errorf("health %q: %v %v, want %v", name, r.GetStatus(), err, want)
		}
	}
}

// TestEmbedWithoutEmbeddingModel checks that a server with only a
// generation model answers the embedding service FAILED_PRECONDITION.
func TestEmbedWithoutEmbeddingModel(t *testing.T) {
	s := startServer(t, "--model", testModel(t, testmodels.Stories260K))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := kvgatev1.NewEmbeddingServiceClient(s.conn)
	_, err := c.Embed(ctx, &kvgatev1.EmbedRequest{Inputs: []*kvgatev1.EmbedInput{embedText("x")}})
	if status.Code(err) != codes.FailedPrecondition || errorInfoReason(err) != "NO_EMBEDDING_MODEL" {
		t.Fatalf("Embed without an embedding model: %v", err)
	}
	if _, err := s.Generate().Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: "x"}); err != nil {
		t.Fatalf("Tokenize: %v", err)
	}
}
