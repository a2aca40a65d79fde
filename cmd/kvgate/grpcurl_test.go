package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// grpcurlPath finds the grpcurl that scripts/tools.sh installs at a pinned
// version.
func grpcurlPath(t *testing.T) string {
	t.Helper()
	p, err := filepath.Abs("../../.bin/grpcurl")
	if err == nil {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("grpcurl is not installed: .ci/run must run scripts/tools.sh (make tools)")
	}
	t.Skip("grpcurl not installed; run make grpcurl")
	return ""
}

// grpcurlRunner returns a function that runs grpcurl -plaintext with its
// arguments and returns its output, failing the test when grpcurl fails.
func grpcurlRunner(t *testing.T, grpcurl string) func(args ...string) string {
	return func(args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, grpcurl, append([]string{"-plaintext"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("grpcurl %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
}

// TestGrpcurl drives the server with grpcurl and server reflection alone,
// as an engineer would: no .proto files at hand.
func TestGrpcurl(t *testing.T) {
	grpcurl := grpcurlPath(t)
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"))
	run := grpcurlRunner(t, grpcurl)

	list := run(s.addr, "list")
	for _, svc := range []string{"kvgate.v1.GenerateService", "kvgate.v1.CacheService", "grpc.health.v1.Health"} {
		if !strings.Contains(list, svc) {
			t.Errorf("grpcurl list lacks %s:\n%s", svc, list)
		}
	}

	desc := run(s.addr, "describe", "kvgate.v1.GenerateRequest")
	for _, field := range []string{"message GenerateRequest", "string text", "uint32 max_tokens", "SamplingParams sampling", "repeated string stop"} {
		if !strings.Contains(desc, field) {
			t.Errorf("describe lacks %q:\n%s", field, desc)
		}
	}

	out := run("-d", `{"text": "Once upon a time", "max_tokens": 16}`, s.addr, "kvgate.v1.GenerateService/Generate")
	dec := json.NewDecoder(strings.NewReader(out))
	var started, chunks, finished int
	var text strings.Builder
	for dec.More() {
		var msg struct {
			Started  json.RawMessage          `json:"started"`
			Chunk    *struct{ Text string }   `json:"chunk"`
			Finished *struct{ Reason string } `json:"finished"`
		}
		if err := dec.Decode(&msg); err != nil {
			t.Fatalf("decode grpcurl output: %v\n%s", err, out)
		}
		switch {
		case msg.Started != nil:
			started++
		case msg.Chunk != nil:
			chunks++
			text.WriteString(msg.Chunk.Text)
		case msg.Finished != nil:
			finished++
			if msg.Finished.Reason == "" {
				t.Errorf("finished without a reason")
			}
		}
	}
	if started != 1 || finished != 1 || chunks < 2 || text.Len() == 0 {
		t.Fatalf("started %d, chunks %d, finished %d, text %q\n%s", started, chunks, finished, text.String(), out)
	}

	health := run(s.addr, "grpc.health.v1.Health/Check")
	if !strings.Contains(health, "SERVING") {
		t.Errorf("health check: %s", health)
	}
}
