package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/bench"
)

// clientVars are the environment variables the client commands document
// and read, written out here rather than taken from clientEnv so that the
// tests check the documented names.
var clientVars = []string{
	"KVGATE_ADDR", "KVGATE_TOKEN", "KVGATE_TLS_CA", "KVGATE_TLS_SERVER_NAME",
	"KVGATE_CLIENT_CERT", "KVGATE_CLIENT_KEY", "KVGATE_SERVICE_CONFIG",
}

// cliResult is what one run of a kvgate client command printed, and its
// exit status.
type cliResult struct {
	stdout, stderr string
	code           int
}

func (r cliResult) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// cliEnv returns the test process's environment without its KVGATE_
// variables, plus env: a client command sees only the variables a test
// gives it.
func cliEnv(env ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "KVGATE_") {
			out = append(out, kv)
		}
	}
	return append(out, env...)
}

// cli runs the built kvgate with args, the environment of cliEnv(env...)
// and stdin, and returns its output and exit status.
func cli(t *testing.T, env []string, stdin string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, kvgateBin, args...)
	cmd.Env = cliEnv(env...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := cliResult{stdout: stdout.String(), stderr: stderr.String()}
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit) && exit.Exited():
		r.code = exit.ExitCode()
	default:
		t.Fatalf("kvgate %q: %v\n%s", args, err, r)
	}
	return r
}

// mustCLI runs cli and fails the test unless the command exits 0.
func mustCLI(t *testing.T, env []string, stdin string, args ...string) cliResult {
	t.Helper()
	r := cli(t, env, stdin, args...)
	if r.code != 0 {
		t.Fatalf("kvgate %q: %s", args, r)
	}
	return r
}

// tableFields parses the field table of kvgate info or stats into the
// names in order and a map from name to value.
func tableFields(t *testing.T, out string) ([]string, map[string]string) {
	t.Helper()
	var names []string
	values := map[string]string{}
	for line := range strings.Lines(out) {
		line = strings.TrimRight(line, "\n")
		name, value, ok := strings.Cut(line, " ")
		if !ok {
			t.Fatalf("table line %q has no value", line)
		}
		names = append(names, name)
		values[name] = strings.TrimSpace(value)
	}
	return names, values
}

// protoNames returns the proto names of m's fields in declaration order.
func protoNames(m proto.Message) []string {
	fields := m.ProtoReflect().Descriptor().Fields()
	names := make([]string, fields.Len())
	for i := range names {
		names[i] = string(fields.Get(i).Name())
	}
	return names
}

// TestCLI runs the client commands against one server and checks what they
// print against the server's own answers.
func TestCLI(t *testing.T) {
	model := testModel(t, "stories260K.gguf")
	s := startServer(t, "--model", model, "--ctx", "256")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	info, err := s.Generate().GetModelInfo(ctx, &kvgatev1.GetModelInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}

	t.Run("info", func(t *testing.T) {
		r := mustCLI(t, nil, "", "info", "--addr", s.addr)
		names, values := tableFields(t, r.stdout)
		if want := protoNames(info); !slices.Equal(names, want) {
			t.Errorf("table fields %q, want %q", names, want)
		}
		for _, c := range []struct{ field, want string }{
			{"path", info.GetPath()},
			{"architecture", "llama"},
			{"vocab_size", strconv.Itoa(int(info.GetVocabSize()))},
			{"kv_cells", "256"},
			{"max_sequence_tokens", "256"},
			{"size_bytes", fmt.Sprintf("%d (%.1f MiB)", info.GetSizeBytes(), float64(info.GetSizeBytes())/(1<<20))},
			{"has_chat_template", "false"},
			{"prefix_cache", "true"},
			{"admission_policy", "reserve"},
			{"tenant", "default"},
		} {
			if got := values[c.field]; got != c.want {
				t.Errorf("%s = %q, want %q", c.field, got, c.want)
			}
		}

		r = mustCLI(t, nil, "", "info", "--addr", s.addr, "--json")
		var got kvgatev1.GetModelInfoResponse
		if err := protojson.Unmarshal([]byte(r.stdout), &got); err != nil {
			t.Fatalf("info --json does not parse as GetModelInfoResponse: %v\n%s", err, r.stdout)
		}
		if !proto.Equal(&got, info) {
			t.Errorf("info --json = %v, want %v", &got, info)
		}
		// Proto names, and zero values written out.
		var keys map[string]json.RawMessage
		if err := json.Unmarshal([]byte(r.stdout), &keys); err != nil {
			t.Fatal(err)
		}
		for _, k := range []string{"vocab_size", "has_chat_template", "deterministic"} {
			if _, ok := keys[k]; !ok {
				t.Errorf("info --json lacks %q:\n%s", k, r.stdout)
			}
		}
	})

	t.Run("stats", func(t *testing.T) {
		for range 2 {
			if r := generateAll(ctx, s.Generate(), textPrompt("Once", 4)); r.err != nil {
				t.Fatal(r.err)
			}
		}
		// A request that can never fit is refused, and counted.
		if r := generateAll(ctx, s.Generate(), textPrompt("Once", 1000)); r.err == nil {
			t.Fatal("a request beyond the pool was admitted")
		}
		want := waitQuiet(t, s)
		r := mustCLI(t, nil, "", "stats", "--addr", s.addr)
		names, values := tableFields(t, r.stdout)
		if w := protoNames(want); !slices.Equal(names, w) {
			t.Errorf("table fields %q, want %q", names, w)
		}
		if want.GetAdmittedTotal() < 2 {
			t.Fatalf("admitted_total %d after two calls", want.GetAdmittedTotal())
		}
		var rejected []string
		for k, v := range want.GetRejectedTotal() {
			rejected = append(rejected, fmt.Sprintf("%s=%d", k, v))
		}
		slices.Sort(rejected)
		for _, c := range []struct{ field, want string }{
			{"cells_total", "256"},
			{"admitted_total", strconv.FormatUint(want.GetAdmittedTotal(), 10)},
			{"generated_tokens_total", strconv.FormatUint(want.GetGeneratedTokensTotal(), 10)},
			{"prompt_tokens_total", strconv.FormatUint(want.GetPromptTokensTotal(), 10)},
			{"sequences_running", "0"},
			{"rejected_total", strings.Join(rejected, " ")},
		} {
			if got := values[c.field]; got != c.want {
				t.Errorf("%s = %q, want %q", c.field, got, c.want)
			}
		}

		r = mustCLI(t, nil, "", "stats", "--addr", s.addr, "--json")
		var got kvgatev1.GetCacheStatsResponse
		if err := protojson.Unmarshal([]byte(r.stdout), &got); err != nil {
			t.Fatalf("stats --json does not parse as GetCacheStatsResponse: %v\n%s", err, r.stdout)
		}
		// The smoothed drain rate moves with time; the counters of an idle
		// server do not.
		got.DrainCellsPerSecond, want.DrainCellsPerSecond = 0, 0
		if !proto.Equal(&got, want) {
			t.Errorf("stats --json = %v, want %v", &got, want)
		}
	})

	t.Run("health", func(t *testing.T) {
		for _, c := range []struct {
			service, stdout, stderr string
			code                    int
		}{
			{"", "SERVING\n", "", 0},
			{"kvgate.v1.GenerateService", "SERVING\n", "", 0},
			{"kvgate.v1.CacheService", "SERVING\n", "", 0},
			{"no.such.Service", "", "NotFound: unknown service", 1},
		} {
			r := cli(t, nil, "", "health", "--addr", s.addr, "--service", c.service)
			if r.code != c.code || r.stdout != c.stdout || !strings.Contains(r.stderr, c.stderr) {
				t.Errorf("health --service %q: %s", c.service, r)
			}
		}

		// --watch prints the current status, and an interrupt ends it
		// with the exit status of the last one.
		w := startCLI(t, "health", "--addr", s.addr, "--watch")
		if line := w.line(t); line != "SERVING" {
			t.Fatalf("health --watch: first line %q", line)
		}
		if err := w.cmd.Process.Signal(os.Interrupt); err != nil {
			t.Fatal(err)
		}
		if code, stderr := w.wait(t); code != 0 {
			t.Errorf("health --watch interrupted while SERVING: exit %d\n%s", code, stderr)
		}
	})

	t.Run("tokenize and detokenize", func(t *testing.T) {
		const text = "Once upon a time"
		tok, err := s.Generate().Tokenize(ctx, &kvgatev1.TokenizeRequest{Text: text, AddSpecial: true})
		if err != nil {
			t.Fatal(err)
		}
		var want strings.Builder
		args := make([]string, len(tok.GetIds()))
		for i, id := range tok.GetIds() {
			fmt.Fprintf(&want, "%6d  %q\n", id, tok.GetPieces()[i])
			args[i] = strconv.Itoa(int(id))
		}
		r := mustCLI(t, nil, "", "tokenize", "--addr", s.addr, text)
		if r.stdout != want.String() || r.stderr != fmt.Sprintf("%d tokens\n", len(args)) {
			t.Errorf("tokenize %q: %s\nwant stdout:\n%s", text, r, want.String())
		}

		for _, c := range []struct {
			name  string
			flags []string
			req   *kvgatev1.DetokenizeRequest
		}{
			{"plain", nil, &kvgatev1.DetokenizeRequest{Ids: tok.GetIds()}},
			{"strip", []string{"--strip-leading-space"}, &kvgatev1.DetokenizeRequest{Ids: tok.GetIds(), StripLeadingSpace: true}},
			{"special", []string{"--render-special"}, &kvgatev1.DetokenizeRequest{Ids: tok.GetIds(), RenderSpecial: true}},
		} {
			d, err := s.Generate().Detokenize(ctx, c.req)
			if err != nil {
				t.Fatal(err)
			}
			base := append([]string{"detokenize", "--addr", s.addr}, c.flags...)
			if r := mustCLI(t, nil, "", append(base, args...)...); r.stdout != d.GetText()+"\n" {
				t.Errorf("%s: detokenize %v printed %q, want %q", c.name, args, r.stdout, d.GetText()+"\n")
			}
			stdin := strings.Join(args[:2], "\n") + "\n  " + strings.Join(args[2:], "\t") + "\n"
			if r := mustCLI(t, nil, stdin, append(base, "-")...); r.stdout != d.GetText()+"\n" {
				t.Errorf("%s: detokenize - of %q printed %q, want %q", c.name, stdin, r.stdout, d.GetText()+"\n")
			}
		}

		vocab := strconv.Itoa(int(info.GetVocabSize()))
		for _, c := range []struct {
			name   string
			args   []string
			stderr []string
		}{
			{"past the vocabulary", []string{vocab},
				[]string{"InvalidArgument: ids[0] = " + vocab + " is outside the vocabulary", "google.rpc.BadRequest", `"field": "ids[0]"`, "[0, " + vocab + ")"}},
			{"negative", []string{"--", "5", "-1"},
				[]string{"InvalidArgument: ids[1] = -1 is outside the vocabulary", "google.rpc.BadRequest", `"field": "ids[1]"`}},
			{"not a number", []string{"5", "12x"}, []string{`token id 2, "12x": invalid syntax`}},
			{"beyond int32", []string{"4294967296"}, []string{`token id 1, "4294967296": value out of range`}},
			{"none", nil, []string{"no token ids"}},
		} {
			r := cli(t, nil, "", append([]string{"detokenize", "--addr", s.addr}, c.args...)...)
			if r.code != 1 || r.stdout != "" {
				t.Errorf("%s: %s", c.name, r)
			}
			for _, want := range c.stderr {
				if !strings.Contains(r.stderr, want) {
					t.Errorf("%s: stderr lacks %q:\n%s", c.name, want, r.stderr)
				}
			}
		}
	})

	t.Run("environment", func(t *testing.T) {
		want := mustCLI(t, nil, "", "tokenize", "--addr", s.addr, "Once").stdout
		for _, c := range []struct {
			name   string
			env    []string
			args   []string
			code   int
			stderr string
		}{
			{"KVGATE_ADDR", []string{"KVGATE_ADDR=" + s.addr}, nil, 0, ""},
			{"--addr wins", []string{"KVGATE_ADDR=127.0.0.1:1"}, []string{"--addr", s.addr}, 0, ""},
			{"empty counts as unset", []string{"KVGATE_ADDR="}, []string{"--addr", s.addr}, 0, ""},
			// serve's variables, as a server's shell would export them:
			// KVGATE_TLS_CERT once turned TLS on for every client.
			{"serve variables ignored", []string{
				"KVGATE_ADDR=" + s.addr, "KVGATE_TLS_CERT=/nonexistent/cert.pem", "KVGATE_TLS_KEY=/nonexistent/key.pem",
				"KVGATE_CLIENT_CA=/nonexistent/ca.pem", "KVGATE_ADD_SPECIAL=bogus", "KVGATE_LISTEN=bogus", "KVGATE_MODEL=/nonexistent",
			}, nil, 0, ""},
			{"KVGATE_CLIENT_CERT", []string{"KVGATE_ADDR=" + s.addr, "KVGATE_CLIENT_CERT=/nonexistent/cert.pem"}, nil, 1, "needs both --tls-cert and --tls-key"},
			{"KVGATE_CLIENT_KEY", []string{"KVGATE_ADDR=" + s.addr, "KVGATE_CLIENT_CERT=/nonexistent/cert.pem", "KVGATE_CLIENT_KEY=/nonexistent/key.pem"}, nil, 1, "/nonexistent/cert.pem"},
			{"KVGATE_TLS_CA", []string{"KVGATE_ADDR=" + s.addr, "KVGATE_TLS_CA=/nonexistent/ca.pem"}, nil, 1, "/nonexistent/ca.pem"},
			// TLS against a plaintext server fails the handshake.
			{"KVGATE_TLS_SERVER_NAME", []string{"KVGATE_ADDR=" + s.addr, "KVGATE_TLS_SERVER_NAME=kvgate.test"}, nil, 1, "Unavailable"},
			{"KVGATE_SERVICE_CONFIG", []string{"KVGATE_ADDR=" + s.addr, "KVGATE_SERVICE_CONFIG=/nonexistent/sc.json"}, nil, 1, "--service-config: open /nonexistent/sc.json"},
		} {
			r := cli(t, c.env, "", append(append([]string{"tokenize"}, c.args...), "Once")...)
			if r.code != c.code || !strings.Contains(r.stderr, c.stderr) || (c.code == 0 && r.stdout != want) {
				t.Errorf("%s: %s", c.name, r)
			}
		}
	})

	t.Run("help", func(t *testing.T) {
		for _, cmd := range []string{"generate", "tokenize", "detokenize", "info", "stats", "health", "bench"} {
			r := cli(t, nil, "", cmd, "--help")
			if r.code != 0 {
				t.Errorf("%s --help: %s", cmd, r)
				continue
			}
			env := r.stderr[strings.Index(r.stderr, "\nEnvironment")+1:]
			if !strings.HasPrefix(env, "Environment") {
				t.Errorf("%s --help has no Environment section:\n%s", cmd, r.stderr)
			}
			for _, v := range append([]string{"-service-config", "comma-separated list"}, clientVars...) {
				if !strings.Contains(r.stderr, v) {
					t.Errorf("%s --help lacks %s:\n%s", cmd, v, r.stderr)
				}
			}
		}
	})

	t.Run("targets and service configs", func(t *testing.T) {
		_, port, err := net.SplitHostPort(s.addr)
		if err != nil {
			t.Fatal(err)
		}
		want := mustCLI(t, nil, "", "tokenize", "--addr", s.addr, "Once").stdout
		cfg := writeFile(t, "service-config.json", readmeServiceConfig(t))
		for _, args := range [][]string{
			{"--addr", "dns:///localhost:" + port},
			{"--addr", "dns:///localhost:" + port, "--service-config", cfg},
			{"--addr", s.addr, "--service-config", cfg},
			{"--addr", s.addr + "," + s.addr},
		} {
			if r := mustCLI(t, nil, "", append(append([]string{"tokenize"}, args...), "Once")...); r.stdout != want {
				t.Errorf("tokenize %v: %s", args, r)
			}
		}
		for _, c := range []struct {
			name, config string
			args         []string
			stderr       string
		}{
			{"syntax", "{\n  \"loadBalancingConfig\": [],\n}\n", nil, "line 3, column 1: invalid character '}'"},
			{"not an object", `[{"round_robin": {}}]`, nil, "not a JSON object"},
			{"unknown policy", `{"loadBalancingConfig": [{"no_such_policy": {}}]}`, nil, "service config is invalid"},
			{"bad retry policy", `{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 0}}]}`, nil, "service config is invalid"},
			{"empty list entry", "", []string{"--addr", s.addr + ",," + s.addr}, "address 2 of the list is empty"},
			{"target in a list", "", []string{"--addr", s.addr + ",dns:///localhost:" + port}, "is not host:port"},
		} {
			args := append([]string{"info"}, c.args...)
			if c.config != "" {
				args = append(args, "--addr", s.addr, "--service-config", writeFile(t, "bad.json", c.config))
			}
			if r := cli(t, nil, "", args...); r.code != 1 || !strings.Contains(r.stderr, c.stderr) {
				t.Errorf("%s: want exit 1 and %q: %s", c.name, c.stderr, r)
			}
		}
	})
}

// TestCLIToken checks KVGATE_TOKEN and --token against a server with
// --auth-tokens.
func TestCLIToken(t *testing.T) {
	tokens := writeTokens(t, "tok-a team-a")
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "256", "--auth-tokens", tokens)
	for _, c := range []struct {
		name   string
		env    []string
		args   []string
		code   int
		stderr string
	}{
		{"none", nil, nil, 1, "Unauthenticated"},
		{"KVGATE_TOKEN", []string{"KVGATE_TOKEN=tok-a"}, nil, 0, ""},
		{"wrong", []string{"KVGATE_TOKEN=tok-b"}, nil, 1, "Unauthenticated"},
		{"--token wins", []string{"KVGATE_TOKEN=tok-b"}, []string{"--token", "tok-a"}, 0, ""},
	} {
		r := cli(t, c.env, "", append([]string{"info", "--addr", s.addr}, c.args...)...)
		if r.code != c.code || !strings.Contains(r.stderr, c.stderr) {
			t.Errorf("%s: %s", c.name, r)
			continue
		}
		if _, values := tableFields(t, r.stdout); c.code == 0 && values["tenant"] != "team-a" {
			t.Errorf("%s: tenant %q, want team-a", c.name, values["tenant"])
		}
	}
	// Health needs no token.
	if r := cli(t, nil, "", "health", "--addr", s.addr); r.code != 0 || r.stdout != "SERVING\n" {
		t.Errorf("health without a token: %s", r)
	}
}

// TestCLIHealthDrain checks kvgate health through a SIGTERM: a watch prints
// SERVING, then NOT_SERVING as the drain begins; during the drain a check
// prints NOT_SERVING and exits 1, and so does the watch when interrupted.
// A long stream keeps the drain going meanwhile (as in TestDrain), and
// finishes.
func TestCLIHealthDrain(t *testing.T) {
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "2048", "--drain-timeout", "60s")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const tokens = 1500
	req := textPrompt("Once upon a time", tokens)
	req.IgnoreEos = true
	long, err := s.Generate().Generate(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := long.Recv(); err != nil { // started: admitted
		t.Fatal(err)
	}
	const service = "kvgate.v1.GenerateService"
	w := startCLI(t, "health", "--addr", s.addr, "--service", service, "--watch")
	if line := w.line(t); line != "SERVING" {
		t.Fatalf("first status %q", line)
	}
	s.signal(t, syscall.SIGTERM)
	if line := w.line(t); line != "NOT_SERVING" {
		t.Fatalf("status after SIGTERM %q", line)
	}
	r := cli(t, nil, "", "health", "--addr", s.addr, "--service", service)
	if r.code != 1 || r.stdout != "NOT_SERVING\n" || !strings.Contains(r.stderr, `service "kvgate.v1.GenerateService" is NOT_SERVING`) {
		t.Errorf("health of a draining server: %s", r)
	}
	if err := w.cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	if code, stderr := w.wait(t); code != 1 || !strings.Contains(stderr, "is NOT_SERVING") {
		t.Errorf("health --watch of a draining server, interrupted: exit %d\n%s", code, stderr)
	}
	var finished *kvgatev1.Finished
	for {
		resp, err := long.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("the stream through the drain: %v", err)
		}
		if f := resp.GetFinished(); f != nil {
			finished = f
		}
	}
	if got := finished.GetUsage().GetCompletionTokens(); got != tokens {
		t.Errorf("the stream through the drain generated %d tokens, want %d", got, tokens)
	}
	if err := s.waitExit(t, 30*time.Second); err != nil {
		t.Fatalf("exit: %v", err)
	}
}

// TestCLIScaleOut runs three replicas and sends calls through one client
// channel over all of them: kvgate generate and kvgate bench with
// --addr a,b,c, with the README's service config as it stands and with the
// default round_robin. Every replica's admitted_total counter shows that
// it served calls, and the counters add up to the calls sent.
func TestCLIScaleOut(t *testing.T) {
	model := testModel(t, "stories260K.gguf")
	replicas := []*server{
		startServer(t, "--model", model, "--ctx", "256"),
		startServer(t, "--model", model, "--ctx", "256"),
		startServer(t, "--model", model, "--ctx", "256"),
	}
	addrs := make([]string, len(replicas))
	for i, s := range replicas {
		addrs[i] = s.addr
	}
	list := strings.Join(addrs, ",")
	cfg := writeFile(t, "service-config.json", readmeServiceConfig(t))
	admitted := func() []uint64 {
		n := make([]uint64, len(replicas))
		for i, s := range replicas {
			n[i] = cacheStats(t, s).GetAdmittedTotal()
		}
		return n
	}
	// delta returns the calls each replica admitted since before, and
	// their sum.
	delta := func(before []uint64) ([]uint64, uint64) {
		after := admitted()
		var sum uint64
		for i := range after {
			after[i] -= before[i]
			sum += after[i]
		}
		return after, sum
	}

	before := admitted()
	const generates = 3
	for range generates {
		r := mustCLI(t, nil, "", "generate", "--addr", list, "--service-config", cfg, "--max-tokens", "8", "Once")
		if strings.TrimSpace(r.stdout) == "" {
			t.Errorf("generate printed nothing: %s", r)
		}
	}
	if d, sum := delta(before); sum != generates {
		t.Errorf("%d generate calls, admitted %v", generates, d)
	}

	// One channel, sequential calls: once every replica is connected,
	// round_robin (and weighted_round_robin with the equal weights of idle
	// replicas) takes them in turn.
	const requests = 30
	for _, c := range []struct {
		name  string
		flags []string
	}{
		{"README service config", []string{"--service-config", cfg}},
		{"default round_robin", nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := admitted()
			args := append([]string{"bench", "--addr", list, "--json", "--requests", strconv.Itoa(requests),
				"--input-tokens", "8", "--output-tokens", "4"}, c.flags...)
			r := mustCLI(t, nil, "", args...)
			var rep bench.Report
			if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
				t.Fatalf("bench report: %v\n%s", err, r)
			}
			if rep.Requests.OK != requests {
				t.Errorf("bench: %d of %d requests ok\n%s", rep.Requests.OK, requests, r)
			}
			if rep.Server != nil {
				t.Errorf("a bench over %d replicas reports one server's counters: %+v", len(replicas), rep.Server)
			}
			d, sum := delta(before)
			t.Logf("admitted per replica: %v", d)
			if sum != requests {
				t.Errorf("%d requests, admitted %v", requests, d)
			}
			for i, n := range d {
				if n == 0 {
					t.Errorf("replica %d (%s) served none of the %d requests: %v", i, addrs[i], requests, d)
				}
			}
		})
	}
}

// cliProcess is a client command still running, whose stdout lines the
// test reads as they come.
type cliProcess struct {
	cmd    *exec.Cmd
	lines  chan string
	stderr *syncBuffer
	done   chan struct{} // closed when the process has exited
	code   int           // the exit status, set when done is closed
}

// startCLI starts the built kvgate with args. The process is killed, if
// still running, when the test ends.
func startCLI(t *testing.T, args ...string) *cliProcess {
	t.Helper()
	cmd := exec.Command(kvgateBin, args...)
	cmd.Env = cliEnv()
	p := &cliProcess{cmd: cmd, lines: make(chan string, 64), stderr: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stderr = p.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
		err := cmd.Wait()
		var exit *exec.ExitError
		switch {
		case err == nil:
		case errors.As(err, &exit):
			p.code = exit.ExitCode()
		default:
			p.code = -1
		}
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// line returns the next line of stdout, failing the test if the process
// ends first or prints nothing for a minute.
func (p *cliProcess) line(t *testing.T) string {
	t.Helper()
	select {
	case l, ok := <-p.lines:
		if !ok {
			t.Fatalf("kvgate %q ended without another line\n%s", p.cmd.Args[1:], p.stderr.String())
		}
		return l
	case <-time.After(time.Minute):
		t.Fatalf("kvgate %q printed no line for a minute\n%s", p.cmd.Args[1:], p.stderr.String())
		return ""
	}
}

// wait waits for the process to exit and returns its exit status and
// stderr.
func (p *cliProcess) wait(t *testing.T) (int, string) {
	t.Helper()
	for range p.lines {
	}
	select {
	case <-p.done:
	case <-time.After(time.Minute):
		t.Fatalf("kvgate %q did not exit within a minute\n%s", p.cmd.Args[1:], p.stderr.String())
	}
	return p.code, p.stderr.String()
}

// readmeServiceConfig returns the client service config of the README's
// "Load reports and scale-out" section, exactly as written there.
func readmeServiceConfig(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "The client service config for N replicas:")
	if ok {
		_, rest, ok = strings.Cut(rest, "```json\n")
	}
	cfg, _, ok2 := strings.Cut(rest, "```")
	if !ok || !ok2 {
		t.Fatal("README.md has no service config after \"The client service config for N replicas:\"")
	}
	return cfg
}

// writeFile writes content to a new file in the test's temporary
// directory and returns its path.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
