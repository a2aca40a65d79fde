package server

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/mkmodel"
	"github.com/kvgate/kvgate/internal/models"
	"github.com/kvgate/kvgate/internal/testmodels"
	"github.com/kvgate/kvgate/service"
)

func TestMain(m *testing.M) {
	code := m.Run()
	testmodels.Cleanup()
	os.Exit(code)
}

// stalledProxy is a Go module proxy serving a module zip that holds the
// real stories260K at the default model's path, but only once release is
// called: until then a download of it hangs, so the server stays loading.
type stalledProxy struct {
	*httptest.Server
	requested chan struct{} // closed on the first request
	release   func()
}

// newStalledProxy starts a stalledProxy and points the default model's
// fetch at it, with empty caches, for the rest of the test.
func newStalledProxy(t *testing.T) *stalledProxy {
	t.Helper()
	model, err := os.ReadFile(testmodels.Path(t, testmodels.Stories260K))
	if err != nil {
		t.Fatal(err)
	}
	var zbuf bytes.Buffer
	zw := zip.NewWriter(&zbuf)
	src := models.Stories260K
	w, err := zw.Create(src.Module + "@" + src.Version + "/" + src.File)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(model); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	p := &stalledProxy{requested: make(chan struct{})}
	var once, reqOnce sync.Once
	p.release = func() { once.Do(func() { close(gate) }) }
	p.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reqOnce.Do(func() { close(p.requested) })
		if !strings.HasSuffix(r.URL.Path, "/@v/"+src.Version+".zip") {
			http.NotFound(w, r)
			return
		}
		select {
		case <-gate:
		case <-r.Context().Done():
			return
		}
		_, _ = w.Write(zbuf.Bytes())
	}))
	t.Cleanup(func() { p.release(); p.Close() })
	t.Setenv("GOPROXY", p.URL)
	t.Setenv("GOMODCACHE", t.TempDir())
	t.Setenv("KVGATE_CACHE_DIR", t.TempDir())
	return p
}

// waitRequested waits for the server to ask p for the model.
func (p *stalledProxy) waitRequested(t *testing.T) {
	t.Helper()
	select {
	case <-p.requested:
	case <-time.After(time.Minute):
		t.Fatal("the server did not ask for the model")
	}
}

// syncBuffer is a bytes.Buffer safe for a logger's writes and the test's
// reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testConfig returns a small configuration on a free loopback port that
// logs into logs.
func testConfig(logs io.Writer) Config {
	cfg := DefaultConfig()
	cfg.Listen = "127.0.0.1:0"
	cfg.Ctx = 256
	cfg.Threads = 1 // the test machines are small and shared
	cfg.MaxSeqs = 4
	cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	return cfg
}

// dial returns a client connection to addr, closed when the test ends.
func dial(t *testing.T, addr net.Addr) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr.String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// healthz returns the status code of the server's /healthz.
func healthz(t *testing.T, s *Server) int {
	t.Helper()
	resp, err := http.Get("http://" + s.MetricsAddr().String() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

// checkHealth checks that the server and each kvgate service report want.
func checkHealth(ctx context.Context, t *testing.T, hc healthpb.HealthClient, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	for _, name := range servedNames {
		w := want
		if name == kvgatev1.EmbeddingService_ServiceDesc.ServiceName {
			// These servers load no embedding model: that service never
			// serves (issue 14).
			w = healthpb.HealthCheckResponse_NOT_SERVING
		}
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: name})
		if err != nil || resp.GetStatus() != w {
			t.Errorf("health of %q: %v, %v; want %v", name, resp, err, w)
		}
	}
}

// waitReady waits until s has loaded its model, failing t when the load
// fails or ctx ends first.
func waitReady(ctx context.Context, t *testing.T, s *Server) {
	t.Helper()
	select {
	case <-s.Ready():
	case <-s.Done():
		t.Fatalf("the load failed: %v", s.Err())
	case <-ctx.Done():
		t.Fatal("not ready")
	}
}

// errorInfoReason returns the reason of err's ErrorInfo detail, if any.
func errorInfoReason(err error) string {
	for _, d := range status.Convert(err).Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok {
			return ei.GetReason()
		}
	}
	return ""
}

// TestServer runs a server in process through its life: it listens and
// answers NOT_SERVING while the model comes, refuses a second server on
// its port, turns SERVING once loaded and serves a Generate call to its
// end over a real gRPC connection, then drains, closes (twice) and frees
// its port.
func TestServer(t *testing.T) {
	proxy := newStalledProxy(t)
	var logs syncBuffer
	cfg := testConfig(&logs)
	cfg.MetricsListen = "127.0.0.1:0"
	s, err := Start(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	addr := s.Addr()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	conn := dial(t, addr)
	hc := healthpb.NewHealthClient(conn)
	gen := kvgatev1.NewGenerateServiceClient(conn)

	// Loading: the port answers, health says NOT_SERVING.
	proxy.waitRequested(t)
	checkHealth(ctx, t, hc, healthpb.HealthCheckResponse_NOT_SERVING)
	if _, err := gen.Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: "Once"}); status.Code(err) != codes.Unavailable ||
		errorInfoReason(err) != service.ReasonModelLoading {
		t.Errorf("Tokenize while loading: %v, want UNAVAILABLE %s", err, service.ReasonModelLoading)
	}
	if code := healthz(t, s); code != http.StatusServiceUnavailable {
		t.Errorf("/healthz while loading: %d, want 503", code)
	}
	select {
	case <-s.Ready():
		t.Fatal("ready before the model came")
	default:
	}

	// A second server on the same port fails at once.
	var logs2 syncBuffer
	cfg2 := testConfig(&logs2)
	cfg2.Listen = addr.String()
	start := time.Now()
	if s2, err := Start(ctx, cfg2); err == nil {
		s2.Close()
		t.Errorf("a second server started on %s", addr)
	} else if !strings.Contains(err.Error(), "address already in use") || !strings.Contains(err.Error(), addr.String()) {
		t.Errorf("second Start on %s: %v; want an error naming the port in use", addr, err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("second Start took %v to fail, want under 2 s", took)
	}
	if strings.Contains(logs2.String(), "model") {
		t.Errorf("the second server went on to its model:\n%s", logs2.String())
	}

	// Ready: SERVING, and a Generate call runs to its end.
	proxy.release()
	select {
	case <-s.Ready():
	case <-s.Done():
		t.Fatalf("the load failed: %v\n%s", s.Err(), logs.String())
	case <-ctx.Done():
		t.Fatalf("not ready\n%s", logs.String())
	}
	checkHealth(ctx, t, hc, healthpb.HealthCheckResponse_SERVING)
	if code := healthz(t, s); code != http.StatusOK {
		t.Errorf("/healthz once ready: %d, want 200", code)
	}
	const maxTokens = 8
	stream, err := gen.Generate(ctx, &kvgatev1.GenerateRequest{
		Prompt: &kvgatev1.GenerateRequest_Text{Text: "Once upon a time"}, MaxTokens: maxTokens, IgnoreEos: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	var (
		started  bool
		tokens   int
		finished *kvgatev1.Finished
	)
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("Generate: %v", err)
		}
		started = started || resp.GetStarted() != nil
		tokens += len(resp.GetChunk().GetTokenIds())
		if f := resp.GetFinished(); f != nil {
			finished = f
		}
	}
	if !started || tokens != maxTokens || finished.GetReason() != kvgatev1.FinishReason_FINISH_REASON_LENGTH ||
		finished.GetUsage().GetCompletionTokens() != maxTokens {
		t.Errorf("Generate: started %v, %d tokens, finished %v; want %d tokens to LENGTH", started, tokens, finished, maxTokens)
	}

	// Drain: NOT_SERVING, new calls refused, the gRPC server still up.
	if err := s.Drain(ctx); err != nil {
		t.Errorf("Drain: %v", err)
	}
	checkHealth(ctx, t, hc, healthpb.HealthCheckResponse_NOT_SERVING)
	refused, err := gen.Generate(ctx, &kvgatev1.GenerateRequest{
		Prompt: &kvgatev1.GenerateRequest_Text{Text: "Once"}, MaxTokens: 4,
	})
	if err == nil {
		_, err = refused.Recv() // the refusal comes as the stream's status
	}
	if status.Code(err) != codes.Unavailable || errorInfoReason(err) != "DRAINING" {
		t.Errorf("Generate after Drain: %v; want UNAVAILABLE DRAINING", err)
	}
	if err := s.Drain(ctx); err != nil {
		t.Errorf("second Drain: %v", err)
	}

	// Close, twice; the port is free again.
	for i := range 2 {
		if err := s.Close(); err != nil {
			t.Errorf("Close #%d: %v", i+1, err)
		}
	}
	select {
	case <-s.Done():
		t.Errorf("Done closed: %v", s.Err())
	default:
	}
	l, err := net.Listen("tcp", addr.String())
	if err != nil {
		t.Errorf("the port is still in use after Close: %v", err)
	} else {
		l.Close()
	}
	out := logs.String()
	for _, want := range []string{
		`msg="kvgate listening" addr=` + addr.String(),
		`msg="kvgate ready" addr=` + addr.String(),
		`msg="model loaded"`,
		"msg=draining timeout=1m0s running=0 queued=0",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the log lacks %s:\n%s", want, out)
		}
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if last := lines[len(lines)-1]; !strings.Contains(last, "msg=stopped cells_in_use=0 ") || !strings.HasSuffix(last, " running=0") {
		t.Errorf("last log line: %s", last)
	}
}

// TestStopWhileLoading checks the two ways a loading server stops: Start's
// ctx cancelled, which fails the load and closes Done with the context's
// error, and Close, which stops the load without a failure.
func TestStopWhileLoading(t *testing.T) {
	t.Run("ctx cancelled", func(t *testing.T) {
		proxy := newStalledProxy(t)
		var logs syncBuffer
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		s, err := Start(ctx, testConfig(&logs))
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		proxy.waitRequested(t)
		cancel()
		select {
		case <-s.Done():
		case <-time.After(time.Minute):
			t.Fatalf("cancelling ctx did not stop the load\n%s", logs.String())
		}
		if err := s.Err(); !errors.Is(err, context.Canceled) {
			t.Errorf("Err: %v, want context.Canceled", err)
		}
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		select {
		case <-s.Ready():
			t.Error("ready after a cancelled load")
		default:
		}
	})

	t.Run("Close", func(t *testing.T) {
		proxy := newStalledProxy(t)
		var logs syncBuffer
		s, err := Start(t.Context(), testConfig(&logs))
		if err != nil {
			t.Fatal(err)
		}
		proxy.waitRequested(t)
		closed := make(chan error, 1)
		go func() { closed <- s.Close() }()
		select {
		case err := <-closed:
			if err != nil {
				t.Errorf("Close: %v", err)
			}
		case <-time.After(time.Minute):
			t.Fatalf("Close did not stop the load\n%s", logs.String())
		}
		select {
		case <-s.Done():
			t.Errorf("Done closed by Close: %v", s.Err())
		default:
		}
		if strings.Contains(logs.String(), "msg=stopped") {
			t.Errorf("a server that never served logged stopped:\n%s", logs.String())
		}
	})
}

// TestCloseEndsStreams checks that Close ends the streams still running,
// both under a Drain that would wait for them for ten minutes (which stops
// waiting) and without one, and that no cell is in use afterwards.
func TestCloseEndsStreams(t *testing.T) {
	spec, err := mkmodel.Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	model := testmodels.Random(t, "tiny-16k", spec)
	for _, drain := range []bool{true, false} {
		t.Run(map[bool]string{true: "during Drain", false: "without Drain"}[drain], func(t *testing.T) {
			var logs syncBuffer
			cfg := testConfig(&logs)
			cfg.Model = model
			cfg.Ctx = 16384
			cfg.MaxSeqs = 1
			cfg.DrainTimeout = 10 * time.Minute
			s, err := Start(t.Context(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			waitReady(ctx, t, s)
			stream, err := kvgatev1.NewGenerateServiceClient(dial(t, s.Addr())).Generate(ctx, &kvgatev1.GenerateRequest{
				Prompt: &kvgatev1.GenerateRequest_Text{Text: "Once upon a time"}, MaxTokens: 16000, IgnoreEos: true,
			})
			if err != nil {
				t.Fatal(err)
			}
			for tokens := 0; tokens == 0; { // the stream runs
				resp, err := stream.Recv()
				if err != nil {
					t.Fatal(err)
				}
				tokens += len(resp.GetChunk().GetTokenIds())
			}
			drained := make(chan error, 1)
			if drain {
				go func() { drained <- s.Drain(context.Background()) }()
				for deadline := time.Now().Add(time.Minute); !strings.Contains(logs.String(), "msg=draining"); {
					if time.Now().After(deadline) {
						t.Fatalf("the drain did not start\n%s", logs.String())
					}
					time.Sleep(10 * time.Millisecond)
				}
			}
			start := time.Now()
			if err := s.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
			if took := time.Since(start); took > 30*time.Second {
				t.Errorf("Close took %v", took)
			}
			if drain {
				if err := <-drained; err != nil {
					t.Errorf("Drain: %v", err)
				}
			}
			for {
				_, err := stream.Recv()
				if err == nil {
					continue
				}
				if status.Code(err) != codes.Unavailable {
					t.Errorf("the stream ended with %v, want UNAVAILABLE", err)
				}
				break
			}
			out := logs.String()
			want := "msg=\"closed while draining: cancelling running streams\" running=1"
			if !drain {
				want = "msg=draining timeout=0s running=1"
			}
			if !strings.Contains(out, want) {
				t.Errorf("the log lacks %s:\n%s", want, out)
			}
			lines := strings.Split(strings.TrimSpace(out), "\n")
			if last := lines[len(lines)-1]; !strings.Contains(last, "msg=stopped cells_in_use=0 ") || !strings.HasSuffix(last, " running=0") {
				t.Errorf("last log line: %s", last)
			}
		})
	}
}

// TestStartInvalid checks that Start refuses a configuration Validate
// refuses, before binding anything, and closes the listener it was given.
func TestStartInvalid(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(io.Discard)
	cfg.Listener = l
	cfg.Ctx = 0
	if s, err := Start(t.Context(), cfg); err == nil || !strings.Contains(err.Error(), "--ctx 0") {
		if s != nil {
			s.Close()
		}
		t.Fatalf("Start with Ctx 0: %v", err)
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("the given listener is still open: Accept: %v", err)
	}
}

// TestConfigValidate covers the settings Validate refuses, each with a
// message naming its flag.
func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		set  func(*Config)
		want string // part of the error; empty: accepted
	}{
		{"defaults", func(*Config) {}, ""},
		{"deterministic without prefix cache", func(c *Config) { c.Deterministic, c.PrefixCache = true, false }, ""},
		{"deterministic", func(c *Config) { c.Deterministic = true }, "--deterministic needs --prefix-cache=false"},
		{"deterministic max seqs", func(c *Config) { c.Deterministic, c.PrefixCache, c.MaxSeqs = true, false, 254 }, "two sequence ids for itself"},
		{"deterministic max seqs fit", func(c *Config) { c.Deterministic, c.PrefixCache, c.MaxSeqs = true, false, 253 }, ""},
		{"ctx", func(c *Config) { c.Ctx = 0 }, "--ctx 0: must be positive"},
		{"ctx too large", func(c *Config) { c.Ctx = 3000000000 }, "--ctx 3000000000: must be at most"},
		{"max seqs", func(c *Config) { c.MaxSeqs = 257 }, "--max-seqs 257: must be in [1, 256]"},
		{"batch", func(c *Config) { c.Batch = 0 }, "--batch 0"},
		{"max queue", func(c *Config) { c.MaxQueue = -1 }, "--max-queue -1"},
		{"max stop", func(c *Config) { c.MaxStop = -1 }, "--max-stop -1"},
		{"threads", func(c *Config) { c.Threads = -1 }, "--threads -1"},
		{"stream buffer max", func(c *Config) { c.StreamBuffer = 65536 }, ""},
		{"stream buffer", func(c *Config) { c.StreamBuffer = 65537 }, "--stream-buffer 65537: must be in [1, 65536]"},
		{"max streams per conn", func(c *Config) { c.MaxStreamsPerConn = 0 }, "--max-streams-per-conn 0"},
		{"max connections", func(c *Config) { c.MaxConnections = 0 }, "--max-connections 0"},
		{"handshake timeout", func(c *Config) { c.HandshakeTimeout = 0 }, "--handshake-timeout 0s"},
		{"max connection idle", func(c *Config) { c.MaxConnIdle = -time.Second }, "--max-connection-idle -1s"},
		{"max prompt bytes", func(c *Config) { c.MaxPromptBytes = -1 }, "--max-prompt-bytes -1"},
		{"default max tokens", func(c *Config) { c.DefaultMaxTokens = -1 }, "--default-max-tokens -1"},
		{"max tokenize bytes", func(c *Config) { c.MaxTokenizeBytes = 0 }, "--max-tokenize-bytes 0"},
		{"tokenizer budget", func(c *Config) { c.TokenizerBudget = c.MaxTokenizeBytes - 1 }, "must be at least --max-tokenize-bytes"},
		{"max priority", func(c *Config) { c.MaxPriority = 3000000000 }, "--max-priority 3000000000"},
		{"negative max priority", func(c *Config) { c.MaxPriority = -5 }, ""},
		{"tenant max share", func(c *Config) { c.TenantMaxShare = 0 }, "--tenant-max-share 0"},
		{"tenant max share above 1", func(c *Config) { c.TenantMaxShare = 1.5 }, "--tenant-max-share 1.5"},
		{"tenant max share part", func(c *Config) { c.TenantMaxShare = 0.25 }, ""},
		{"tenant max queued", func(c *Config) { c.TenantMaxQueued = -1 }, "--tenant-max-queued -1"},
		{"kv type", func(c *Config) { c.KVType = "q8_0" }, `--kv-type "q8_0": want f16 or f32`},
		{"kv type f32", func(c *Config) { c.KVType = "f32" }, ""},
		{"kv layout", func(c *Config) { c.KVLayout = "paged" }, `--kv-layout "paged": want unified or streams`},
		{"kv layout streams", func(c *Config) { c.KVLayout, c.PrefixCache, c.Ctx, c.MaxSeqs = LayoutStreams, false, 8192, 32 }, ""},
		{"kv layout streams prefix cache", func(c *Config) { c.KVLayout, c.Ctx, c.MaxSeqs = LayoutStreams, 16384, 32 }, ""},
		{"kv layout streams prefix cache small", func(c *Config) { c.KVLayout, c.Ctx, c.MaxSeqs = LayoutStreams, 8192, 32 }, "raise --ctx to 16384"},
		{"kv layout streams cache streams", func(c *Config) { c.KVLayout, c.Ctx, c.MaxSeqs, c.CacheStreams = LayoutStreams, 8192, 16, 16 }, ""},
		{"kv layout streams too many", func(c *Config) { c.KVLayout, c.Ctx, c.MaxSeqs, c.CacheStreams = LayoutStreams, 1<<20, 200, 100 }, "make 300 streams, more than 256"},
		{"cache streams", func(c *Config) { c.CacheStreams = -1 }, "--cache-streams -1"},
		{"kv layout streams deterministic", func(c *Config) { c.KVLayout, c.PrefixCache, c.Deterministic = LayoutStreams, false, true }, "--kv-layout streams and --deterministic"},
		{"kv layout streams small", func(c *Config) { c.KVLayout, c.PrefixCache, c.Ctx, c.MaxSeqs = LayoutStreams, false, 4096, 64 }, "raise --ctx to 16384"},
		{"admission", func(c *Config) { c.Admission = "lottery" }, `--admission "lottery"`},
		{"optimistic", func(c *Config) { c.Admission = "optimistic" }, ""},
		{"watermark", func(c *Config) { c.Watermark = -1 }, "--watermark -1"},
		{"max prompt tokens", func(c *Config) { c.MaxPromptTokens = -1 }, "--max-prompt-tokens -1"},
		{"max completion tokens", func(c *Config) { c.MaxCompletionTokens = -1 }, "--max-completion-tokens -1"},
		{"max recv msg size", func(c *Config) { c.MaxRecvMsgSize = 0 }, "--max-recv-msg-size 0"},
		{"drain timeout", func(c *Config) { c.DrainTimeout = -time.Second }, "--drain-timeout -1s"},
		{"max connection age", func(c *Config) { c.MaxConnAge = -time.Second }, "--max-connection-age -1s"},
		{"max connection age grace", func(c *Config) { c.MaxConnAgeGrace = -time.Second }, "--max-connection-age-grace -1s"},
		{"pprof", func(c *Config) { c.Pprof = true }, "--pprof needs --metrics-listen"},
		{"pprof with metrics", func(c *Config) { c.Pprof, c.MetricsListen = true, "127.0.0.1:0" }, ""},
		{"tls cert alone", func(c *Config) { c.TLSCert = "cert.pem" }, "--tls-cert and --tls-key go together"},
		{"tls key alone", func(c *Config) { c.TLSKey = "key.pem" }, "--tls-cert and --tls-key go together"},
		{"client ca alone", func(c *Config) { c.ClientCA = "ca.pem" }, "--client-ca needs --tls-cert and --tls-key"},
		{"llama log", func(c *Config) { c.LlamaLog = "loud" }, `--llama-log "loud"`},
		{"llama log none", func(c *Config) { c.LlamaLog = "none" }, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig()
			tc.set(&c)
			err := c.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("Validate: %v, want accepted", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("Validate: %v, want an error containing %q", err, tc.want)
			}
		})
	}
	if err := (&Config{}).Validate(); err == nil {
		t.Error("the zero Config is accepted")
	}
}

// TestStreamsLayout serves with a KV stream per sequence: GetModelInfo
// reports the stream as the most a sequence may hold, a request that fits
// a stream runs to its end, and one a token over the stream is refused
// with INVALID_ARGUMENT although the pool has room for it.
func TestStreamsLayout(t *testing.T) {
	var logs syncBuffer
	cfg := testConfig(&logs)
	cfg.KVLayout, cfg.PrefixCache, cfg.Ctx, cfg.MaxSeqs = LayoutStreams, false, 1024, 4
	s, err := Start(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	waitReady(ctx, t, s)
	gen := kvgatev1.NewGenerateServiceClient(dial(t, s.Addr()))
	info, err := gen.GetModelInfo(ctx, &kvgatev1.GetModelInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.GetKvCells() != 1024 || info.GetMaxSequenceTokens() != 256 {
		t.Fatalf("kv_cells %d, max_sequence_tokens %d: want 1024 and 256", info.GetKvCells(), info.GetMaxSequenceTokens())
	}
	stats, err := kvgatev1.NewCacheServiceClient(dial(t, s.Addr())).GetCacheStats(ctx, &kvgatev1.GetCacheStatsRequest{})
	if err != nil || stats.GetDecodeThreads() != 1 {
		t.Errorf("GetCacheStats: decode_threads %d, %v; want --threads 1", stats.GetDecodeThreads(), err)
	}
	if !strings.Contains(logs.String(), "kv_layout=streams sequence_cells=256") {
		t.Errorf("the ready line does not name the layout:\n%s", logs.String())
	}
	prompt := &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: []int32{1, 300, 301, 302}}}
	generate := func(maxTokens uint32) (int, error) {
		stream, err := gen.Generate(ctx, &kvgatev1.GenerateRequest{Prompt: prompt, MaxTokens: maxTokens, IgnoreEos: true})
		if err != nil {
			return 0, err
		}
		n := 0
		for {
			resp, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				return n, nil
			}
			if err != nil {
				return n, err
			}
			n += len(resp.GetChunk().GetTokenIds())
		}
	}
	if n, err := generate(252); err != nil || n != 252 {
		t.Fatalf("a request that fills a stream: %d tokens, %v", n, err)
	}
	if _, err := generate(253); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("a request a token over a stream: %v, want INVALID_ARGUMENT", err)
	}
}
