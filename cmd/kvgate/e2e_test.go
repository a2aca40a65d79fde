package main

import (
	"context"
	"errors"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/llamatest"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/native/llama"
)

// TestGenerateEndToEnd streams a greedy completion from a real server and
// checks it against Detokenize, against greedy decoding through native/
// directly, and against a second run.
func TestGenerateEndToEnd(t *testing.T) {
	modelPath := testModel(t, "stories260K.gguf")
	s := startServer(t, "--model", modelPath)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	req := textPrompt("Once upon a time", 32)
	first := generateAll(ctx, s.Generate(), req)
	if first.err != nil {
		t.Fatalf("Generate: %v", first.err)
	}
	if first.started == nil || first.finished == nil {
		t.Fatalf("stream lacks started or finished: %+v", first)
	}
	if len(first.chunks) < 2 {
		t.Fatalf("got %d chunks, want at least 2", len(first.chunks))
	}
	text := first.text()
	if text == "" {
		t.Fatal("empty completion")
	}

	// 1. Detokenize of the streamed ids.
	detok, err := s.Generate().Detokenize(ctx, &kvgatev1.DetokenizeRequest{Ids: first.ids()})
	if err != nil {
		t.Fatal(err)
	}
	if detok.GetText() != text {
		t.Errorf("Detokenize(streamed ids) = %q, streamed text %q", detok.GetText(), text)
	}

	// 2. Greedy decoding through native/ directly.
	m, err := llama.LoadModel(modelPath, llama.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	prompt, err := m.Tokenize("Once upon a time", true, true)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := llamatest.GreedyReference(ctx, m, prompt, 32)
	if err != nil {
		t.Fatal(err)
	}
	refText, err := m.Detokenize(ref, native.DetokenizeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if refText != text {
		t.Errorf("native greedy text %q, streamed %q", refText, text)
	}

	// 3. Determinism.
	second := generateAll(ctx, s.Generate(), req)
	if second.err != nil {
		t.Fatal(second.err)
	}
	if second.text() != text {
		t.Errorf("second run %q, first %q", second.text(), text)
	}

	u := first.finished.GetUsage()
	if u.GetPromptTokens() != uint32(len(prompt)) || u.GetCompletionTokens() != uint32(len(first.ids())) {
		t.Errorf("usage %+v, prompt %d tokens, streamed %d ids", u, len(prompt), len(first.ids()))
	}
	if first.started.GetPromptTokens() != uint32(len(prompt)) {
		t.Errorf("started.prompt_tokens = %d, want %d", first.started.GetPromptTokens(), len(prompt))
	}
	t.Logf("streamed %d chunks: %q (finish %v)", len(first.chunks), text, first.finished.GetReason())

	info, err := s.Generate().GetModelInfo(ctx, &kvgatev1.GetModelInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.GetArchitecture() != "llama" || info.GetVocabSize() != 512 || info.GetMaxStopStrings() == 0 {
		t.Errorf("GetModelInfo = %v", info)
	}
}

// TestBadInput sends requests that can never be served: each gets
// INVALID_ARGUMENT with a BadRequest naming the field, and the server keeps
// serving.
func TestBadInput(t *testing.T) {
	// Without a default, an unset max_tokens is bad input too.
	s := startServer(t, "--model", testModel(t, "stories260K.gguf"), "--ctx", "1024", "--max-stop", "4", "--default-max-tokens", "0")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nan := float32(math.NaN())
	one := float32(1)
	zero := float32(0)
	over := float32(1.5)
	ok := func() *kvgatev1.GenerateRequest { return textPrompt("Once upon a time", 8) }
	with := func(f func(r *kvgatev1.GenerateRequest)) *kvgatev1.GenerateRequest {
		r := ok()
		f(r)
		return r
	}
	tests := []struct {
		name  string
		req   *kvgatev1.GenerateRequest
		field string
	}{
		{"no prompt", &kvgatev1.GenerateRequest{MaxTokens: 8}, "prompt"},
		{"empty text", with(func(r *kvgatev1.GenerateRequest) { r.Prompt = &kvgatev1.GenerateRequest_Text{} }), "text"},
		{"empty tokens", with(func(r *kvgatev1.GenerateRequest) {
			r.Prompt = &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{}}
		}), "tokens.ids"},
		{"max_tokens zero", with(func(r *kvgatev1.GenerateRequest) { r.MaxTokens = 0 }), "max_tokens"},
		{"max_tokens beyond context", with(func(r *kvgatev1.GenerateRequest) { r.MaxTokens = 5000 }), "max_tokens"},
		{"prompt + max_tokens beyond context", with(func(r *kvgatev1.GenerateRequest) { r.MaxTokens = 1022 }), "text"},
		{"negative temperature", with(func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{Temperature: -0.5}
		}), "sampling.temperature"},
		{"NaN temperature", with(func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{Temperature: nan}
		}), "sampling.temperature"},
		{"top_p zero", with(func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{Temperature: one, TopP: &zero}
		}), "sampling.top_p"},
		{"top_p above one", with(func(r *kvgatev1.GenerateRequest) {
			r.Sampling = &kvgatev1.SamplingParams{Temperature: one, TopP: &over}
		}), "sampling.top_p"},
		{"token id beyond vocabulary", with(func(r *kvgatev1.GenerateRequest) {
			r.Prompt = &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: []int32{1, 100, 512}}}
		}), "tokens.ids[2]"},
		{"negative token id", with(func(r *kvgatev1.GenerateRequest) {
			r.Prompt = &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: []int32{-7}}}
		}), "tokens.ids[0]"},
		{"too many stop strings", with(func(r *kvgatev1.GenerateRequest) { r.Stop = []string{"a", "b", "c", "d", "e"} }), "stop"},
		{"empty stop string", with(func(r *kvgatev1.GenerateRequest) { r.Stop = []string{"ok", ""} }), "stop[1]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := generateAll(ctx, s.Generate(), tt.req)
			if r.started != nil || len(r.chunks) > 0 {
				t.Fatalf("a refused request streamed messages: %+v", r)
			}
			st, _ := status.FromError(r.err)
			if st.Code() != codes.InvalidArgument {
				t.Fatalf("code %v (%v), want InvalidArgument", st.Code(), r.err)
			}
			var fields []string
			for _, d := range st.Details() {
				if br, ok := d.(*errdetails.BadRequest); ok {
					for _, v := range br.GetFieldViolations() {
						fields = append(fields, v.GetField())
						if v.GetDescription() == "" {
							t.Errorf("violation of %s has no description", v.GetField())
						}
					}
				}
			}
			found := false
			for _, f := range fields {
				found = found || f == tt.field
			}
			if !found {
				t.Fatalf("violations %v do not name %q (message %q)", fields, tt.field, st.Message())
			}
		})
	}
	// Detokenize refuses ids outside the vocabulary the same way.
	_, err := s.Generate().Detokenize(ctx, &kvgatev1.DetokenizeRequest{Ids: []int32{5, 99999}})
	if st, _ := status.FromError(err); st.Code() != codes.InvalidArgument {
		t.Fatalf("Detokenize out of range: %v", err)
	}
	// The server still serves.
	r := generateAll(ctx, s.Generate(), ok())
	if r.err != nil || r.finished == nil {
		t.Fatalf("normal request after bad ones: %+v", r)
	}
	st, err := s.Cache().GetCacheStats(ctx, &kvgatev1.GetCacheStatsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.GetCellsUsed() != st.GetCellsCached() || st.GetCellsReserved() != 0 || st.GetSequencesRunning() != 0 {
		t.Fatalf("cells leaked: %v", st)
	}
}

// TestModelErrorsAtStartup checks that a missing or corrupt model makes
// kvgate serve exit non-zero with one clear line, without an abort.
func TestModelErrorsAtStartup(t *testing.T) {
	dir := t.TempDir()
	good, err := os.ReadFile(testModel(t, "stories260K.gguf"))
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		name, path, want string
	}{
		{"missing", filepath.Join(dir, "missing.gguf"), "model file not found"},
		{"not gguf", write("junk.gguf", []byte("this is not a model")), "not a GGUF file"},
		{"truncated", write("trunc.gguf", good[:len(good)*2/3]), "invalid model file"},
		{"corrupt header", write("hdr.gguf", append([]byte("GGUF"), make([]byte, 60)...)), "invalid model file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, kvgateBin, "serve", "--listen", "127.0.0.1:0", "--model", tt.path, "--llama-log", "none")
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			if !errors.As(err, &exit) {
				t.Fatalf("kvgate serve: %v, want a non-zero exit\n%s", err, out)
			}
			if exit.ExitCode() != 1 {
				t.Fatalf("exit status %v (signal or abort?), want 1\n%s", exit, out)
			}
			var errLines []string
			for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
				if strings.HasPrefix(l, "kvgate serve:") {
					errLines = append(errLines, l)
				}
			}
			if len(errLines) != 1 || !strings.Contains(errLines[0], tt.want) {
				t.Fatalf("want one error line containing %q, got:\n%s", tt.want, out)
			}
			if strings.Contains(string(out), "terminate called") || strings.Contains(string(out), "GGML_ASSERT") {
				t.Fatalf("C++ abort in output:\n%s", out)
			}
		})
	}
}
