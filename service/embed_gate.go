package service

import (
	"context"

	kvgatev1 "github.com/kvgate/kvgate/gen/kvgate/v1"
)

// ReadyEmbed hands every later embedding call to s: a service with the
// embedding model, or one without (NewEmbedService with a nil Embedder),
// which answers FAILED_PRECONDITION. Until it is called, embedding calls
// get UNAVAILABLE (MODEL_LOADING).
func (g *Gate) ReadyEmbed(s *EmbedService) { g.embed.Store(s) }

// NoGeneration makes every later generation and cache call end
// FAILED_PRECONDITION (NO_GENERATION_MODEL): the server serves an
// embedding model only.
func (g *Gate) NoGeneration() { g.noGeneration.Store(true) }

// EmbedService returns the service given to ReadyEmbed, or nil before it.
func (g *Gate) EmbedService() *EmbedService { return g.embed.Load() }

func (g *Gate) embedLoading(ctx context.Context) error { return toStatus(ctx, ErrLoading) }

// Embed implements kvgatev1.EmbeddingServiceServer.
func (g *Gate) Embed(ctx context.Context, req *kvgatev1.EmbedRequest) (*kvgatev1.EmbedResponse, error) {
	if s := g.embed.Load(); s != nil {
		return s.Embed(ctx, req)
	}
	return nil, g.embedLoading(ctx)
}

// GetEmbeddingModelInfo implements kvgatev1.EmbeddingServiceServer.
func (g *Gate) GetEmbeddingModelInfo(ctx context.Context, req *kvgatev1.GetEmbeddingModelInfoRequest) (*kvgatev1.GetEmbeddingModelInfoResponse, error) {
	if s := g.embed.Load(); s != nil {
		return s.GetEmbeddingModelInfo(ctx, req)
	}
	return nil, g.embedLoading(ctx)
}

// GetEmbeddingStats implements kvgatev1.EmbeddingServiceServer.
func (g *Gate) GetEmbeddingStats(ctx context.Context, req *kvgatev1.GetEmbeddingStatsRequest) (*kvgatev1.GetEmbeddingStatsResponse, error) {
	if s := g.embed.Load(); s != nil {
		return s.GetEmbeddingStats(ctx, req)
	}
	return nil, g.embedLoading(ctx)
}
