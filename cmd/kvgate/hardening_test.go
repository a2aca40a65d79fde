package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// rssBoundMB is the documented bound (README, "Limits and memory") on the
// peak resident memory of a stories260K server under the attacks of
// TestMemoryBounds.
const rssBoundMB = 300

// procStatusKB reads a field of /proc/PID/status, in kB.
func procStatusKB(t testing.TB, pid int, field string) int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// withToken returns ctx sending tok as the call's bearer token.
func withToken(ctx context.Context, tok string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
}

// checkServing fails the test unless the server reports SERVING and
// completes a greedy request.
func checkServing(ctx context.Context, t *testing.T, s *server) {
	t.Helper()
	hc, err := healthpb.NewHealthClient(s.conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || hc.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v, %v\n%s", hc, err, s.Logs())
	}
	if r := generateAll(ctx, s.Generate(), textPrompt("Once upon a time", 8)); r.err != nil || r.finished == nil {
		t.Fatalf("a normal request: %v", r.err)
	}
}

// TestCrashRegressions sends the requests that used to abort the process
// (every logit infinite in llama.cpp's dist sampler) and checks that each
// is refused with a field violation while the server stays SERVING.
func TestCrashRegressions(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "256")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, tc := range []struct {
		name     string
		sampling *kvgatev1.SamplingParams
		field    string
	}{
		{"temperature 1e-40", &kvgatev1.SamplingParams{Temperature: 1e-40}, "sampling.temperature"},
		{"repetition_penalty 1e-45", &kvgatev1.SamplingParams{RepetitionPenalty: 1e-45}, "sampling.repetition_penalty"},
		{"frequency_penalty -3.4e38", &kvgatev1.SamplingParams{Temperature: 1, FrequencyPenalty: -3.4e38}, "sampling.frequency_penalty"},
		{"presence_penalty -3.4e38", &kvgatev1.SamplingParams{Temperature: 1, PresencePenalty: -3.4e38}, "sampling.presence_penalty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := textPrompt("Once upon a time", 4)
			req.Sampling = tc.sampling
			r := generateAll(ctx, s.Generate(), req)
			if status.Code(r.err) != codes.InvalidArgument || !slices.Contains(violationFields(r.err), tc.field) {
				t.Fatalf("got %v (violations %v), want INVALID_ARGUMENT naming %s", r.err, violationFields(r.err), tc.field)
			}
			checkServing(ctx, t, s)
		})
	}
	// A request that leaves max_tokens unset gets the server's default.
	// The flag's 256 is clamped to what one sequence (--ctx 256) allows.
	info, err := s.Generate().GetModelInfo(ctx, &kvgatev1.GetModelInfoRequest{})
	if want := min(256, info.GetMaxSequenceTokens()-1); err != nil || info.GetDefaultMaxTokens() != want {
		t.Fatalf("default_max_tokens %d, want %d (%v)", info.GetDefaultMaxTokens(), want, err)
	}
	req := textPrompt("Once upon a time", 0)
	req.IgnoreEos = true
	r := generateAll(ctx, s.Generate(), req)
	if r.err != nil {
		t.Fatal(r.err)
	}
	// Shortened to what the prompt leaves of the sequence.
	want := min(info.GetDefaultMaxTokens(), info.GetMaxSequenceTokens()-r.started.GetPromptTokens())
	if got := r.finished.GetUsage().GetCompletionTokens(); got != want {
		t.Errorf("unset max_tokens generated %d tokens, want %d", got, want)
	}
}

// TestMemoryBounds runs each memory attack measured on the unhardened
// server, at the sizes measured there, against one real server process,
// and checks that the offending calls get their documented status and
// that the process's peak resident memory stays under rssBoundMB.
func TestMemoryBounds(t *testing.T) {
	// The stream buffer flag is bounded before anything loads.
	out, err := exec.Command(kvgateBin, "serve", "--stream-buffer", "10000000", "--model", "/nonexistent").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--stream-buffer 10000000: must be in [1, 65536]") {
		t.Errorf("--stream-buffer 10000000: %v\n%s", err, out)
	}

	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "1024", "--metrics-listen", "127.0.0.1:0")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pid := s.cmd.Process.Pid
	t.Logf("RSS at start: %d kB", procStatusKB(t, pid, "VmRSS"))

	t.Run("penalty_last_n 300000000", func(t *testing.T) {
		req := textPrompt("Once upon a time", 4)
		req.Sampling = &kvgatev1.SamplingParams{Temperature: 1, RepetitionPenalty: 1.1, PenaltyLastN: 300_000_000}
		r := generateAll(ctx, s.Generate(), req)
		if status.Code(r.err) != codes.InvalidArgument || !slices.Contains(violationFields(r.err), "sampling.penalty_last_n") {
			t.Fatalf("got %v, want INVALID_ARGUMENT naming sampling.penalty_last_n", r.err)
		}
	})

	t.Logf("peak RSS so far: %d kB", procStatusKB(t, pid, "VmHWM"))
	t.Run("20000 streams on one connection", func(t *testing.T) {
		refused, goroutines := rawStreamFlood(t, s, 20000)
		t.Logf("refused %d streams; server goroutines while held: %v", refused, goroutines)
		if refused < 20000-128 {
			t.Errorf("%d of 20000 streams refused, want all but the 128 of --max-streams-per-conn", refused)
		}
		if goroutines > 2000 {
			t.Errorf("%v server goroutines while the streams were held", goroutines)
		}
	})

	t.Logf("peak RSS so far: %d kB", procStatusKB(t, pid, "VmHWM"))
	t.Run("1000 idle connections", func(t *testing.T) {
		conns := make([]net.Conn, 0, 1000)
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for range 1000 {
			c, err := net.Dial("tcp", s.addr)
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, c)
		}
		// Every connection is closed by the server: those past
		// --max-connections (512) at once, the others when the 5 s
		// handshake timeout passes without an HTTP/2 preface. The
		// client's read deadline only bounds a hang: a connection left
		// open is one the server never closes, however long it waits.
		var closed atomic.Int32
		var wg sync.WaitGroup
		for _, c := range conns {
			wg.Go(func() {
				_ = c.SetReadDeadline(time.Now().Add(2 * time.Minute))
				if _, err := io.Copy(io.Discard, c); err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
					closed.Add(1)
				}
			})
		}
		wg.Wait()
		if n := closed.Load(); n != 1000 {
			t.Errorf("the server closed %d of 1000 idle connections within 2 minutes", n)
		}
		fams := scrape(t, s)
		if n := metricValue(fams, "kvgate_connections_refused_total"); n < 488 {
			t.Errorf("kvgate_connections_refused_total = %v, want >= 488", n)
		}
	})

	t.Logf("peak RSS so far: %d kB", procStatusKB(t, pid, "VmHWM"))
	t.Run("32 concurrent 1 MiB Tokenize calls", func(t *testing.T) {
		text := strings.Repeat("Once upon a time there was a cat. ", (1<<20)/34)
		var ok, busy atomic.Int32
		var wg sync.WaitGroup
		for range 32 {
			wg.Go(func() {
				_, err := s.Generate().Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: text}, grpc.MaxCallRecvMsgSize(256<<20))
				switch {
				case err == nil:
					ok.Add(1)
				case status.Code(err) == codes.ResourceExhausted && errorInfoReason(err) == "TOKENIZER_BUSY":
					busy.Add(1)
				default:
					t.Errorf("Tokenize: %v", err)
				}
			})
		}
		wg.Wait()
		t.Logf("%d succeeded, %d refused as busy", ok.Load(), busy.Load())
		if ok.Load() == 0 || busy.Load() == 0 {
			t.Errorf("%d succeeded and %d were refused; want both", ok.Load(), busy.Load())
		}
		_, err := s.Generate().Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: text + strings.Repeat("x", 1<<20)})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("a 2 MiB Tokenize: %v, want INVALID_ARGUMENT", err)
		}
	})

	t.Logf("peak RSS so far: %d kB", procStatusKB(t, pid, "VmHWM"))
	t.Run("4 MiB Generate text", func(t *testing.T) {
		r := generateAll(ctx, s.Generate(), textPrompt(strings.Repeat("a", 4<<20-1024), 4))
		if status.Code(r.err) != codes.InvalidArgument || !strings.Contains(r.err.Error(), "max_prompt_bytes") {
			t.Fatalf("got %v, want INVALID_ARGUMENT naming max_prompt_bytes", r.err)
		}
	})

	checkServing(ctx, t, s)
	peak := procStatusKB(t, pid, "VmHWM")
	t.Logf("peak RSS: %d kB (bound %d MB)", peak, rssBoundMB)
	if peak > rssBoundMB*1024 {
		t.Errorf("peak RSS %d kB exceeds the documented bound of %d MB", peak, rssBoundMB)
	}
}

// rawStreamFlood opens n Generate streams on one raw HTTP/2 connection
// without ever sending their request message, and returns how many the
// server refused and its goroutine count while the rest are held.
func rawStreamFlood(t *testing.T, s *server, n int) (refused int, goroutines float64) {
	t.Helper()
	c, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(c, c)
	var wmu sync.Mutex
	write := func(f func() error) {
		wmu.Lock()
		defer wmu.Unlock()
		if err := f(); err != nil {
			t.Error(err)
		}
	}
	write(func() error { return fr.WriteSettings() })
	var rst atomic.Int32
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					write(func() error { return fr.WriteSettingsAck() })
				}
			case *http2.RSTStreamFrame:
				if f.ErrCode == http2.ErrCodeRefusedStream {
					rst.Add(1)
				}
			case *http2.PingFrame:
				if !f.IsAck() {
					write(func() error { return fr.WritePing(true, f.Data) })
				}
			}
		}
	}()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for i := range n {
		hb.Reset()
		for _, h := range [][2]string{
			{":method", "POST"}, {":scheme", "http"}, {":path", kvgatev1.GenerateService_Generate_FullMethodName},
			{":authority", s.addr}, {"content-type", "application/grpc"}, {"te", "trailers"},
		} {
			_ = enc.WriteField(hpack.HeaderField{Name: h[0], Value: h[1]})
		}
		write(func() error {
			return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(2*i + 1), BlockFragment: hb.Bytes(), EndHeaders: true})
		})
	}
	waitFor(t, 60*time.Second, "the server to refuse the streams past its limit", func() bool {
		return int(rst.Load()) >= n-128
	})
	goroutines = metricValue(scrape(t, s), "go_goroutines")
	c.Close()
	<-readDone
	return int(rst.Load()), goroutines
}

// violationFields returns the fields of err's BadRequest violations.
func violationFields(err error) []string {
	st, _ := status.FromError(err)
	var fields []string
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				fields = append(fields, v.GetField())
			}
		}
	}
	return fields
}

// writeTokens writes a token file and returns its path.
func writeTokens(t *testing.T, lines ...string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestTenancy checks that the prefix cache never reveals one tenant's
// prompt to another, nor across cache salts, while a tenant's own repeats
// with the same salt still share cells.
func TestTenancy(t *testing.T) {
	tokens := writeTokens(t, "tok-a team-a", "tok-a2 team-a", "tok-b team-b")
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "1024", "--auth-tokens", tokens)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	secret := "The secret code of the vault is 4 8 1 5 1 6 2 3 4 2 and nobody knows it"
	cached := func(tok, salt string) uint32 {
		t.Helper()
		req := textPrompt(secret, 2)
		req.CacheSalt = salt
		r := generateAll(withToken(ctx, tok), s.Generate(), req)
		if r.err != nil || r.started == nil || r.finished == nil {
			t.Fatalf("token %s salt %q: %v", tok, salt, r.err)
		}
		if got, want := r.finished.GetUsage().GetCachedTokens(), r.started.GetCachedPromptTokens(); got != want {
			t.Fatalf("usage.cached_tokens %d != started.cached_prompt_tokens %d", got, want)
		}
		return r.started.GetCachedPromptTokens()
	}
	if n := cached("tok-a", ""); n != 0 {
		t.Fatalf("first request: %d cached tokens", n)
	}
	for _, tc := range []struct {
		name   string
		tok    string
		salt   string
		shares bool
	}{
		{"another tenant", "tok-b", "", false},
		{"another salt, same tenant", "tok-a", "x", false},
		{"same tenant, same salt, another token", "tok-a2", "", true},
		{"same tenant, same salt", "tok-a", "", true},
		{"the other salt again", "tok-a", "x", true},
		{"another tenant with that salt", "tok-b", "x", false},
	} {
		n := cached(tc.tok, tc.salt)
		if tc.shares && n == 0 || !tc.shares && n != 0 {
			t.Errorf("%s: %d cached prompt tokens; sharing %v", tc.name, n, tc.shares)
		}
	}
	// The call's request_id and tenant are logged with it.
	req := textPrompt("Once", 2)
	req.RequestId = "req-4815"
	if r := generateAll(withToken(ctx, "tok-b"), s.Generate(), req); r.err != nil || r.started.GetRequestId() != "req-4815" {
		t.Fatalf("request with an id: %v, started %v", r.err, r.started)
	}
	waitFor(t, time.Minute, "the call's log line", func() bool {
		return strings.Contains(s.Logs(), "request_id=req-4815 tenant=team-b")
	})

	// Without auth there is one tenant, and the salt still partitions.
	s2 := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "1024")
	for i, tc := range []struct {
		salt string
		want bool
	}{{"", false}, {"", true}, {"tenant-1", false}, {"tenant-2", false}, {"tenant-1", true}} {
		req := textPrompt(secret, 2)
		req.CacheSalt = tc.salt
		r := generateAll(ctx, s2.Generate(), req)
		if r.err != nil {
			t.Fatal(r.err)
		}
		if got := r.started.GetCachedPromptTokens() > 0; got != tc.want {
			t.Errorf("request %d (salt %q): cached %d, want sharing %v", i, tc.salt, r.started.GetCachedPromptTokens(), tc.want)
		}
	}
}

// fairnessStepBound is the documented bound (README, "Tenants and fair
// share") on the decode steps the server runs between a tenant-B request's
// arrival and its first token, p99, while another tenant floods the server,
// in TestFairness's setting. It is counted in steps, not time, so that a
// busy machine, which slows every step alike, does not change it.
const fairnessStepBound = 16

// TestFairness floods the server from tenant A with 200 maximum-size
// requests in flight, and checks that tenant B's small requests, sent one
// after another meanwhile, nearly all succeed quickly, under both
// admission policies.
func TestFairness(t *testing.T) {
	for _, policy := range []string{"reserve", "optimistic"} {
		t.Run(policy, func(t *testing.T) {
			tokens := writeTokens(t, "tok-a team-a max-share=0.5", "tok-b team-b")
			s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "4096", "--max-seqs", "64",
				"--max-queue", "512", "--admission", policy, "--auth-tokens", tokens)
			s.token = "tok-b"
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			info, err := s.Generate().GetModelInfo(withToken(ctx, "tok-a"), &kvgatev1.GetModelInfoRequest{})
			if err != nil {
				t.Fatal(err)
			}
			prompt := []int32{1, 400, 50, 300}
			maxSize := info.GetMaxSequenceTokens() - uint32(len(prompt))

			// No deadline: the flood waits as long as it takes, so the
			// allocator never refuses it on its wait estimate.
			flood, stopFlood := context.WithCancel(withToken(context.Background(), "tok-a"))
			// Tenant A's flood comes over its own two connections: one
			// connection carries at most --max-streams-per-conn (128) calls.
			var floodClients []kvgatev1.GenerateServiceClient
			for range 2 {
				conn, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				floodClients = append(floodClients, kvgatev1.NewGenerateServiceClient(conn))
			}
			var inFlight atomic.Int32
			var wg sync.WaitGroup
			for i := range 200 {
				wg.Go(func() {
					for flood.Err() == nil {
						inFlight.Add(1)
						r := generateAll(flood, floodClients[i%2], &kvgatev1.GenerateRequest{
							Prompt: &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: prompt}}, MaxTokens: maxSize, IgnoreEos: true,
						})
						inFlight.Add(-1)
						if c := status.Code(r.err); r.err != nil && c != codes.Canceled && c != codes.ResourceExhausted {
							t.Errorf("flood request: %v", r.err)
						}
					}
				})
			}
			defer func() { stopFlood(); wg.Wait() }()
			waitFor(t, 30*time.Second, "tenant A's flood to be queued", func() bool {
				st := cacheStats(t, s)
				return st.GetSequencesRunning()+st.GetSequencesQueued() >= 200
			})

			// 100 requests, so that the p99 (nearest rank: the 99th
			// smallest) is not the maximum, which one descheduled client
			// goroutine on a busy machine decides.
			const n = 100
			var ttfts []time.Duration
			var waits []uint64 // decode steps from before the call to its first token
			okCount := 0
			for i := range n {
				start := time.Now()
				steps0 := cacheStats(t, s).GetDecodeStepsTotal()
				var steps uint64
				cctx, ccancel := context.WithTimeout(withToken(ctx, "tok-b"), 30*time.Second)
				stream, err := s.Generate().Generate(cctx, &kvgatev1.GenerateRequest{
					Prompt: &kvgatev1.GenerateRequest_Text{Text: fmt.Sprintf("Once upon a time %d", i)}, MaxTokens: 16,
				})
				var first time.Duration
				finished := false
				for err == nil {
					var resp *kvgatev1.GenerateResponse
					resp, err = stream.Recv()
					if err != nil {
						break
					}
					if resp.GetChunk() != nil && first == 0 {
						first = time.Since(start)
						steps = cacheStats(t, s).GetDecodeStepsTotal() - steps0
					}
					if st := resp.GetStarted(); st != nil && st.GetQueueWaitMs() > 500 {
						t.Logf("tenant B request %d waited %.0f ms for admission", i, st.GetQueueWaitMs())
					}
					finished = finished || resp.GetFinished() != nil
				}
				ccancel()
				if errors.Is(err, io.EOF) && finished {
					if first == 0 {
						first = time.Since(start) // finished without text
						steps = cacheStats(t, s).GetDecodeStepsTotal() - steps0
					}
					if steps > fairnessStepBound/2 {
						t.Logf("tenant B request %d: first token after %d decode steps, %v", i, steps, first)
					}
					okCount++
					ttfts = append(ttfts, first)
					waits = append(waits, steps)
				} else {
					t.Logf("tenant B request %d: %v", i, err)
				}
			}
			if got := inFlight.Load(); got < 200 {
				t.Errorf("only %d flood requests in flight at the end", got)
			}
			// p99 by nearest rank: the ceil(0.99 n)-th smallest.
			p99Index := func(n int) int { return max(0, (99*n+99)/100-1) }
			slices.Sort(ttfts)
			var p99 time.Duration
			if len(ttfts) > 0 {
				p99 = ttfts[p99Index(len(ttfts))]
			}
			var p50 time.Duration
			if len(ttfts) > 0 {
				p50 = ttfts[len(ttfts)/2]
			}
			slices.Sort(waits)
			var p99Steps, p50Steps uint64
			if len(waits) > 0 {
				p99Steps = waits[p99Index(len(waits))]
				p50Steps = waits[len(waits)/2]
			}
			t.Logf("%s: tenant B %d/%d OK, first token after p50 %d p99 %d decode steps (TTFT p50 %v p99 %v); slowest %v", policy, okCount, n, p50Steps, p99Steps, p50, p99, waits[max(0, len(waits)-5):])
			if okCount*100 < 95*n {
				t.Errorf("tenant B: %d of %d requests succeeded, want >= 95%%", okCount, n)
			}
			if p99Steps > fairnessStepBound {
				t.Errorf("tenant B: first token p99 after %d decode steps, over the documented bound %d", p99Steps, fairnessStepBound)
			}
			stopFlood()
			wg.Wait()
			st := waitQuiet(t, s)
			if st.GetNokvslotTotal() != 0 {
				t.Errorf("NoKvSlot %d", st.GetNokvslotTotal())
			}
		})
	}
}

// TestPriorityLimit checks that a priority above the tenant's limit is
// refused with PERMISSION_DENIED, never clamped, and that a tenant's own
// limit from the token file and the server-wide default both apply.
func TestPriorityLimit(t *testing.T) {
	tokens := writeTokens(t, "tok-p team-p max-priority=20", "tok-d team-d")
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "256", "--auth-tokens", tokens, "--max-priority", "5")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, tc := range []struct {
		tok      string
		priority int32
		want     codes.Code
	}{
		{"tok-p", 20, codes.OK}, {"tok-p", 21, codes.PermissionDenied},
		{"tok-d", 5, codes.OK}, {"tok-d", 6, codes.PermissionDenied}, {"tok-d", 1<<31 - 1, codes.PermissionDenied},
		{"tok-d", -1 << 31, codes.OK},
	} {
		req := textPrompt("Once", 2)
		req.Priority = tc.priority
		r := generateAll(withToken(ctx, tc.tok), s.Generate(), req)
		if status.Code(r.err) != tc.want {
			t.Errorf("%s priority %d: %v, want %v", tc.tok, tc.priority, r.err, tc.want)
		}
		if tc.want == codes.PermissionDenied {
			if errorInfoReason(r.err) != "PRIORITY_NOT_ALLOWED" || r.started != nil {
				t.Errorf("%s priority %d: reason %q, started %v", tc.tok, tc.priority, errorInfoReason(r.err), r.started)
			}
		}
	}
	info, err := s.Generate().GetModelInfo(withToken(ctx, "tok-p"), &kvgatev1.GetModelInfoRequest{})
	if err != nil || info.GetTenant() != "team-p" || info.GetMaxPriority() != 20 {
		t.Errorf("GetModelInfo for team-p: tenant %q max_priority %d, %v", info.GetTenant(), info.GetMaxPriority(), err)
	}
}

// TestEstimateAfterIdle sends, after the server has been idle, a burst of
// 300 small requests with 60 s deadlines to a pool that clears the burst
// in well under that, and checks that at most 1% are refused as unable to
// be admitted before their deadline.
func TestEstimateAfterIdle(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "512", "--max-seqs", "8", "--max-queue", "512")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if r := generateAll(ctx, s.Generate(), textPrompt("Once upon a time", 32)); r.err != nil {
		t.Fatal(r.err)
	}
	time.Sleep(3 * time.Second) // the idle period of the measured defect
	start := time.Now()
	var refused, ok atomic.Int32
	var wg sync.WaitGroup
	for i := range 300 {
		wg.Go(func() {
			cctx, ccancel := context.WithTimeout(ctx, 60*time.Second)
			defer ccancel()
			req := textPrompt(fmt.Sprintf("Once upon a time %d", i), 32)
			req.IgnoreEos = true
			r := generateAll(cctx, s.Generate(), req)
			switch {
			case r.err == nil:
				ok.Add(1)
			case errorInfoReason(r.err) == "KV_CELLS_EXHAUSTED":
				refused.Add(1)
			default:
				t.Errorf("request %d: %v", i, r.err)
			}
		})
	}
	wg.Wait()
	t.Logf("burst of 300: %d OK, %d refused KV_CELLS_EXHAUSTED, in %v", ok.Load(), refused.Load(), time.Since(start).Round(time.Millisecond))
	if refused.Load() > 3 {
		t.Errorf("%d of 300 refused for a wait estimated past the deadline, want at most 1%%", refused.Load())
	}
	waitQuiet(t, s)
}

// TestDeadlineMidStream checks that a deadline passing mid-stream ends the
// call DEADLINE_EXCEEDED in the client, in the server's log and in
// kvgate_generate_requests_total, every time.
//
// "Mid-stream" must hold on any machine: the 20 calls run at once with a
// 5 s deadline, ample for their first token however loaded the machine,
// and 3000 tokens each of a 64k-context model, which even 20 in a batch
// cannot finish within it (their attention alone grows with every cell).
// The log and the metrics are read once the server has written them
// (the logging interceptor runs before Prometheus's, which counts the call
// last), not when the cells are back, which comes first.
func TestDeadlineMidStream(t *testing.T) {
	s := startServer(t, "--model", tinyModel(t), "--ctx", "65536", "--metrics-listen", "127.0.0.1:0")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	const calls, tokens = 20, 3000
	var wg sync.WaitGroup
	var most atomic.Int64 // tokens the furthest call streamed
	for i := range calls {
		wg.Go(func() {
			cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
			defer ccancel()
			req := textPrompt("Once upon a time", tokens)
			req.IgnoreEos = true
			r := generateAll(cctx, s.Generate(), req)
			if status.Code(r.err) != codes.DeadlineExceeded {
				t.Errorf("call %d: %v, want DEADLINE_EXCEEDED", i, r.err)
			}
			if r.started == nil || len(r.chunks) == 0 || r.finished != nil {
				t.Errorf("call %d did not end mid-stream: started %v, %d chunks, finished %v", i, r.started != nil, len(r.chunks), r.finished != nil)
			}
			for n := int64(len(r.ids())); ; {
				if m := most.Load(); n <= m || most.CompareAndSwap(m, n) {
					break
				}
			}
		})
	}
	wg.Wait()
	t.Logf("the furthest of %d calls streamed %d of its %d tokens before the deadline", calls, most.Load(), tokens)
	waitQuiet(t, s)
	generateLines := func() []string {
		var lines []string
		for _, line := range strings.Split(s.Logs(), "\n") {
			if strings.Contains(line, "grpc.method=Generate") {
				lines = append(lines, line)
			}
		}
		return lines
	}
	var fams map[string]*dto.MetricFamily
	waitFor(t, 2*time.Minute, "every call's log line and Prometheus count", func() bool {
		fams = scrape(t, s)
		return len(generateLines()) >= calls && metricValue(fams, "grpc_server_handled_total", "grpc_method", "Generate") >= calls
	})
	logged := 0
	for _, line := range generateLines() {
		if strings.Contains(line, "grpc.code=DeadlineExceeded") {
			logged++
		} else {
			t.Errorf("log line: %s", line)
		}
	}
	if logged != calls {
		t.Errorf("%d Generate log lines say DeadlineExceeded, want %d", logged, calls)
	}
	if n := metricValue(fams, "kvgate_generate_requests_total", "code", "DeadlineExceeded"); n != calls {
		t.Errorf("kvgate_generate_requests_total{code=DeadlineExceeded} = %v, want %d", n, calls)
	}
	if n := metricValue(fams, "grpc_server_handled_total", "grpc_method", "Generate", "grpc_code", "DeadlineExceeded"); n != calls {
		t.Errorf("grpc_server_handled_total{Generate, DeadlineExceeded} = %v, want %d", n, calls)
	}
}

// TestHangupWhileLoading checks that a SIGHUP while the model loads
// neither kills the server nor is acted on before it serves. The model
// path is a FIFO, so loading blocks until the test writes to it.
func TestHangupWhileLoading(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "model.gguf")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Skipf("no FIFO here: %v", err)
	}
	cmd := exec.Command(kvgateBin, "serve", "--listen", "127.0.0.1:0", "--model", fifo)
	var logs syncBuffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() { _ = cmd.Process.Kill() }()
	waitFor(t, 30*time.Second, "the server to start loading", func() bool {
		return strings.Contains(logs.String(), "llama.cpp system info")
	})
	for range 3 {
		if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case err := <-done:
		t.Fatalf("SIGHUP while loading ended the server: %v\n%s", err, logs.String())
	case <-time.After(time.Second):
	}
	// Unblock the load with a file that is not a model: the server must
	// now fail for that reason, with exit status 1, not of the signal.
	f, err := os.OpenFile(fifo, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteString("not a model")
	f.Close()
	err = <-done
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(logs.String(), "not a GGUF file") {
		t.Fatalf("after the load failed: %v\n%s", err, logs.String())
	}
}

// syncBuffer is a bytes.Buffer safe for a process's writes and the test's
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

// TestStartupLogsThreads checks that the start-up log gives the thread
// count llama.cpp uses, not the machine's CPU count.
func TestStartupLogsThreads(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "256") // the harness passes --threads 1
	if !strings.Contains(s.Logs(), `msg="llama.cpp system info"`) || !regexp.MustCompile(`msg="llama.cpp system info" .* threads=1 cpus="\d+ CPUs`).MatchString(s.Logs()) {
		t.Errorf("the start-up log does not give threads=1:\n%s", s.Logs())
	}
}

// TestVersion checks kvgate version and --version against the real
// binary.
func TestVersion(t *testing.T) {
	for _, arg := range []string{"version", "--version"} {
		out, err := exec.Command(kvgateBin, arg).CombinedOutput()
		if err != nil {
			t.Fatalf("kvgate %s: %v\n%s", arg, err, out)
		}
		for _, want := range []*regexp.Regexp{
			regexp.MustCompile(`(?m)^kvgate \S`),
			regexp.MustCompile(`(?m)^llama\.cpp ec98e2002 \(vendored by github\.com/ollama/ollama v0\.17\.4\)$`),
			regexp.MustCompile(`(?m)^go go1\.\d+`),
			regexp.MustCompile(`(?m)^cpu .*LLAMAFILE = 1`),
		} {
			if !want.Match(out) {
				t.Errorf("kvgate %s: output lacks %s:\n%s", arg, want, out)
			}
		}
	}
}
