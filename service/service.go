// Package service is kvgate's thin gRPC layer. It validates requests, asks
// the allocator for KV cells before anything is sent to the client, hands
// admitted sequences to the native decode worker and streams their tokens
// back. Domain errors from the allocator and the worker are translated to
// gRPC status here, and only here (see toStatus).
package service

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/kvgate/kvgate/allocator"
	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/native"
)

// Admitter admits sequences into the KV-cell pool.
type Admitter interface {
	Admit(ctx context.Context, req allocator.Request) (*allocator.Lease, error)
	Stats() allocator.Stats
}

// Engine runs admitted sequences.
type Engine interface {
	Start(req native.Request) (*native.Stream, error)
	Stats() native.EngineStats
}

// Model is what the service needs of the loaded model.
type Model interface {
	tokenizer
	Detokenize(ids []int32, opts native.DetokenizeOptions) (string, error)
}

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
	// Observer, when set, receives per-request latencies.
	Observer Observer
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

	cfg    Config
	model  Model
	alloc  Admitter
	engine Engine
}

// New returns a Service over an allocator and an engine sharing one model.
func New(cfg Config, m Model, a Admitter, e Engine) *Service {
	if cfg.Observer == nil {
		cfg.Observer = nopObserver{}
	}
	return &Service{cfg: cfg, model: m, alloc: a, engine: e}
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
	ctx := stream.Context()
	arrived := time.Now()
	r, err := validate(req, s.model, s.cfg.Limits)
	if err != nil {
		return err
	}
	ci.PromptTokens = len(r.prompt)
	lease, err := s.alloc.Admit(ctx, allocator.Request{
		Prompt:       r.prompt,
		NoCache:      req.GetSkipPrefixCache(),
		MaxTokens:    r.maxTokens,
		Priority:     r.priority,
		QueueTimeout: time.Duration(req.GetQueueTimeoutMs()) * time.Millisecond,
	})
	if err != nil {
		return toStatus(ctx, err)
	}
	admitted := time.Now()
	ci.QueueWait = admitted.Sub(arrived)
	s.cfg.Observer.QueueWait(ci.QueueWait)
	cached := lease.CachedTokens()
	ci.CachedTokens = cached
	out, err := s.engine.Start(native.Request{
		Ctx:       ctx,
		SeqID:     lease.SeqID(),
		Priority:  r.priority,
		Prompt:    r.prompt,
		MaxTokens: r.maxTokens,
		Sampling:  r.sampling,
		Stop:      r.stop,
		IgnoreEOS: r.ignoreEOS,
		Ledger:    s.ledgerFor(lease),
	})
	if err != nil {
		return toStatus(ctx, err)
	}
	queueMS := msSince(arrived, admitted)
	err = stream.Send(&kvgatev1.GenerateResponse{Event: &kvgatev1.GenerateResponse_Started{Started: &kvgatev1.Started{
		RequestId:          req.GetRequestId(),
		PromptTokens:       uint32(len(r.prompt)),
		CachedPromptTokens: uint32(cached),
		QueueWaitMs:        queueMS,
	}}})
	var last time.Time
	events := out.Events()
	// When the sender falls behind the worker by a quarter of the stream's
	// buffer, it merges the waiting events into one message, so a reader
	// that keeps up with the transport is never cut off for the cost of
	// sending many small messages.
	mergeAt := max(cap(events)/4, 1)
	var text strings.Builder
	var ids []int32
	for ev := range events {
		if err != nil || out.Failed() {
			continue // drain; the engine ends the sequence when ctx is done
		}
		chunk := &kvgatev1.Chunk{Text: ev.Text, TokenIds: ev.Tokens}
		if len(events) >= mergeAt {
			text.Reset()
			text.WriteString(ev.Text)
			ids = append(ids[:0], ev.Tokens...)
			for n := len(events); n > 0; n-- {
				more, ok := <-events
				if !ok {
					break
				}
				text.WriteString(more.Text)
				ids = append(ids, more.Tokens...)
			}
			chunk = &kvgatev1.Chunk{Text: text.String(), TokenIds: slices.Clone(ids)}
		}
		err = stream.Send(&kvgatev1.GenerateResponse{Event: &kvgatev1.GenerateResponse_Chunk{Chunk: chunk}})
		now := time.Now()
		if last.IsZero() {
			s.cfg.Observer.TimeToFirstToken(now.Sub(arrived))
		} else {
			s.cfg.Observer.InterToken(now.Sub(last))
		}
		last = now
	}
	res := out.Result()
	ci.CompletionTokens = res.CompletionTokens
	if err != nil {
		return err // the transport failed; the client is gone
	}
	if res.Err != nil {
		return toStatus(ctx, res.Err)
	}
	first := res.FirstToken
	if first.IsZero() {
		first = res.Ended
	}
	return stream.Send(&kvgatev1.GenerateResponse{Event: &kvgatev1.GenerateResponse_Finished{Finished: &kvgatev1.Finished{
		Reason: finishReason(res.Reason),
		Stop:   res.StopString,
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
	}}})
}

// reserveLedger adapts a lease admitted under the reserve policy: its
// cells are all reserved up front, so the worker need not ask for each
// token's cell (one allocator lock fewer per token).
type reserveLedger struct{ *allocator.Lease }

// ledger adapts a lease admitted under the optimistic policy, which grows
// cell by cell and may be preempted.
type ledger struct{ *allocator.Lease }

// ledgerFor returns the engine's view of lease under the server's policy.
func (s *Service) ledgerFor(lease *allocator.Lease) native.Ledger {
	if s.cfg.AdmissionPolicy == allocator.PolicyOptimistic.String() {
		return ledger{lease}
	}
	return reserveLedger{lease}
}

// Grow asks for n more cells; ok is false when the pool has none left and
// the engine must preempt.
func (l ledger) Grow(n int) (bool, error) {
	err := l.Lease.Grow(n)
	if errors.Is(err, allocator.ErrNoCells) {
		return false, nil
	}
	return err == nil, err
}

var (
	_ native.PrefixLedger = reserveLedger{}
	_ native.PrefixLedger = ledger{}
	_ native.GrowLedger   = ledger{}
)

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

// maxTokenizeBytes bounds the text of one Tokenize call.
const maxTokenizeBytes = 1 << 20

// Tokenize returns the token ids and pieces of a text.
func (s *Service) Tokenize(ctx context.Context, req *kvgatev1.TokenizeRequest) (*kvgatev1.TokenizeResponse, error) {
	if len(req.GetText()) > maxTokenizeBytes {
		return nil, errInvalid("text too long", violation("text", fmt.Sprintf("%d bytes exceed the limit of %d", len(req.GetText()), maxTokenizeBytes)))
	}
	ids, err := s.model.Tokenize(req.GetText(), req.GetAddSpecial(), req.GetParseSpecial())
	if err != nil {
		return nil, toStatus(ctx, err)
	}
	pieces := make([]string, len(ids))
	for i := range ids {
		p, err := s.model.Detokenize(ids[i:i+1], native.DetokenizeOptions{RenderSpecial: true})
		if err != nil {
			return nil, toStatus(ctx, err)
		}
		pieces[i] = p
	}
	return &kvgatev1.TokenizeResponse{Ids: ids, Pieces: pieces}, nil
}

// maxDetokenizeIDs bounds the ids of one Detokenize call.
const maxDetokenizeIDs = 1 << 20

// Detokenize returns the text of token ids, exactly as Generate streams it.
func (s *Service) Detokenize(ctx context.Context, req *kvgatev1.DetokenizeRequest) (*kvgatev1.DetokenizeResponse, error) {
	ids := req.GetIds()
	if len(ids) > maxDetokenizeIDs {
		return nil, errInvalid("too many ids", violation("ids", fmt.Sprintf("%d ids exceed the limit of %d", len(ids), maxDetokenizeIDs)))
	}
	if i := s.model.ValidTokens(ids); i >= 0 {
		return nil, errInvalid(fmt.Sprintf("ids[%d] = %d is outside the vocabulary", i, ids[i]),
			violation(fmt.Sprintf("ids[%d]", i), fmt.Sprintf("token id %d is outside the vocabulary [0, %d)", ids[i], s.model.Info().VocabSize)))
	}
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
		SystemInfo:          native.SystemInfo(),
		MaxPromptTokens:     uint32(effectiveLimit(s.cfg.Limits.MaxPromptTokens, s.cfg.Limits.MaxSequenceTokens-1)),
		MaxCompletionTokens: uint32(effectiveLimit(s.cfg.Limits.MaxCompletionTokens, s.cfg.Limits.MaxSequenceTokens-1)),
		AdmissionPolicy:     s.cfg.AdmissionPolicy,
		PrefixCache:         s.cfg.PrefixCache,
		Deterministic:       s.cfg.Deterministic,
	}, nil
}

// GetCacheStats returns a snapshot of the allocator and the worker.
func (s *Service) GetCacheStats(ctx context.Context, _ *kvgatev1.GetCacheStatsRequest) (*kvgatev1.GetCacheStatsResponse, error) {
	a := s.alloc.Stats()
	e := s.engine.Stats()
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
	}, nil
}
