package service

// This file is the embedding service (kvgate.v1.EmbeddingService): it
// validates and tokenizes a request's inputs, truncates or refuses the long
// ones, hands them to the embedding worker (native.EmbedEngine), and
// normalizes the vectors when asked. Its errors go through toStatus like
// every other call's.

import (
	"context"
	"fmt"
	"math"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"golang.org/x/sync/semaphore"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/native"
)

// Embedder runs embedding requests: native.EmbedEngine, wired by the
// server package, or a fake in tests.
type Embedder interface {
	// Embed queues req and waits for its vectors; see
	// native.EmbedEngine.Embed for its errors.
	Embed(ctx context.Context, req native.EmbedRequest) (native.EmbedResult, error)
	// Stats returns the worker's counters.
	Stats() native.EmbedStats
}

// EmbedModel is what the embedding service needs of the embedding model's
// vocabulary. Its methods are safe for concurrent use.
type EmbedModel interface {
	// Tokenize returns the token ids of text (see llama.Model.Tokenize).
	Tokenize(text string, addSpecial, parseSpecial bool) ([]int32, error)
	// ValidTokens returns the index of the first id outside the
	// vocabulary, or -1.
	ValidTokens(ids []int32) int
	// AddsEndToken reports whether Tokenize with special tokens appends an
	// end or separator token, which truncation keeps last.
	AddsEndToken() bool
}

// Embedding limits' defaults.
const (
	// DefaultMaxEmbedInputs bounds the inputs of one Embed call.
	DefaultMaxEmbedInputs = 256
	// DefaultMaxEmbedInputBytes bounds one text input. Tokenizing costs
	// about 30 bytes of memory per byte of text.
	DefaultMaxEmbedInputBytes = 64 << 10
)

// EmbedConfig configures the embedding service.
type EmbedConfig struct {
	// Path, Architecture, Description, Pooling, Dimensions,
	// TrainingContext and VocabSize describe the model, for
	// GetEmbeddingModelInfo.
	Path, Architecture, Description, Pooling string
	Dimensions, TrainingContext, VocabSize   int
	// MaxInputTokens is the most tokens of one input (the worker's
	// MaxInputTokens).
	MaxInputTokens int
	// MaxInputs bounds the inputs of one call; 0 means
	// DefaultMaxEmbedInputs.
	MaxInputs int
	// MaxInputBytes bounds one text input; 0 means
	// DefaultMaxEmbedInputBytes.
	MaxInputBytes int
	// BatchTokens and MaxQueue are the worker's, for GetEmbeddingModelInfo.
	BatchTokens, MaxQueue int
	// WorkBudget bounds the bytes of text being tokenized at once; 0 means
	// DefaultWorkBudget.
	WorkBudget int
	// MaxRequestIDBytes bounds request_id; 0 means 128.
	MaxRequestIDBytes int
	// Tenant returns the caller's tenant; nil means DefaultTenant for all.
	Tenant func(ctx context.Context) Tenant
	// Observer, when set, receives each call's outcome, for metrics.
	Observer EmbedObserver
}

// EmbedObserver receives the outcome of Embed calls, for metrics. Its
// methods are called on the request's goroutine and must not block.
type EmbedObserver interface {
	// EmbedFinished reports a call's end: its gRPC code name, its inputs,
	// its tokens, the inputs truncated and its time in the queue.
	EmbedFinished(code string, inputs, tokens, truncated int, queueWait time.Duration)
}

// EmbedService implements kvgate.v1.EmbeddingService. A service without an
// embedding model (NewEmbedService with a nil Embedder) answers every call
// with FAILED_PRECONDITION, reason NO_EMBEDDING_MODEL.
type EmbedService struct {
	kvgatev1.UnimplementedEmbeddingServiceServer

	cfg    EmbedConfig
	model  EmbedModel
	engine Embedder
	work   *semaphore.Weighted

	truncated atomic.Uint64
}

// NewEmbedService returns the embedding service over engine running model
// m; with a nil engine (and model), it refuses every call with
// FAILED_PRECONDITION.
func NewEmbedService(cfg EmbedConfig, m EmbedModel, engine Embedder) *EmbedService {
	if cfg.MaxInputs <= 0 {
		cfg.MaxInputs = DefaultMaxEmbedInputs
	}
	if cfg.MaxInputBytes <= 0 {
		cfg.MaxInputBytes = DefaultMaxEmbedInputBytes
	}
	if cfg.WorkBudget <= 0 {
		cfg.WorkBudget = DefaultWorkBudget
	}
	cfg.WorkBudget = max(cfg.WorkBudget, cfg.MaxInputBytes)
	if cfg.MaxRequestIDBytes <= 0 {
		cfg.MaxRequestIDBytes = 128
	}
	if cfg.Tenant == nil {
		cfg.Tenant = func(context.Context) Tenant { return DefaultTenant }
	}
	return &EmbedService{cfg: cfg, model: m, engine: engine, work: semaphore.NewWeighted(int64(cfg.WorkBudget))}
}

// Register registers the embedding service on srv.
func (s *EmbedService) Register(srv grpc.ServiceRegistrar) {
	kvgatev1.RegisterEmbeddingServiceServer(srv, s)
}

// embedLimits are the limits validateEmbed checks.
type embedLimits struct {
	maxInputs, maxInputBytes, maxInputTokens, maxRequestID, vocab int
	addsEnd                                                       bool
}

// embedInput is one validated input.
type embedInput struct {
	ids       []int32
	truncated bool
}

// truncateTokens cuts ids to at most limit tokens. With keepLast (a text
// whose tokenizer appended an end or separator token) the last token
// stays last. It returns ids itself when it fits.
func truncateTokens(ids []int32, limit int, keepLast bool) ([]int32, bool) {
	if len(ids) <= limit {
		return ids, false
	}
	if limit <= 0 {
		return nil, true
	}
	out := make([]int32, limit)
	copy(out, ids[:limit])
	if keepLast && limit >= 2 {
		out[limit-1] = ids[len(ids)-1]
	}
	return out, true
}

// validateEmbed checks req against lim, tokenizes its texts with tokenize,
// and truncates or refuses the inputs that are too long. Every refusal is
// INVALID_ARGUMENT with a BadRequest field violation per input at fault.
func validateEmbed(req *kvgatev1.EmbedRequest, lim embedLimits, tokenize func(string) ([]int32, error)) ([]embedInput, error) {
	var bad []string
	var vs []*errdetails.BadRequest_FieldViolation
	add := func(field, desc string) {
		vs = append(vs, violation(field, desc))
		bad = append(bad, field+": "+desc)
	}
	if len(req.GetRequestId()) > lim.maxRequestID || !utf8.ValidString(req.GetRequestId()) {
		add("request_id", fmt.Sprintf("must be valid UTF-8 of at most %d bytes", lim.maxRequestID))
	}
	trunc := req.GetTruncation()
	switch trunc {
	case kvgatev1.Truncation_TRUNCATION_UNSPECIFIED, kvgatev1.Truncation_TRUNCATION_REFUSE, kvgatev1.Truncation_TRUNCATION_END:
	default:
		add("truncation", fmt.Sprintf("unknown value %d", int32(trunc)))
	}
	n := len(req.GetInputs())
	switch {
	case n == 0:
		add("inputs", "at least one input is required")
	case n > lim.maxInputs:
		add("inputs", fmt.Sprintf("%d inputs, more than the limit of %d", n, lim.maxInputs))
	}
	if len(vs) > 0 {
		return nil, errInvalid(joinViolations(bad), vs...)
	}
	out := make([]embedInput, n)
	for i, in := range req.GetInputs() {
		var ids []int32
		field := fmt.Sprintf("inputs[%d]", i)
		fromText := false
		switch v := in.GetInput().(type) {
		case *kvgatev1.EmbedInput_Text:
			field += ".text"
			switch {
			case v.Text == "":
				add(field, "empty text")
				continue
			case len(v.Text) > lim.maxInputBytes:
				add(field, fmt.Sprintf("%d bytes, more than the limit of %d", len(v.Text), lim.maxInputBytes))
				continue
			}
			var err error
			if ids, err = tokenize(v.Text); err != nil {
				add(field, err.Error())
				continue
			}
			if len(ids) == 0 {
				add(field, "the text has no tokens")
				continue
			}
			fromText = true
		case *kvgatev1.EmbedInput_Tokens:
			field += ".tokens.ids"
			ids = v.Tokens.GetIds()
			if len(ids) == 0 {
				add(field, "empty token list")
				continue
			}
			if len(ids) > lim.maxInputTokens && trunc != kvgatev1.Truncation_TRUNCATION_END {
				break // refused below, before the ids are scanned
			}
			for j, id := range ids[:min(len(ids), lim.maxInputTokens)] {
				if id < 0 || int(id) >= lim.vocab {
					add(field, fmt.Sprintf("ids[%d] = %d outside the vocabulary [0, %d)", j, id, lim.vocab))
					break
				}
			}
		default:
			add(field, "set text or tokens")
			continue
		}
		if len(ids) > lim.maxInputTokens {
			if trunc != kvgatev1.Truncation_TRUNCATION_END {
				add(field, fmt.Sprintf("%d tokens, more than the limit of %d; set truncation TRUNCATION_END to cut it", len(ids), lim.maxInputTokens))
				continue
			}
		}
		out[i].ids, out[i].truncated = truncateTokens(ids, lim.maxInputTokens, fromText && lim.addsEnd)
	}
	if len(vs) > 0 {
		return nil, errInvalid(joinViolations(bad), vs...)
	}
	return out, nil
}

// joinViolations is the status message of a refusal: its violations, the
// first three in full.
func joinViolations(bad []string) string {
	msg := "invalid embedding request: "
	for i, b := range bad {
		if i == 3 {
			msg += fmt.Sprintf("; and %d more", len(bad)-3)
			break
		}
		if i > 0 {
			msg += "; "
		}
		msg += b
	}
	return msg
}

// normalize scales v to unit L2 norm; a zero vector stays zero.
func normalize(v []float32) {
	s := 0.0
	for _, x := range v {
		s += float64(x) * float64(x)
	}
	if s == 0 || math.IsNaN(s) || math.IsInf(s, 0) {
		return
	}
	inv := 1 / math.Sqrt(s)
	for i, x := range v {
		v[i] = float32(float64(x) * inv)
	}
}

// Embed implements kvgatev1.EmbeddingServiceServer.
func (s *EmbedService) Embed(ctx context.Context, req *kvgatev1.EmbedRequest) (*kvgatev1.EmbedResponse, error) {
	var inputs, tokens, truncated int
	var wait time.Duration
	resp, err := s.embed(ctx, req, &inputs, &tokens, &truncated, &wait)
	if s.cfg.Observer != nil {
		s.cfg.Observer.EmbedFinished(status.Code(err).String(), inputs, tokens, truncated, wait)
	}
	return resp, err
}

func (s *EmbedService) embed(ctx context.Context, req *kvgatev1.EmbedRequest, inputs, tokens, truncated *int, wait *time.Duration) (*kvgatev1.EmbedResponse, error) {
	if s.engine == nil {
		return nil, toStatus(ctx, native.ErrNoEmbeddingModel)
	}
	ctx, cancel := endBeforeDeadline(ctx)
	defer cancel()
	tenant := s.cfg.Tenant(ctx)
	text := 0
	for _, in := range req.GetInputs() {
		text += len(in.GetText())
	}
	if text > 0 {
		// Tokenizing is work like Tokenize's: wait for its share.
		w := int64(min(text, s.cfg.WorkBudget))
		if err := s.work.Acquire(ctx, w); err != nil {
			return nil, toStatus(ctx, err)
		}
		defer s.work.Release(w)
	}
	lim := embedLimits{
		maxInputs: s.cfg.MaxInputs, maxInputBytes: s.cfg.MaxInputBytes, maxInputTokens: s.cfg.MaxInputTokens,
		maxRequestID: s.cfg.MaxRequestIDBytes, vocab: s.cfg.VocabSize, addsEnd: s.model.AddsEndToken(),
	}
	in, err := validateEmbed(req, lim, func(t string) ([]int32, error) { return s.model.Tokenize(t, true, false) })
	if err != nil {
		return nil, err
	}
	ids := make([][]int32, len(in))
	for i, x := range in {
		ids[i] = x.ids
		*tokens += len(x.ids)
		if x.truncated {
			*truncated++
		}
	}
	*inputs = len(in)
	res, err := s.engine.Embed(ctx, native.EmbedRequest{
		Inputs: ids, Tenant: tenant.Name, QueueTimeout: time.Duration(req.GetQueueTimeoutMs()) * time.Millisecond,
	})
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	*wait = res.QueueWait
	s.truncated.Add(uint64(*truncated))
	out := &kvgatev1.EmbedResponse{
		Embeddings: make([]*kvgatev1.Embedding, len(in)),
		Usage:      &kvgatev1.EmbedUsage{PromptTokens: uint32(*tokens), QueueMs: float64(res.QueueWait.Microseconds()) / 1000},
	}
	for i, v := range res.Vectors {
		if req.GetNormalize() {
			normalize(v)
		}
		out.Embeddings[i] = &kvgatev1.Embedding{Values: v, Tokens: uint32(len(in[i].ids)), Truncated: in[i].truncated}
	}
	return out, nil
}

// GetEmbeddingModelInfo implements kvgatev1.EmbeddingServiceServer.
func (s *EmbedService) GetEmbeddingModelInfo(ctx context.Context, _ *kvgatev1.GetEmbeddingModelInfoRequest) (*kvgatev1.GetEmbeddingModelInfoResponse, error) {
	if s.engine == nil {
		return nil, toStatus(ctx, native.ErrNoEmbeddingModel)
	}
	c := &s.cfg
	return &kvgatev1.GetEmbeddingModelInfoResponse{
		Path: c.Path, Architecture: c.Architecture, Description: c.Description, Dimensions: uint32(c.Dimensions),
		Pooling: c.Pooling, TrainingContext: uint32(c.TrainingContext), VocabSize: uint32(c.VocabSize),
		MaxInputTokens: uint32(c.MaxInputTokens), MaxInputs: uint32(c.MaxInputs), MaxInputBytes: uint32(c.MaxInputBytes),
		BatchTokens: uint32(c.BatchTokens), MaxQueue: uint32(c.MaxQueue),
	}, nil
}

// GetEmbeddingStats implements kvgatev1.EmbeddingServiceServer.
func (s *EmbedService) GetEmbeddingStats(ctx context.Context, _ *kvgatev1.GetEmbeddingStatsRequest) (*kvgatev1.GetEmbeddingStatsResponse, error) {
	if s.engine == nil {
		return nil, toStatus(ctx, native.ErrNoEmbeddingModel)
	}
	st := s.engine.Stats()
	return &kvgatev1.GetEmbeddingStatsResponse{
		RequestsQueued: uint32(st.Queued), RequestsTotal: st.Requests, InputsTotal: st.Inputs, TokensTotal: st.Tokens,
		EncodeCallsTotal: st.EncodeCalls, TruncatedTotal: s.truncated.Load(), RejectedTotal: st.Rejected,
	}, nil
}

// HasModel reports whether the service has an embedding model.
func (s *EmbedService) HasModel() bool { return s.engine != nil }
