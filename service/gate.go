package service

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
	"github.com/kvgate/kvgate/native"
)

// ReasonModelLoading is the ErrorInfo reason of a call that reached the
// server before its model was ready.
const ReasonModelLoading = "MODEL_LOADING"

// loadingRetryDelay is the retry delay given to calls made while the model
// loads.
const loadingRetryDelay = time.Second

// ErrLoading reports a call made before the model is ready.
var ErrLoading = errors.New("the model is still loading")

// Gate stands in for the kvgate services from the moment the server
// listens until its Service is ready, so that a server can bind its port
// and answer health checks (NOT_SERVING) while the model loads. Until Ready
// is called every call ends UNAVAILABLE with reason MODEL_LOADING and a
// RetryInfo; after it, calls go to the Service.
type Gate struct {
	kvgatev1.UnimplementedGenerateServiceServer
	kvgatev1.UnimplementedCacheServiceServer
	kvgatev1.UnimplementedEmbeddingServiceServer

	svc atomic.Pointer[Service]
	// embed and noGeneration: embed_gate.go (issue 14).
	embed        atomic.Pointer[EmbedService]
	noGeneration atomic.Bool
}

// Register registers both kvgate services on srv, answered by g.
func (g *Gate) Register(srv grpc.ServiceRegistrar) {
	kvgatev1.RegisterGenerateServiceServer(srv, g)
	kvgatev1.RegisterCacheServiceServer(srv, g)
	kvgatev1.RegisterEmbeddingServiceServer(srv, g)
}

// Ready hands every later call to s.
func (g *Gate) Ready(s *Service) { g.svc.Store(s) }

// Service returns the Service given to Ready, or nil before it.
func (g *Gate) Service() *Service { return g.svc.Load() }

func (g *Gate) loading(ctx context.Context) error {
	if g.noGeneration.Load() {
		return toStatus(ctx, native.ErrNoGenerationModel)
	}
	return toStatus(ctx, ErrLoading)
}

// Generate implements kvgatev1.GenerateServiceServer.
func (g *Gate) Generate(req *kvgatev1.GenerateRequest, stream grpc.ServerStreamingServer[kvgatev1.GenerateResponse]) error {
	if s := g.svc.Load(); s != nil {
		return s.Generate(req, stream)
	}
	return g.loading(stream.Context())
}

// Tokenize implements kvgatev1.GenerateServiceServer.
func (g *Gate) Tokenize(ctx context.Context, req *kvgatev1.TokenizeRequest) (*kvgatev1.TokenizeResponse, error) {
	if s := g.svc.Load(); s != nil {
		return s.Tokenize(ctx, req)
	}
	return nil, g.loading(ctx)
}

// Detokenize implements kvgatev1.GenerateServiceServer.
func (g *Gate) Detokenize(ctx context.Context, req *kvgatev1.DetokenizeRequest) (*kvgatev1.DetokenizeResponse, error) {
	if s := g.svc.Load(); s != nil {
		return s.Detokenize(ctx, req)
	}
	return nil, g.loading(ctx)
}

// RenderChat implements kvgatev1.GenerateServiceServer.
func (g *Gate) RenderChat(ctx context.Context, req *kvgatev1.RenderChatRequest) (*kvgatev1.RenderChatResponse, error) {
	if s := g.svc.Load(); s != nil {
		return s.RenderChat(ctx, req)
	}
	return nil, g.loading(ctx)
}

// GetModelInfo implements kvgatev1.GenerateServiceServer.
func (g *Gate) GetModelInfo(ctx context.Context, req *kvgatev1.GetModelInfoRequest) (*kvgatev1.GetModelInfoResponse, error) {
	if s := g.svc.Load(); s != nil {
		return s.GetModelInfo(ctx, req)
	}
	return nil, g.loading(ctx)
}

// GetCacheStats implements kvgatev1.CacheServiceServer.
func (g *Gate) GetCacheStats(ctx context.Context, req *kvgatev1.GetCacheStatsRequest) (*kvgatev1.GetCacheStatsResponse, error) {
	if s := g.svc.Load(); s != nil {
		return s.GetCacheStats(ctx, req)
	}
	return nil, g.loading(ctx)
}
