package bench

// This file is the embedding benchmark (kvgate bench --embed): closed-loop
// clients send Embed calls of a few generated sentences each to kvgate's
// EmbeddingService over gRPC, or POST /v1/embeddings to llama.cpp's
// llama-server --embeddings, and the report counts the inputs embedded
// per second and the latency of a call.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// EmbedTarget is a server that embeds texts.
type EmbedTarget interface {
	// Embed returns the vectors' dimensions after embedding texts, one
	// vector each, or the failure.
	Embed(ctx context.Context, texts []string) (dims int, err error)
}

// grpcEmbed is kvgate's EmbeddingService as an EmbedTarget.
type grpcEmbed struct {
	c kvgatev1.EmbeddingServiceClient
}

// NewGRPCEmbedTarget returns kvgate's EmbeddingService on conn as an
// EmbedTarget. Its calls ask for normalized vectors, as llama-server's
// /v1/embeddings returns them.
func NewGRPCEmbedTarget(conn grpc.ClientConnInterface) EmbedTarget {
	return grpcEmbed{kvgatev1.NewEmbeddingServiceClient(conn)}
}

func (g grpcEmbed) Embed(ctx context.Context, texts []string) (int, error) {
	req := &kvgatev1.EmbedRequest{Normalize: true, Truncation: kvgatev1.Truncation_TRUNCATION_END}
	for _, t := range texts {
		req.Inputs = append(req.Inputs, &kvgatev1.EmbedInput{Input: &kvgatev1.EmbedInput_Text{Text: t}})
	}
	resp, err := g.c.Embed(ctx, req)
	if err != nil {
		return 0, err
	}
	if len(resp.GetEmbeddings()) != len(texts) {
		return 0, fmt.Errorf("%d embeddings for %d inputs", len(resp.GetEmbeddings()), len(texts))
	}
	return len(resp.GetEmbeddings()[0].GetValues()), nil
}

// Embed implements EmbedTarget with POST /v1/embeddings (OpenAI's shape,
// whose vectors llama-server L2-normalizes).
func (s *LlamaServer) Embed(ctx context.Context, texts []string) (int, error) {
	body, err := json.Marshal(map[string]any{"input": texts, "encoding_format": "float"})
	if err != nil {
		return 0, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.base+"/v1/embeddings", bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.client.Do(req)
	if err != nil {
		return 0, transportError(ctx, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, httpError(resp)
	}
	var out struct {
		Data []struct {
			Embedding []float32 `json:"embedding"`
		} `json:"data"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&out); err != nil {
		return 0, protocolError("POST /v1/embeddings: %v", err)
	}
	if len(out.Data) != len(texts) {
		return 0, protocolError("POST /v1/embeddings: %d embeddings for %d inputs", len(out.Data), len(texts))
	}
	return len(out.Data[0].Embedding), nil
}

// EmbedConfig configures RunEmbed.
type EmbedConfig struct {
	// Clients is the closed-loop clients, each with one call in flight.
	Clients int
	// Duration is the measured window; Warmup runs before it, unmeasured.
	Duration, Warmup time.Duration
	// Inputs is the texts of one call.
	Inputs int
	// Words bounds each text's length in words: uniform in [MinWords,
	// MaxWords].
	MinWords, MaxWords int
	// Timeout is the deadline of each call.
	Timeout time.Duration
	// Seed makes the texts; every target gets the same ones for a seed.
	Seed uint64
}

// Validate checks c.
func (c EmbedConfig) Validate() error {
	switch {
	case c.Clients < 1:
		return fmt.Errorf("%w: --concurrency %d must be positive", ErrConfig, c.Clients)
	case c.Duration <= 0:
		return fmt.Errorf("%w: --duration %v must be positive", ErrConfig, c.Duration)
	case c.Inputs < 1:
		return fmt.Errorf("%w: --embed-inputs %d must be positive", ErrConfig, c.Inputs)
	case c.MinWords < 1 || c.MaxWords < c.MinWords:
		return fmt.Errorf("%w: --embed-words %d..%d: want 1 <= min <= max", ErrConfig, c.MinWords, c.MaxWords)
	case c.Timeout <= 0:
		return fmt.Errorf("%w: --timeout %v must be positive", ErrConfig, c.Timeout)
	}
	return nil
}

// EmbedReport is the outcome of RunEmbed.
type EmbedReport struct {
	Target     string  `json:"target"`
	Clients    int     `json:"clients"`
	Inputs     int     `json:"inputs_per_call"`
	Seconds    float64 `json:"seconds"`
	Calls      int     `json:"calls"`
	Errors     int     `json:"errors"`
	FirstError string  `json:"first_error,omitempty"`
	Dimensions int     `json:"dimensions"`
	// InputsPerSecond is the inputs of the successful calls of the
	// measured window, divided by its length.
	InputsPerSecond float64 `json:"inputs_per_second"`
	// P50MS and P99MS are the latencies of the successful calls.
	P50MS float64 `json:"p50_ms"`
	P99MS float64 `json:"p99_ms"`
}

// embedWords are what the benchmark's texts are made of.
var embedWords = strings.Fields(`the a cat dog sits runs on under mat rug market stock fell rose sharply slowly today
yesterday kitten sitting quick brown fox jumps over lazy river city night morning model vector text search
query answer engine server request batch token memory fast small large green blue red house tree`)

// embedTexts returns n texts of cfg's lengths, the same for one seed.
func embedTexts(cfg EmbedConfig, n int, seed uint64) []string {
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	out := make([]string, n)
	for i := range out {
		words := cfg.MinWords + r.IntN(cfg.MaxWords-cfg.MinWords+1)
		w := make([]string, words)
		for j := range w {
			w[j] = embedWords[r.IntN(len(embedWords))]
		}
		out[i] = strings.Join(w, " ")
	}
	return out
}

// RunEmbed drives t with cfg's load and returns the report; name labels
// it.
func RunEmbed(ctx context.Context, t EmbedTarget, name string, cfg EmbedConfig) (*EmbedReport, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	seed := cfg.Seed
	if seed == 0 {
		seed = rand.Uint64()
	}
	texts := embedTexts(cfg, 4096, seed)
	rep := &EmbedReport{Target: name, Clients: cfg.Clients, Inputs: cfg.Inputs}
	var (
		mu        sync.Mutex
		latencies []float64
		measuring bool
		start     time.Time
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for c := range cfg.Clients {
		wg.Go(func() {
			for k := c * 97; ; k++ {
				select {
				case <-stop:
					return
				case <-ctx.Done():
					return
				default:
				}
				batch := make([]string, cfg.Inputs)
				for i := range batch {
					batch[i] = texts[(k*cfg.Inputs+i)%len(texts)]
				}
				cctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
				t0 := time.Now()
				dims, err := t.Embed(cctx, batch)
				d := time.Since(t0)
				cancel()
				mu.Lock()
				if measuring && t0.After(start) {
					rep.Calls++
					if err != nil {
						rep.Errors++
						if rep.FirstError == "" {
							rep.FirstError = err.Error()
						}
					} else {
						rep.Dimensions = dims
						latencies = append(latencies, float64(d.Microseconds())/1000)
					}
				}
				mu.Unlock()
			}
		})
	}
	sleep := func(d time.Duration) bool {
		select {
		case <-time.After(d):
			return true
		case <-ctx.Done():
			return false
		}
	}
	ok := sleep(cfg.Warmup)
	mu.Lock()
	measuring, start = true, time.Now()
	mu.Unlock()
	ok = ok && sleep(cfg.Duration)
	mu.Lock()
	measuring = false
	rep.Seconds = time.Since(start).Seconds()
	mu.Unlock()
	close(stop)
	wg.Wait()
	if !ok {
		return rep, errors.New("interrupted: the report is partial")
	}
	slices.Sort(latencies)
	if n := len(latencies); n > 0 {
		rep.P50MS = latencies[n/2]
		rep.P99MS = latencies[min(n-1, n*99/100)]
	}
	rep.InputsPerSecond = float64(len(latencies)*cfg.Inputs) / rep.Seconds
	return rep, nil
}

// WriteText prints the report as one line.
func (r *EmbedReport) WriteText(w io.Writer) error {
	_, err := fmt.Fprintf(w, "embed %s: %d clients, %d inputs/call: %.1f inputs/s, %d calls, %d errors, p50 %.1f ms, p99 %.1f ms, %d dims%s\n",
		r.Target, r.Clients, r.Inputs, r.InputsPerSecond, r.Calls, r.Errors, r.P50MS, r.P99MS, r.Dimensions,
		map[bool]string{true: " (first error: " + r.FirstError + ")", false: ""}[r.FirstError != ""])
	return err
}

// WriteJSON prints the report as JSON.
func (r *EmbedReport) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}
