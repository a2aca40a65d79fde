package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/bench"
	mk "github.com/kvgate/kvgate/internal/mkmodel"
	kvserver "github.com/kvgate/kvgate/server"
)

// runBench runs the built kvgate bench against s with --json and returns
// the parsed report and the raw JSON.
func runBench(t *testing.T, s *server, args ...string) (*bench.Report, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, kvgateBin, append([]string{"bench", "--addr", s.addr, "--json"}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("kvgate bench %v: %v\nstderr:\n%s", args, err, stderr.String())
	}
	var r bench.Report
	dec := json.NewDecoder(bytes.NewReader(stdout.Bytes()))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		t.Fatalf("parse report: %v\n%s", err, stdout.String())
	}
	return &r, stdout.Bytes()
}

// checkNumbers fails on any negative, NaN or infinite number in a JSON
// document.
func checkNumbers(t *testing.T, raw []byte) {
	t.Helper()
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
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
			for i, x := range v {
				walk(fmt.Sprintf("%s[%d]", path, i), x)
			}
		}
	}
	walk("report", v)
}

// checkAccounting checks that every request of a report is accounted for.
func checkAccounting(t *testing.T, r *bench.Report, output int) {
	t.Helper()
	if r.Schema != bench.Schema {
		t.Errorf("schema %q, want %q", r.Schema, bench.Schema)
	}
	sum := 0
	for _, n := range r.Status {
		sum += n
	}
	if r.Requests.Sent == 0 || sum != r.Requests.Sent {
		t.Errorf("sent %d, outcomes add up to %d (%v)", r.Requests.Sent, sum, r.Status)
	}
	if r.Requests.OK != r.Status["OK"] || r.Requests.OK+r.Requests.Failed != r.Requests.Sent {
		t.Errorf("requests %+v, status %v", r.Requests, r.Status)
	}
	// A light load on a pool this large: nothing may fail.
	if r.Requests.OK != r.Requests.Sent {
		t.Errorf("%d of %d requests failed: %v %v", r.Requests.Failed, r.Requests.Sent, r.Status, r.ErrorReasons)
	}
	if want := int64(r.Requests.OK) * int64(output); r.Tokens.Output != want {
		t.Errorf("output tokens %d, want %d (ok requests x %d with ignore_eos)", r.Tokens.Output, want, output)
	}
	if r.LatencyMS.TTFT.Count != r.Requests.OK || r.LatencyMS.E2E.Count != r.Requests.OK {
		t.Errorf("latency samples %+v for %d ok requests", r.LatencyMS, r.Requests.OK)
	}
	if want := r.Requests.OK * (output - 1); r.LatencyMS.ITL.Count != want {
		t.Errorf("%d inter-token samples, want %d", r.LatencyMS.ITL.Count, want)
	}
	s := r.Server
	if s == nil {
		t.Fatal("no server counters")
	}
	if s.PrefillTokens > uint64(r.Tokens.PromptSent) {
		t.Errorf("server computed %d prefill tokens, more than the %d sent", s.PrefillTokens, r.Tokens.PromptSent)
	}
	if s.PrefillTokens == 0 {
		t.Errorf("server computed no prefill tokens for %d prompt tokens sent", r.Tokens.PromptSent)
	}
	if s.GeneratedTokens != uint64(r.Tokens.Output) {
		t.Errorf("server generated %d tokens, client received %d", s.GeneratedTokens, r.Tokens.Output)
	}
	if s.Admitted != uint64(r.Requests.Sent) || s.NoKVSlot != 0 {
		t.Errorf("server admitted %d of %d, nokvslot %d", s.Admitted, r.Requests.Sent, s.NoKVSlot)
	}
	if r.Throughput.OutputTokensPerSecond <= 0 || r.ElapsedSeconds <= 0 {
		t.Errorf("throughput %+v over %gs", r.Throughput, r.ElapsedSeconds)
	}
}

// TestBenchSmoke runs kvgate bench against a real server and checks that
// its JSON report accounts for every request. It checks no timing.
func TestBenchSmoke(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"))

	t.Run("fixed closed loop", func(t *testing.T) {
		r, raw := runBench(t, s, "--duration", "3s", "--concurrency", "4", "--warmup", "4",
			"--input-tokens", "16", "--output-tokens", "16", "--slo-ttft", "10s", "--slo-itl", "10s")
		checkNumbers(t, raw)
		checkAccounting(t, r, 16)
		if r.Config.Mode != "closed" || r.Config.Concurrency != 4 || r.Requests.Warmup != 4 || r.Interrupted {
			t.Errorf("config %+v, requests %+v", r.Config, r.Requests)
		}
		if r.Tokens.PromptSent != int64(r.Requests.Sent)*16 {
			t.Errorf("prompt tokens %d for %d requests of 16", r.Tokens.PromptSent, r.Requests.Sent)
		}
		if r.Goodput.Requests > r.Requests.OK {
			t.Errorf("goodput %d of %d ok requests", r.Goodput.Requests, r.Requests.OK)
		}
		if r.Model.VocabSize != 512 || r.Model.SystemInfo == "" {
			t.Errorf("model %+v", r.Model)
		}
	})

	t.Run("shared prefix open loop", func(t *testing.T) {
		r, raw := runBench(t, s, "--requests", "12", "--rate", "20", "--workload", "shared-prefix",
			"--input-tokens", "40", "--prefix-tokens", "32", "--output-tokens", "8")
		checkNumbers(t, raw)
		checkAccounting(t, r, 8)
		if r.Requests.Sent != 12 || r.Config.Mode != "open" || r.Tokens.PromptSent != 12*40 {
			t.Errorf("requests %+v, config %+v, tokens %+v", r.Requests, r.Config, r.Tokens)
		}
	})

	t.Run("mixed without prefix cache", func(t *testing.T) {
		r, raw := runBench(t, s, "--requests", "8", "--concurrency", "2", "--workload", "mixed", "--no-prefix-cache",
			"--input-min", "4", "--input-max", "64", "--output-min", "4", "--output-max", "4")
		checkNumbers(t, raw)
		checkAccounting(t, r, 4)
		if r.Config.PrefixCache || r.Tokens.CachedReported != 0 || r.Server.PrefixHitTokens != 0 {
			t.Errorf("prefix cache used: config %+v, tokens %+v, server %+v", r.Config, r.Tokens, r.Server)
		}
	})
}

// TestBenchBadFlags checks that kvgate bench refuses a workload the server
// cannot serve, before sending anything.
func TestBenchBadFlags(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "256")
	for _, args := range [][]string{
		{"--input-tokens", "200", "--output-tokens", "100", "--requests", "1"},
		{"--workload", "shared-prefix", "--prefix-tokens", "0", "--requests", "1"},
		{"--workload", "poisson", "--requests", "1"},
		{"--warmup", "soon", "--requests", "1"},
	} {
		cmd := exec.Command(kvgateBin, append([]string{"bench", "--addr", s.addr}, args...)...)
		if out, err := cmd.CombinedOutput(); err == nil {
			t.Errorf("kvgate bench %v succeeded:\n%s", args, out)
		}
	}
	if st := cacheStats(t, s); st.GetAdmittedTotal() != 0 {
		t.Errorf("%d requests admitted", st.GetAdmittedTotal())
	}
}

// benchModelFile returns the model of the in-process gRPC benchmark:
// $KVGATE_BENCH_MODEL, or the 15m preset written by internal/mkmodel into
// the user cache directory once.
func benchModelFile(b *testing.B) string {
	b.Helper()
	if p := os.Getenv("KVGATE_BENCH_MODEL"); p != "" {
		return p
	}
	spec, err := mk.Preset("15m")
	if err != nil {
		b.Fatal(err)
	}
	dir := os.Getenv("KVGATE_CACHE_DIR")
	if dir == "" {
		if dir, err = os.UserCacheDir(); err != nil {
			b.Fatal(err)
		}
		dir = filepath.Join(dir, "kvgate")
	}
	dir = filepath.Join(dir, "bench")
	path := filepath.Join(dir, fmt.Sprintf("%s-%s-seed%d.gguf", spec.Name, spec.Type, spec.Seed))
	if _, err := os.Stat(path); err == nil {
		return path
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	if _, err := mk.WriteFile(context.Background(), path, spec); err != nil {
		b.Fatal(err)
	}
	return path
}

// inProcessServer serves kvgate over an in-memory connection, wired as
// kvgate serve wires it (package server, with reserve admission and no
// prefix cache), and returns the client connection. Everything stops when
// b ends.
func inProcessServer(b *testing.B, maxSeqs, cells int) *grpc.ClientConn {
	b.Helper()
	lis := bufconn.Listen(1 << 20)
	cfg := kvserver.DefaultConfig()
	cfg.Listener = lis
	cfg.Model = benchModelFile(b)
	cfg.Ctx = cells
	cfg.MaxSeqs = maxSeqs
	cfg.PrefixCache = false
	cfg.Logger = slog.New(slog.DiscardHandler)
	srv, err := kvserver.Start(context.Background(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := srv.Close(); err != nil {
			b.Error(err)
		}
	})
	select {
	case <-srv.Ready():
	case <-srv.Done():
		b.Fatal(srv.Err())
	}
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	return conn
}

// BenchmarkGRPCInProcess runs the whole serving path (gRPC over an
// in-memory connection, the interceptors, the service, the allocator, the
// engine) in one
// process, so that a CPU profile shows where a token's time goes, gRPC
// included:
//
//	go test ./cmd/kvgate -run '^$' -bench GRPCInProcess -benchtime 2x -cpuprofile cpu.out
//	go tool pprof -top cpu.out
//
// One iteration is a round of N concurrent 128/128-token requests (closed
// loop, through internal/bench). The model is $KVGATE_BENCH_MODEL or the
// 15m preset.
func BenchmarkGRPCInProcess(b *testing.B) {
	for _, n := range []int{1, 4, 16, 32} {
		b.Run(fmt.Sprintf("streams=%d", n), func(b *testing.B) {
			conn := inProcessServer(b, 32, 8192)
			gen, cache := kvgatev1.NewGenerateServiceClient(conn), kvgatev1.NewCacheServiceClient(conn)
			var tokens int64
			for b.Loop() {
				r, err := bench.Run(context.Background(), gen, cache, bench.Config{
					Concurrency: n, Requests: n,
					Workload: bench.Workload{Kind: bench.Fixed, InputTokens: 128, OutputTokens: 128},
				})
				if err != nil {
					b.Fatal(err)
				}
				if r.Requests.OK != n {
					b.Fatalf("%d of %d requests ok: %v", r.Requests.OK, n, r.Status)
				}
				tokens += r.Tokens.Output
			}
			b.ReportMetric(float64(tokens)/b.Elapsed().Seconds(), "out-tok/s")
		})
	}
}

// fakeLlamaServer serves the part of llama-server's HTTP API that kvgate
// bench --llama-server uses (GET /props, GET /v1/models, POST /completion
// streamed), as the real llama-server of llama.cpp b7347 replies: n_predict
// tokens, one an event, then the stop event. It counts the completions.
func fakeLlamaServer(t *testing.T) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var completions atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("GET /props", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"default_generation_settings":{"params":{"n_predict":-1},"n_ctx":1024},"total_slots":4,"model_path":"/models/fake.gguf","build_info":"b7347-fake"}`)
	})
	mux.HandleFunc("GET /v1/models", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"object":"list","data":[{"id":"fake.gguf","meta":{"vocab_type":1,"n_vocab":32000,"n_ctx_train":4096,"n_params":15191712,"size":30390912}}]}`)
	})
	mux.HandleFunc("POST /completion", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Prompt   []int `json:"prompt"`
			NPredict int   `json:"n_predict"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || len(req.Prompt) == 0 {
			w.WriteHeader(http.StatusBadRequest)
			io.WriteString(w, `{"error":{"code":400,"message":"bad request","type":"invalid_request_error"}}`)
			return
		}
		io.Copy(io.Discard, r.Body)
		completions.Add(1)
		w.Header().Set("Content-Type", "text/event-stream")
		for k := 1; k <= req.NPredict; k++ {
			fmt.Fprintf(w, "data: {\"index\":0,\"content\":\" x\",\"tokens\":[%d],\"stop\":false,\"id_slot\":-1,\"tokens_predicted\":%d,\"tokens_evaluated\":%d}\n\n", 100+k, k, len(req.Prompt))
			w.(http.Flusher).Flush()
		}
		fmt.Fprintf(w, "data: {\"index\":0,\"content\":\"\",\"tokens\":[],\"id_slot\":0,\"stop\":true,\"tokens_predicted\":%d,\"tokens_evaluated\":%d,\"stop_type\":\"limit\",\"timings\":{\"cache_n\":0}}\n\n", req.NPredict, len(req.Prompt))
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv, &completions
}

// TestBenchLlamaServer runs kvgate bench --llama-server against a fake
// llama-server: the report has the same JSON form as against kvgate, and
// no server counters.
func TestBenchLlamaServer(t *testing.T) {
	srv, completions := fakeLlamaServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, kvgateBin, "bench", "--llama-server", srv.URL, "--json", "--requests", "12",
		"--concurrency", "3", "--input-tokens", "16", "--output-tokens", "8")
	// An address in the environment is for kvgate servers: ignored here.
	cmd.Env = append(os.Environ(), "KVGATE_ADDR=127.0.0.1:1")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("kvgate bench --llama-server: %v\nstderr:\n%s", err, stderr.String())
	}
	var r bench.Report
	dec := json.NewDecoder(bytes.NewReader(stdout.Bytes()))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		t.Fatalf("parse report: %v\n%s", err, stdout.String())
	}
	checkNumbers(t, stdout.Bytes())
	if r.Schema != bench.Schema || r.Requests.Sent != 12 || r.Requests.OK != 12 || completions.Load() != 12 {
		t.Fatalf("schema %q, requests %+v, status %v; the server saw %d", r.Schema, r.Requests, r.Status, completions.Load())
	}
	if r.Tokens.Output != 12*8 || r.LatencyMS.TTFT.Count != 12 || r.LatencyMS.ITL.Count != 12*7 || r.LatencyMS.Queue.Count != 0 {
		t.Errorf("tokens %+v, latencies %+v", r.Tokens, r.LatencyMS)
	}
	if r.Config.Target != srv.URL || r.Model.VocabSize != 32000 || r.Model.MaxRunningSequences != 4 || r.Model.Path != "/models/fake.gguf" {
		t.Errorf("config %+v, model %+v", r.Config, r.Model)
	}
	if !bytes.Contains(stdout.Bytes(), []byte(`"server": null`)) {
		t.Errorf("report has server counters from llama-server:\n%s", stdout.String())
	}
}

// TestBenchLlamaServerFlags checks that kvgate bench refuses --llama-server
// with the flags of a kvgate connection, a bad URL and a workload that
// does not fit a slot, before sending anything.
func TestBenchLlamaServerFlags(t *testing.T) {
	srv, completions := fakeLlamaServer(t)
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--addr", "127.0.0.1:50051"}, "--llama-server and --addr cannot be used together"},
		{[]string{"-addr=127.0.0.1:50051"}, "--llama-server and --addr cannot be used together"},
		{[]string{"--tls"}, "--llama-server and --tls cannot be used together"},
		{[]string{"--token", "x"}, "--llama-server and --token cannot be used together"},
		{[]string{"--input-tokens", "1000", "--output-tokens", "100"}, "exceed the server's limit of 1024"},
	} {
		args := append([]string{"bench", "--llama-server", srv.URL, "--requests", "1"}, tt.args...)
		out, err := exec.Command(kvgateBin, args...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), tt.want) {
			t.Errorf("kvgate %v: %v, want an error with %q:\n%s", args, err, tt.want, out)
		}
	}
	out, err := exec.Command(kvgateBin, "bench", "--llama-server", strings.TrimPrefix(srv.URL, "http://"), "--requests", "1").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "llama-server URL") {
		t.Errorf("kvgate bench with a URL without a scheme: %v:\n%s", err, out)
	}
	if n := completions.Load(); n != 0 {
		t.Errorf("%d completions sent", n)
	}
}
