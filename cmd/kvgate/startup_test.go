package main

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"flag"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	mk "github.com/kvgate/kvgate/internal/mkmodel"
	"github.com/kvgate/kvgate/internal/models"
	"github.com/kvgate/kvgate/internal/testmodels"
	"github.com/kvgate/kvgate/service"
)

// oneShot runs kvgate with args and env until it exits, and returns its
// combined output, its exit error, how long it ran and its peak RSS in kB.
func oneShot(t *testing.T, env []string, args ...string) (string, error, time.Duration, int64) {
	t.Helper()
	cmd := exec.Command(kvgateBin, args...)
	cmd.Env = append(append(os.Environ(), "KVGATE_CACHE_DIR="+t.TempDir()), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	var rss int64
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		rss = ru.Maxrss // kB on Linux
	}
	return out.String(), err, took, rss
}

// stalledProxy is a Go module proxy serving a module zip that holds the
// real stories260K at the default model's path, but only once release is
// called: until then a download of it hangs, as on a slow network.
type stalledProxy struct {
	*httptest.Server
	requested chan struct{} // closed on the first request
	release   func()
}

func newStalledProxy(t *testing.T) *stalledProxy {
	t.Helper()
	model, err := os.ReadFile(testModel(t, testmodels.Stories260K))
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
	return p
}

// env returns the environment that makes kvgate fetch the default model
// from p, with an empty module cache.
func (p *stalledProxy) env(t *testing.T) []string {
	return []string{"GOPROXY=" + p.URL, "GOMODCACHE=" + t.TempDir()}
}

// TestStartupPortInUse shows that a port already in use fails before the
// model loads: the default model's download is stalled forever, so a
// server that loaded first would never get to the port. The whole run must
// also take under 2 s.
func TestStartupPortInUse(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	proxy := newStalledProxy(t)
	out, err, took, _ := oneShot(t, proxy.env(t), "serve", "--listen", l.Addr().String(), "--threads", "1")
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("kvgate serve on a used port: %v\n%s", err, out)
	}
	if !strings.Contains(out, "address already in use") || !strings.Contains(out, l.Addr().String()) {
		t.Errorf("the error does not name the port and the cause:\n%s", out)
	}
	select {
	case <-proxy.requested:
		t.Error("the server asked for the model before binding its port")
	default:
	}
	if strings.Contains(out, "model loaded") {
		t.Errorf("the model loaded before the port was bound:\n%s", out)
	}
	t.Logf("failed in %v: %s", took.Round(time.Millisecond), lastLine(out))
	if took > 2*time.Second {
		t.Errorf("took %v, want under 2 s", took)
	}
}

// TestStartupHealthWhileLoading shows that the server listens while its
// model is still coming, answers health checks NOT_SERVING and kvgate calls
// UNAVAILABLE (MODEL_LOADING, with a retry delay) until then, and SERVING
// once ready; a health Watch sees the change. A SIGTERM during the load
// stops the server promptly and cleanly.
func TestStartupHealthWhileLoading(t *testing.T) {
	t.Run("ready", func(t *testing.T) {
		proxy := newStalledProxy(t)
		s := startServerUntil(t, listenRE, proxy.env(t), "--ctx", "256", "--metrics-listen", "127.0.0.1:0")
		<-proxy.requested // the model is on its way, and stalled
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		hc := healthpb.NewHealthClient(s.conn)
		watch, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{Service: kvgatev1.GenerateService_ServiceDesc.ServiceName})
		if err != nil {
			t.Fatal(err)
		}
		if first, err := watch.Recv(); err != nil || first.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
			t.Fatalf("first health watch event: %v, %v; want NOT_SERVING", first, err)
		}
		for _, name := range []string{"", kvgatev1.GenerateService_ServiceDesc.ServiceName, kvgatev1.CacheService_ServiceDesc.ServiceName} {
			resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: name})
			if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
				t.Errorf("health of %q while loading: %v, %v", name, resp, err)
			}
		}
		_, err = s.Generate().Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: "Once"})
		if st, _ := status.FromError(err); st.Code() != codes.Unavailable || errorInfoReason(err) != service.ReasonModelLoading {
			t.Errorf("Tokenize while loading: %v; want UNAVAILABLE %s", err, service.ReasonModelLoading)
		} else if !hasRetryInfo(err) {
			t.Errorf("Tokenize while loading has no RetryInfo: %v", err)
		}
		if code := healthzCode(t, s); code != http.StatusServiceUnavailable {
			t.Errorf("/healthz while loading: %d, want 503", code)
		}

		proxy.release()
		waitFor(t, 5*time.Minute, "the ready log line", func() bool { return readyRE.MatchString(s.Logs()) })
		next, err := watch.Recv()
		if err != nil || next.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health watch after the load: %v, %v; want SERVING", next, err)
		}
		if resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health once ready: %v, %v", resp, err)
		}
		if _, err := s.Generate().Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: "Once"}); err != nil {
			t.Errorf("Tokenize once ready: %v", err)
		}
		if code := healthzCode(t, s); code != http.StatusOK {
			t.Errorf("/healthz once ready: %d, want 200", code)
		}
	})

	t.Run("SIGTERM while loading", func(t *testing.T) {
		proxy := newStalledProxy(t)
		s := startServerUntil(t, listenRE, proxy.env(t), "--ctx", "256")
		<-proxy.requested
		if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case <-s.done:
		case <-time.After(time.Minute):
			t.Fatalf("a SIGTERM during the download did not stop the server\n%s", s.Logs())
		}
		if s.err != nil || !strings.Contains(s.Logs(), `msg="stopped while loading"`) {
			t.Errorf("exit %v; want a clean stop with a log line\n%s", s.err, s.Logs())
		}
	})
}

// healthzCode returns the status code of the server's /healthz.
func healthzCode(t *testing.T, s *server) int {
	t.Helper()
	m := metricsListenRE.FindStringSubmatch(s.Logs())
	if m == nil {
		t.Fatalf("no metrics address in the log\n%s", s.Logs())
	}
	resp, err := http.Get("http://" + m[1] + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

// hasRetryInfo reports whether err's status carries a RetryInfo.
func hasRetryInfo(err error) bool {
	st, _ := status.FromError(err)
	for _, d := range st.Details() {
		if _, ok := d.(*errdetails.RetryInfo); ok {
			return true
		}
	}
	return false
}

// lastLine returns the last non-empty line of s.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// TestStartupImpossibleContext shows that a --ctx whose KV cache cannot fit
// in memory is refused from the model's header, before anything is
// allocated: with one clear line, little memory, and in under 2 s.
func TestStartupImpossibleContext(t *testing.T) {
	model := testModel(t, testmodels.Stories260K)
	out, err, took, rss := oneShot(t, nil, "serve", "--model", model, "--listen", "127.0.0.1:0", "--threads", "1", "--ctx", "2000000000")
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("kvgate serve --ctx 2000000000: %v\n%s", err, out)
	}
	line := lastLine(out)
	if !regexp.MustCompile(`^kvgate serve: --ctx 2000000000: the KV cache needs at least \S+ TiB .* more than the .* of memory available`).MatchString(line) {
		t.Errorf("the refusal is not one clear line: %q", line)
	}
	if strings.Contains(out, "model loaded") {
		t.Errorf("the model was loaded before the refusal:\n%s", out)
	}
	t.Logf("refused in %v with a peak RSS of %d kB: %s", took.Round(time.Millisecond), rss, line)
	if rss > 200<<10 {
		t.Errorf("peak RSS %d kB, want under 200 MB", rss)
	}
	if took > 2*time.Second {
		t.Errorf("took %v, want under 2 s", took)
	}
}

// TestStartupFlagsBeforeLoad shows that flags whose values are wrong are
// refused before the model is fetched or loaded, each with a message
// naming the flag: the default model's download is stalled forever, so a
// check made after it would never be reached.
func TestStartupFlagsBeforeLoad(t *testing.T) {
	proxy := newStalledProxy(t)
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--kv-type", "q8_0"}, `--kv-type "q8_0": want f16 or f32`},
		{[]string{"--admission", "lottery"}, `--admission "lottery"`},
		{[]string{"--threads", "-1"}, "--threads -1"},
		{[]string{"--ctx", "3000000000"}, "--ctx 3000000000: must be at most"},
		{[]string{"--watermark", "-1"}, "--watermark -1"},
		{[]string{"--log-format", "yaml"}, "--log-format"},
		{[]string{"--auth-tokens", "/nonexistent/tokens"}, "--auth-tokens"},
		{[]string{"--chat-template", "nope"}, `--chat-template "nope": not a llama.cpp built-in template; want one of`},
		{[]string{"--max-chat-messages", "0"}, "--max-chat-messages 0: must be positive"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			out, err, _, _ := oneShot(t, proxy.env(t), append([]string{"serve", "--listen", "127.0.0.1:0"}, tt.args...)...)
			if err == nil || !strings.Contains(out, tt.want) {
				t.Errorf("exit %v; want an error with %q:\n%s", err, tt.want, out)
			}
		})
	}
	select {
	case <-proxy.requested:
		t.Error("a server asked for the model before refusing its flags")
	default:
	}
}

// TestSecondSignalDuringDrain shows that a second SIGTERM during a drain
// stops the server at once: the stream the drain waits for (16,000 tokens,
// far from done) is cut, the process exits with status 1 and a log line
// that says so, and the graceful path's "stopped" line never comes.
func TestSecondSignalDuringDrain(t *testing.T) {
	spec, err := mk.Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	model := testmodels.Random(t, "tiny-16k", spec)
	s := startServer(t, "--model", model, "--ctx", "16384", "--max-seqs", "1", "--drain-timeout", "10m")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	stream, err := s.Generate().Generate(ctx, &kvgatev1.GenerateRequest{
		Prompt: &kvgatev1.GenerateRequest_Text{Text: "Once upon a time"}, MaxTokens: 16000, IgnoreEos: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	tokens := 0
	for tokens == 0 { // the stream runs
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if c := resp.GetChunk(); c != nil {
			tokens += len(c.GetTokenIds())
		}
	}
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "the drain to start", func() bool { return strings.Contains(s.Logs(), "msg=draining") })
	start := time.Now()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.done:
	case <-time.After(time.Minute):
		t.Fatalf("the second SIGTERM did not stop the server\n%s", s.Logs())
	}
	took := time.Since(start)
	var finished bool
	for {
		resp, err := stream.Recv()
		if err != nil {
			break
		}
		if c := resp.GetChunk(); c != nil {
			tokens += len(c.GetTokenIds())
		}
		finished = finished || resp.GetFinished() != nil
	}
	var exit *exec.ExitError
	if !errors.As(s.err, &exit) || exit.ExitCode() != 1 {
		t.Errorf("exit %v, want status 1", s.err)
	}
	logs := s.Logs()
	if !strings.Contains(logs, "second signal: exiting now") {
		t.Errorf("no log line for the second signal\n%s", logs)
	}
	if strings.Contains(logs, "msg=stopped") || finished || tokens >= 16000 {
		t.Errorf("the server waited for the stream (finished %v, %d tokens)\n%s", finished, tokens, logs)
	}
	t.Logf("exited %v after the second signal, the stream cut after %d of 16000 tokens", took.Round(time.Millisecond), tokens)
}

// TestServeHelpListsEnvironment checks that serve -h names the environment
// variable of every flag, and the others serve reads.
func TestServeHelpListsEnvironment(t *testing.T) {
	out, err, _, _ := oneShot(t, nil, "serve", "-h")
	if err != nil {
		t.Fatalf("serve -h: %v\n%s", err, out)
	}
	_, env, ok := strings.Cut(out, "\nEnvironment:\n")
	if !ok {
		t.Fatalf("serve -h has no Environment section:\n%s", out)
	}
	var o serveOptions
	fs := serveFlags(&o)
	want := []string{"KVGATE_CACHE_DIR", "GOPROXY", "GOMODCACHE"}
	fs.VisitAll(func(f *flag.Flag) { want = append(want, envName(f.Name)) })
	for _, name := range want {
		if !regexp.MustCompile(`\b` + name + `\b`).MatchString(env) {
			t.Errorf("serve -h does not list %s", name)
		}
	}
}
