package main

import (
	"encoding/json"
	"math"
	"strings"
	"testing"

	"github.com/kvgate/kvgate/internal/testmodels"
)

// TestGrpcurlEmbed drives the embedding service with grpcurl and server
// reflection alone, as TestGrpcurl does the generation service.
func TestGrpcurlEmbed(t *testing.T) {
	grpcurl := grpcurlPath(t)
	s := startServer(t, "--model", "none", "--embedding-model", testModel(t, testmodels.MiniLM))
	run := grpcurlRunner(t, grpcurl)
	if list := run(s.addr, "list"); !strings.Contains(list, "kvgate.v1.EmbeddingService") {
		t.Errorf("grpcurl list lacks kvgate.v1.EmbeddingService:\n%s", list)
	}
	desc := run(s.addr, "describe", "kvgate.v1.EmbedRequest")
	for _, field := range []string{"message EmbedRequest", "repeated .kvgate.v1.EmbedInput inputs", "bool normalize", "Truncation truncation"} {
		if !strings.Contains(desc, field) {
			t.Errorf("describe lacks %q:\n%s", field, desc)
		}
	}
	out := run("-d", `{"inputs": [{"text": "A cat sits on the mat"}, {"tokens": {"ids": [101, 7592, 102]}}], "normalize": true}`,
		s.addr, "kvgate.v1.EmbeddingService/Embed")
	var resp struct {
		Embeddings []struct {
			Values []float64 `json:"values"`
			Tokens int       `json:"tokens"`
		} `json:"embeddings"`
		Usage struct {
			PromptTokens int `json:"promptTokens"`
		} `json:"usage"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil {
		t.Fatalf("decode grpcurl output: %v\n%s", err, out)
	}
	if len(resp.Embeddings) != 2 || resp.Usage.PromptTokens != 11 {
		t.Fatalf("response %s", out)
	}
	for i, e := range resp.Embeddings {
		s := 0.0
		for _, v := range e.Values {
			s += v * v
		}
		if len(e.Values) != 384 || math.Abs(math.Sqrt(s)-1) > 1e-4 {
			t.Errorf("embedding %d: %d values, norm %v", i, len(e.Values), math.Sqrt(s))
		}
	}
	info := run(s.addr, "kvgate.v1.EmbeddingService/GetEmbeddingModelInfo")
	for _, want := range []string{`"pooling": "mean"`, `"dimensions": 384`, `"architecture": "bert"`} {
		if !strings.Contains(info, want) {
			t.Errorf("model info lacks %s:\n%s", want, info)
		}
	}
	if health := run("-d", `{"service": "kvgate.v1.EmbeddingService"}`, s.addr, "grpc.health.v1.Health/Check"); !strings.Contains(health, "SERVING") {
		t.Errorf("health check: %s", health)
	}
}
