package bench

// This file drives llama.cpp's llama-server, so that kvgate and llama-server
// can be measured with the same workloads, prompts and report. It relies on
// the HTTP API of llama-server as of llama.cpp build b7347 (its tools/server
// at b7347, the library at commit ec98e2002), checked against the real
// server's replies:
//
//   - GET /props: default_generation_settings.n_ctx (the context of one
//     slot, which bounds prompt plus output), default_generation_settings
//     .params.n_predict (the server's cap on output, -1 for none),
//     total_slots, model_path and build_info.
//   - GET /v1/models: data[0].meta.n_vocab, n_params and size. (/props has
//     no vocabulary size; meta is null while the model loads.)
//   - POST /completion with a prompt of token ids, n_predict, ignore_eos,
//     cache_prompt, stream and the greedy sampler chain ["top_k"] with
//     top_k 1. The reply is server-sent events, one "data: {json}" line and
//     a blank line each. Every event has tokens_predicted, the number of
//     tokens decoded so far, and tokens, the ids it brings; the last event
//     has stop true, tokens empty and timings.cache_n, the prompt tokens
//     reused from the slot's cache. An error after the stream started is an
//     event {"error": {"code", "message", "type"}}; one before it is the
//     HTTP status with the same JSON as the body. The server closes the
//     connection after each stream, whatever its Keep-Alive header says.
//     (return_tokens is not sent: it only fills the tokens of a reply that
//     is not streamed.)
//
// Tokens are counted by tokens_predicted, not by the tokens arrays (nor the
// text): llama-server sends no event for a token that ends inside a UTF-8
// character, so its id never appears in a tokens array, and the next event
// brings its text with the next token's. Counting tokens_predicted puts such
// a token in the next event's chunk, as kvgate would with a chunk of two.
// An event without tokens_predicted counts its tokens array. tokens_cached
// is not the reused prompt: it is every token in the slot at the end,
// prompt and output.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// maxEventBytes bounds one server-sent event line. The last event of a
// completion repeats the prompt as text, about 10 bytes a token.
const maxEventBytes = 16 << 20

// LlamaServer is a Target that drives llama.cpp's llama-server over HTTP:
// it sends POST /completion requests with token-id prompts and reads their
// event streams. llama-server reports neither admission (so the report's
// queue latencies are empty) nor kvgate's counters (so it has no server
// counters); the cached prompt tokens come from each stream's last event.
type LlamaServer struct {
	base   string // scheme://host[:port][/path], without the trailing slash
	client *http.Client
}

// NewLlamaServer returns the Target of the llama-server at baseURL, such as
// http://127.0.0.1:8080, using client; a nil client means a client of
// http.DefaultTransport without a timeout of its own (each request's
// deadline is its context's).
func NewLlamaServer(baseURL string, client *http.Client) (*LlamaServer, error) {
	u, err := url.Parse(baseURL)
	if err != nil {
		return nil, fmt.Errorf("%w: llama-server URL %q: %w", ErrConfig, baseURL, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("%w: llama-server URL %q: want http://host:port or https://host:port", ErrConfig, baseURL)
	}
	if client == nil {
		client = &http.Client{}
	}
	return &LlamaServer{base: strings.TrimRight(u.String(), "/"), client: client}, nil
}

// llamaProps is the part of GET /props that Info reads.
type llamaProps struct {
	DefaultGenerationSettings struct {
		NCtx   int `json:"n_ctx"`
		Params struct {
			NPredict int `json:"n_predict"`
		} `json:"params"`
	} `json:"default_generation_settings"`
	TotalSlots int    `json:"total_slots"`
	ModelPath  string `json:"model_path"`
	BuildInfo  string `json:"build_info"`
}

// llamaModels is the part of GET /v1/models that Info reads.
type llamaModels struct {
	Data []struct {
		ID   string `json:"id"`
		Meta *struct {
			NVocab  int    `json:"n_vocab"`
			NParams uint64 `json:"n_params"`
			Size    uint64 `json:"size"`
		} `json:"meta"`
	} `json:"data"`
}

// getJSON decodes the JSON reply of GET base+path into v.
func (s *LlamaServer) getJSON(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.base+path, nil)
	if err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %w", path, httpError(resp))
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	return nil
}

// Info implements Target with GET /props and GET /v1/models. The vocabulary
// size is required; llama-server reports it once the model is loaded.
func (s *LlamaServer) Info(ctx context.Context) (Limits, ModelInfo, error) {
	var props llamaProps
	if err := s.getJSON(ctx, "/props", &props); err != nil {
		return Limits{}, ModelInfo{}, fmt.Errorf("llama-server at %s: %w", s.base, err)
	}
	var models llamaModels
	if err := s.getJSON(ctx, "/v1/models", &models); err != nil {
		return Limits{}, ModelInfo{}, fmt.Errorf("llama-server at %s: %w", s.base, err)
	}
	if len(models.Data) == 0 || models.Data[0].Meta == nil || models.Data[0].Meta.NVocab <= 0 {
		return Limits{}, ModelInfo{}, fmt.Errorf("llama-server at %s: GET /v1/models has no data[0].meta.n_vocab (is the model loaded?)", s.base)
	}
	meta := models.Data[0].Meta
	g := props.DefaultGenerationSettings
	lim := Limits{
		VocabSize: meta.NVocab,
		// A slot refuses a prompt of n_ctx tokens or more, and stops
		// generating once prompt and output fill it.
		MaxSequenceTokens: g.NCtx,
	}
	if g.NCtx > 0 {
		lim.MaxPromptTokens = g.NCtx - 1
	}
	if g.Params.NPredict > 0 {
		lim.MaxCompletionTokens = g.Params.NPredict
	}
	m := ModelInfo{
		Path:           props.ModelPath,
		Description:    strings.TrimSpace("llama-server " + props.BuildInfo),
		ParameterCount: meta.NParams,
		SizeBytes:      meta.Size,
		VocabSize:      uint32(meta.NVocab),
		// KVCells stays 0: the slots' total context is not reported (with
		// a unified KV cache each slot's n_ctx is the whole of it).
		MaxRunningSequences: uint32(max(props.TotalSlots, 0)),
		// Each slot reuses the longest common prefix of its last prompt
		// unless a request sets cache_prompt false.
		PrefixCache: true,
	}
	return lim, m, nil
}

// llamaCompletion is the body of POST /completion.
type llamaCompletion struct {
	Prompt      []int32  `json:"prompt"`
	NPredict    int      `json:"n_predict"`
	IgnoreEOS   bool     `json:"ignore_eos"`
	CachePrompt bool     `json:"cache_prompt"`
	Stream      bool     `json:"stream"`
	Samplers    []string `json:"samplers"`
	TopK        int      `json:"top_k"`
}

// llamaEvent is the part of a /completion stream event that Generate
// reads.
type llamaEvent struct {
	Tokens          []int32 `json:"tokens"`
	TokensPredicted *int    `json:"tokens_predicted"`
	Stop            bool    `json:"stop"`
	Timings         *struct {
		CacheN *int `json:"cache_n"`
	} `json:"timings"`
	Error *llamaError `json:"error"`
}

// llamaError is llama-server's error object, the body of an error reply
// and the content of an error event.
type llamaError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Type    string `json:"type"`
}

// err returns the error as an *Error.
func (e *llamaError) err() *Error {
	return &Error{Code: httpCode(e.Code), Reason: e.Type, Err: fmt.Errorf("llama-server: %d %s", e.Code, e.Message)}
}

// httpCode returns the gRPC code that corresponds to an HTTP status, as
// gRPC's and Google's API conventions map them.
func httpCode(status int) codes.Code {
	switch status {
	case http.StatusOK:
		return codes.OK
	case http.StatusBadRequest:
		return codes.InvalidArgument
	case http.StatusUnauthorized:
		return codes.Unauthenticated
	case http.StatusForbidden:
		return codes.PermissionDenied
	case http.StatusNotFound:
		return codes.NotFound
	case http.StatusConflict:
		return codes.Aborted
	case http.StatusRequestEntityTooLarge:
		return codes.OutOfRange
	case http.StatusTooManyRequests:
		return codes.ResourceExhausted
	case 499: // client closed request
		return codes.Canceled
	case http.StatusNotImplemented:
		return codes.Unimplemented
	case http.StatusBadGateway, http.StatusServiceUnavailable:
		return codes.Unavailable
	case http.StatusGatewayTimeout:
		return codes.DeadlineExceeded
	}
	switch {
	case status >= 400 && status < 500:
		return codes.FailedPrecondition
	case status >= 500:
		return codes.Internal
	}
	return codes.Unknown
}

// httpError returns the failure of a reply that is not 200 OK, as an
// *Error with the code of its status and, when its body is llama-server's
// error JSON, that error's type and message.
func httpError(resp *http.Response) *Error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var e struct {
		Error *llamaError `json:"error"`
	}
	if json.Unmarshal(body, &e) == nil && e.Error != nil {
		return &Error{Code: httpCode(resp.StatusCode), Reason: e.Error.Type, Err: fmt.Errorf("HTTP %s: %s", resp.Status, e.Error.Message)}
	}
	msg := strings.TrimSpace(string(body))
	if len(msg) > 200 {
		msg = msg[:200] + "..."
	}
	return &Error{Code: httpCode(resp.StatusCode), Err: fmt.Errorf("HTTP %s: %q", resp.Status, msg)}
}

// transportError classifies a failure to send a request or to read its
// reply: the context's end if it has ended, else the server as unavailable.
func transportError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return &Error{Code: status.FromContextError(ctx.Err()).Code(), Err: err}
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return &Error{Code: status.FromContextError(err).Code(), Err: err}
	}
	return &Error{Code: codes.Unavailable, Err: err}
}

// protocolError is a reply that does not follow llama-server's protocol.
func protocolError(format string, args ...any) error {
	return &Error{Code: codes.Internal, Err: fmt.Errorf("llama-server stream: "+format, args...)}
}

// Generate implements Target with POST /completion, streamed. It returns
// after the stream's end; its errors are *Error values.
func (s *LlamaServer) Generate(ctx context.Context, req Request, ev Events) error {
	body, err := json.Marshal(llamaCompletion{
		Prompt:      req.Prompt.Tokens,
		NPredict:    req.Prompt.OutputTokens,
		IgnoreEOS:   true,
		CachePrompt: !req.NoPrefixCache,
		Stream:      true,
		// kvgate decodes greedily when a request sets no sampling: the
		// cheapest greedy chain of llama-server is top-k 1 alone (its
		// default chain samples at temperature 0.8).
		Samplers: []string{"top_k"},
		TopK:     1,
	})
	if err != nil {
		return fmt.Errorf("encode request: %w", err)
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, s.base+"/completion", bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("new request: %w", err)
	}
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("Accept", "text/event-stream")
	// llama-server closes the connection after every streamed reply (its
	// content provider reports the stream's end as a cancel to
	// cpp-httplib), although the reply says Keep-Alive; a request sent on
	// the closing connection would fail with EOF. So each completion gets a
	// connection of its own, as it would anyway.
	hreq.Close = true
	if req.ID != "" {
		hreq.Header.Set("X-Request-Id", req.ID)
	}
	resp, err := s.client.Do(hreq)
	if err != nil {
		return transportError(ctx, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return httpError(resp)
	}
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt != "text/event-stream" {
		return protocolError("reply of type %q, not text/event-stream", resp.Header.Get("Content-Type"))
	}
	return readLlamaStream(ctx, resp.Body, ev)
}

// readLlamaStream reads a /completion event stream to its end and reports
// its events to ev. It accepts the server-sent events syntax (data, event,
// id and retry fields, comments, data over several lines) but refuses any
// other line, and any data that is not an event of llama-server's, so that
// a change of the protocol shows as INTERNAL failures rather than as wrong
// numbers.
func readLlamaStream(ctx context.Context, r io.Reader, ev Events) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), maxEventBytes)
	var (
		data    []byte
		hasData bool
		seen    int  // tokens reported so far
		stopped bool // the last event has come
	)
	dispatch := func() error {
		payload := data
		data, hasData = data[:0], false
		if string(payload) == "[DONE]" {
			return nil // the OpenAI-style end marker
		}
		if stopped {
			return protocolError("event after the last one: %.100q", payload)
		}
		var e llamaEvent
		if err := json.Unmarshal(payload, &e); err != nil {
			return protocolError("event %.100q: %w", payload, err)
		}
		if e.Error != nil {
			return e.Error.err()
		}
		n := len(e.Tokens)
		if e.TokensPredicted != nil {
			n = *e.TokensPredicted - seen
			if n < 0 {
				return protocolError("tokens_predicted went back from %d to %d", seen, *e.TokensPredicted)
			}
		}
		if n > 0 {
			seen += n
			ev.Tokens(n)
		}
		if e.Stop {
			stopped = true
			if e.Timings != nil && e.Timings.CacheN != nil {
				ev.Cached(*e.Timings.CacheN)
			}
			ev.Finished()
		}
		return nil
	}
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 {
			if hasData {
				if err := dispatch(); err != nil {
					return err
				}
			}
			continue
		}
		if line[0] == ':' {
			continue // a comment
		}
		field, value, found := bytes.Cut(line, []byte(":"))
		if found && len(value) > 0 && value[0] == ' ' {
			value = value[1:]
		}
		switch string(field) {
		case "data":
			if hasData {
				data = append(data, '\n')
			}
			data = append(data, value...)
			hasData = true
		case "event", "id", "retry":
		default:
			return protocolError("line %.100q is not a server-sent event field", line)
		}
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return protocolError("event of more than %d bytes", maxEventBytes)
		}
		return transportError(ctx, err)
	}
	if hasData {
		// The stream ended without the blank line after its last event.
		if err := dispatch(); err != nil {
			return err
		}
	}
	return nil
}

// String returns the server's base URL.
func (s *LlamaServer) String() string { return s.base }
