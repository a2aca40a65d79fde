package server

// This file is the whole of the server's wiring of the model, the native
// engine, the allocator and the service: build, and the parts it returns.
// Nothing else in the package knows the engine's or the allocator's types.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/kvgate/kvgate/allocator"
	"github.com/kvgate/kvgate/internal/obs"
	"github.com/kvgate/kvgate/native"
	"github.com/kvgate/kvgate/service"
)

// Sequence-id bounds that Config.Validate checks MaxSeqs against.
const (
	// maxSequenceIDs is the most sequence ids a context has.
	maxSequenceIDs = native.MaxSequenceIDs
	// retiredSequence is the first of the ids Deterministic keeps for
	// itself.
	retiredSequence = native.RetiredSequence
)

// buildDeps are what build wires in beside the Config.
type buildDeps struct {
	security *security
	metrics  *obs.Metrics // nil without MetricsListen
}

// parts are what build makes: the service, and what Server needs of the
// model, the engine and the allocator beneath it, through the methods
// below.
type parts struct {
	svc *service.Service

	// What the "kvgate ready" line says.
	modelPath string
	arch      string
	cells     int
	batch     int

	model  *native.Model
	engine *native.Engine
	alloc  *allocator.Allocator
}

// build loads the model at path and builds the engine, the allocator and
// the service on it. The load stops early when ctx is done.
func build(ctx context.Context, c *Config, log *slog.Logger, path string, d buildDeps) (*parts, error) {
	var opts native.LoadOptions
	if c.Progress != nil {
		opts.Progress = func(f float32) { c.Progress(path, f) }
	}
	start := time.Now()
	model, err := native.LoadModelContext(ctx, path, opts)
	if err != nil {
		return nil, err
	}
	info := model.Info()
	log.Info("model loaded", "path", path, "arch", info.Architecture, "params", info.ParameterCount,
		"vocab", info.VocabSize, "ctx_train", info.TrainingContext, "took", time.Since(start).Round(time.Millisecond))

	ecfg := native.EngineConfig{
		Cells: c.Ctx, Batch: c.Batch, MaxSequences: c.MaxSeqs, Threads: c.Threads, StreamBuffer: c.StreamBuffer,
		KVType: c.KVType, Deterministic: c.Deterministic,
	}
	if d.metrics != nil {
		ecfg.OnStep = d.metrics.OnStep
	}
	engine, err := native.NewEngine(model, ecfg)
	if err != nil {
		model.Close()
		return nil, fmt.Errorf("create llama.cpp context: %w", err)
	}

	policy, err := admissionPolicy(c.Admission)
	if err != nil {
		engine.Close()
		model.Close()
		return nil, err
	}
	limits := service.DefaultLimits()
	limits.MaxStopStrings = c.MaxStop
	limits.MaxSequenceTokens = min(engine.Cells(), info.TrainingContext)
	limits.MaxPromptTokens = c.MaxPromptTokens
	limits.MaxCompletionTokens = c.MaxCompletionTokens
	limits.MaxPromptBytes = c.MaxPromptBytes
	limits.DefaultMaxTokens = c.DefaultMaxTokens
	tenants := tenantPolicy{tokens: d.security.tokens, maxPriority: int32(c.MaxPriority), maxShare: c.TenantMaxShare, maxQueued: c.TenantMaxQueued}
	seqIDs := c.MaxSeqs
	if c.PrefixCache {
		seqIDs = native.MaxSequenceIDs // the ids beyond running ones hold cached prefixes
	}
	alloc, err := allocator.New(allocator.Config{
		Cells:             engine.Cells(),
		MaxSequences:      seqIDs,
		MaxRunning:        c.MaxSeqs,
		MaxQueue:          c.MaxQueue,
		MaxSequenceTokens: limits.MaxSequenceTokens,
		PrefixCache:       c.PrefixCache,
		OnEvict:           engine.Evict,
		Policy:            policy,
		Watermark:         min(c.Watermark, engine.Cells()-1),
		Tenants:           tenants.limits,
		StepRate:          engine.StepRate,
		Batch:             engine.Batch(),
	})
	if err != nil {
		engine.Close()
		model.Close()
		return nil, fmt.Errorf("allocator: %w", err)
	}
	scfg := service.Config{
		Limits: limits, Cells: engine.Cells(), MaxSequences: c.MaxSeqs, MaxQueue: c.MaxQueue,
		AdmissionPolicy: policy.String(), PrefixCache: c.PrefixCache, Deterministic: c.Deterministic,
		Tenant: tenants.of, MaxTokenizeBytes: c.MaxTokenizeBytes, WorkBudget: c.TokenizerBudget,
	}
	if d.metrics != nil {
		scfg.Observer = d.metrics
	}
	scfg.SystemInfo = native.SystemInfo()
	svc := service.New(scfg, model, engineAdapter{alloc: alloc, eng: engine, optimistic: policy == allocator.PolicyOptimistic})
	return &parts{
		svc:       svc,
		modelPath: info.Path,
		arch:      info.Architecture,
		cells:     engine.Cells(),
		batch:     engine.Batch(),
		model:     model,
		engine:    engine,
		alloc:     alloc,
	}, nil
}

// requests returns the requests running and queued.
func (p *parts) requests() (running, queued int) {
	st := p.alloc.Stats()
	return st.Running, st.Queued
}

// stopAdmitting refuses every later request with DRAINING.
func (p *parts) stopAdmitting() { p.alloc.Drain() }

// idle returns a channel closed once no request runs or waits.
func (p *parts) idle() <-chan struct{} { return p.alloc.Idle() }

// stop ends whatever still runs with UNAVAILABLE and frees the cells of
// the prefix cache, which goes with the context; it returns how many
// cells the cache held.
func (p *parts) stop() int {
	p.engine.Close()
	return p.alloc.FlushCache()
}

// close frees the engine and the model. The service must no longer be
// called.
func (p *parts) close() {
	p.engine.Close()
	p.model.Close()
}

// admissionPolicy parses Config.Admission.
func admissionPolicy(s string) (allocator.Policy, error) {
	switch s {
	case "reserve":
		return allocator.PolicyReserve, nil
	case "optimistic":
		return allocator.PolicyOptimistic, nil
	}
	return 0, fmt.Errorf("--admission %q: want reserve or optimistic", s)
}

// limits returns the allocator's view of a tenant.
func (p tenantPolicy) limits(name string) allocator.TenantLimits {
	t := p.tenant(name)
	return allocator.TenantLimits{Weight: t.Weight, MaxShare: t.MaxShare, MaxQueued: t.MaxQueued}
}

// engineAdapter adapts the allocator and the worker to service.Engine.
type engineAdapter struct {
	alloc      *allocator.Allocator
	eng        *native.Engine
	optimistic bool
}

// stream is a running sequence with the prompt tokens its lease found in
// the prefix cache.
type stream struct {
	*native.Stream
	cached int
}

// CachedTokens returns the prompt tokens found in the prefix cache.
func (s stream) CachedTokens() int { return s.cached }

// Submit admits r (blocking while it is queued) and starts it on the
// engine.
func (e engineAdapter) Submit(ctx context.Context, r native.Request) (service.Stream, error) {
	lease, err := e.alloc.Admit(ctx, allocator.Request{
		Prompt: r.Prompt, NoCache: r.NoCache, MaxTokens: r.MaxTokens, Priority: r.Priority,
		QueueTimeout: r.QueueTimeout, Tenant: r.Tenant, CacheSalt: r.CacheSalt,
	})
	if err != nil {
		return nil, err
	}
	r.SeqID = lease.SeqID()
	if e.optimistic {
		r.Ledger = ledger{lease}
	} else {
		r.Ledger = reserveLedger{lease}
	}
	out, err := e.eng.Start(r)
	if err != nil {
		return nil, err
	}
	return stream{out, lease.CachedTokens()}, nil
}

// Stats returns a snapshot of the allocator and the worker.
func (e engineAdapter) Stats() service.Stats {
	return service.Stats{Allocator: e.alloc.Stats(), Engine: e.eng.Stats()}
}

// reserveLedger is the ledger of a reserve-admitted lease, which holds its
// cells from the start.
type reserveLedger struct{ *allocator.Lease }

// ledger is the ledger of an optimistically admitted lease, which grows as
// it generates.
type ledger struct{ *allocator.Lease }

// Grow asks for n more cells, reporting false without error when none are
// free.
func (l ledger) Grow(n int) (bool, error) {
	err := l.Lease.Grow(n)
	if errors.Is(err, allocator.ErrNoCells) {
		return false, nil
	}
	return err == nil, err
}
