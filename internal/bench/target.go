package bench

import (
	"context"
	"errors"
	"fmt"
	"io"

	"google.golang.org/grpc/codes"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// Target is a server that a benchmark drives: kvgate over gRPC
// (NewGRPCTarget) or llama.cpp's llama-server over HTTP (NewLlamaServer).
// Its methods may be called from many goroutines at once.
type Target interface {
	// Info returns the server's bounds on one request, against which the
	// workload is checked, and a description of its model for the report.
	Info(ctx context.Context) (Limits, ModelInfo, error)
	// Generate sends req, reports what its stream brings to ev as it
	// arrives, and returns when the stream has ended. A nil error means the
	// stream ended cleanly; it counts as OK only if ev.Finished was called.
	// A failure is best returned as an *Error, or as a gRPC status error,
	// so that the report can name its code.
	Generate(ctx context.Context, req Request, ev Events) error
}

// StatsTarget is a Target whose server keeps kvgate's GetCacheStats
// counters; Run reports how they changed over the measured window.
type StatsTarget interface {
	Target
	// CacheStats returns the server's counters now.
	CacheStats(ctx context.Context) (*kvgatev1.GetCacheStatsResponse, error)
}

// Request is one request of a benchmark.
type Request struct {
	// ID names the request in the server's logs, where it has a place.
	ID string
	// Prompt is the prompt's token ids and the exact number of tokens to
	// generate: the request ignores end-of-sequence tokens.
	Prompt Prompt
	// NoPrefixCache asks the server not to reuse cached prompt tokens.
	NoPrefixCache bool
}

// Events receives what a Target learns about one request while its stream
// goes on. Its methods are called from the goroutine that called Generate,
// each at the moment the event arrives, since the time of the call is what
// the latencies measure.
type Events interface {
	// Started reports that the server admitted the request after it waited
	// queueWaitMS milliseconds for admission. A Target whose server does
	// not report admission does not call it.
	Started(queueWaitMS float64)
	// Cached reports how many prompt tokens the server reused from its
	// prefix cache.
	Cached(tokens int)
	// Tokens reports n more generated tokens, arrived together.
	Tokens(n int)
	// Finished reports that the stream ended as a complete response: all
	// its tokens were generated.
	Finished()
}

// Error is a failed request as a Target reports it. Its Code names the
// outcome in the report's Status, in the same terms whatever the server's
// protocol, and its Reason, when set, is counted in ErrorReasons.
type Error struct {
	// Code is the gRPC code closest to the failure.
	Code codes.Code
	// Reason is the server's machine-readable name for the failure, such as
	// an ErrorInfo reason or llama-server's error type; it may be empty.
	Reason string
	// Err is the failure.
	Err error
}

// Error returns the code's name, the reason and the failure.
func (e *Error) Error() string {
	s := CodeName(e.Code)
	if e.Reason != "" {
		s += " (" + e.Reason + ")"
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap returns Err.
func (e *Error) Unwrap() error { return e.Err }

// grpcTarget drives kvgate's Generate API.
type grpcTarget struct {
	gen kvgatev1.GenerateServiceClient
}

// grpcStatsTarget is a grpcTarget that also reads GetCacheStats.
type grpcStatsTarget struct {
	grpcTarget
	cache kvgatev1.CacheServiceClient
}

// NewGRPCTarget returns the Target of a kvgate server behind gen. When
// cache is not nil the Target is also a StatsTarget, and the report then
// has the server's counters.
func NewGRPCTarget(gen kvgatev1.GenerateServiceClient, cache kvgatev1.CacheServiceClient) Target {
	t := grpcTarget{gen: gen}
	if cache == nil {
		return t
	}
	return grpcStatsTarget{grpcTarget: t, cache: cache}
}

// Info implements Target with GetModelInfo.
func (t grpcTarget) Info(ctx context.Context) (Limits, ModelInfo, error) {
	info, err := t.gen.GetModelInfo(ctx, &kvgatev1.GetModelInfoRequest{})
	if err != nil {
		return Limits{}, ModelInfo{}, fmt.Errorf("get model info: %w", err)
	}
	lim := Limits{
		VocabSize:           int(info.GetVocabSize()),
		MaxSequenceTokens:   int(info.GetMaxSequenceTokens()),
		MaxPromptTokens:     int(info.GetMaxPromptTokens()),
		MaxCompletionTokens: int(info.GetMaxCompletionTokens()),
	}
	m := ModelInfo{
		Path: info.GetPath(), Description: info.GetDescription(), ParameterCount: info.GetParameterCount(),
		SizeBytes: info.GetSizeBytes(), VocabSize: info.GetVocabSize(), KVCells: info.GetKvCells(),
		MaxRunningSequences: info.GetMaxRunningSequences(), PrefixCache: info.GetPrefixCache(),
		SystemInfo: info.GetSystemInfo(),
	}
	return lim, m, nil
}

// Generate implements Target with a Generate stream; its errors are the
// stream's gRPC status errors.
func (t grpcTarget) Generate(ctx context.Context, req Request, ev Events) error {
	stream, err := t.gen.Generate(ctx, &kvgatev1.GenerateRequest{
		Prompt:          &kvgatev1.GenerateRequest_Tokens{Tokens: &kvgatev1.TokenList{Ids: req.Prompt.Tokens}},
		MaxTokens:       uint32(req.Prompt.OutputTokens),
		IgnoreEos:       true,
		SkipPrefixCache: req.NoPrefixCache,
		RequestId:       req.ID,
	})
	if err != nil {
		return err
	}
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		switch e := resp.GetEvent().(type) {
		case *kvgatev1.GenerateResponse_Started:
			ev.Cached(int(e.Started.GetCachedPromptTokens()))
			ev.Started(e.Started.GetQueueWaitMs())
		case *kvgatev1.GenerateResponse_Chunk:
			if n := len(e.Chunk.GetTokenIds()); n > 0 {
				ev.Tokens(n)
			}
		case *kvgatev1.GenerateResponse_Finished:
			ev.Finished()
		}
	}
}

// CacheStats implements StatsTarget with GetCacheStats.
func (t grpcStatsTarget) CacheStats(ctx context.Context) (*kvgatev1.GetCacheStatsResponse, error) {
	st, err := t.cache.GetCacheStats(ctx, &kvgatev1.GetCacheStatsRequest{})
	if err != nil {
		return nil, fmt.Errorf("get cache stats: %w", err)
	}
	return st, nil
}
