package obs

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// testService is a test-only GenerateService: Tokenize panics on the text
// "panic", and Generate streams one chunk and reports token counts through
// the annotation.
type testService struct {
	kvgatev1.UnimplementedGenerateServiceServer
}

type testStatsKey struct{}

func (testService) Tokenize(_ context.Context, req *kvgatev1.TokenizeRequest) (*kvgatev1.TokenizeResponse, error) {
	if req.GetText() == "panic" {
		panic("test-only handler panics")
	}
	return &kvgatev1.TokenizeResponse{Ids: []int32{1, 2, 3}}, nil
}

func (testService) Generate(req *kvgatev1.GenerateRequest, stream grpc.ServerStreamingServer[kvgatev1.GenerateResponse]) error {
	if cs, ok := stream.Context().Value(testStatsKey{}).(*CallStats); ok {
		cs.PromptTokens, cs.CompletionTokens, cs.QueueWait = 7, int(req.GetMaxTokens()), 1500*time.Microsecond
	}
	return stream.Send(&kvgatev1.GenerateResponse{Event: &kvgatev1.GenerateResponse_Chunk{Chunk: &kvgatev1.Chunk{Text: "x"}}})
}

// syncBuffer is a bytes.Buffer safe for the concurrent writes of a logger.
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

// startChain serves testService and health over bufconn through the chain
// that ServerOptions builds from o, and returns a client connection.
func startChain(t *testing.T, o ChainOptions, dial ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(ServerOptions(o)...)
	kvgatev1.RegisterGenerateServiceServer(srv, testService{})
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(lis) }()
	dial = append([]grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}, dial...)
	conn, err := grpc.NewClient("passthrough:///bufconn", dial...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		srv.Stop()
		<-served
	})
	return conn
}

func testAnnotator(ctx context.Context, fullMethod string) (context.Context, func() CallStats) {
	if fullMethod != kvgatev1.GenerateService_Generate_FullMethodName {
		return ctx, nil
	}
	cs := &CallStats{}
	return context.WithValue(ctx, testStatsKey{}, cs), func() CallStats { return *cs }
}

// TestRecovery checks that a panicking handler is answered INTERNAL,
// counted and logged, and that the server goes on serving.
func TestRecovery(t *testing.T) {
	var logs syncBuffer
	m := NewMetrics()
	conn := startChain(t, ChainOptions{
		Logger:  slog.New(slog.NewTextHandler(&logs, nil)),
		Metrics: m,
	})
	c := kvgatev1.NewGenerateServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := c.Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: "panic"})
	if status.Code(err) != codes.Internal {
		t.Fatalf("panicking handler: got %v, want INTERNAL", err)
	}
	for range 2 {
		if _, err := c.Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: "fine"}); err != nil {
			t.Fatalf("call after the panic: %v", err)
		}
	}
	if n := counterValue(t, m.panics); n != 1 {
		t.Errorf("kvgate_handler_panics_total = %v, want 1", n)
	}
	out := logs.String()
	if !strings.Contains(out, `msg="panic in handler" panic="test-only handler panics"`) || !strings.Contains(out, "grpc.code=Internal") {
		t.Errorf("log lacks the panic or its INTERNAL call line:\n%s", out)
	}
}

// TestCallLog checks that every call gets exactly one log line with its
// code and duration, and a Generate call its token counts and queue wait,
// with no payload.
func TestCallLog(t *testing.T) {
	var logs syncBuffer
	conn := startChain(t, ChainOptions{
		Logger:   slog.New(slog.NewJSONHandler(&logs, nil)),
		Annotate: testAnnotator,
	})
	c := kvgatev1.NewGenerateServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := c.Generate(ctx, &kvgatev1.GenerateRequest{
		Prompt: &kvgatev1.GenerateRequest_Text{Text: "secret prompt"}, MaxTokens: 5,
	})
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := stream.Recv(); err != nil {
			break
		}
	}
	if _, err := c.Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: "secret text"}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d log lines for 2 calls, want 2:\n%s", len(lines), logs.String())
	}
	gen := lines[0]
	for _, want := range []string{`"grpc.method":"Generate"`, `"grpc.code":"OK"`, `"grpc.time_ms":`,
		`"prompt_tokens":7`, `"completion_tokens":5`, `"queue_wait_ms":1.5`} {
		if !strings.Contains(gen, want) {
			t.Errorf("Generate log line lacks %s: %s", want, gen)
		}
	}
	if strings.Contains(lines[1], "prompt_tokens") || !strings.Contains(lines[1], `"grpc.method":"Tokenize"`) {
		t.Errorf("Tokenize log line: %s", lines[1])
	}
	if strings.Contains(logs.String(), "secret") {
		t.Errorf("a payload was logged:\n%s", logs.String())
	}
}

// TestAuthInProcess checks the auth interceptor: health is open, other
// calls need a valid bearer token.
func TestAuthInProcess(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(path, []byte("# operators\n  tok-1  \n\ntok-2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tokens, err := LoadTokens(path)
	if err != nil {
		t.Fatal(err)
	}
	conn := startChain(t, ChainOptions{Tokens: tokens})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health without a token: %v", err)
	}
	c := kvgatev1.NewGenerateServiceClient(conn)
	for _, tc := range []struct {
		md   []string
		want codes.Code
	}{
		{nil, codes.Unauthenticated},
		{[]string{"authorization", "Bearer nope"}, codes.Unauthenticated},
		{[]string{"authorization", "Basic tok-1"}, codes.Unauthenticated},
		{[]string{"authorization", "Bearer tok-1"}, codes.OK},
		{[]string{"authorization", "bearer tok-2"}, codes.OK},
		{[]string{"authorization", "Bearer # operators"}, codes.Unauthenticated},
	} {
		cctx := ctx
		if tc.md != nil {
			cctx = metadata.AppendToOutgoingContext(ctx, tc.md...)
		}
		_, err := c.Tokenize(cctx, &kvgatev1.TokenizeRequest{Text: "x"})
		if got := status.Code(err); got != tc.want {
			t.Errorf("metadata %q: got %v, want %v", tc.md, err, tc.want)
		}
	}
	// A reload swaps the set.
	if err := os.WriteFile(path, []byte("tok-3\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if n, err := tokens.Reload(); err != nil || n != 1 {
		t.Fatalf("reload: %d tokens, %v", n, err)
	}
	if tokens.Valid("tok-1") || !tokens.Valid("tok-3") {
		t.Error("reload did not replace the tokens")
	}
	// A failed reload keeps them.
	os.Remove(path)
	if _, err := tokens.Reload(); err == nil || !tokens.Valid("tok-3") {
		t.Errorf("failed reload: err %v, tok-3 valid %v", err, tokens.Valid("tok-3"))
	}
}

// counterValue reads a counter's value.
func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
