package server

// This file wires the embedding model (issue 14): its configuration, the
// cgo encoder context (native/llama) inside the embedding worker (native),
// and the embedding service. A server serves a generation model, an
// embedding model, or both, each with its own context and worker.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/kvgate/kvgate/internal/obs"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/native/llama"
	"github.com/kvgate/kvgate/service"
)

// ModelNone as Config.Model (--model none) serves no generation model:
// the server serves its embedding model only, and generation calls end
// FAILED_PRECONDITION (NO_GENERATION_MODEL).
const ModelNone = "none"

// EmbeddingConfig configures the embedding model and its worker.
type EmbeddingConfig struct {
	// Model is the GGUF embedding model, a BERT-class encoder
	// (--embedding-model; empty: none, and embedding calls end
	// FAILED_PRECONDITION, NO_EMBEDDING_MODEL).
	Model string
	// Batch is the most tokens of one encode call, across the inputs it
	// packs (--embedding-batch): llama.cpp's n_batch and n_ubatch. One
	// input holds at most min(Batch, the model's training context)
	// tokens.
	Batch int
	// MaxSeqs is the most inputs of one encode call (--embedding-max-seqs):
	// llama.cpp's n_seq_max.
	MaxSeqs int
	// MaxQueue is the most embedding requests queued or being encoded
	// (--embedding-max-queue).
	MaxQueue int
	// MaxInputs is the most inputs of one Embed call
	// (--embedding-max-inputs).
	MaxInputs int
	// MaxInputBytes is the longest text input in bytes
	// (--embedding-max-input-bytes).
	MaxInputBytes int
	// Threads is the encoder's CPU thread count (--embedding-threads; 0:
	// as --threads).
	Threads int
}

// DefaultEmbeddingConfig returns the embedding flags' defaults.
func DefaultEmbeddingConfig() EmbeddingConfig {
	return EmbeddingConfig{
		Batch: 512, MaxSeqs: 64, MaxQueue: 256,
		MaxInputs: service.DefaultMaxEmbedInputs, MaxInputBytes: service.DefaultMaxEmbedInputBytes,
	}
}

// maxEmbeddingBatch bounds --embedding-batch: an encoder attends across
// the whole batch at once, with an attention mask of batch² floats.
const maxEmbeddingBatch = 8192

// validate checks the embedding settings; c is the whole Config.
func (e *EmbeddingConfig) validate(c *Config) error {
	switch {
	case c.Model == ModelNone && e.Model == "":
		return errors.New("--model none serves no generation model: it needs --embedding-model")
	case e.Batch < 1 || e.Batch > maxEmbeddingBatch:
		return fmt.Errorf("--embedding-batch %d: must be in [1, %d]", e.Batch, maxEmbeddingBatch)
	case e.MaxSeqs < 1 || e.MaxSeqs > maxSequenceIDs:
		return fmt.Errorf("--embedding-max-seqs %d: must be in [1, %d]", e.MaxSeqs, maxSequenceIDs)
	case e.MaxQueue < 1:
		return fmt.Errorf("--embedding-max-queue %d: must be positive", e.MaxQueue)
	case e.MaxInputs < 1:
		return fmt.Errorf("--embedding-max-inputs %d: must be positive", e.MaxInputs)
	case e.MaxInputBytes < 1 || e.MaxInputBytes > llama.MaxTokenizeBytes:
		return fmt.Errorf("--embedding-max-input-bytes %d: must be in [1, %d]", e.MaxInputBytes, llama.MaxTokenizeBytes)
	case e.Threads < 0:
		return fmt.Errorf("--embedding-threads %d: must be >= 0 (0: as --threads)", e.Threads)
	}
	return nil
}

// embedParts are what buildEmbed makes.
type embedParts struct {
	svc    *service.EmbedService
	model  *llama.Model
	engine *native.EmbedEngine
}

// buildEmbed loads the embedding model, if the Config names one, and
// builds its worker and service; without one it returns a service that
// answers FAILED_PRECONDITION.
func buildEmbed(ctx context.Context, c *Config, log *slog.Logger, d buildDeps) (*embedParts, error) {
	ec := c.Embedding
	if ec.Model == "" {
		return &embedParts{svc: service.NewEmbedService(service.EmbedConfig{}, nil, nil)}, nil
	}
	var opts llama.LoadOptions
	if c.Progress != nil {
		opts.Progress = func(f float32) { c.Progress(ec.Model, f) }
	}
	start := time.Now()
	model, err := llama.LoadEmbeddingModel(ctx, ec.Model, opts)
	if err != nil {
		return nil, fmt.Errorf("--embedding-model: %w", err)
	}
	info := model.Info()
	threads := ec.Threads
	if threads == 0 {
		threads = c.llamaThreads()
	}
	params := llama.EmbedParams{Batch: ec.Batch, MaxSequences: ec.MaxSeqs, Threads: threads}
	pooling := ""
	tenants := tenantPolicy{tokens: d.security.tokens, maxPriority: int32(c.MaxPriority), maxShare: c.TenantMaxShare, maxQueued: c.TenantMaxQueued}
	cfg := native.EmbedConfig{
		Open: func() (native.EmbedBackend, error) {
			ctx, err := llama.NewEmbedContext(model, params)
			if err != nil {
				return nil, err
			}
			pooling = ctx.Pooling()
			return ctx, nil
		},
		Vocab:       model,
		MaxQueue:    ec.MaxQueue,
		Tenants:     tenants.limits,
		TuneThreads: c.TuneThreads,
	}
	if d.metrics != nil {
		cfg.OnEncode = d.metrics.OnEncode
	}
	engine, err := native.NewEmbedEngine(cfg)
	if err != nil {
		model.Close()
		return nil, fmt.Errorf("--embedding-model: create llama.cpp context: %w", err)
	}
	log.Info("embedding model loaded", "path", ec.Model, "arch", info.Architecture, "params", info.ParameterCount,
		"dimensions", engine.Dimensions(), "pooling", pooling, "ctx_train", info.TrainingContext,
		"batch", engine.BatchTokens(), "max_seqs", engine.MaxSequences(), "threads", threads, "took", time.Since(start).Round(time.Millisecond))
	scfg := service.EmbedConfig{
		Path: info.Path, Architecture: info.Architecture, Description: info.Description, Pooling: pooling,
		Dimensions: engine.Dimensions(), TrainingContext: info.TrainingContext, VocabSize: info.VocabSize,
		MaxInputTokens: engine.MaxInputTokens(), MaxInputs: ec.MaxInputs, MaxInputBytes: ec.MaxInputBytes,
		BatchTokens: engine.BatchTokens(), MaxQueue: ec.MaxQueue, WorkBudget: c.TokenizerBudget, Tenant: tenants.of,
	}
	if d.metrics != nil {
		scfg.Observer = d.metrics
		d.metrics.SetEmbedQueue(func() int { return engine.Stats().Queued })
	}
	return &embedParts{svc: service.NewEmbedService(scfg, model, engine), model: model, engine: engine}, nil
}

// requests returns the embedding requests being encoded and queued.
func (e *embedParts) requests() (running, queued int) {
	if e == nil || e.engine == nil {
		return 0, 0
	}
	st := e.engine.Stats()
	return st.Running, st.Queued
}

// stopAdmitting refuses every later embedding request with DRAINING.
func (e *embedParts) stopAdmitting() {
	if e != nil && e.engine != nil {
		e.engine.Drain()
	}
}

// idle returns a channel closed once no embedding request is queued or
// encoded.
func (e *embedParts) idle() <-chan struct{} {
	if e == nil || e.engine == nil {
		return closedChan
	}
	return e.engine.Idle()
}

// close stops the worker (ending what still waits with UNAVAILABLE) and
// frees the model. It is idempotent.
func (e *embedParts) close() {
	if e == nil || e.engine == nil {
		return
	}
	e.engine.Close()
	e.model.Close()
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// bothIdle returns a channel closed once a and b are both closed. Its
// goroutine ends then: the drain closes both workers at the latest.
func bothIdle(a, b <-chan struct{}) <-chan struct{} {
	if a == closedChan {
		return b
	}
	if b == closedChan {
		return a
	}
	out := make(chan struct{})
	go func() {
		<-a
		<-b
		close(out)
	}()
	return out
}

var _ service.EmbedObserver = (*obs.Metrics)(nil)
