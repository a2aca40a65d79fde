package bench

import (
	"context"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// behaviour is what the fake server does with the i-th Generate call
// (counting from 0).
type behaviour int

const (
	serve      behaviour = iota // stream every token, then Finished
	refuse                      // RESOURCE_EXHAUSTED with ErrorInfo QUEUE_FULL, no message
	failMid                     // Started, two chunks, then UNAVAILABLE
	incomplete                  // Started and the tokens, but no Finished
)

// fakeServer is a GenerateServiceClient and CacheServiceClient without a
// network: it streams max_tokens token ids per request, in chunks of one
// and two tokens, and keeps counters like the real server's.
type fakeServer struct {
	kvgatev1.GenerateServiceClient // only the methods below are called

	info  *kvgatev1.GetModelInfoResponse
	plan  func(i int) behaviour
	delay time.Duration // before each chunk
	// hold, when set, keeps every chunk back until it is closed, so that
	// a test decides when requests can make progress.
	hold <-chan struct{}
	// onCall, when set, is called with i at the start of the i-th
	// Generate call.
	onCall func(i int)

	calls atomic.Int64
	mu    sync.Mutex
	stats kvgatev1.GetCacheStatsResponse
	reqs  []*kvgatev1.GenerateRequest
}

func newFake(plan func(int) behaviour) *fakeServer {
	if plan == nil {
		plan = func(int) behaviour { return serve }
	}
	return &fakeServer{
		info: &kvgatev1.GetModelInfoResponse{VocabSize: 512, MaxSequenceTokens: 2048, KvCells: 2048, Description: "fake"},
		plan: plan,
	}
}

func (f *fakeServer) GetModelInfo(context.Context, *kvgatev1.GetModelInfoRequest, ...grpc.CallOption) (*kvgatev1.GetModelInfoResponse, error) {
	return f.info, nil
}

func (f *fakeServer) GetCacheStats(context.Context, *kvgatev1.GetCacheStatsRequest, ...grpc.CallOption) (*kvgatev1.GetCacheStatsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := &kvgatev1.GetCacheStatsResponse{
		PromptTokensTotal:    f.stats.PromptTokensTotal,
		PrefillTokensTotal:   f.stats.PrefillTokensTotal,
		GeneratedTokensTotal: f.stats.GeneratedTokensTotal,
		DecodeStepsTotal:     f.stats.DecodeStepsTotal,
		AdmittedTotal:        f.stats.AdmittedTotal,
		RejectedTotal:        map[string]uint64{},
	}
	for k, v := range f.stats.RejectedTotal {
		st.RejectedTotal[k] = v
	}
	return st, nil
}

func (f *fakeServer) cache() kvgatev1.CacheServiceClient { return f }

func (f *fakeServer) Generate(ctx context.Context, req *kvgatev1.GenerateRequest, _ ...grpc.CallOption) (grpc.ServerStreamingClient[kvgatev1.GenerateResponse], error) {
	i := int(f.calls.Add(1) - 1)
	if f.onCall != nil {
		f.onCall(i)
	}
	b := f.plan(i)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reqs = append(f.reqs, req)
	if b == refuse {
		if f.stats.RejectedTotal == nil {
			f.stats.RejectedTotal = map[string]uint64{}
		}
		f.stats.RejectedTotal["QUEUE_FULL"]++
		st, _ := status.New(codes.ResourceExhausted, "queue full").WithDetails(&errdetails.ErrorInfo{Reason: "QUEUE_FULL", Domain: "kvgate"})
		return &fakeStream{ctx: ctx, err: st.Err()}, nil
	}
	n := len(req.GetTokens().GetIds())
	f.stats.AdmittedTotal++
	f.stats.PromptTokensTotal += uint64(n)
	f.stats.PrefillTokensTotal += uint64(n)
	f.stats.DecodeStepsTotal += uint64(req.GetMaxTokens())
	s := &fakeStream{ctx: ctx, delay: f.delay, hold: f.hold, fake: f}
	s.msgs = append(s.msgs, &kvgatev1.GenerateResponse{Event: &kvgatev1.GenerateResponse_Started{Started: &kvgatev1.Started{
		PromptTokens: uint32(n), QueueWaitMs: 0.5,
	}}})
	left := int(req.GetMaxTokens())
	for k := 0; left > 0; k++ {
		size := min(1+k%2, left)
		ids := make([]int32, size)
		s.msgs = append(s.msgs, &kvgatev1.GenerateResponse{Event: &kvgatev1.GenerateResponse_Chunk{Chunk: &kvgatev1.Chunk{Text: "x", TokenIds: ids}}})
		left -= size
		if b == failMid && k == 1 {
			s.err = status.Error(codes.Unavailable, "engine closed")
			return s, nil
		}
	}
	if b == serve {
		s.msgs = append(s.msgs, &kvgatev1.GenerateResponse{Event: &kvgatev1.GenerateResponse_Finished{Finished: &kvgatev1.Finished{
			Reason: kvgatev1.FinishReason_FINISH_REASON_LENGTH,
			Usage:  &kvgatev1.Usage{PromptTokens: uint32(n), CompletionTokens: req.GetMaxTokens()},
		}}})
	}
	return s, nil
}

// fakeStream replays prepared messages, then ends with err (nil: io.EOF).
type fakeStream struct {
	grpc.ClientStream // only Recv and Context are called

	ctx   context.Context
	delay time.Duration
	hold  <-chan struct{}
	fake  *fakeServer
	msgs  []*kvgatev1.GenerateResponse
	err   error
}

func (s *fakeStream) Context() context.Context { return s.ctx }

func (s *fakeStream) Recv() (*kvgatev1.GenerateResponse, error) {
	if err := s.ctx.Err(); err != nil {
		return nil, status.FromContextError(err).Err()
	}
	if len(s.msgs) == 0 {
		if s.err != nil {
			return nil, s.err
		}
		return nil, io.EOF
	}
	m := s.msgs[0]
	s.msgs = s.msgs[1:]
	if c := m.GetChunk(); c != nil {
		if s.hold != nil {
			select {
			case <-s.hold:
			case <-s.ctx.Done():
				return nil, status.FromContextError(s.ctx.Err()).Err()
			}
		}
		if s.delay > 0 {
			select {
			case <-time.After(s.delay):
			case <-s.ctx.Done():
				return nil, status.FromContextError(s.ctx.Err()).Err()
			}
		}
		s.fake.mu.Lock()
		s.fake.stats.GeneratedTokensTotal += uint64(len(c.GetTokenIds()))
		s.fake.mu.Unlock()
	}
	return m, nil
}
