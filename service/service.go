// Package service is kvgate's thin gRPC layer. It validates requests,
// submits them to the engine, which admits them (the allocator's KV cells
// are accounted for before anything is sent to the client) and runs them,
// and streams their tokens back. Domain errors from the allocator and the
// worker are translated to gRPC status here, and only here (see toStatus).
package service

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"golang.org/x/sync/semaphore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/kvgate/kvgate/allocator"
	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/internal/chat"
	"github.com/kvgate/kvgate/native"
)

// Engine admits and runs sequences: native.Engine, wired by the server
// package, or a fake in tests.
type Engine interface {
	// Submit admits req (blocking while it is queued) and starts it. An
	// admission refusal is an *allocator.RejectError, returned before the
	// sequence holds anything.
	Submit(ctx context.Context, req native.Request) (Stream, error)
	// Stats returns a snapshot of the allocator and the worker.
	Stats() Stats
}

// Stream is one running sequence's output, as native.Stream delivers it.
type Stream interface {
	// Events delivers the generated text; it is closed after the last
	// event.
	Events() <-chan native.Event
	// Result says how the sequence ended; it is valid once Events is
	// closed.
	Result() native.Result
	// Results says how each sample ended (GenerateRequest.n), indexed by
	// Event.Index; valid once Events is closed.
	Results() []native.Result
	// Failed reports, without waiting, that every sample has ended with
	// an error.
	Failed() bool
	// CachedTokens is the number of prompt tokens shared from the prefix
	// cache at admission.
	CachedTokens() int
}

// Stats is a snapshot of the allocator and the worker, for GetCacheStats.
type Stats struct {
	Allocator allocator.Stats
	Engine    native.EngineStats
}

// Model is what the service needs of the loaded model.
type Model interface {
	tokenizer
	Detokenize(ids []int32, opts native.DetokenizeOptions) (string, error)
	// AppendPiece appends the text of one valid token to dst.
	AppendPiece(dst []byte, tok int32, renderSpecial, lstrip bool) []byte
}

// Tenant is what the service needs to know of a caller's tenant.
type Tenant struct {
	// Name identifies the tenant; requests of different tenants never
	// share prefix-cache cells, and the allocator shares the pool fairly
	// between tenants.
	Name string
	// MaxPriority is the highest request priority the tenant may use.
	MaxPriority int32
}

// DefaultTenant is the tenant of every call when Config.Tenant is nil.
var DefaultTenant = Tenant{Name: "default", MaxPriority: DefaultMaxPriority}

// DefaultMaxPriority is the default for the highest priority a tenant may
// use.
const DefaultMaxPriority = 10

// Work limits of Tokenize and Detokenize.
const (
	// DefaultMaxTokenizeBytes bounds one Tokenize call's text.
	DefaultMaxTokenizeBytes = 1 << 20
	// DefaultMaxDetokenizeIDs bounds one Detokenize call's ids.
	DefaultMaxDetokenizeIDs = 1 << 18
	// DefaultWorkBudget bounds the tokenizer work in flight at once, in
	// bytes of text (Tokenize, Generate prompts) or of the longest output
	// the ids can spell (Detokenize). Tokenizing costs up to about 40
	// bytes of memory per byte of text (ids, pieces, the response).
	DefaultWorkBudget = 2 << 20
)

// Config holds the parts of the server's configuration that the API
// reports.
type Config struct {
	// Limits bound each request.
	Limits Limits
	// Cells is the KV pool size.
	Cells int
	// MaxSequences bounds running sequences.
	MaxSequences int
	// MaxQueue is the admission queue's capacity.
	MaxQueue int
	// AdmissionPolicy names the allocator's admission policy, "reserve" or
	// "optimistic", for GetModelInfo.
	AdmissionPolicy string
	// PrefixCache reports whether finished sequences leave their cells
	// behind as a prefix cache, for GetModelInfo.
	PrefixCache bool
	// Deterministic reports whether the engine runs in deterministic mode
	// (native.EngineConfig.Deterministic), for GetModelInfo.
	Deterministic bool
	// SystemInfo is llama.cpp's system information, for GetModelInfo.
	SystemInfo string
	// Observer, when set, receives per-request latencies.
	Observer Observer
	// Tenant returns the caller's tenant; nil means DefaultTenant for all.
	// It is called once per call and must not block.
	Tenant func(ctx context.Context) Tenant
	// MaxTokenizeBytes bounds a Tokenize call's text; 0 means
	// DefaultMaxTokenizeBytes.
	MaxTokenizeBytes int
	// MaxDetokenizeIDs bounds a Detokenize call's ids; 0 means
	// DefaultMaxDetokenizeIDs.
	MaxDetokenizeIDs int
	// WorkBudget bounds the tokenizer work in flight; 0 means
	// DefaultWorkBudget. It must be at least MaxTokenizeBytes.
	WorkBudget int
	// Chat renders conversations (GenerateRequest.messages, RenderChat);
	// nil means the model has no usable template, and such requests get
	// FAILED_PRECONDITION (NO_CHAT_TEMPLATE).
	Chat *chat.Template
	// MaxChatMessages bounds the messages of a conversation; 0 means
	// DefaultMaxChatMessages.
	MaxChatMessages int
}

// Observer receives the latencies of Generate calls, for metrics. Its
// methods are called on the request's goroutine and must not block.
type Observer interface {
	// QueueWait is the time from arrival to admission of an admitted call.
	QueueWait(d time.Duration)
	// TimeToFirstToken is the time from arrival to the first chunk sent.
	TimeToFirstToken(d time.Duration)
	// InterToken is the time between two consecutive chunks of a stream.
	InterToken(d time.Duration)
	// Finished reports a call's end: its gRPC code name ("OK" for a
	// finished stream) and its token counts.
	Finished(code string, promptTokens, completionTokens int)
}

type nopObserver struct{}

func (nopObserver) QueueWait(time.Duration)        {}
func (nopObserver) TimeToFirstToken(time.Duration) {}
func (nopObserver) InterToken(time.Duration)       {}
func (nopObserver) Finished(string, int, int)      {}

// Service implements kvgate.v1.GenerateService and kvgate.v1.CacheService.
type Service struct {
	kvgatev1.UnimplementedGenerateServiceServer
	kvgatev1.UnimplementedCacheServiceServer

	cfg      Config
	model    Model
	engine   Engine
	maxPiece int // bytes of the model's longest token text
	work     *semaphore.Weighted
}

// New returns a Service over an engine running model m. It derives the
// limits that depend on the model's vocabulary.
func New(cfg Config, m Model, e Engine) *Service {
	if cfg.Observer == nil {
		cfg.Observer = nopObserver{}
	}
	if cfg.Tenant == nil {
		cfg.Tenant = func(context.Context) Tenant { return DefaultTenant }
	}
	if cfg.MaxTokenizeBytes <= 0 {
		cfg.MaxTokenizeBytes = DefaultMaxTokenizeBytes
	}
	if cfg.MaxDetokenizeIDs <= 0 {
		cfg.MaxDetokenizeIDs = DefaultMaxDetokenizeIDs
	}
	if cfg.WorkBudget <= 0 {
		cfg.WorkBudget = DefaultWorkBudget
	}
	cfg.WorkBudget = max(cfg.WorkBudget, cfg.MaxTokenizeBytes)
	if cfg.MaxChatMessages <= 0 {
		cfg.MaxChatMessages = DefaultMaxChatMessages
	}
	s := &Service{cfg: cfg, model: m, engine: e, work: semaphore.NewWeighted(int64(cfg.WorkBudget))}
	s.maxPiece = longestPiece(m)
	lim := &s.cfg.Limits
	// Every byte of a text ends up in some token's text, so a text longer
	// than max_prompt_tokens times the longest token text can never fit.
	// Twice that, plus room for a BOS, keeps the bound safe.
	prompt := effectiveLimit(lim.MaxPromptTokens, lim.MaxSequenceTokens-1)
	if byTokens := 2*s.maxPiece*prompt + 64; lim.MaxPromptBytes <= 0 || byTokens < lim.MaxPromptBytes {
		lim.MaxPromptBytes = byTokens
	}
	if lim.MaxPenaltyLastN <= 0 || lim.MaxPenaltyLastN > native.MaxPenaltyLastN {
		lim.MaxPenaltyLastN = native.MaxPenaltyLastN
	}
	lim.MaxPenaltyLastN = max(min(lim.MaxPenaltyLastN, lim.MaxSequenceTokens), defaultPenaltyLastN)
	if lim.DefaultMaxTokens > 0 {
		lim.DefaultMaxTokens = min(lim.DefaultMaxTokens, effectiveLimit(lim.MaxCompletionTokens, lim.MaxSequenceTokens-1))
	}
	return s
}

// longestPiece returns the length in bytes of the longest token text of
// m's vocabulary, special tokens rendered.
func longestPiece(m Model) int {
	n := 1
	var buf []byte
	for id := range int32(m.Info().VocabSize) {
		buf = m.AppendPiece(buf[:0], id, true, false)
		n = max(n, len(buf))
	}
	return n
}

// Register registers both services on s.
func (s *Service) Register(srv grpc.ServiceRegistrar) {
	kvgatev1.RegisterGenerateServiceServer(srv, s)
	kvgatev1.RegisterCacheServiceServer(srv, s)
}

func msSince(t time.Time, now time.Time) float64 {
	if t.IsZero() {
		return 0
	}
	return float64(now.Sub(t).Microseconds()) / 1000
}

// CallInfo collects what one Generate call did, for the server's
// per-call log line. An interceptor installs it with WithCallInfo; the
// service fills it in.
type CallInfo struct {
	RequestID        string
	Tenant           string
	PromptTokens     int
	CachedTokens     int
	CompletionTokens int
	QueueWait        time.Duration
}

type callInfoKey struct{}

// WithCallInfo returns a context carrying a fresh CallInfo for the service
// to fill in.
func WithCallInfo(ctx context.Context) (context.Context, *CallInfo) {
	ci := &CallInfo{}
	return context.WithValue(ctx, callInfoKey{}, ci), ci
}

func callInfo(ctx context.Context) *CallInfo {
	if ci, ok := ctx.Value(callInfoKey{}).(*CallInfo); ok {
		return ci
	}
	return &CallInfo{}
}

// Generate admits the request, then streams its tokens. Admission errors
// are returned before any message is sent, so the call ends Trailers-Only
// and gRPC's retry policy can act on it.
func (s *Service) Generate(req *kvgatev1.GenerateRequest, stream grpc.ServerStreamingServer[kvgatev1.GenerateResponse]) error {
	ci := callInfo(stream.Context())
	err := s.generate(req, stream, ci)
	s.cfg.Observer.Finished(status.Code(err).String(), ci.PromptTokens, ci.CompletionTokens)
	return err
}

func (s *Service) generate(req *kvgatev1.GenerateRequest, stream grpc.ServerStreamingServer[kvgatev1.GenerateResponse], ci *CallInfo) error {
	arrived := time.Now()
	// The call ends itself just before its deadline, so that the client,
	// the log and the metrics all see DEADLINE_EXCEEDED rather than the
	// transport's cancellation.
	ctx, cancel := endBeforeDeadline(stream.Context())
	defer cancel()
	tenant := s.cfg.Tenant(ctx)
	ci.Tenant = tenant.Name
	if n := len(req.GetRequestId()); n <= s.cfg.Limits.MaxRequestIDBytes && utf8.ValidString(req.GetRequestId()) {
		ci.RequestID = req.GetRequestId()
	}
	if t := req.GetText(); t != "" {
		// Tokenizing is work like Tokenize's: wait for its share.
		w := int64(min(len(t), s.cfg.WorkBudget))
		if err := s.work.Acquire(ctx, w); err != nil {
			return toStatus(ctx, err)
		}
		defer s.work.Release(w)
	}
	if m := req.GetMessages(); m != nil {
		// Rendering a conversation is tokenizer work too: its contents'
		// bytes, as for a text prompt.
		n := 0
		for _, msg := range m.GetMessages() {
			n += len(msg.GetContent())
		}
		w := int64(min(max(n, 1), s.cfg.WorkBudget))
		if err := s.work.Acquire(ctx, w); err != nil {
			return toStatus(ctx, err)
		}
		defer s.work.Release(w)
	}
	r, err := validateChat(req, s.model, s.cfg.Limits, chatInput{tmpl: s.cfg.Chat, limits: s.chatLimits()})
	if err != nil {
		return toStatus(ctx, err)
	}
	if r.priority > tenant.MaxPriority {
		return toStatus(ctx, &PriorityError{Tenant: tenant.Name, Priority: r.priority, Max: tenant.MaxPriority})
	}
	ci.PromptTokens = len(r.prompt)
	out, err := s.engine.Submit(ctx, native.Request{
		Priority:     r.priority,
		Prompt:       r.prompt,
		MaxTokens:    r.maxTokens,
		Sampling:     r.sampling,
		Stop:         r.stop,
		StopTokens:   r.stopTokens,
		Logprobs:     r.logprobs,
		TopLogprobs:  r.topLogprobs,
		IgnoreEOS:    r.ignoreEOS,
		N:            r.n,
		NoCache:      req.GetSkipPrefixCache(),
		QueueTimeout: time.Duration(req.GetQueueTimeoutMs()) * time.Millisecond,
		Tenant:       tenant.Name,
		CacheSalt:    req.GetCacheSalt(),
	})
	if err != nil {
		var rej *allocator.RejectError
		if errors.As(err, &rej) && rej.Reason == allocator.ReasonNeverFits {
			err = &neverFitsError{RejectError: rej, promptField: r.promptField, promptTokens: len(r.prompt), maxTokens: r.maxTokens, n: r.n}
		}
		return toStatus(ctx, err)
	}
	admitted := time.Now()
	ci.QueueWait = admitted.Sub(arrived)
	s.cfg.Observer.QueueWait(ci.QueueWait)
	cached := out.CachedTokens()
	ci.CachedTokens = cached
	queueMS := msSince(arrived, admitted)
	err = stream.Send(&kvgatev1.GenerateResponse{Event: &kvgatev1.GenerateResponse_Started{Started: &kvgatev1.Started{
		RequestId:          req.GetRequestId(),
		PromptTokens:       uint32(len(r.prompt)),
		CachedPromptTokens: uint32(cached),
		QueueWaitMs:        queueMS,
		DroppedMessages:    uint32(r.dropped),
	}}})
	var last time.Time
	events := out.Events()
	// When the sender falls behind the worker by a quarter of the stream's
	// buffer, it merges the waiting events into one message, so a reader
	// that keeps up with the transport is never cut off for the cost of
	// sending many small messages.
	mergeAt := max(cap(events)/4, 1)
	var m chunkMerger
	for ev := range events {
		if err != nil || out.Failed() {
			continue // drain; the engine ends the sequence when ctx is done
		}
		m.start(ev)
		if len(events) >= mergeAt {
			for n := len(events); n > 0 && err == nil; n-- {
				more, ok := <-events
				if !ok {
					break
				}
				if more.Index != m.index {
					// Another sample's: chunks never mix samples.
					err = stream.Send(s.chunkResponse(&m))
					m.start(more)
					continue
				}
				m.add(more)
			}
		}
		if err == nil {
			err = stream.Send(s.chunkResponse(&m))
		}
		now := time.Now()
		if last.IsZero() {
			s.cfg.Observer.TimeToFirstToken(now.Sub(arrived))
		} else {
			s.cfg.Observer.InterToken(now.Sub(last))
		}
		last = now
	}
	results := out.Results()
	ci.CompletionTokens = 0
	for _, res := range results {
		ci.CompletionTokens += res.CompletionTokens
	}
	if err != nil {
		return err // the transport failed; the client is gone
	}
	// Every sample that ended normally gets its Finished, in index order;
	// the first sample that failed then ends the call with its status.
	var failed error
	for i, res := range results {
		if res.Err != nil {
			if failed == nil {
				failed = res.Err
			}
			continue
		}
		if err := stream.Send(finished(i, res, admitted, queueMS)); err != nil {
			return err
		}
	}
	if failed != nil {
		return toStatus(ctx, failed)
	}
	return nil
}

// finished is the Finished event of sample i, which ended normally with res.
func finished(i int, res native.Result, admitted time.Time, queueMS float64) *kvgatev1.GenerateResponse {
	first := res.FirstToken
	if first.IsZero() {
		first = res.Ended
	}
	var stopToken *int32
	if res.HasStopToken {
		stopToken = &res.StopToken
	}
	return &kvgatev1.GenerateResponse{Event: &kvgatev1.GenerateResponse_Finished{Finished: &kvgatev1.Finished{
		Reason:    finishReason(res.Reason),
		Stop:      res.StopString,
		StopToken: stopToken,
		Index:     uint32(i),
		Usage: &kvgatev1.Usage{
			PromptTokens:     uint32(res.PromptTokens),
			CachedTokens:     uint32(res.CachedTokens),
			CompletionTokens: uint32(res.CompletionTokens),
		},
		Timings: &kvgatev1.Timings{
			QueueMs:   queueMS,
			PrefillMs: msSince(admitted, first),
			DecodeMs:  msSince(first, res.Ended),
		},
	}}}
}

// chunkMerger merges the events of one sample that waited for the sender
// into one Chunk. A chunk of one event uses the event's own text and
// slices, which the engine made for it; merging appends to copies.
type chunkMerger struct {
	index  int
	text   string
	ids    []int32
	lps    []native.TokenLogprob
	merged bool
}

// start begins a chunk with ev.
func (m *chunkMerger) start(ev native.Event) {
	m.index, m.text, m.ids, m.lps, m.merged = ev.Index, ev.Text, ev.Tokens, ev.Logprobs, false
}

// add appends ev, an event of the same sample.
func (m *chunkMerger) add(ev native.Event) {
	if !m.merged {
		m.ids, m.lps, m.merged = slices.Clone(m.ids), slices.Clone(m.lps), true
	}
	m.text += ev.Text
	m.ids = append(m.ids, ev.Tokens...)
	m.lps = append(m.lps, ev.Logprobs...)
}

// chunkResponse is the Chunk event of what m holds.
func (s *Service) chunkResponse(m *chunkMerger) *kvgatev1.GenerateResponse {
	return &kvgatev1.GenerateResponse{Event: &kvgatev1.GenerateResponse_Chunk{Chunk: &kvgatev1.Chunk{
		Text: m.text, TokenIds: m.ids, Index: uint32(m.index), Logprobs: s.logprobs(m.lps),
	}}}
}

// logprobs converts the engine's log-probabilities to the API's, with the
// text of every alternative; nil for none.
func (s *Service) logprobs(lps []native.TokenLogprob) []*kvgatev1.TokenLogprob {
	if len(lps) == 0 {
		return nil
	}
	out := make([]*kvgatev1.TokenLogprob, len(lps))
	for i, lp := range lps {
		top := make([]*kvgatev1.TopLogprob, len(lp.Top))
		for k, t := range lp.Top {
			piece := s.model.AppendPiece(nil, t.Token, true, false)
			top[k] = &kvgatev1.TopLogprob{TokenId: t.Token, Logprob: t.Logprob, Text: strings.ToValidUTF8(string(piece), "\uFFFD")}
			if !utf8.Valid(piece) {
				top[k].Raw = piece
			}
		}
		out[i] = &kvgatev1.TokenLogprob{TokenId: lp.Token, Logprob: lp.Logprob, Top: top}
	}
	return out
}

func finishReason(r native.FinishReason) kvgatev1.FinishReason {
	switch r {
	case native.FinishEOS:
		return kvgatev1.FinishReason_FINISH_REASON_EOS
	case native.FinishLength:
		return kvgatev1.FinishReason_FINISH_REASON_LENGTH
	case native.FinishStop:
		return kvgatev1.FinishReason_FINISH_REASON_STOP
	}
	return kvgatev1.FinishReason_FINISH_REASON_UNSPECIFIED
}

// Tokenize returns the token ids and pieces of a text. Its work counts
// against the server's work budget: when the budget is spent the call is
// refused at once with RESOURCE_EXHAUSTED.
func (s *Service) Tokenize(ctx context.Context, req *kvgatev1.TokenizeRequest) (*kvgatev1.TokenizeResponse, error) {
	text := req.GetText()
	if len(text) > s.cfg.MaxTokenizeBytes {
		return nil, errInvalid("text too long", violation("text", fmt.Sprintf("%d bytes exceed the server's max_tokenize_bytes limit of %d", len(text), s.cfg.MaxTokenizeBytes)))
	}
	w := int64(max(len(text), 1))
	if !s.work.TryAcquire(w) {
		return nil, toStatus(ctx, errWorkBudget)
	}
	defer s.work.Release(w)
	ids, err := s.model.Tokenize(text, req.GetAddSpecial(), req.GetParseSpecial())
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	// The pieces share one backing string: one allocation, not one per
	// token. A piece that is not valid UTF-8 on its own (a byte token) is
	// U+FFFD, as Detokenize renders it.
	var buf []byte
	ends := make([]int, len(ids))
	for i, id := range ids {
		start := len(buf)
		buf = s.model.AppendPiece(buf, id, true, false)
		if !utf8.Valid(buf[start:]) {
			buf = append(buf[:start], "\uFFFD"...)
		}
		ends[i] = len(buf)
	}
	all := string(buf)
	pieces := make([]string, len(ids))
	prev := 0
	for i, end := range ends {
		pieces[i] = all[prev:end]
		prev = end
	}
	return &kvgatev1.TokenizeResponse{Ids: ids, Pieces: pieces}, nil
}

// Detokenize returns the text of token ids, exactly as Generate streams it.
// Its work, the longest text the ids could spell, counts against the
// server's work budget as Tokenize's does.
func (s *Service) Detokenize(ctx context.Context, req *kvgatev1.DetokenizeRequest) (*kvgatev1.DetokenizeResponse, error) {
	ids := req.GetIds()
	if len(ids) > s.cfg.MaxDetokenizeIDs {
		return nil, errInvalid("too many ids", violation("ids", fmt.Sprintf("%d ids exceed the server's max_detokenize_ids limit of %d", len(ids), s.cfg.MaxDetokenizeIDs)))
	}
	if i := s.model.ValidTokens(ids); i >= 0 {
		return nil, errInvalid(fmt.Sprintf("ids[%d] = %d is outside the vocabulary", i, ids[i]),
			violation(fmt.Sprintf("ids[%d]", i), fmt.Sprintf("token id %d is outside the vocabulary [0, %d)", ids[i], s.model.Info().VocabSize)))
	}
	w := int64(min(max(len(ids)*s.maxPiece, 1), s.cfg.WorkBudget))
	if !s.work.TryAcquire(w) {
		return nil, toStatus(ctx, errWorkBudget)
	}
	defer s.work.Release(w)
	text, err := s.model.Detokenize(ids, native.DetokenizeOptions{
		RenderSpecial: req.GetRenderSpecial(), StripLeadingSpace: req.GetStripLeadingSpace(),
	})
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	return &kvgatev1.DetokenizeResponse{Text: text}, nil
}

// GetModelInfo describes the model and the server's limits.
func (s *Service) GetModelInfo(ctx context.Context, _ *kvgatev1.GetModelInfoRequest) (*kvgatev1.GetModelInfoResponse, error) {
	info := s.model.Info()
	tenant := s.cfg.Tenant(ctx)
	return &kvgatev1.GetModelInfoResponse{
		Path:                info.Path,
		Architecture:        info.Architecture,
		Description:         info.Description,
		ParameterCount:      info.ParameterCount,
		SizeBytes:           info.SizeBytes,
		TrainingContext:     uint32(info.TrainingContext),
		VocabSize:           uint32(info.VocabSize),
		HasChatTemplate:     info.HasChatTemplate,
		KvCells:             uint32(s.cfg.Cells),
		MaxSequenceTokens:   uint32(s.cfg.Limits.MaxSequenceTokens),
		MaxStopStrings:      uint32(s.cfg.Limits.MaxStopStrings),
		MaxStopStringBytes:  uint32(s.cfg.Limits.MaxStopStringBytes),
		MaxRunningSequences: uint32(s.cfg.MaxSequences),
		MaxQueue:            uint32(s.cfg.MaxQueue),
		SystemInfo:          s.cfg.SystemInfo,
		MaxPromptTokens:     uint32(effectiveLimit(s.cfg.Limits.MaxPromptTokens, s.cfg.Limits.MaxSequenceTokens-1)),
		MaxCompletionTokens: uint32(effectiveLimit(s.cfg.Limits.MaxCompletionTokens, s.cfg.Limits.MaxSequenceTokens-1)),
		AdmissionPolicy:     s.cfg.AdmissionPolicy,
		PrefixCache:         s.cfg.PrefixCache,
		Deterministic:       s.cfg.Deterministic,
		MaxPromptBytes:      uint32(s.cfg.Limits.MaxPromptBytes),
		MaxPenaltyLastN:     uint32(s.cfg.Limits.MaxPenaltyLastN),
		MaxPriority:         tenant.MaxPriority,
		Tenant:              tenant.Name,
		MaxTokenizeBytes:    uint32(s.cfg.MaxTokenizeBytes),
		MaxDetokenizeIds:    uint32(s.cfg.MaxDetokenizeIDs),
		DefaultMaxTokens:    uint32(max(s.cfg.Limits.DefaultMaxTokens, 0)),
		ChatTemplate:        s.chatTemplateName(),
		MaxChatMessages:     uint32(s.cfg.MaxChatMessages),
		MaxGrammarBytes:     uint32(s.cfg.Limits.grammarBytes()),
		MaxLogprobs:         native.MaxTopLogprobs,
		MaxLogitBias:        uint32(s.cfg.Limits.logitBiasEntries()),
		MaxSamples:          uint32(s.cfg.Limits.samples()),
	}, nil
}

// GetCacheStats returns a snapshot of the allocator and the worker.
func (s *Service) GetCacheStats(ctx context.Context, _ *kvgatev1.GetCacheStatsRequest) (*kvgatev1.GetCacheStatsResponse, error) {
	st := s.engine.Stats()
	a, e := st.Allocator, st.Engine
	return &kvgatev1.GetCacheStatsResponse{
		CellsTotal:            uint32(a.CellsTotal),
		CellsUsed:             uint32(a.CellsUsed),
		CellsReserved:         uint32(a.CellsReserved),
		CellsFree:             uint32(a.CellsFree),
		SequencesRunning:      uint32(a.Running),
		SequencesQueued:       uint32(a.Queued),
		NokvslotTotal:         e.NoKVSlot,
		AdmittedTotal:         a.Admitted,
		RejectedTotal:         a.Rejected,
		DecodeStepsTotal:      e.Steps,
		PrefillTokensTotal:    e.PrefillTokens,
		GeneratedTokensTotal:  e.GeneratedTokens,
		SlowConsumerTotal:     e.SlowConsumers,
		DrainCellsPerSecond:   a.DrainCellsPerSecond,
		CellsCached:           uint32(a.CellsCached),
		CellsShared:           uint32(a.CellsShared),
		SequencesCached:       uint32(a.Cached),
		PrefixHitTokensTotal:  a.PrefixHitTokens,
		PromptTokensTotal:     a.PromptTokens,
		PreemptionsTotal:      a.Preemptions,
		EvictionsTotal:        a.Evictions,
		CellsQueued:           uint32(a.CellsQueued),
		OrderHoldsTotal:       e.Held,
		OrderRelocationsTotal: e.Relocated,
		OrderBreaksTotal:      e.Disordered,
		PaddingTokensTotal:    e.Padded,
		DecodeThreads:         uint32(max(e.Threads, 0)),
		ThreadChangesTotal:    e.ThreadChanges,
		GrammarTokensTotal:    e.GrammarTokens,
		GrammarResamplesTotal: e.GrammarResamples,
	}, nil
}

// chatTemplateName returns the name of the chat template, or "" without
// one.
func (s *Service) chatTemplateName() string {
	if s.cfg.Chat == nil {
		return ""
	}
	return s.cfg.Chat.Name()
}
