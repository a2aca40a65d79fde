package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/obs"
)

var metricsListenRE = regexp.MustCompile(`msg="metrics listening" addr=(\S+)`)

// metricsURL returns the base URL of the server's metrics listener, read
// from its log.
func (s *server) metricsURL(t testing.TB) string {
	t.Helper()
	m := metricsListenRE.FindStringSubmatch(s.Logs())
	if m == nil {
		t.Fatalf("no metrics listener in the log:\n%s", s.Logs())
	}
	return "http://" + m[1]
}

// lastLog returns the server's last log line.
func (s *server) lastLog() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.logs) == 0 {
		return ""
	}
	return s.logs[len(s.logs)-1]
}

// waitExit waits for the process to exit and returns Wait's error.
func (s *server) waitExit(t testing.TB, timeout time.Duration) error {
	t.Helper()
	select {
	case <-s.done:
		return s.err
	case <-time.After(timeout):
		t.Fatalf("kvgate serve did not exit within %v\n%s", timeout, s.Logs())
		return nil
	}
}

// signal sends sig to the server process.
func (s *server) signal(t testing.TB, sig os.Signal) {
	t.Helper()
	if err := s.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// httpGet fetches url and returns the status code and body.
func httpGet(t testing.TB, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// scrape parses the server's /metrics.
func scrape(t testing.TB, s *server) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := httpGet(t, s.metricsURL(t)+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: HTTP %d", code)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// metricValue sums the series of a family whose labels include want: the
// value of counters and gauges, the sample count of histograms.
func metricValue(fams map[string]*dto.MetricFamily, name string, want ...string) float64 {
	f := fams[name]
	if f == nil {
		return 0
	}
	sum := 0.0
next:
	for _, m := range f.GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(want); i += 2 {
			if labels[want[i]] != want[i+1] {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Histogram != nil:
			sum += float64(m.GetHistogram().GetSampleCount())
		case m.Untyped != nil:
			sum += m.GetUntyped().GetValue()
		}
	}
	return sum
}

// TestMetricsScrape runs a few Generate calls against a real process and
// checks that kvgate's series and the per-RPC series moved by exactly what
// the calls did.
func TestMetricsScrape(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "1024",
		"--metrics-listen", "127.0.0.1:0", "--pprof")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	url := s.metricsURL(t)
	if code, body := httpGet(t, url+"/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Fatalf("/healthz: %d %q", code, body)
	}
	if code, _ := httpGet(t, url+"/debug/pprof/"); code != http.StatusOK {
		t.Fatalf("/debug/pprof/: %d", code)
	}
	info, err := s.Generate().GetModelInfo(ctx, &kvgatev1.GetModelInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if seq := info.GetMaxSequenceTokens(); info.GetMaxPromptTokens() != seq-1 || info.GetMaxCompletionTokens() != seq-1 {
		t.Errorf("default limits: max_prompt_tokens %d, max_completion_tokens %d; want %d", info.GetMaxPromptTokens(), info.GetMaxCompletionTokens(), seq-1)
	}
	if info.GetAdmissionPolicy() != "reserve" || !info.GetPrefixCache() {
		t.Errorf("GetModelInfo: admission_policy %q, prefix_cache %v", info.GetAdmissionPolicy(), info.GetPrefixCache())
	}

	before, statsBefore := scrape(t, s), cacheStats(t, s)
	prompts := []string{"Once upon a time", "The cat", "Lily wanted to play", "One day"}
	var generated, promptTokens, interTokens int
	for i, p := range prompts {
		req := textPrompt(p, uint32(3+2*i))
		req.IgnoreEos, req.SkipPrefixCache = true, true
		r := generateAll(ctx, s.Generate(), req)
		if r.err != nil || r.finished == nil {
			t.Fatalf("call %d: %v", i, r.err)
		}
		generated += int(r.finished.GetUsage().GetCompletionTokens())
		promptTokens += int(r.started.GetPromptTokens())
		interTokens += len(r.chunks) - 1
	}
	badReq := textPrompt("Once", 4)
	badReq.Stop = []string{""}
	bad := generateAll(ctx, s.Generate(), badReq)
	if status.Code(bad.err) != codes.InvalidArgument {
		t.Fatalf("an empty stop string: %v", bad.err)
	}
	after, statsAfter := scrape(t, s), cacheStats(t, s)

	delta := func(name string, labels ...string) float64 {
		return metricValue(after, name, labels...) - metricValue(before, name, labels...)
	}
	steps := float64(statsAfter.GetDecodeStepsTotal() - statsBefore.GetDecodeStepsTotal())
	n := float64(len(prompts))
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"kvgate_generated_tokens_total", nil, float64(generated)},
		{"kvgate_completion_tokens_total", nil, float64(generated)},
		{"kvgate_prompt_tokens_total", nil, float64(promptTokens)},
		{"kvgate_prefill_tokens_total", nil, float64(promptTokens)},
		{"kvgate_admissions_total", nil, n},
		{"kvgate_generate_requests_total", []string{"code", "OK"}, n},
		{"kvgate_generate_requests_total", []string{"code", "InvalidArgument"}, 1},
		{"grpc_server_handled_total", []string{"grpc_method", "Generate", "grpc_code", "OK"}, n},
		{"grpc_server_handled_total", []string{"grpc_method", "Generate", "grpc_code", "InvalidArgument"}, 1},
		{"grpc_server_started_total", []string{"grpc_method", "Generate"}, n + 1},
		{"grpc_server_handling_seconds", []string{"grpc_method", "Generate"}, n + 1},
		{"kvgate_queue_wait_seconds", nil, n},
		{"kvgate_time_to_first_token_seconds", nil, n},
		{"kvgate_inter_token_seconds", nil, float64(interTokens)},
		{"kvgate_decode_steps_total", nil, steps},
		{"kvgate_batch_tokens", nil, steps},
		{"kvgate_batch_sequences", nil, steps},
		{"kvgate_rejections_total", nil, 0},
		{"kvgate_nokvslot_total", nil, 0},
	} {
		if got := delta(c.name, c.labels...); got != c.want {
			t.Errorf("%s%v moved by %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if steps < float64(generated)/n {
		t.Errorf("only %v decode steps for %d tokens", steps, generated)
	}
	if v := metricValue(after, "kvgate_kv_pool_cells"); v != 1024 {
		t.Errorf("kvgate_kv_pool_cells = %v", v)
	}
	for _, state := range []string{"used", "reserved"} {
		if v := metricValue(after, "kvgate_kv_cells", "state", state); v != 0 {
			t.Errorf("kvgate_kv_cells{state=%q} = %v after every call ended", state, v)
		}
	}
	if v := metricValue(after, "kvgate_kv_cells", "state", "free"); v != 1024 {
		t.Errorf("kvgate_kv_cells{state=free} = %v", v)
	}

	// One log line per Generate call, with its token counts. The server
	// writes a call's line before the client sees the call end, but the
	// harness reads the server's stderr on its own goroutine: wait until
	// it has read them all.
	var lines []string
	waitFor(t, time.Minute, "the Generate calls' log lines", func() bool {
		lines = lines[:0]
		for _, l := range strings.Split(s.Logs(), "\n") {
			if strings.Contains(l, `msg="finished call"`) && strings.Contains(l, "grpc.method=Generate") {
				lines = append(lines, l)
			}
		}
		return len(lines) >= len(prompts)+1
	})
	if len(lines) != len(prompts)+1 {
		t.Fatalf("%d Generate log lines for %d calls:\n%s", len(lines), len(prompts)+1, strings.Join(lines, "\n"))
	}
	if !strings.Contains(lines[0], "grpc.code=OK") || !strings.Contains(lines[0], "completion_tokens=3") ||
		!strings.Contains(lines[0], "queue_wait_ms=") || !strings.Contains(lines[0], "grpc.time_ms=") {
		t.Errorf("Generate log line: %s", lines[0])
	}
}

// TestLimits checks the server-side limits: reported by GetModelInfo and
// named in the INVALID_ARGUMENT field violations.
func TestLimits(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "256",
		"--max-prompt-tokens", "8", "--max-completion-tokens", "16", "--max-stop", "1")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	info, err := s.Generate().GetModelInfo(ctx, &kvgatev1.GetModelInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.GetMaxPromptTokens() != 8 || info.GetMaxCompletionTokens() != 16 || info.GetMaxStopStrings() != 1 {
		t.Fatalf("GetModelInfo limits: prompt %d, completion %d, stop %d", info.GetMaxPromptTokens(), info.GetMaxCompletionTokens(), info.GetMaxStopStrings())
	}
	ids := make([]int32, 9)
	for i := range ids {
		ids[i] = int32(10 + i)
	}
	for _, c := range []struct {
		req         *kvgatev1.GenerateRequest
		field, name string
	}{
		{&kvgatev1.GenerateRequest{Prompt: &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: ids}}, MaxTokens: 4},
			"tokens.ids", "max_prompt_tokens"},
		{textPrompt("Once", 17), "max_tokens", "max_completion_tokens"},
		{&kvgatev1.GenerateRequest{Prompt: &kvgatev1.GenerateRequest_Text{Text: "Once"}, MaxTokens: 4, Stop: []string{"a", "b"}},
			"stop", "max_stop_strings"},
	} {
		r := generateAll(ctx, s.Generate(), c.req)
		st, _ := status.FromError(r.err)
		if st.Code() != codes.InvalidArgument {
			t.Errorf("%s over its limit: %v", c.field, r.err)
			continue
		}
		var found bool
		for _, d := range st.Details() {
			if br, ok := d.(*errdetails.BadRequest); ok {
				for _, v := range br.GetFieldViolations() {
					found = found || (v.GetField() == c.field && strings.Contains(v.GetDescription(), c.name))
				}
			}
		}
		if !found {
			t.Errorf("no violation of %s naming %s: %v", c.field, c.name, st.Details())
		}
	}
	// At the limits the call runs.
	if r := generateAll(ctx, s.Generate(), &kvgatev1.GenerateRequest{
		Prompt: &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: ids[:8]}}, MaxTokens: 16, Stop: []string{"zzz"},
	}); r.err != nil {
		t.Errorf("a request at the limits: %v", r.err)
	}
}

// TestDrain sends SIGTERM while streams run. With a long drain timeout the
// streams finish, health turns NOT_SERVING and a new call gets
// UNAVAILABLE; with a short one the streams are ended with UNAVAILABLE.
// Either way the process exits 0 and its last log line reports no cell in
// use.
//
// Both need the streams still generating when the signal (and, for the
// second, the drain timeout) comes; nothing can hold a generation back, so
// they run on a 64k-context model whose streams outlast the signal's
// delivery by far: 4000 tokens (at least 1.5 s at the model's fastest) that
// a 60 s drain still lets finish, and 30000 (minutes) against a 100 ms
// drain timeout. stories260K's 600 and 1900 tokens took half a second and
// two.
func TestDrain(t *testing.T) {
	long := tinyModel(t) // 64k context: streams that outlast a signal
	// start begins n streams of maxTokens tokens and returns once all are
	// admitted; each channel receives its stream's outcome.
	start := func(t *testing.T, s *server, n int, maxTokens uint32) []chan streamResult {
		out := make([]chan streamResult, n)
		for i := range out {
			out[i] = make(chan streamResult, 1)
			req := textPrompt("Once upon a time", maxTokens)
			req.IgnoreEos = true
			stream, err := s.Generate().Generate(t.Context(), req)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := stream.Recv(); err != nil { // started: admitted
				t.Fatal(err)
			}
			go func() {
				var r streamResult
				for {
					resp, err := stream.Recv()
					if err != nil {
						if !errors.Is(err, io.EOF) {
							r.err = err
						}
						break
					}
					if f := resp.GetFinished(); f != nil {
						r.finished = f
					}
				}
				out[i] <- r
			}()
		}
		return out
	}
	checkExit := func(t *testing.T, s *server) {
		if err := s.waitExit(t, 2*time.Minute); err != nil {
			t.Fatalf("exit: %v", err)
		}
		// Cells the prefix cache still holds are not in use.
		last := s.lastLog()
		if !strings.Contains(last, "msg=stopped") || !strings.Contains(last, " cells_in_use=0 ") ||
			!strings.Contains(last, " cells_reserved=0 ") || !strings.HasSuffix(last, " running=0") {
			t.Fatalf("last log line: %s", last)
		}
	}

	t.Run("streams finish", func(t *testing.T) {
		s := startServer(t, "--model", long, "--ctx", "16384", "--drain-timeout", "60s")
		const n, tokens = 2, 4000
		streams := start(t, s, n, tokens)
		s.signal(t, syscall.SIGTERM)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		waitFor(t, time.Minute, "health NOT_SERVING", func() bool {
			hc, err := healthpb.NewHealthClient(s.conn).Check(ctx, &healthpb.HealthCheckRequest{})
			return err == nil && hc.GetStatus() == healthpb.HealthCheckResponse_NOT_SERVING
		})
		r := generateAll(ctx, s.Generate(), textPrompt("Once", 4))
		if st, _ := status.FromError(r.err); st.Code() != codes.Unavailable || errorInfoReason(r.err) != "DRAINING" {
			t.Errorf("a new call while draining: %v", r.err)
		}
		for i, c := range streams {
			r := <-c
			if r.err != nil || r.finished.GetUsage().GetCompletionTokens() != tokens {
				t.Errorf("stream %d: %v, finished %v", i, r.err, r.finished)
			}
		}
		checkExit(t, s)
		logs := s.Logs()
		if !strings.Contains(logs, fmt.Sprintf("msg=draining timeout=1m0s running=%d", n)) {
			t.Errorf("the streams were not running when the drain began:\n%s", logs)
		}
		if strings.Contains(logs, "drain timeout") {
			t.Error("the drain timed out")
		}
	})

	t.Run("timeout cancels", func(t *testing.T) {
		s := startServer(t, "--model", long, "--ctx", "65536", "--drain-timeout", "100ms")
		streams := start(t, s, 2, 30000)
		s.signal(t, syscall.SIGTERM)
		for i, c := range streams {
			r := <-c
			if status.Code(r.err) != codes.Unavailable {
				t.Errorf("stream %d after the drain timeout: %v, finished %v", i, r.err, r.finished)
			}
		}
		checkExit(t, s)
		if !strings.Contains(s.Logs(), "drain timeout: cancelling running streams") {
			t.Error("no drain-timeout line in the log")
		}
	})
}

// tlsConn dials the server with the given TLS client configuration.
func tlsConn(t testing.TB, addr string, creds credentials.TransportCredentials, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// tryGenerate runs a short Generate call.
func tryGenerate(conn *grpc.ClientConn) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return generateAll(ctx, kvgatev1.NewGenerateServiceClient(conn), textPrompt("Once", 4)).err
}

// TestTLS serves TLS and then mutual TLS with certificates made in the
// test: a client that trusts the CA is served; under mTLS a client without
// a certificate, or with one from another CA, is refused, and the kvgate
// client command works with its --tls-* flags.
func TestTLS(t *testing.T) {
	model := testModel(t, "stories260K.gguf")
	dir := t.TempDir()
	ca := newTestCA(t, dir, "kvgate-test")
	other := newTestCA(t, dir, "other")
	srvCert, srvKey := ca.issue(t, dir, "server", false)
	cliCert, cliKey := ca.issue(t, dir, "client", true)
	strangerCert, strangerKey := other.issue(t, dir, "stranger", true)
	clientTLS := func(t *testing.T, cert, key string) credentials.TransportCredentials {
		cfg, err := obs.ClientTLSConfig(ca.File, cert, key, "")
		if err != nil {
			t.Fatal(err)
		}
		return credentials.NewTLS(cfg)
	}

	t.Run("tls", func(t *testing.T) {
		s := startServer(t, "--model", model, "--ctx", "256", "--tls-cert", srvCert, "--tls-key", srvKey)
		if err := tryGenerate(tlsConn(t, s.addr, clientTLS(t, "", ""))); err != nil {
			t.Fatalf("TLS client: %v", err)
		}
		if err := tryGenerate(tlsConn(t, s.addr, insecure.NewCredentials())); status.Code(err) != codes.Unavailable {
			t.Errorf("plaintext client of a TLS server: %v", err)
		}
		if !strings.Contains(s.Logs(), "tls=true mtls=false") {
			t.Error("the listening line does not report TLS")
		}
	})

	t.Run("mtls", func(t *testing.T) {
		s := startServer(t, "--model", model, "--ctx", "256", "--tls-cert", srvCert, "--tls-key", srvKey, "--client-ca", ca.File)
		if err := tryGenerate(tlsConn(t, s.addr, clientTLS(t, cliCert, cliKey))); err != nil {
			t.Fatalf("client with a certificate: %v", err)
		}
		if err := tryGenerate(tlsConn(t, s.addr, clientTLS(t, "", ""))); status.Code(err) != codes.Unavailable {
			t.Errorf("client without a certificate: %v, want UNAVAILABLE", err)
		}
		if err := tryGenerate(tlsConn(t, s.addr, clientTLS(t, strangerCert, strangerKey))); status.Code(err) != codes.Unavailable {
			t.Errorf("client with another CA's certificate: %v, want UNAVAILABLE", err)
		}
		out, err := exec.Command(kvgateBin, "generate", "--addr", s.addr, "--tls-ca", ca.File,
			"--tls-cert", cliCert, "--tls-key", cliKey, "--max-tokens", "4", "--ignore-eos", "-v", "Once").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "completion: 4") {
			t.Errorf("kvgate generate over mTLS: %v\n%s", err, out)
		}
		out, err = exec.Command(kvgateBin, "generate", "--addr", s.addr, "--tls-ca", ca.File, "Once").CombinedOutput()
		if err == nil {
			t.Errorf("kvgate generate without a client certificate succeeded:\n%s", out)
		}
	})
}

// TestAuthTokens checks bearer-token auth against a real process: a
// missing or wrong token gets UNAUTHENTICATED, health needs none, and a
// SIGHUP reload of the token file takes effect.
func TestAuthTokens(t *testing.T) {
	file := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(file, []byte("# kvgate tokens\ntok-a\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "256", "--auth-tokens", file)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	call := func(token string) error {
		cctx := ctx
		if token != "" {
			cctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
		}
		return generateAll(cctx, s.Generate(), textPrompt("Once", 2)).err
	}
	hc, err := healthpb.NewHealthClient(s.conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || hc.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health without a token: %v, %v", hc, err)
	}
	for _, c := range []struct {
		token string
		want  codes.Code
	}{{"", codes.Unauthenticated}, {"tok-b", codes.Unauthenticated}, {"tok-a", codes.OK}} {
		if err := call(c.token); status.Code(err) != c.want {
			t.Errorf("token %q: %v, want %v", c.token, err, c.want)
		}
	}
	if _, err := s.Cache().GetCacheStats(ctx, &kvgatev1.GetCacheStatsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("GetCacheStats without a token: %v", err)
	}

	if err := os.WriteFile(file, []byte("tok-b\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.signal(t, syscall.SIGHUP)
	waitFor(t, time.Minute, "the token reload", func() bool {
		return strings.Contains(s.Logs(), `msg="auth tokens reloaded" tokens=1`)
	})
	if err := call("tok-a"); status.Code(err) != codes.Unauthenticated {
		t.Errorf("the old token after the reload: %v", err)
	}
	if err := call("tok-b"); err != nil {
		t.Errorf("the new token after the reload: %v", err)
	}
	out, err := exec.Command(kvgateBin, "tokenize", "--addr", s.addr, "--token", "tok-b", "Once").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "tokens") {
		t.Errorf("kvgate tokenize --token: %v\n%s", err, out)
	}
	if out, err := exec.Command(kvgateBin, "tokenize", "--addr", s.addr, "Once").CombinedOutput(); err == nil ||
		!strings.Contains(string(out), "Unauthenticated") {
		t.Errorf("kvgate tokenize without a token: %v\n%s", err, out)
	}
}
