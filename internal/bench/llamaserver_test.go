package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// The fakes of this file speak llama-server's HTTP protocol as
// llamaserver.go describes it (build b7347); the stream lines are copied
// from the real server's replies, with their fields in its order.

// events records what a Target reports of one request.
type events struct {
	started  int
	cached   int
	tokens   []int // the n of each Tokens call
	finished bool
	onTokens func() // called after each Tokens call
}

func (e *events) Started(float64) { e.started++ }
func (e *events) Cached(n int)    { e.cached = n }
func (e *events) Tokens(n int) {
	e.tokens = append(e.tokens, n)
	if e.onTokens != nil {
		e.onTokens()
	}
}
func (e *events) Finished() { e.finished = true }

// partial is a stream event before the last, as llama-server writes it.
func partial(tok, predicted int) string {
	return fmt.Sprintf(`data: {"index":0,"content":" x","tokens":[%d],"stop":false,"id_slot":-1,"tokens_predicted":%d,"tokens_evaluated":8}`+"\n\n", tok, predicted)
}

// final is a stream's last event, as llama-server writes it.
func final(predicted, cacheN int) string {
	return fmt.Sprintf(`data: {"index":0,"content":"","tokens":[],"id_slot":3,"stop":true,"model":"15m.gguf","tokens_predicted":%d,"tokens_evaluated":8,"prompt":"a b","has_new_line":false,"truncated":false,"stop_type":"limit","stopping_word":"","tokens_cached":%d,"timings":{"cache_n":%d,"prompt_n":1,"prompt_ms":9.0,"predicted_n":%d,"predicted_ms":115.5}}`+"\n\n",
		predicted, 8+predicted-1, cacheN, predicted)
}

// sse returns a handler that replies 200 with an event stream of body.
func sse(body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, body)
	}
}

// reply returns a handler that replies with code, a content type and body.
func reply(code int, contentType, body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", contentType)
		w.WriteHeader(code)
		io.WriteString(w, body)
	}
}

// newLlama starts h as a llama-server at /completion and returns its
// Target.
func newLlama(t *testing.T, h http.Handler) *LlamaServer {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle("POST /completion", h)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	s, err := NewLlamaServer(srv.URL+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// codeOf returns the code and reason of a Generate error as the report
// names them, or "OK" for nil.
func codeOf(err error) (string, string) {
	if err == nil {
		return "OK", ""
	}
	o := &outcome{}
	o.classify(err)
	return o.status, o.reason
}

func TestLlamaServerGenerate(t *testing.T) {
	long := strings.Repeat("x", 100<<10) // longer than bufio.Scanner's default line
	tests := []struct {
		name     string
		h        http.Handler
		code     string // as the report names it
		reason   string
		tokens   []int // the n of each Tokens call
		cached   int
		finished bool
	}{
		{
			name:   "one token an event, then the stop event",
			h:      sse(partial(16684, 1) + partial(20940, 2) + partial(9545, 3) + final(3, 7)),
			code:   "OK",
			tokens: []int{1, 1, 1}, cached: 7, finished: true,
		},
		{
			name: "a token inside a UTF-8 character has no event: the next brings both",
			h:    sse(partial(100, 1) + partial(101, 2) + partial(103, 4) + partial(104, 5) + final(5, 0)),
			code: "OK", tokens: []int{1, 1, 2, 1}, finished: true,
		},
		{
			name: "a token held back at the end comes with the stop event",
			h:    sse(partial(100, 1) + partial(101, 2) + final(3, 0)),
			code: "OK", tokens: []int{1, 1, 1}, finished: true,
		},
		{
			name: "without tokens_predicted the tokens arrays count",
			h: sse("data: {\"tokens\":[5,6],\"stop\":false}\n\n" + "data: {\"tokens\":[7],\"stop\":false}\n\n" +
				"data: {\"tokens\":[],\"stop\":true,\"timings\":{\"cache_n\":2}}\n\n"),
			code: "OK", tokens: []int{2, 1}, cached: 2, finished: true,
		},
		{
			name: "CRLF lines, comments, event and id fields, data over two lines, [DONE]",
			h: sse(": keep-alive\r\n\r\nevent: message\r\nid: 1\r\ndata: {\"tokens\":[5],\r\ndata: \"tokens_predicted\":1,\"stop\":false}\r\n\r\n" +
				"data:" + final(1, 0)[len("data: "):] + "data: [DONE]\n\n"),
			code: "OK", tokens: []int{1}, finished: true,
		},
		{
			name: "an event of 100 KiB",
			h:    sse(partial(5, 1) + `data: {"tokens":[],"stop":true,"tokens_predicted":1,"prompt":"` + long + `"}` + "\n\n"),
			code: "OK", tokens: []int{1}, finished: true,
		},
		{
			name: "the last event without its blank line",
			h:    sse(partial(5, 1) + strings.TrimSuffix(final(1, 0), "\n\n")),
			code: "OK", tokens: []int{1}, finished: true,
		},
		{
			name: "a stream that ends before its stop event is incomplete",
			h:    sse(partial(5, 1) + partial(6, 2)),
			code: "OK", tokens: []int{1, 1},
		},
		{
			name:   "503 while the model loads",
			h:      reply(503, "application/json; charset=utf-8", `{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}`),
			code:   "UNAVAILABLE",
			reason: "unavailable_error",
		},
		{
			name: "429 from a proxy, as text",
			h:    reply(429, "text/plain", "slow down"),
			code: "RESOURCE_EXHAUSTED",
		},
		{
			name:   "400 for a prompt larger than a slot",
			h:      reply(400, "application/json; charset=utf-8", `{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error","n_prompt_tokens":1097,"n_ctx":1024}}`),
			code:   "INVALID_ARGUMENT",
			reason: "exceed_context_size_error",
		},
		{
			name: "500 without a body",
			h:    reply(500, "text/plain", ""),
			code: "INTERNAL",
		},
		{
			name:   "an error event after the stream started",
			h:      sse(partial(5, 1) + `data: {"error":{"code":500,"message":"boom","type":"server_error"}}` + "\n\n"),
			code:   "INTERNAL",
			reason: "server_error",
			tokens: []int{1},
		},
		{
			name:   "a line that is no event field",
			h:      sse(partial(5, 1) + "{\"tokens\":[6],\"stop\":false}\n\n" + final(2, 0)),
			code:   "INTERNAL",
			tokens: []int{1},
		},
		{
			name:   "data that is not JSON",
			h:      sse(partial(5, 1) + "data: {\"tokens\":[6],\n\n" + final(2, 0)),
			code:   "INTERNAL",
			tokens: []int{1},
		},
		{
			name:   "tokens_predicted going back",
			h:      sse(partial(5, 2) + partial(6, 1)),
			code:   "INTERNAL",
			tokens: []int{2},
		},
		{
			name:   "an event after the stop event",
			h:      sse(partial(5, 1) + final(1, 0) + partial(6, 2)),
			code:   "INTERNAL",
			tokens: []int{1}, finished: true,
		},
		{
			name: "a 200 reply that is not an event stream",
			h:    reply(200, "application/json", `{"content":"x","tokens":[5],"stop":true}`),
			code: "INTERNAL",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newLlama(t, tt.h)
			var ev events
			err := s.Generate(context.Background(), Request{Prompt: Prompt{Tokens: []int32{3, 4}, OutputTokens: 3}}, &ev)
			code, reason := codeOf(err)
			if code != tt.code || reason != tt.reason {
				t.Fatalf("Generate = %v: code %s, reason %q; want %s, %q", err, code, reason, tt.code, tt.reason)
			}
			if !slices.Equal(ev.tokens, tt.tokens) || ev.cached != tt.cached || ev.finished != tt.finished || ev.started != 0 {
				t.Fatalf("events %+v, want tokens %v, cached %d, finished %v and no Started", ev, tt.tokens, tt.cached, tt.finished)
			}
		})
	}
}

func TestLlamaServerGenerateContext(t *testing.T) {
	// The server sends one token, then nothing until the client goes.
	h := func(w http.ResponseWriter, r *http.Request) {
		// Once the body is read, r's context ends when the client goes.
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, partial(5, 1))
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}
	for _, tt := range []struct {
		name string
		// ctx returns the request's context; a cancel function that
		// ev.onTokens calls, or nil.
		ctx  func() (ctx context.Context, onFirst, cleanup func())
		code string
	}{
		{"cancelled after the first token", func() (context.Context, func(), func()) {
			ctx, cancel := context.WithCancel(context.Background())
			return ctx, cancel, cancel
		}, "CANCELLED"},
		{"deadline passed after the first token", func() (context.Context, func(), func()) {
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			return ctx, nil, cancel
		}, "DEADLINE_EXCEEDED"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := newLlama(t, http.HandlerFunc(h))
			ctx, onFirst, cleanup := tt.ctx()
			defer cleanup()
			ev := events{onTokens: onFirst}
			start := time.Now()
			err := s.Generate(ctx, Request{Prompt: Prompt{Tokens: []int32{3}, OutputTokens: 4}}, &ev)
			if code, _ := codeOf(err); code != tt.code {
				t.Fatalf("Generate = %v (%s), want %s", err, code, tt.code)
			}
			if !slices.Equal(ev.tokens, []int{1}) || ev.finished {
				t.Fatalf("events %+v", ev)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Fatalf("Generate took %v to see its context end", d)
			}
		})
	}

	t.Run("cancelled before sending", func(t *testing.T) {
		s := newLlama(t, http.HandlerFunc(h))
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		err := s.Generate(ctx, Request{Prompt: Prompt{Tokens: []int32{3}, OutputTokens: 4}}, &events{})
		if code, _ := codeOf(err); code != "CANCELLED" {
			t.Fatalf("Generate = %v (%s), want CANCELLED", err, code)
		}
	})

	t.Run("server gone", func(t *testing.T) {
		srv := httptest.NewServer(http.NotFoundHandler())
		url := srv.URL
		srv.Close()
		s, err := NewLlamaServer(url, nil)
		if err != nil {
			t.Fatal(err)
		}
		err = s.Generate(context.Background(), Request{Prompt: Prompt{Tokens: []int32{3}, OutputTokens: 4}}, &events{})
		if code, _ := codeOf(err); code != "UNAVAILABLE" {
			t.Fatalf("Generate = %v (%s), want UNAVAILABLE", err, code)
		}
	})
}

// llamaProps and llamaModels replies of the real server (b7347, -np 4 -c
// 4096), shortened.
const (
	propsReply  = `{"default_generation_settings":{"params":{"seed":4294967295,"temperature":0.8,"top_k":40,"n_predict":-1,"samplers":["penalties","dry","top_n_sigma","top_k","typ_p","top_p","min_p","xtc","temperature"]},"n_ctx":1024},"total_slots":4,"model_alias":"15m.gguf","model_path":"/models/15m.gguf","modalities":{"vision":false,"audio":false},"build_info":"b7347-333a342"}`
	modelsReply = `{"models":[{"name":"15m.gguf","model":"15m.gguf"}],"object":"list","data":[{"id":"15m.gguf","object":"model","created":1796192749,"owned_by":"llamacpp","meta":{"vocab_type":1,"n_vocab":32000,"n_ctx_train":4096,"n_embd":288,"n_params":15191712,"size":30390912}}]}`
)

func TestLlamaServerInfo(t *testing.T) {
	tests := []struct {
		name          string
		props, models http.HandlerFunc
		want          Limits
		wantErr       string
	}{
		{
			name:  "loaded",
			props: reply(200, "application/json", propsReply), models: reply(200, "application/json", modelsReply),
			want: Limits{VocabSize: 32000, MaxSequenceTokens: 1024, MaxPromptTokens: 1023},
		},
		{
			name:  "a server cap on n_predict",
			props: reply(200, "application/json", strings.Replace(propsReply, `"n_predict":-1`, `"n_predict":256`, 1)), models: reply(200, "application/json", modelsReply),
			want: Limits{VocabSize: 32000, MaxSequenceTokens: 1024, MaxPromptTokens: 1023, MaxCompletionTokens: 256},
		},
		{
			name:    "loading",
			props:   reply(503, "application/json", `{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}`),
			models:  reply(200, "application/json", modelsReply),
			wantErr: "Loading model",
		},
		{
			name:    "no vocabulary size",
			props:   reply(200, "application/json", propsReply),
			models:  reply(200, "application/json", `{"object":"list","data":[{"id":"15m.gguf","meta":null}]}`),
			wantErr: "n_vocab",
		},
		{
			name:    "not JSON",
			props:   reply(200, "text/html", "<html>"),
			models:  reply(200, "application/json", modelsReply),
			wantErr: "GET /props",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mux := http.NewServeMux()
			mux.Handle("GET /props", tt.props)
			mux.Handle("GET /v1/models", tt.models)
			srv := httptest.NewServer(mux)
			defer srv.Close()
			s, err := NewLlamaServer(srv.URL, nil)
			if err != nil {
				t.Fatal(err)
			}
			lim, m, err := s.Info(context.Background())
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Info = %v, want an error with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if lim != tt.want {
				t.Fatalf("limits %+v, want %+v", lim, tt.want)
			}
			want := ModelInfo{Path: "/models/15m.gguf", Description: "llama-server b7347-333a342", ParameterCount: 15191712,
				SizeBytes: 30390912, VocabSize: 32000, MaxRunningSequences: 4, PrefixCache: true}
			if m != want {
				t.Fatalf("model %+v, want %+v", m, want)
			}
		})
	}
}

func TestNewLlamaServer(t *testing.T) {
	for _, tt := range []struct {
		url, want string // want "": refused
	}{
		{"http://127.0.0.1:8080", "http://127.0.0.1:8080"},
		{"http://127.0.0.1:8080/", "http://127.0.0.1:8080"},
		{"https://llm.internal/llama/", "https://llm.internal/llama"},
		{"127.0.0.1:8080", ""},
		{"localhost:8080", ""},
		{"grpc://h:1", ""},
		{"http://h:1/?x=1", ""},
		{"http://", ""},
	} {
		s, err := NewLlamaServer(tt.url, nil)
		switch {
		case tt.want == "" && !errors.Is(err, ErrConfig):
			t.Errorf("NewLlamaServer(%q) = %v, %v; want ErrConfig", tt.url, s, err)
		case tt.want != "" && (err != nil || s.String() != tt.want):
			t.Errorf("NewLlamaServer(%q) = %v, %v; want %s", tt.url, s, err, tt.want)
		}
	}
}

// fakeLlama is a llama-server of the protocol llamaserver.go relies on:
// it streams n_predict tokens per request, one an event, every delay, and
// reports as cached the prompt's common prefix with the last prompt it
// served with cache_prompt. It records the requests.
type fakeLlama struct {
	delay time.Duration
	// refuse, when set, says whether to refuse the i-th request with 503.
	refuse func(i int) bool
	// onRequest, when set, is called with i when the i-th request
	// arrives.
	onRequest func(i int)

	mu   sync.Mutex
	reqs []map[string]any
	last []int
	kept int // completions that asked to keep the connection
}

func (f *fakeLlama) handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /props", reply(200, "application/json", propsReply))
	mux.Handle("GET /v1/models", reply(200, "application/json", strings.Replace(modelsReply, `"n_vocab":32000`, `"n_vocab":512`, 1)))
	mux.HandleFunc("POST /completion", func(w http.ResponseWriter, r *http.Request) {
		var body map[string]any
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			reply(500, "application/json", `{"error":{"code":500,"message":"parse error","type":"server_error"}}`)(w, r)
			return
		}
		// Once the body is read, r's context ends when the client goes.
		io.Copy(io.Discard, r.Body)
		var prompt []int
		for _, v := range body["prompt"].([]any) {
			prompt = append(prompt, int(v.(float64)))
		}
		f.mu.Lock()
		i := len(f.reqs)
		f.reqs = append(f.reqs, body)
		if !r.Close {
			f.kept++
		}
		cached := 0
		if body["cache_prompt"] == true {
			for cached < min(len(prompt)-1, len(f.last)) && prompt[cached] == f.last[cached] {
				cached++
			}
			f.last = prompt
		}
		f.mu.Unlock()
		if f.onRequest != nil {
			f.onRequest(i)
		}
		if f.refuse != nil && f.refuse(i) {
			reply(503, "application/json", `{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}`)(w, r)
			return
		}
		n := int(body["n_predict"].(float64))
		w.Header().Set("Content-Type", "text/event-stream")
		for k := 1; k <= n; k++ {
			select {
			case <-time.After(f.delay):
			case <-r.Context().Done():
				return
			}
			io.WriteString(w, partial(100+k, k))
			w.(http.Flusher).Flush()
		}
		io.WriteString(w, final(n, cached))
	})
	return mux
}

func TestRunLlamaServer(t *testing.T) {
	f := &fakeLlama{delay: 2 * time.Millisecond, refuse: func(i int) bool { return i%5 == 4 }}
	srv := httptest.NewServer(f.handler())
	defer srv.Close()
	target, err := NewLlamaServer(srv.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		Target: target.String(), Concurrency: 3, Requests: 20, Seed: 5,
		Workload: Workload{Kind: SharedPrefix, InputTokens: 24, PrefixTokens: 16, OutputTokens: 6},
	}
	r, err := RunTarget(context.Background(), target, cfg)
	if err != nil {
		t.Fatal(err)
	}
	checkReport(t, r)
	if want := map[string]int{"OK": 16, "UNAVAILABLE": 4}; !equalMaps(r.Status, want) {
		t.Fatalf("status %v, want %v", r.Status, want)
	}
	if r.ErrorReasons["unavailable_error"] != 4 || len(r.ErrorReasons) != 1 {
		t.Fatalf("error reasons %v", r.ErrorReasons)
	}
	if r.Tokens.Output != 16*6 || r.Tokens.PromptSent != 20*24 || r.Tokens.OutputPartial != 0 {
		t.Fatalf("tokens %+v", r.Tokens)
	}
	// Every prompt after the first shares the 16-token prefix with the
	// one before it.
	if r.Tokens.CachedReported < 15*16 {
		t.Fatalf("cached %d, want at least %d", r.Tokens.CachedReported, 15*16)
	}
	l := r.LatencyMS
	if l.TTFT.Count != 16 || l.E2E.Count != 16 || l.ITL.Count != 16*5 || l.Queue.Count != 0 {
		t.Fatalf("latency counts %+v", l)
	}
	// The fake waits 2ms before each token.
	if l.TTFT.P50 < 2 || l.ITL.P50 < 1 || l.E2E.P50 < 12 {
		t.Fatalf("latencies %+v below the fake's delays", l)
	}
	if r.Server != nil {
		t.Fatalf("server counters %+v from llama-server", r.Server)
	}
	// llama-server closes the connection after each stream: reusing it
	// would race with the close.
	if f.kept != 0 {
		t.Fatalf("%d of %d completions asked to keep their connection", f.kept, len(f.reqs))
	}
	if r.Config.Target != srv.URL || r.Model.VocabSize != 512 || r.Model.MaxRunningSequences != 4 {
		t.Fatalf("config %+v, model %+v", r.Config, r.Model)
	}
	for _, body := range f.reqs {
		prompt := body["prompt"].([]any)
		for _, v := range prompt {
			if id := int(v.(float64)); id < FirstTokenID || id >= 512 {
				t.Fatalf("prompt token %d outside the vocabulary", id)
			}
		}
		samplers, _ := json.Marshal(body["samplers"])
		if len(prompt) != 24 || body["n_predict"] != 6.0 || body["ignore_eos"] != true || body["stream"] != true ||
			body["cache_prompt"] != true || body["top_k"] != 1.0 || string(samplers) != `["top_k"]` {
			t.Fatalf("request %v", body)
		}
	}

	// --no-prefix-cache sets cache_prompt false, and the server then
	// reports nothing cached.
	f = &fakeLlama{}
	srv2 := httptest.NewServer(f.handler())
	defer srv2.Close()
	target, _ = NewLlamaServer(srv2.URL, nil)
	cfg.NoPrefixCache, cfg.Requests = true, 6
	r, err = RunTarget(context.Background(), target, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if r.Requests.OK != 6 || r.Tokens.CachedReported != 0 || r.Config.PrefixCache {
		t.Fatalf("requests %+v, tokens %+v", r.Requests, r.Tokens)
	}
	for _, body := range f.reqs {
		if body["cache_prompt"] != false {
			t.Fatalf("request %v with --no-prefix-cache", body)
		}
	}
}

func TestRunLlamaServerRefusesWhatCannotFit(t *testing.T) {
	f := &fakeLlama{}
	srv := httptest.NewServer(f.handler())
	defer srv.Close()
	target, _ := NewLlamaServer(srv.URL, nil)
	// A slot of the fake holds 1024 tokens.
	_, err := RunTarget(context.Background(), target, Config{Concurrency: 1, Requests: 1, Workload: Workload{Kind: Fixed, InputTokens: 1000, OutputTokens: 100}})
	if !errors.Is(err, ErrConfig) {
		t.Fatalf("RunTarget = %v, want ErrConfig", err)
	}
	if len(f.reqs) != 0 {
		t.Fatal("requests were sent")
	}
}

func TestRunLlamaServerInterrupted(t *testing.T) {
	// The cancel comes when the second request reaches the server, not
	// after a delay that a slow machine might spend before sending any.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f := &fakeLlama{delay: 5 * time.Millisecond, onRequest: func(i int) {
		if i == 1 {
			cancel()
		}
	}}
	srv := httptest.NewServer(f.handler())
	defer srv.Close()
	target, _ := NewLlamaServer(srv.URL, nil)
	r, err := RunTarget(ctx, target, Config{Concurrency: 2, Duration: time.Hour, Workload: Workload{Kind: Fixed, InputTokens: 4, OutputTokens: 1000}})
	if err != nil {
		t.Fatal(err)
	}
	checkReport(t, r)
	if !r.Interrupted || r.Status["CANCELLED"] == 0 || r.Requests.OK != 0 {
		t.Fatalf("interrupted %v, status %v", r.Interrupted, r.Status)
	}
}
