package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/testmodels"
)

// kvgateBin is the kvgate binary built once by TestMain for the end-to-end
// tests.
var kvgateBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kvgate-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	kvgateBin = filepath.Join(dir, "kvgate")
	// The build inherits CGO_CFLAGS / CGO_CXXFLAGS, so it reuses the cgo
	// objects of this test binary from the build cache.
	build := exec.Command("go", "build", "-o", kvgateBin, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build kvgate:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	testmodels.Cleanup()
	os.Exit(code)
}

// testModel returns the path of a real test model (testmodels.Stories260K
// or testmodels.MiniLM), fetched and verified on first use; see package
// testmodels.
func testModel(t testing.TB, name string) string {
	t.Helper()
	return testmodels.Path(t, name)
}

// server is a running kvgate serve process.
type server struct {
	t    testing.TB
	cmd  *exec.Cmd
	addr string
	conn *grpc.ClientConn
	// token, when set, is sent with the harness's own calls (cacheStats,
	// waitQuiet) to a server with --auth-tokens.
	token string

	mu   sync.Mutex
	logs []string
	done chan struct{}
	err  error // Wait's result, set when done is closed
}

// readyRE matches the log line of a server whose model is loaded and whose
// health is SERVING; listenRE the earlier line of a bound port.
var (
	readyRE  = regexp.MustCompile(`msg="kvgate ready" addr=(\S+)`)
	listenRE = regexp.MustCompile(`msg="kvgate listening" addr=(\S+)`)
)

// startServer runs kvgate serve on a free loopback port with the given extra
// flags and waits until it is ready: listening, with its model loaded. The
// process is stopped when the test ends.
func startServer(t testing.TB, args ...string) *server {
	t.Helper()
	return startServerUntil(t, readyRE, nil, args...)
}

// startServerUntil is startServer that returns as soon as a log line
// matches until (whose first group is the address), with env added to the
// process's environment.
func startServerUntil(t testing.TB, until *regexp.Regexp, env []string, args ...string) *server {
	t.Helper()
	// One llama.cpp thread: the test machines are small and shared, and
	// ggml's spinning threads slow down badly when cores are oversubscribed.
	full := append([]string{"serve", "--listen", "127.0.0.1:0", "--threads", "1"}, args...)
	cmd := exec.Command(kvgateBin, full...)
	cmd.Env = append(append(os.Environ(), "KVGATE_CACHE_DIR="+t.TempDir()), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &server{t: t, cmd: cmd, done: make(chan struct{})}
	addrCh := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		for sc.Scan() {
			line := sc.Text()
			s.mu.Lock()
			s.logs = append(s.logs, line)
			s.mu.Unlock()
			if m := until.FindStringSubmatch(line); m != nil {
				select {
				case addrCh <- m[1]:
				default:
				}
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
		s.err = cmd.Wait()
		close(s.done)
	}()
	select {
	case s.addr = <-addrCh:
	case <-s.done:
		t.Fatalf("kvgate serve exited before logging %q: %v\n%s", until, s.err, s.Logs())
	case <-time.After(5 * time.Minute):
		_ = cmd.Process.Kill()
		t.Fatalf("kvgate serve did not log %q within 5 minutes\n%s", until, s.Logs())
	}
	s.conn, err = grpc.NewClient(s.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.conn.Close()
		s.Stop()
		if t.Failed() {
			t.Logf("server log:\n%s", s.Logs())
		}
	})
	return s
}

// Logs returns the server's stderr so far.
func (s *server) Logs() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.logs, "\n")
}

// Stop sends SIGTERM and waits for the process to exit, killing it after
// 30 s.
func (s *server) Stop() {
	select {
	case <-s.done:
		return
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}

// Generate returns a client of the server's GenerateService.
func (s *server) Generate() kvgatev1.GenerateServiceClient {
	return kvgatev1.NewGenerateServiceClient(s.conn)
}

// Cache returns a client of the server's CacheService.
func (s *server) Cache() kvgatev1.CacheServiceClient { return kvgatev1.NewCacheServiceClient(s.conn) }

// streamResult is everything one Generate call returned.
type streamResult struct {
	started  *kvgatev1.Started
	chunks   []*kvgatev1.Chunk
	finished *kvgatev1.Finished
	err      error
}

func (r streamResult) text() string {
	var b strings.Builder
	for _, c := range r.chunks {
		b.WriteString(c.GetText())
	}
	return b.String()
}

func (r streamResult) ids() []int32 {
	var ids []int32
	for _, c := range r.chunks {
		ids = append(ids, c.GetTokenIds()...)
	}
	return ids
}

// generate runs one Generate call to the end.
func generateAll(ctx context.Context, c kvgatev1.GenerateServiceClient, req *kvgatev1.GenerateRequest, opts ...grpc.CallOption) streamResult {
	var r streamResult
	stream, err := c.Generate(ctx, req, opts...)
	if err != nil {
		r.err = err
		return r
	}
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return r
		}
		if err != nil {
			r.err = err
			return r
		}
		switch ev := resp.GetEvent().(type) {
		case *kvgatev1.GenerateResponse_Started:
			r.started = ev.Started
		case *kvgatev1.GenerateResponse_Chunk:
			r.chunks = append(r.chunks, ev.Chunk)
		case *kvgatev1.GenerateResponse_Finished:
			r.finished = ev.Finished
		}
	}
}

func textPrompt(s string, maxTokens uint32) *kvgatev1.GenerateRequest {
	return &kvgatev1.GenerateRequest{Prompt: &kvgatev1.GenerateRequest_Text{Text: s}, MaxTokens: maxTokens}
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
